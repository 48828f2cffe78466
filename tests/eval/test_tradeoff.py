"""The trade-off panels on hand-made variants: error bars from the rounds, marker areas by size, the fronts, and
the holdout panel apart; the figure draws exactly the panels' data."""
from __future__ import annotations

import pytest

from eval.tradeoff import MAX_AREA, MIN_AREA, holdout_panel, latency_panel, render_tradeoff, size_panel


def _v(name, top1, rounds, size, images=1000):
    return {"name": name, "accuracy": {"top1": top1}, "size_bytes": size, "evaluated_on": {"images": images},
            "latency_ms": {"median": sorted(rounds)[len(rounds) // 2], "round_medians": rounds, "measurement": "m"}}


VARIANTS = [_v("fp32", 0.90, [2.0, 2.1, 1.9], 4 * 2 ** 20), _v("int8", 0.89, [1.0, 1.2, 0.9], 2 ** 20),
            _v("slow-int8", 0.85, [3.0, 3.1, 2.9], 2 ** 20)]


def test_latency_panel_points_bars_areas_and_front():
    p = latency_panel("ort-x86", VARIANTS)
    pts = {q["name"]: q for q in p["points"]}
    assert pts["int8"]["x"] == 1.0 and pts["int8"]["xerr"] == pytest.approx([0.1, 0.2])  # fastest / slowest round
    assert pts["int8"]["y"] == pytest.approx(89.0)
    assert pts["int8"]["yerr"] == pytest.approx(100 * 1.96 * (0.89 * 0.11 / 1000) ** 0.5)
    assert pts["fp32"]["area"] == MAX_AREA and MIN_AREA < pts["int8"]["area"] < MAX_AREA / 3
    assert p["front"] == ["int8", "fp32"] and p["ylabel"] == "test top-1 (%)"


def test_size_panel_and_holdout_panel():
    s = size_panel(VARIANTS)
    assert [q["x"] for q in s["points"]] == [4.0, 1.0, 1.0] and s["front"] == ["int8", "fp32"]
    h = holdout_panel({"netadapt": [{"latency_ms": {"median": 2.0}, "top1": 0.8}, {"latency_ms": 1.5, "top1": 0.7},
                                    {"latency_ms": None, "top1": 0.6}]})
    assert h["lines"] == [{"name": "netadapt", "points": [[2.0, 80.0], [1.5, 70.0]]}]
    assert "holdout" in h["ylabel"] and "TRAIN" in h["ylabel"]


def test_the_figure_draws_the_panels_data():
    from matplotlib.collections import PathCollection

    panels = [latency_panel("ort-x86", VARIANTS), size_panel(VARIANTS), holdout_panel({"n": [{"latency_ms": 1.0,
                                                                                               "top1": 0.5}]})]
    fig = render_tradeoff(panels)
    assert len(fig.axes) == 3
    ax = fig.axes[0]
    markers = [c for c in ax.collections if isinstance(c, PathCollection)]
    drawn = sorted(tuple(map(float, c.get_offsets()[0])) for c in markers)
    assert drawn == sorted((q["x"], q["y"]) for q in panels[0]["points"])
    sizes = sorted(float(c.get_sizes()[0]) for c in markers)
    assert sizes == sorted(q["area"] for q in panels[0]["points"])
    step = [ln for ln in ax.lines if ln.get_label() == "Pareto front"][0]
    assert list(step.get_xdata()) == [1.0, 2.0]
    assert fig.axes[2].get_ylabel() == panels[2]["ylabel"] and fig.axes[0].get_ylabel() == "test top-1 (%)"
