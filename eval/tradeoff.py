"""The trade-off picture: test accuracy against measured latency (one panel per set of latencies timed together),
test accuracy against size, and, in a panel of its own, NetAdapt's search on its holdout.

:func:`tradeoff_panels` turns variants into plain data - each panel's points, error bars, marker areas and Pareto
front - and :func:`render_tradeoff` draws exactly that data with matplotlib (Agg); report.json keeps it, so the
picture can be checked without reading pixels.  Holdout and test accuracy never share an axis: a NetAdapt
trajectory's top-1 is measured on held-out TRAIN images during the search, with latencies of the search's own
measurements; a variant's top-1 is measured on the test split.

Error bars: latency from the slowest to the fastest round median of the interleaved measurement (the round-to-round
spread; p90 when a report has no rounds); accuracy a 95 % binomial interval over the evaluated test images.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from compress.io import write_with

__all__ = ["pareto_front", "finite", "top1", "latency", "latency_range", "latency_panel", "size_panel",
           "holdout_panel", "render_tradeoff", "plot_tradeoff", "MIN_AREA", "MAX_AREA"]

MIN_AREA, MAX_AREA = 25.0, 400.0  # marker areas (points^2) of the smallest and the largest model drawn


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (lower latency and higher accuracy are better; a point is
    dominated by one that is at least as good on both and strictly better on one).  Points with a missing or
    non-finite value are never on the front.  Sorted by latency, then index."""
    valid = [i for i, p in enumerate(points) if finite(p[0]) and finite(p[1])]
    front = []
    for i in valid:
        li, ai = points[i]
        dominated = any(points[j][0] <= li and points[j][1] >= ai and (points[j][0] < li or points[j][1] > ai)
                        for j in valid if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], i))


def top1(v: dict) -> float | None:
    acc = v.get("accuracy")
    value = acc.get("top1") if isinstance(acc, dict) else (acc if finite(acc) else v.get("top1"))
    return float(value) if finite(value) else None


def latency(v: dict) -> float | None:
    lat = v.get("latency_ms")
    value = lat.get("median") if isinstance(lat, dict) else lat
    return float(value) if finite(value) else None


def latency_range(v: dict) -> tuple[float, float] | None:
    """(fastest, slowest) round median of the measurement; (median, p90) without rounds; None without either."""
    lat = v.get("latency_ms") if isinstance(v.get("latency_ms"), dict) else {}
    rounds = [m for m in lat.get("round_medians") or [] if finite(m)]
    if rounds:
        return min(rounds), max(rounds)
    if finite(lat.get("p90")) and finite(lat.get("median")):
        return float(lat["median"]), float(lat["p90"])
    return None


def _accuracy_error(acc: float, images: Any) -> float | None:
    if not finite(images) or images < 1:
        return None
    return 100 * 1.96 * math.sqrt(max(acc * (1 - acc), 0.0) / images)


def _area(size: Any, largest: float) -> float:
    if not finite(size) or largest <= 0:
        return MIN_AREA
    return MIN_AREA + (MAX_AREA - MIN_AREA) * float(size) / largest


def _point(v: dict, x: float, xerr: list[float] | None, images: Any, largest: float) -> dict[str, Any]:
    acc = top1(v)
    return {"name": str(v.get("name")), "x": x, "xerr": xerr, "y": round(100 * acc, 4),
            "yerr": _accuracy_error(acc, images), "size_bytes": v.get("size_bytes"),
            "area": round(_area(v.get("size_bytes"), largest), 2)}


def _with_front(panel: dict[str, Any]) -> dict[str, Any]:
    pts = panel["points"]
    panel["front"] = [pts[i]["name"] for i in pareto_front([(p["x"], p["y"]) for p in pts])]
    return panel


def latency_panel(title: str, variants: Sequence[dict], images: Any = None, largest: float | None = None,
                  note: str = "") -> dict[str, Any]:
    """Test top-1 against median latency of variants timed in one measurement (``largest``: the size that gets
    the largest marker, shared by every panel of a figure)."""
    largest = largest if largest is not None else max((v.get("size_bytes") or 0 for v in variants), default=0)
    points = []
    for v in variants:
        lat, acc = latency(v), top1(v)
        if lat is None or acc is None:
            continue
        rng = latency_range(v)
        xerr = [round(max(0.0, lat - rng[0]), 6), round(max(0.0, rng[1] - lat), 6)] if rng else None
        points.append(_point(v, lat, xerr, (v.get("evaluated_on") or {}).get("images", images), largest))
    return _with_front({"kind": "latency", "title": title, "note": note,
                        "xlabel": "latency, median ms (bar: fastest to slowest round)",
                        "ylabel": "test top-1 (%)", "points": points})


