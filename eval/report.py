"""Run reports and comparisons: ``report.json`` + ``report.md`` per run, and ``compare`` across runs with the
accuracy/latency Pareto front drawn to ``pareto.png``.

A run report is ``{"variants": [{"name", "file", "is_reference", ...evaluate_onnx fields}, ...], ...extra}``;
"Δ vs float" and "speedup" are taken against the run's reference variant (``is_reference``), which is the
float model the run compressed.  A run may add a ``trajectory`` list (e.g. NetAdapt iterations) of points
with a latency (``latency_ms`` as a number or ``{"median": ...}``) and an accuracy (``top1`` or
``accuracy.top1``); compare draws it as a line.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from compress.errors import UserError
from compress.io import ensure_dir, write_json, write_text, write_with

REPORT_JSON, REPORT_MD, PARETO_PNG = "report.json", "report.md", "pareto.png"
COLUMNS = ("variant", "top-1", "Δ vs float (pt)", "latency median ms (p90)", "speedup vs float", "size",
           "params", "MACs")


# -- the Pareto front -----------------------------------------------------------------------------------

def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (lower latency and higher accuracy are better; a point is
    dominated by one that is at least as good on both and strictly better on one).  Points with a missing or
    non-finite value are never on the front.  Sorted by latency, then index."""
    valid = [i for i, p in enumerate(points) if _finite(p[0]) and _finite(p[1])]
    front = []
    for i in valid:
        li, ai = points[i]
        dominated = any(points[j][0] <= li and points[j][1] >= ai and (points[j][0] < li or points[j][1] > ai)
                        for j in valid if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], i))


# -- field access ---------------------------------------------------------------------------------------

def _top1(v: dict) -> float | None:
    acc = v.get("accuracy")
    value = acc.get("top1") if isinstance(acc, dict) else (acc if _finite(acc) else v.get("top1"))
    return float(value) if _finite(value) else None


def _latency(v: dict) -> float | None:
    lat = v.get("latency_ms")
    value = lat.get("median") if isinstance(lat, dict) else lat
    return float(value) if _finite(value) else None


def _p90(v: dict) -> float | None:
    lat = v.get("latency_ms")
    value = lat.get("p90") if isinstance(lat, dict) else None
    return float(value) if _finite(value) else None


def _reference(variants: Sequence[dict]) -> dict | None:
    refs = [v for v in variants if v.get("is_reference")]
    return refs[0] if refs else None


# -- formatting -----------------------------------------------------------------------------------------

def _si(n: Any, unit: str = "") -> str:
    if not _finite(n):
        return "–"
    for div, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:g}{' ' + unit if unit else ''}"


