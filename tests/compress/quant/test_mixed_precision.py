"""compress/quant/mixed_precision.py (latency-aware per-layer int8 / fp32); the int8 recipe's depthwise padding.

A MobileNetV3-Small at width 0.5 with random BN statistics (so every bias is non-zero) at 32x32: its
depthwise convs have 8, 40, 72 and 120 channels, so padding has work to do; calibration and holdout data are
random tensors - only structure and bookkeeping are tested here, accuracy is the quantize tests' business.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compress.onnx.export import to_onnx  # noqa: E402
from compress.onnx.padding import INPUT_PAD_SUFFIX  # noqa: E402
from compress.quant.mixed_precision import (  # noqa: E402
    GRAPH_INPUT,
    boundary_tensors,
    greedy_latency_plan,
    layer_units,
    plan,
    transition_ms,
)
from recipes.loader import MixedPrecisionConfig, load_recipe  # noqa: E402

SIZE = 32


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _dw_groups(model: onnx.ModelProto) -> list[int]:
    out = []
    for n in model.graph.node:
        g = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv" and g > 1:
            out.append(g)
    return out


@pytest.fixture(scope="module")
def fp32() -> onnx.ModelProto:
    from compress.models.mobilenetv3 import mobilenet_v3_small

    torch.manual_seed(0)
    model = mobilenet_v3_small(width_mult=0.5, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
        elif isinstance(m, torch.nn.Linear):  # torchvision's init (std 0.01) makes near-zero logits
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
    return to_onnx(model, (SIZE, SIZE))


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32)


def test_the_int8_recipe_pads_depthwise_convs(fp32, tmp_path):
    from compress.quant.core import prepare_float

    q = load_recipe("int8").quantize
    assert q.depthwise_channel_multiple == 16
    prepared = onnx.load(str(prepare_float(fp32, q, tmp_path)))
    assert all(g % 16 == 0 for g in _dw_groups(prepared))
    assert any(nd.name.endswith(INPUT_PAD_SUFFIX) for nd in prepared.graph.node)


# -- units, transitions, the greedy plan ----------------------------------------------------------------------

def _chain() -> onnx.ModelProto:
    """input -> /a/a.0/Conv -> /b/b.0/Conv -> /c/c.0/Conv -> output, 4x8x8 tensors (256 elements)."""
    inits, nodes, prev = [], [], "input"
    for k, name in enumerate("abc"):
        inits.append(numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), f"w{k}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{k}"], [f"t{k}"], name=f"/{name}/{name}.{k}/Conv"))
        prev = f"t{k}"
    vi = [helper.make_tensor_value_info(f"t{k}", TensorProto.FLOAT, [1, 4, 8, 8]) for k in range(2)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("t2", TensorProto.FLOAT, [1, 4, 8, 8])], inits,
                          value_info=vi)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_transitions_are_counted_against_the_plan():
    m = _chain()
    units = layer_units(m)
    assert list(units) == ["a.0", "b.1", "c.2"]
    borders = boundary_tensors(m, units)
    assert borders["a.0"] == [("input", GRAPH_INPUT), ("t0", "b.1")]
    numel = {"input": 256, "t0": 256, "t1": 256, "t2": 256}
    rate = 1e-3  # ms per element
    # b in fp32 between int8 neighbours: a DQ in and a Q out
    assert transition_ms("b.1", set(), borders, numel, rate) == pytest.approx(2 * 0.256)
    # with a already fp32 the input transition disappears
    assert transition_ms("b.1", {"a.0"}, borders, numel, rate) == pytest.approx(0.0)
    # a reads the float input: in fp32 it saves the input QuantizeLinear, pays at its output
    assert transition_ms("a.0", set(), borders, numel, rate) == pytest.approx(0.0)
    # c's output is the float logits: only its input counts
    assert transition_ms("c.2", set(), borders, numel, rate) == pytest.approx(0.256)


def test_greedy_latency_plan_moves_only_units_that_pay_for_their_transitions():
    m = _chain()
    units = layer_units(m)
    borders = boundary_tensors(m, units)
    numel = {"input": 256, "t0": 256, "t1": 256, "t2": 256}
    fp32_ms = {"a.0": 0.1, "b.1": 0.1, "c.2": 0.1}
    int8_ms = {"a.0": 0.05, "b.1": 0.2, "c.2": 0.05}  # int8 is slower only in b, by 0.1 ms
    # b in fp32 needs a DQ in and a Q out: 2 x 0.256 ms > 0.1 ms
    assert greedy_latency_plan(units, fp32_ms, int8_ms, borders, numel, 1e-3, 0.0, max_convs=3)[0] == set()
    # cheaper transitions (2 x 0.0256 ms): b pays for them
    chosen, steps = greedy_latency_plan(units, fp32_ms, int8_ms, borders, numel, 1e-4, 0.01, max_convs=3)
    assert chosen == {"b.1"} and steps == [{"unit": "b.1", "reason": "latency", "gain_ms": pytest.approx(0.0488)}]
    # two candidates, a budget of one conv: the larger gain wins
    int8_ms["a.0"] = 0.3
    assert greedy_latency_plan(units, fp32_ms, int8_ms, borders, numel, 1e-4, 0.01, max_convs=1)[0] == {"a.0"}


# -- the whole plan -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantizer(fp32, tmp_path_factory):
    """(prepared float model, build(extra_excluded) -> int8 model, predict(model) -> logits) with random data."""
    from compress.quant.core import calibrate, prepare_float, quantize_prepared

    wd = tmp_path_factory.mktemp("mp")
    recipe = load_recipe("int8-mixed")
    prepared_path = prepare_float(fp32, recipe.quantize, wd)
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((16, 3, SIZE, SIZE)).astype(np.float32) for _ in range(2)]

    class Reader:
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x}

        def rewind(self):
            self.it = iter(batches)

        def __len__(self):
            return len(batches)

    ranges = calibrate(prepared_path, Reader(), recipe.calibration, wd)
    holdout = rng.standard_normal((32, 3, SIZE, SIZE)).astype(np.float32)

    def build(extra):
        return quantize_prepared(prepared_path, ranges, recipe, wd, extra_excluded=extra).model

    return onnx.load(str(prepared_path)), build, lambda m: _run(m, holdout)


def test_plan_on_unlabeled_data_reports_every_unit(quantizer):
    """Logit SQNR as the criterion on unlabelled data: the all-int8 model of this network reaches 5 dB (a broken
    quantization would not), so the plan keeps it and reports every unit."""
    prepared, build, predict = quantizer
    cfg = MixedPrecisionConfig(enabled=True, sensitivity="sqnr", profile_runs=3)
    p = plan(prepared, build, predict, None, cfg, min_sqnr_db=5.0)
    r = p.report
    assert r["metric"] == "sqnr" and r["meets_tolerance"] and r["score"] >= 5.0
    assert set(r["units"]) == set(layer_units(prepared))
    names = {n.name for n in prepared.graph.node}
    assert set(p.nodes_to_exclude) <= names
    assert r["fp32_convs"] <= int(cfg.max_fp32_fraction * r["convs"])
    assert all(u["precision"] in ("int8", "fp32") for u in r["units"].values())
    assert {s["reason"] for s in r["steps"]} <= {"latency"}
    assert r["profiled_kernel_ms"]["int8_all"] > 0


def test_plan_falls_back_sensitive_units_until_the_budget(quantizer):
    prepared, build, predict = quantizer
    cfg = MixedPrecisionConfig(enabled=True, sensitivity="sqnr", profile_runs=3, max_fp32_fraction=0.1,
                               min_gain_ms=1000.0)  # no latency moves: only accuracy decides
    p = plan(prepared, build, predict, None, cfg, min_sqnr_db=1000.0)  # an SQNR no int8 model reaches
    r = p.report
    assert not r["meets_tolerance"]
    assert r["steps"] and all(s["reason"] == "accuracy" for s in r["steps"])
    assert 0 < r["fp32_convs"] <= int(0.1 * r["convs"])
    assert all("sensitivity" in r["units"][s["unit"]] for s in r["steps"])
    moved = {s["unit"] for s in r["steps"]}
    assert set(r["fp32_units"]) == moved
    units = layer_units(prepared)
    assert sorted(p.nodes_to_exclude) == sorted(n for u in moved for n in units[u].nodes)


def test_plan_keeps_latency_moves_only_when_the_measurement_shows_them(quantizer, monkeypatch):
    """The latency pass's candidate is measured against all-int8: a gain larger than the round-to-round spread
    keeps it (its units in fp32, the measurement in the report), a gain inside the spread reverts it."""
    import eval.latency
    from compress.quant import mixed_precision as mp

    prepared, build, predict = quantizer
    unit = next(iter(layer_units(prepared)))
    monkeypatch.setattr(mp, "greedy_latency_plan", lambda *a, **k: ({unit}, [{"unit": unit, "reason": "latency",
                                                                              "gain_ms": 0.01}]))
    cfg = MixedPrecisionConfig(enabled=True, sensitivity="sqnr", profile_runs=3)

    def measured(all_ms, plan_ms, spread):
        def fake(models, **kw):
            return {"int8_all": {"median": all_ms, "round_medians": [all_ms, all_ms + spread]},
                    "plan": {"median": plan_ms, "round_medians": [plan_ms, plan_ms + spread]}}
        return fake

    monkeypatch.setattr(eval.latency, "measure_interleaved", measured(1.0, 0.8, 0.05))  # gain 0.2 > spread 0.05
    kept = plan(prepared, build, predict, None, cfg, min_sqnr_db=-1000.0)
    check = kept.report["latency_check"]
    assert check["kept"] and check["gain_ms"] == pytest.approx(0.2) and check["round_spread_ms"] == pytest.approx(0.05)
    assert kept.report["fp32_units"] == [unit] and set(kept.nodes_to_exclude) == set(layer_units(prepared)[unit].nodes)
    monkeypatch.setattr(eval.latency, "measure_interleaved", measured(1.0, 0.98, 0.05))  # gain 0.02 < spread
    reverted = plan(prepared, build, predict, None, cfg, min_sqnr_db=-1000.0)
    assert not reverted.report["latency_check"]["kept"] and reverted.nodes_to_exclude == []
    assert reverted.report["steps"][0]["reverted"].startswith("measured plan not faster")


def test_transition_rate_is_the_input_quantize_per_element():
    """The price of one transition comes from the QuantizeLinear of the graph input, not from the slowest
    QuantizeLinear of the profile (a wide fp32 island's)."""
    from compress.quant.mixed_precision import _transition_rate

    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="input_QuantizeLinear"),
             helper.make_node("QuantizeLinear", ["t", "s", "z"], ["tq"], name="t_QuantizeLinear")]
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])
    model = helper.make_model(helper.make_graph(nodes, "g", [inp], []))
    prof = {"by_node": [{"node": "t_QuantizeLinear", "op_type": "QuantizeLinear", "ms": 0.5},  # slowest first
                        {"node": "input_QuantizeLinear", "op_type": "QuantizeLinear", "ms": 0.0192}]}
    assert _transition_rate(prof, model, model, 1) == pytest.approx(2 * 0.0192 / (3 * 8 * 8))


