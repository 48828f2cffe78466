"""compare --recipes on a tiny model: one command makes every variant (int8, int8-qat, netadapt, netadapt-int8),
times every variant of a runtime in one interleaved run, evaluates all on one test split and draws them; a rerun
runs and measures nothing; a changed request runs only its sub-run again; compare DIR... of separate runs warns.

The model is an untrained MobileNetV3-Small (width 0.5) at 16x16 on a 300 / 100 image fake Fashion-MNIST, the
recipes are the built-in ones cut to a few steps (tests/compress/prune/test_netadapt.py's set-up), and the
targets are ort-x86 and OpenVINO (ort-arm64's mobile checks cost seconds per artifact and add nothing here).
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
from click.testing import CliRunner
from PIL import Image

from compress.compare import measure
from compress.compare import pipeline as cmp
from compress.errors import UserError
from recipes.loader import load_recipe
from tests.compress.prune.test_netadapt import _fake_fashion_mnist

TARGETS = "ort-x86,openvino"
NAMES = ("int8", "int8-qat", "netadapt", "netadapt-int8")
PRUNE = dict(target_latency_ratio=0.95, finetune_steps=1, batch_size=16, eval_images=100, final_finetune_epochs=0,
             max_iterations=1)


def _recipes(d):
    d.mkdir(exist_ok=True)
    recs = {"int8": load_recipe("int8").with_overrides("calibration", size=32),
            "int8-qat": load_recipe("int8-qat").with_overrides("qat", epochs=1, batch_size=32, freeze_bn_epochs=0.5,
                                                               freeze_observers_epochs=0.75, min_onnx_agreement=0.0)
            .with_overrides("calibration", size=32),
            "netadapt": load_recipe("netadapt").with_overrides("prune", **PRUNE),
            # the search netadapt makes (fp32 latency): netadapt-int8 then quantizes netadapt's network (int8-of)
            "netadapt-int8": load_recipe("netadapt-int8").with_overrides("prune", **PRUNE, latency_precision="fp32")
            .with_overrides("calibration", size=32)}
    for name, rec in recs.items():
        (d / f"{name}.toml").write_text(rec.to_toml())
    return ",".join(str(d / f"{n}.toml") for n in NAMES)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The model, the data and the recipes; quick latency settings for the searches and measurements."""
    import torch

    from compress.models.checkpoint import save_checkpoint
    from compress.models.mobilenetv3 import MobileNetV3, arch_spec

    root = tmp_path_factory.mktemp("compare")
    (root / "fm").mkdir()
    _fake_fashion_mnist(root / "fm", n_train=300, n_test=100)
    torch.manual_seed(0)
    model = MobileNetV3(arch_spec("mobilenet_v3_small", width_mult=0.5, num_classes=10))
    save_checkpoint(root / "seed.pt", model, dataset="fashion-mnist", input_size=16)
    return {"root": root, "recipes": _recipes(root / "recipes"),
            "kw": {"weights": str(root / "seed.pt"), "dataset": f"fashion-mnist:{root / 'fm'}", "input_size": 16,
                   "limit_train": 200, "limit_test": 50, "device": "cpu", "targets": TARGETS}}


@pytest.fixture(scope="module", autouse=True)
def quick(tiny):
    """Quick latency settings for the searches and the measurements, a private cache home."""
    import compress.prune.netadapt as na
    from compress.prune.latency_table import LatencyTable

    class QuickTable(LatencyTable):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "rounds": 1, "round_time_s": 0.002})

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNV3_COMPRESS_HOME", str(tiny["root"] / "home"))
        mp.setattr(na, "LatencyTable", QuickTable)
        mp.setattr(na, "CANDIDATE_DEPTH", 2)
        mp.setattr(na, "MEASURE_ROUNDS", 2)
        mp.setattr("compress.prune.outputs.FINAL_ROUNDS", 2)
        mp.setattr(measure, "ROUNDS", 3)
        mp.setattr(measure, "ROUND_TIME_S", 0.01)
        yield


@pytest.fixture(scope="module")
def first(tiny, quick):
    """One compare run from nothing: (its report, its output directory, its progress lines, its seconds)."""
    lines: list[str] = []
    out = tiny["root"] / "out"
    t = time.time()
    report = cmp.compare_recipes(tiny["recipes"], out, log=lines.append, progress=True, **tiny["kw"])
    return report, out, lines, time.time() - t


def _by(report, runtime):
    return {v["name"]: v for v in report["variants"] if v["runtime"] == runtime}