def _size(n: Any) -> str:
    if not _finite(n):
        return "–"
    for div, suffix in ((2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{int(n)} B"


def _row(v: dict, ref: dict | None) -> list[str]:
    top1, lat, p90 = _top1(v), _latency(v), _p90(v)
    rtop1, rlat = (_top1(ref), _latency(ref)) if ref is not None else (None, None)
    is_ref = ref is not None and v is ref
    if is_ref:
        delta, speed = "ref", "1.00×"
    else:
        delta = f"{100 * (top1 - rtop1):+.2f}" if top1 is not None and rtop1 is not None else "–"
        speed = f"{rlat / lat:.2f}×" if lat and rlat else "–"
    lat_text = "–" if lat is None else f"{lat:.3f}" + (f" ({p90:.3f})" if p90 is not None else "")
    return [str(v.get("name", "?")), "–" if top1 is None else f"{100 * top1:.2f} %", delta, lat_text, speed,
            _size(v.get("size_bytes")), _si(v.get("params")), _macs(v)]


def _macs(v: dict) -> str:
    """The network's MACs, with what the graph executes beside them when padding makes that more."""
    macs, run = v.get("macs"), v.get("macs_executed")
    return _si(macs) + (f" ({_si(run)} executed)" if _finite(run) and _finite(macs) and run != macs else "")


def _table(groups: Sequence[tuple[list[dict], dict | None]]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for variants, ref in groups:
        for v in variants:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _row(v, ref)) + " |")
    return lines


def _machines(variants: Sequence[dict]) -> list[str]:
    seen = []
    for v in variants:
        m = v.get("machine")
        if isinstance(m, dict):
            text = (f"{m.get('cpu')}, {m.get('cores')} cores, ISA {', '.join(m.get('isa') or []) or 'none'}, "
                    f"onnxruntime {m.get('onnxruntime')}, torch {m.get('torch')}")
            if text not in seen:
                seen.append(text)
    return seen


def _settings(variants: Sequence[dict]) -> list[str]:
    seen = []
    for v in variants:
        lat = v.get("latency_ms")
        if isinstance(lat, dict):
            text = f"{lat.get('threads')} thread(s), batch {lat.get('batch')}"
            if text not in seen:
                seen.append(text)
    return seen


def _markdown(title: str, groups: Sequence[tuple[list[dict], dict | None]], notes: Sequence[str] = ()) -> str:
    variants = [v for vs, _ in groups for v in vs]
    lines = [f"# {title}", ""] + _table(groups) + [""]
    settings = _settings(variants)
    if settings:
        lines.append(f"Latency: median (p90) of one forward pass, {'; '.join(settings)}; "
                     "speedup = float median / variant median.")
    machines = _machines(variants)
    if len(machines) == 1:
        lines.append(f"Machine: {machines[0]}.")
    elif machines:
        lines.append("**Warning: latencies were measured on different machines and are not comparable:**")
        lines += [f"- {m}" for m in machines]
    lines += list(notes)
    return "\n".join(lines).rstrip() + "\n"


# -- run reports ----------------------------------------------------------------------------------------

def run_header(command: str, recipe, spec, weights, model_source: str, input_size, dataset: dict) -> dict:
    """The keys every command's report starts with: title, command, recipe, the model it started from and the
    data's identity (``dataset``: ``{"name", "fingerprint"}``)."""
    return {
        "title": f"{command} --recipe {recipe.name}: {spec.arch} @ {input_size[0]}x{input_size[1]} on "
                 f"{dataset['name']}",
        "command": command,
        "recipe": {"name": recipe.name, "source": recipe.source, "file": "recipe.toml"},
        "model": {"arch": spec.arch, "weights": str(weights) if weights else "default", "source": model_source,
                  "input_size": list(input_size), "dataset": dataset["name"],
                  "dataset_fingerprint": dataset["fingerprint"]},
    }


def write_run_report(out_dir: str | os.PathLike, variants: list[dict], extra: dict | None = None,
                     notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``out_dir/report.json`` (``{"variants": variants, **extra}``) and ``out_dir/report.md`` (the table,
    then the markdown lines ``notes``).

    Each variant is ``{"name", "file", "is_reference", ...evaluate_onnx fields}``; the reference (float)
    variant is the baseline of "Δ vs float" and "speedup"."""
    out = ensure_dir(out_dir)
    extra = dict(extra or {})
    if "variants" in extra:
        raise ValueError("extra must not contain 'variants'")
    for v in variants:
        if "name" not in v:
            raise ValueError(f"every variant needs a name, got keys {sorted(v)}")
    json_path = write_json(out / REPORT_JSON, {"variants": list(variants), **extra})
    title = str(extra.get("title") or f"Run {out.resolve().name}")
    md_path = write_text(out / REPORT_MD, _markdown(title, [(list(variants), _reference(variants))], notes))
    return json_path, md_path


def load_run_report(run_dir: str | os.PathLike) -> dict:
    """``run_dir/report.json`` (or the file itself), checked to list its variants."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / REPORT_JSON
    if not path.is_file():
        raise UserError(f"no run report at {path} (every run writes report.json listing its variants)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read run report {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), list):
        raise UserError(f"run report {path} has no 'variants' list")
    for v in data["variants"]:
        if not isinstance(v, dict) or "name" not in v:
            raise UserError(f"run report {path} has a variant without a name")
    return data


def _trajectory_points(traj: Any) -> list[tuple[float, float]]:
    points = []
    for item in traj if isinstance(traj, list) else []:
        if isinstance(item, dict):
            lat, top1 = _latency(item), _top1(item)
            if lat is not None and top1 is not None:
                points.append((lat, top1))
    return points


def plot_pareto(path: str | os.PathLike, variants: Sequence[dict], trajectories: dict[str, list] | None = None,
                title: str = "Accuracy vs measured latency") -> Path:
    """Top-1 against median latency (p90 as an error bar), the Pareto front as a step line, NetAdapt-style
    trajectories as dashed lines; written atomically as PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    pts = [(_latency(v), _top1(v)) for v in variants]
    usable = [i for i, (lat, acc) in enumerate(pts) if lat is not None and acc is not None]
    front = pareto_front(pts)
    for name, traj in (trajectories or {}).items():
        tp = _trajectory_points(traj)
        if tp:
            ax.plot([p[0] for p in tp], [100 * p[1] for p in tp], "--", color="0.6", lw=1, marker=".",
                    label=f"{name} trajectory")
    for i in usable:
        lat, acc = pts[i]
        p90 = _p90(variants[i])
        xerr = [[0], [max(0.0, p90 - lat)]] if p90 is not None else None
        on = i in front
        ax.errorbar([lat], [100 * acc], xerr=xerr, fmt="o", color="C3" if on else "C0", ms=6 if on else 5,
                    capsize=2, lw=0.8)
        ax.annotate(str(variants[i].get("name")), (lat, 100 * acc), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    if front:
        fx = [pts[i][0] for i in front]
        fy = [100 * pts[i][1] for i in front]
        ax.step(fx, fy, where="post", color="C3", lw=1.2, label="Pareto front")
    if not usable:
        ax.text(0.5, 0.5, "no variant has both accuracy and latency", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("latency, median ms (bar to p90)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if front or trajectories:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return write_with(path, lambda tmp: fig.savefig(tmp, format="png"))


def _run_names(dirs: Sequence[str | os.PathLike]) -> list[str]:
    names = [Path(d).resolve().name if Path(d).is_dir() else Path(d).resolve().parent.name for d in dirs]
    counts: dict[str, int] = {}
    out = []
    for n in names:
        counts[n] = counts.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}#{counts[n]}")
    return out


def compare_runs(dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> dict:
    """Gather the variants of the runs in ``dirs`` into ``out_dir``: report.json, report.md and pareto.png.

    Variants are named ``RUN/VARIANT``; "Δ vs float" and "speedup" use each run's own reference.  Returns the
    written report (``variants``, ``runs``, ``pareto_front`` names, ``files``)."""
    if not dirs:
        raise UserError("compare needs at least one run directory")
    loaded = [(d, run, load_run_report(d)) for d, run in zip(dirs, _run_names(dirs))]  # fail before writing
    out = ensure_dir(out_dir)
    groups, trajectories, all_variants, runs = [], {}, [], []
    for d, run, data in loaded:
        base = Path(d) if Path(d).is_dir() else Path(d).parent
        variants = []
        for v in data["variants"]:
            v = dict(v, name=f"{run}/{v['name']}", run=run)
            if isinstance(v.get("file"), str):
                v["file"] = os.path.relpath((base / v["file"]).resolve(), out.resolve())
            variants.append(v)
        groups.append((variants, _reference(variants)))
        all_variants += variants
        runs.append({"name": run, "dir": os.path.relpath(base.resolve(), out.resolve())})
        if data.get("trajectory"):
            trajectories[run] = data["trajectory"]
    front = pareto_front([(_latency(v), _top1(v)) for v in all_variants])
    front_names = [all_variants[i]["name"] for i in front]
    plot_pareto(out / PARETO_PNG, all_variants, trajectories)
    notes = ["", f"Pareto front (accuracy vs latency): {', '.join(front_names) or 'none'}.", "",
             f"![accuracy vs latency]({PARETO_PNG})"]
    md = _markdown("Comparison of " + ", ".join(r["name"] for r in runs), groups, notes)
    write_text(out / REPORT_MD, md)
    report = {"variants": all_variants, "runs": runs, "pareto_front": front_names,
              "files": {"json": REPORT_JSON, "markdown": REPORT_MD, "plot": PARETO_PNG}}
    write_json(out / REPORT_JSON, report)
    return report