def size_panel(variants: Sequence[dict], images: Any = None, largest: float | None = None) -> dict[str, Any]:
    """Test top-1 against the artifact's size (MiB), every variant with both."""
    largest = largest if largest is not None else max((v.get("size_bytes") or 0 for v in variants), default=0)
    points = [_point(v, round(v["size_bytes"] / 2 ** 20, 6), None, (v.get("evaluated_on") or {}).get("images", images),
                     largest)
              for v in variants if finite(v.get("size_bytes")) and top1(v) is not None]
    return _with_front({"kind": "size", "title": "Accuracy vs model size", "note": "",
                        "xlabel": "size of the deployed file (MiB)", "ylabel": "test top-1 (%)", "points": points})


def holdout_panel(trajectories: dict[str, list[dict]]) -> dict[str, Any]:
    """NetAdapt's searches: holdout (TRAIN) top-1 against the latency the search measured, per iteration."""
    lines = []
    for name, traj in trajectories.items():
        pts = [(latency(p), top1(p) if top1(p) is not None else p.get("holdout_top1")) for p in traj or []
               if isinstance(p, dict)]
        pts = [[x, round(100 * y, 4)] for x, y in pts if finite(x) and finite(y)]
        if pts:
            lines.append({"name": name, "points": pts})
    return {"kind": "holdout", "title": "NetAdapt search (holdout, not the test split)", "lines": lines,
            "note": "top-1 on held-out TRAIN images; latencies from the search's own measurements",
            "xlabel": "latency during the search, median ms", "ylabel": "holdout top-1 (%), TRAIN images"}


def _draw_points(ax, panel: dict[str, Any]) -> None:
    pts = panel["points"]
    front = set(panel["front"])
    for p in pts:
        on = p["name"] in front
        xerr = [[p["xerr"][0]], [p["xerr"][1]]] if p.get("xerr") else None
        yerr = [p["yerr"]] if p.get("yerr") is not None else None
        ax.errorbar([p["x"]], [p["y"]], xerr=xerr, yerr=yerr, fmt="none", ecolor="0.55", lw=0.8, capsize=2)
        ax.scatter([p["x"]], [p["y"]], s=p["area"], color="C3" if on else "C0", alpha=0.75, edgecolors="k",
                   linewidths=0.5, zorder=3)
        ax.annotate(p["name"], (p["x"], p["y"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    if panel["front"]:
        by_name = {p["name"]: p for p in pts}
        fx = [by_name[n]["x"] for n in panel["front"]]
        fy = [by_name[n]["y"] for n in panel["front"]]
        ax.step(fx, fy, where="post", color="C3", lw=1.2, label="Pareto front")
        ax.legend(fontsize=7, loc="lower right")
    if not pts:
        ax.text(0.5, 0.5, "no variant has both values", ha="center", va="center", transform=ax.transAxes)


def render_tradeoff(panels: Sequence[dict[str, Any]], title: str = ""):
    """A matplotlib Figure (Agg) with one axes per panel, in order, drawing exactly the panels' data."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    n = max(1, len(panels))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.6 * cols, 4.6 * rows), dpi=110)
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        if panel["kind"] == "holdout":
            for i, line in enumerate(panel["lines"]):
                ax.plot([p[0] for p in line["points"]], [p[1] for p in line["points"]], "--", marker=".",
                        color=f"C{i + 4}", lw=1, label=f"{line['name']} (holdout)")
            if panel["lines"]:
                ax.legend(fontsize=7, loc="lower right")
        else:
            _draw_points(ax, panel)
        ax.set_title(panel["title"] + (f"\n{panel['note']}" if panel.get("note") else ""), fontsize=9)
        ax.set_xlabel(panel["xlabel"], fontsize=8)
        ax.set_ylabel(panel["ylabel"], fontsize=8)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_tradeoff(path: str | os.PathLike, panels: Sequence[dict[str, Any]], title: str = "") -> Path:
    """:func:`render_tradeoff` written atomically as PNG.  Marker area is proportional to the model's size."""
    fig = render_tradeoff(panels, title)
    return write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
