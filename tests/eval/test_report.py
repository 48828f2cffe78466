"""Pareto front on hand-made points; run reports and comparisons render (table, valid PNG)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from compress.errors import UserError
from eval.report import compare_runs, pareto_front, write_run_report


def test_pareto_front_by_hand():
    points = [(1.0, 0.50),   # 0 fastest                              -> front
              (2.0, 0.70),   # 1                                      -> front
              (1.5, 0.40),   # 2 slower and worse than 0              -> dominated
              (3.0, 0.70),   # 3 same accuracy as 1, slower           -> dominated
              (4.0, 0.90),   # 4 most accurate                        -> front
              (2.0, 0.60),   # 5 same latency as 1, worse             -> dominated
              (None, 0.99),  # 6 no latency                           -> never on the front
              (0.5, float("nan"))]  # 7 no accuracy
    assert pareto_front(points) == [0, 1, 4]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # equal points do not dominate each other
    assert pareto_front([]) == []


def _variant(name, top1, median, ref=False, size=1_000_000):
    return {"name": name, "file": f"model_{name}.onnx", "is_reference": ref,
            "accuracy": {"top1": top1, "top5": min(1.0, top1 + 0.05)}, "agreement": None if ref else 0.98,
            "latency_ms": {"median": median, "p90": median * 1.1, "mean": median, "std": 0.01, "min": median * 0.9,
                           "threads": 1, "batch": 1, "runs": 100},
            "size_bytes": size, "params": 2_542_856, "macs": 56_510_400,
            "machine": {"cpu": "Test CPU", "cores": 2, "isa": ["avx2"], "onnxruntime": "1.32.0", "torch": "2.13.0"}}


def _run(tmp_path, name, variants, **extra):
    d = tmp_path / name
    write_run_report(d, variants, extra)
    return d


def test_run_report_table(tmp_path):
    variants = [_variant("fp32", 0.900, 2.0, ref=True, size=4_000_000), _variant("int8", 0.885, 1.0)]
    json_path, md_path = write_run_report(tmp_path / "run", variants, {"recipe": "int8"})
    data = json.loads(json_path.read_text())
    assert data["recipe"] == "int8" and [v["name"] for v in data["variants"]] == ["fp32", "int8"]
    md = md_path.read_text()
    assert "| variant | top-1 | Δ vs float (pt) | latency median ms (p90) | speedup vs float | size | params | MACs |" in md
    assert "| fp32 | 90.00 % | ref | 2.000 (2.200) | 1.00× | 3.81 MiB | 2.54 M | 56.51 M |" in md
    assert "| int8 | 88.50 % | -1.50 | 1.000 (1.100) | 2.00× | 976.56 KiB | 2.54 M | 56.51 M |" in md
    assert "Machine: Test CPU, 2 cores" in md


def test_compare_of_separate_runs_warns_and_draws_no_front_across_them(tmp_path):
    """Two runs timed their latencies separately: the report says so, and each run gets its own front and panel;
    the NetAdapt-style trajectory (holdout accuracy) is drawn in its own panel, not on the test axis."""
    a = _run(tmp_path, "runA", [_variant("fp32", 0.90, 2.0, ref=True), _variant("int8", 0.89, 1.0)],
             trajectory=[{"latency_ms": 1.8, "top1": 0.9}, {"latency_ms": {"median": 1.4}, "accuracy": {"top1": 0.88}}])
    b = _run(tmp_path, "runB", [_variant("fp32", 0.91, 2.1, ref=True), _variant("pruned", 0.80, 1.5)])
    out = tmp_path / "cmp"
    report = compare_runs([a, b], out)
    assert [v["name"] for v in report["variants"]] == ["runA/fp32", "runA/int8", "runB/fp32", "runB/pruned"]
    assert report["pareto_front"] is None  # no front across separate measurements
    assert [(g["label"], g["pareto_front"]) for g in report["latency_groups"]] == [
        ("runA", ["runA/int8", "runA/fp32"]), ("runB", ["runB/pruned", "runB/fp32"])]
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / report["variants"][0]["file"]).resolve() == (a / "model_fp32.onnx").resolve()
    md = (out / "report.md").read_text()
    assert "| runB/pruned | 80.00 % | -11.00 | 1.500 (1.650) | 1.40× |" in md
    assert "**Warning: latencies come from 2 separate measurements (timed in separate runs: runA, runB)" in md
    assert "- Pareto front within runA: runA/int8, runA/fp32." in md
    assert report["warnings"] and "separate measurements" in report["warnings"][0]
    panels = report["plot"]["panels"]
    assert [p["kind"] for p in panels] == ["latency", "latency", "size", "holdout"]
    assert [p["name"] for p in panels[0]["points"]] == ["runA/fp32", "runA/int8"]  # the trajectory is not here
    assert [p["name"] for p in panels[1]["points"]] == ["runB/fp32", "runB/pruned"]
    assert panels[3]["lines"] == [{"name": "runA", "points": [[1.8, 90.0], [1.4, 88.0]]}]
    assert "holdout" in panels[3]["ylabel"] and "test" in panels[0]["ylabel"]
    with Image.open(out / "pareto.png") as img:
        img.verify()
    with Image.open(out / "pareto.png") as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200


def test_compare_draws_one_front_for_latencies_of_one_measurement(tmp_path):
    variants = [_variant("fp32", 0.90, 2.0, ref=True), _variant("int8", 0.89, 1.0), _variant("slow", 0.85, 3.0)]
    for v in variants:
        v["latency_ms"]["measurement"] = "m1"
    report = compare_runs([_run(tmp_path, "run", variants)], tmp_path / "out")
    assert report["pareto_front"] == ["run/int8", "run/fp32"] and report["warnings"] == []
    assert len(report["latency_groups"]) == 1
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Pareto front (accuracy vs latency): run/int8, run/fp32." in md and "Warning" not in md
    # the same measurement id on another machine is another measurement
    other = [dict(v, machine={**v["machine"], "cpu": "Other CPU"}) for v in variants[:2]]
    report = compare_runs([_run(tmp_path, "run", variants), _run(tmp_path, "other", other)], tmp_path / "out2")
    assert report["pareto_front"] is None and "on different machines" in report["warnings"][0]


def test_compare_without_accuracy_still_renders(tmp_path):
    v = _variant("fp32", 0.9, 2.0, ref=True)
    v["accuracy"] = {"top1": None, "top5": None}
    report = compare_runs([_run(tmp_path, "synthetic", [v])], tmp_path / "out")
    assert report["pareto_front"] == []
    with Image.open(tmp_path / "out" / "pareto.png") as img:
        img.verify()


def test_compare_errors_and_cli(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run report"):
        compare_runs([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read run report"):
        compare_runs([tmp_path / "bad"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # a failed compare leaves nothing behind
    import cli

    run = _run(tmp_path, "run", [_variant("fp32", 0.9, 2.0, ref=True)])
    res = CliRunner().invoke(cli.main, ["compare", str(run), "--output-dir", str(tmp_path / "cli_out")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli_out" / "report.md").is_file() and (tmp_path / "cli_out" / "pareto.png").is_file()
    res = CliRunner().invoke(cli.main, ["compare", str(tmp_path / "empty"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and res.stderr.startswith("Error: no run report")
