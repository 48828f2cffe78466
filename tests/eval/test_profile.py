"""eval/profile.py: onnxruntime's profiler aggregated per op type, node and layer; the fp32 / int8 comparison;
the ``profile`` command."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from eval_helpers import quantize_tiny

from eval.profile import compare_profiles, layer_of, profile_onnx, render_comparison, render_profile, summarize_events


@pytest.mark.parametrize("node, layer", [
    ("/features/features.1/block/block.0/block.0.2/Relu_output_0_nchwc", "features.1.block.0"),  # fused fp32
    ("/features/features.3/block/block.1/block.1.0/Conv_token_62", "features.3.block.1"),  # QLinearConv
    ("/features/features.0/features.0.0/Conv_token_39", "features.0"),  # the stem conv
    ("/features/features.0/features.0.2/HardSwish/Add", "features.0"),  # its h-swish, rewritten
    ("/features/features.4/block/block.2/fc1/Conv", "features.4.block.2"),  # SE block
    ("/features/features.4/Add_output_0_QuantizeLinear", "features.4"),  # residual
    ("/classifier/classifier.0/Gemm", "classifier.0"),
    ("ReorderOutput_token_191", "(graph)"),
    ("input_QuantizeLinear", "(graph)"),
])
def test_layer_of_maps_ort_node_names_to_torch_modules(node, layer):
    assert layer_of(node) == layer


def _events(durations_per_run: list[dict[str, float]], warm: int) -> list[dict]:
    """Profiler events: ``warm`` warm-up runs of 1000 us per kernel, then the given runs."""
    runs = [{k: 1000.0 for k in durations_per_run[0]}] * warm + durations_per_run
    events, t = [], 0.0
    for r in runs:
        start = t
        for name, dur in r.items():
            events.append({"cat": "Node", "name": f"{name}_kernel_time", "ts": t, "dur": dur,
                           "args": {"op_name": name.split("/")[-1].split("_")[0]}})
            t += dur + 1
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": t - start})
        t += 10
    return events


def test_summary_drops_warmup_and_takes_per_kernel_medians():
    runs = [{"/features/features.0/features.0.0/Conv": 10.0, "/classifier/classifier.0/Gemm": 4.0},
            {"/features/features.0/features.0.0/Conv": 12.0, "/classifier/classifier.0/Gemm": 400.0},  # preempted
            {"/features/features.0/features.0.0/Conv": 11.0, "/classifier/classifier.0/Gemm": 4.0}]
    s = summarize_events(_events(runs, warm=2), warmup=2, runs=3)
    assert s["runs"] == 3
    assert s["by_op_type"]["Conv"]["ms"] == pytest.approx(0.011)
    assert s["by_op_type"]["Gemm"]["ms"] == pytest.approx(0.004)  # the median ignores the preempted run
    assert s["kernel_ms"] == pytest.approx(0.015)
    assert s["by_layer"]["features.0"]["ms"] == pytest.approx(0.011)
    assert sum(r["share"] for r in s["by_node"]) == pytest.approx(1.0, abs=1e-3)
    assert s["by_node"][0]["layer"] == "features.0"


def test_profile_of_a_real_model(tiny):
    prof = profile_onnx(tiny[1], threads=1, batch=2, runs=3, warmup=1)
    assert prof["runs"] == 3 and prof["batch"] == 2
    assert "Conv" in prof["by_op_type"] and prof["kernel_ms"] > 0
    assert prof["run_ms"] >= prof["kernel_ms"] * 0.5
    assert any(k.startswith("features.") for k in prof["by_layer"])
    assert sum(v["nodes"] for v in prof["by_op_type"].values()) == len(prof["by_node"])


def test_int8_vs_fp32_comparison_lines_up_layers(tiny, tmp_path):
    int8 = tmp_path / "int8.onnx"
    quantize_tiny(tiny[1], int8)
    profs = {"fp32": profile_onnx(tiny[1], runs=3, warmup=1), "int8": profile_onnx(int8, runs=3, warmup=1)}
    assert "QLinearConv" in profs["int8"]["by_op_type"]
    cmp = compare_profiles(profs)
    assert cmp["reference"] == "fp32"
    layers = {r["layer"]: r for r in cmp["by_layer"]}
    both = [r for r in layers.values() if r["fp32"] > 0 and r["int8"] > 0]
    assert len(both) >= 10  # most layers are found in both profiles despite different fusions and names
    assert all(r["ratio_int8"] == pytest.approx(r["fp32"] / r["int8"], rel=1e-2) for r in both)
    md = render_comparison(cmp)
    assert "| layer | fp32 ms | int8 ms | fp32/int8 |" in md and "QLinearConv" in md
    assert "| op type | ms/run | nodes | share |" in render_profile(profs["int8"], top=3)


def test_profile_rejects_bad_settings(tiny):
    from compress.errors import UserError

    with pytest.raises(UserError, match="runs >= 1"):
        profile_onnx(tiny[1], runs=0)


def test_profile_command(tiny, tmp_path):
    from cli import main

    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["profile", str(tiny[1]), "--reference", str(tiny[1]), "--runs", "2",
                                  "--top", "3", "--json", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "| op type | ms/run | nodes | share |" in r.output and "(reference)" in r.output
    data = json.loads(out.read_text())
    assert set(data) == {"model", "reference", "comparison"}
    assert np.isfinite(data["model"]["kernel_ms"])