def test_measured_gain_needs_a_margin_beyond_the_spread():
    from compress.quant.mixed_precision import measured_gain

    a = {"median": 1.0, "round_medians": [0.95, 1.0, 1.1]}
    assert measured_gain(a, {"median": 0.9, "round_medians": [0.88, 0.9, 0.92]})["kept"] is False  # 0.1 < 0.15
    r = measured_gain(a, {"median": 0.8, "round_medians": [0.78, 0.8, 0.81]})
    assert r["kept"] is True and r["round_spread_ms"] == pytest.approx(0.15)


def test_recipe_exclusions_are_resolved_once(fp32, tmp_path, monkeypatch):
    """plan_for_recipe resolves the recipe's exclusion patterns once, not once per graph node, and hands the
    resolved node names to the plan."""
    from calibration.datasets import open_dataset
    from compress.quant import mixed_precision as mp
    from compress.quant.core import prepare_float

    recipe = load_recipe("int8-mixed").with_overrides("calibration", size=64)
    recipe = recipe.with_overrides("quantize", nodes_to_exclude=("/features/features.1/*",))
    prepared = prepare_float(fp32, recipe.quantize, tmp_path)
    calls, seen = [], {}
    real = mp.resolve_excluded_nodes
    monkeypatch.setattr(mp, "resolve_excluded_nodes", lambda *a, **k: calls.append(1) or real(*a, **k))

    def fake_plan(prepared, build, predict, labels, cfg, threads=1, batch=1, base_excluded=(), measure=None):
        seen["base"] = list(base_excluded)
        return mp.MixedPlan([], {})

    monkeypatch.setattr(mp, "plan", fake_plan)
    mp.plan_for_recipe(prepared, None, recipe, open_dataset("synthetic", SIZE), tmp_path)
    assert len(calls) == 1
    assert seen["base"] and all(n.startswith("/features/features.1/") for n in seen["base"])


def test_labels_required_for_accuracy_sensitivity():
    from compress.errors import UserError
    from compress.quant.mixed_precision import sensitivity_metric

    assert sensitivity_metric(MixedPrecisionConfig(), has_labels=True) == "accuracy"
    assert sensitivity_metric(MixedPrecisionConfig(), has_labels=False) == "agreement"
    with pytest.raises(UserError, match="synthetic"):
        sensitivity_metric(MixedPrecisionConfig(sensitivity="accuracy"), has_labels=False)


def test_the_stem_pad_runs_on_the_quantized_input(quantizer, x):
    prepared, build, _ = quantizer
    int8 = build([])
    producer = {o: n for n in int8.graph.node for o in n.output}
    pad = next(n for n in int8.graph.node if n.op_type == "Pad")
    q = producer[pad.input[0]]
    assert q.op_type == "QuantizeLinear" and q.input[0] == "input"
    assert pad.input[2] == q.input[2]  # padded with the zero point, i.e. with 0.0
    ref, out = _run(prepared, x), _run(int8, x)
    sqnr = 10 * np.log10((ref ** 2).mean() / ((out - ref) ** 2).mean())
    assert sqnr > 10, sqnr