def test_one_command_makes_every_variant_and_times_each_runtime_in_one_run(first):
    report, out, lines, _ = first
    assert [r["status"] for r in report["runs"]] == ["ran"] * 4
    assert [r["kind"] for r in report["runs"]] == ["quantize", "quantize", "prune", "int8-of"]
    ort, ov = _by(report, "ort-x86"), _by(report, "openvino")
    assert {"fp32", "int8", "int8-qat", "netadapt", "netadapt-int8"} <= set(ort)
    assert {"fp32", "fp32 (bf16)", "netadapt", "int8", "int8-qat", "netadapt-int8"} <= set(ov)
    # every variant of a runtime in ONE interleaved measurement: one id, the same rounds
    for runtime, rows in (("ort-x86", ort), ("openvino", ov)):
        m = report["measurements"][runtime]
        assert {v["latency_ms"]["measurement"] for v in rows.values()} == {m["id"]}
        assert {len(v["latency_ms"]["round_medians"]) for v in rows.values()} == {m["rounds"]} == {3}
        assert sorted(m["variants"]) == sorted(rows) and not m["reused"]
    assert report["measurements"]["ort-x86"]["id"] != report["measurements"]["openvino"]["id"]
    # one test split for all: the sub-runs' numbers where they match, the others evaluated here
    split = report["evaluation"]
    assert split["images"] == 50 and all(v["evaluated_on"] == split for v in report["variants"])
    assert ov["fp32"]["accuracy_from"] == "evaluated by compare"
    assert ort["int8"]["accuracy_from"] == "runs/int8/report.json"
    # netadapt-int8 quantized netadapt's pruned network: one search, its params are the pruned ones
    assert ort["netadapt-int8"]["params"] == ort["netadapt"]["params"] < ort["fp32"]["params"]
    assert ort["netadapt-int8"]["agreement_vs"] == "netadapt"
    # the outputs, and one progress line per stage with the time left
    for f in ("report.json", "report.md", "report.html", "pareto.png", "plan.json", "measurements.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "report.json").read_text())["variants"] == report["variants"]
    md = (out / "report.md").read_text()
    assert "| netadapt-int8 | ort-x86 | int8 |" in md and "## What was run" in md and "Wall time:" in md
    assert f"measurement `{report['measurements']['ort-x86']['id']}`" in md
    stages = [ln for ln in lines if ln.startswith("compare [")]
    assert len(stages) == 10 and stages[-1].endswith("done") and "left" in stages[1]
    assert [ln.split("] ")[1].split(":")[0] for ln in stages] == [
        "model", "run int8", "run int8-qat", "run netadapt", "run netadapt-int8", "variants", "latency ort-x86",
        "latency openvino", "accuracy", "report"]


def test_the_picture_is_the_measured_data_and_keeps_holdout_apart(first):
    from matplotlib.collections import PathCollection

    from eval.tradeoff import render_tradeoff

    report, out, _, _ = first
    panels = report["plot"]["panels"]
    assert [p["kind"] for p in panels] == ["latency", "latency", "size", "holdout"]
    assert [p.get("runtime") for p in panels[:2]] == ["ort-x86", "openvino"]
    for p in panels[:2]:
        rows = _by(report, p["runtime"])
        assert {q["name"] for q in p["points"]} == set(rows)
        for q in p["points"]:
            v = rows[q["name"]]
            assert q["x"] == v["latency_ms"]["median"] and q["y"] == pytest.approx(100 * v["accuracy"]["top1"])
            assert q["xerr"] == pytest.approx([q["x"] - min(v["latency_ms"]["round_medians"]),
                                              max(v["latency_ms"]["round_medians"]) - q["x"]], abs=1e-6)
        assert p["front"] == report["pareto_fronts"][p["runtime"]] and p["front"]
    sizes = {q["name"]: q for q in panels[2]["points"]}
    assert sizes["int8"]["area"] < sizes["fp32"]["area"]  # marker area follows the model's size
    holdout = panels[3]
    assert holdout["lines"][0]["name"] == "netadapt" and "holdout" in holdout["ylabel"]
    # what matplotlib is given: the same points; the test axes carry no trajectory
    fig = render_tradeoff(panels)
    for ax, p in zip(fig.axes, panels):
        if p["kind"] == "holdout":
            assert "holdout" in ax.get_ylabel() and len(ax.lines) == len(p["lines"])
            continue
        assert ax.get_ylabel() == "test top-1 (%)"
        drawn = sorted(tuple(map(float, c.get_offsets()[0])) for c in ax.collections if isinstance(c, PathCollection))
        assert drawn == sorted((q["x"], q["y"]) for q in p["points"])
        assert not any("holdout" in ln.get_label() for ln in ax.lines)
    with Image.open(out / "pareto.png") as img:
        assert img.format == "PNG" and img.size[0] > 1000


def test_a_rerun_runs_and_measures_nothing_and_takes_seconds(first, tiny, monkeypatch, tmp_path):
    report, out, _, took = first
    again = tmp_path / "again"
    shutil.copytree(out, again)

    def fail(*a, **k):
        raise AssertionError("a rerun ran something")

    monkeypatch.setattr(cmp, "RUNNERS", {k: fail for k in cmp.RUNNERS})
    monkeypatch.setattr(measure, "interleave", fail)
    monkeypatch.setattr(measure, "test_logits", fail)
    t = time.time()
    second = cmp.compare_recipes(tiny["recipes"], again, progress=False, **tiny["kw"])
    assert time.time() - t < min(10.0, took / 3)
    assert [r["status"] for r in second["runs"]] == ["reused"] * 4
    assert all(m["reused"] for m in second["measurements"].values())
    assert second["variants"] == report["variants"]  # the same numbers, measurement ids included


def test_other_runtimes_floats_come_from_the_right_network_and_are_reused(first):
    """ExecuTorch and LiteRT build their floats from torch: the pruned row's network is netadapt's checkpoint, not
    the start model; a float another compare built from the same source is read back, not built again."""
    report, out, _, _ = first
    ort = _by(report, "ort-x86")
    pruned = measure._torch_float(ort["netadapt"], out, start_model=None)
    assert sum(p.numel() for p in pruned.parameters()) == ort["netadapt"]["params"] < ort["fp32"]["params"]
    assert measure._torch_float(ort["fp32"], out, start_model="the start model") == "the start model"
    index = json.loads((out / measure.ARTIFACTS_INDEX).read_text())
    assert set(index) == {"openvino/fp32", "openvino/netadapt"}
    entry, source = index["openvino/netadapt"], measure._float_source_digest(ort["netadapt"], out)
    built = measure._reuse_built(entry, source, out)
    assert built and built["fp32"] == (out / entry["files"]["fp32"]["file"]).read_bytes()
    assert measure._reuse_built(entry, "another source", out) is None


def test_a_changed_request_runs_only_that_subrun_and_an_interrupted_one_again(first, tiny, monkeypatch, tmp_path):
    _, out, _, _ = first
    again = tmp_path / "changed"
    shutil.copytree(out, again)
    ran = []
    runners = dict(cmp.RUNNERS)
    monkeypatch.setattr(cmp, "RUNNERS", {k: (lambda f: lambda sub, o: ran.append(sub.name) or f(sub, o))(f)
                                         for k, f in runners.items()})
    (tiny["root"] / "changed").mkdir()
    spec = tiny["recipes"].replace(str(tiny["root"] / "recipes" / "int8.toml"), str(tiny["root"] / "changed" / "int8.toml"))
    (tiny["root"] / "changed" / "int8.toml").write_text(load_recipe("int8").with_overrides("calibration", size=16).to_toml())
    plan = json.loads((again / "plan.json").read_text())
    plan["runs"]["netadapt-int8"]["status"] = "running"  # as if it had been interrupted
    (again / "plan.json").write_text(json.dumps(plan))
    before = json.loads((again / "report.json").read_text())["measurements"]
    report = cmp.compare_recipes(spec, again, progress=False, **tiny["kw"])
    assert ran == ["int8", "netadapt-int8"]
    assert [r["status"] for r in report["runs"]] == ["ran", "reused", "reused", "ran"]
    calibrated = json.loads((again / "runs" / "int8" / "report.json").read_text())["calibration"]["images"]
    assert calibrated == 16
    # new artifacts: each runtime measured again, every variant in that one new measurement
    for runtime, m in report["measurements"].items():
        assert not m["reused"] and m["id"] != before[runtime]["id"]
        assert {v["latency_ms"]["measurement"] for v in report["variants"] if v["runtime"] == runtime} == {m["id"]}


def test_compare_dirs_of_separate_runs_warns_and_the_cli_checks_its_arguments(first, tmp_path):
    import cli

    _, out, _, _ = first
    # netadapt's own run timed its variants; the comparison timed ort-x86 and OpenVINO: three measurements
    res = CliRunner().invoke(cli.main, ["compare", str(out / "runs" / "netadapt"), str(out), "-o", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert "Warning: latencies come from 3 separate measurements (timed in separate runs" in res.stderr
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["pareto_front"] is None
    assert [g["label"] for g in report["latency_groups"]] == ["netadapt", "out ort-x86", "out openvino"]
    assert [p["kind"] for p in report["plot"]["panels"]] == ["latency"] * 3 + ["size", "holdout"]
    assert "out/int8@openvino" in {v["name"] for v in report["variants"]}
    assert "**Warning: latencies come from 3 separate measurements" in (tmp_path / "d" / "report.md").read_text()
    for args, message in ((["-o", str(tmp_path / "x")], "give either run directories"),
                          ([str(out), "--recipes", "int8", "-o", str(tmp_path / "x")], "give either run directories"),
                          ([str(out), "--limit-test", "5", "-o", str(tmp_path / "x")], "--limit-test applies with")):
        res = CliRunner().invoke(cli.main, ["compare", *args])
        assert res.exit_code == 2 and message in res.stderr, res.output
    with pytest.raises(UserError, match="asked for twice"):
        cmp.compare_recipes("int8,int8", tmp_path / "y")
