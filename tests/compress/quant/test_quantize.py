"""int8 quantization: calibration methods, fixed qparams, checks, tuning loop, the CLI.

One tiny model serves every test (tests/compress/quant/tiny_trained.py): MobileNetV3-Small trained for 20 steps on
two well-separated Fashion-MNIST classes.  Agreement is measured on test images of those classes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tomllib
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibration.datasets import open_dataset  # noqa: E402
from calibration.reader import TrainSplitReader  # noqa: E402
from compress.errors import UserError  # noqa: E402
from compress.onnx.export import to_onnx  # noqa: E402
from compress.onnx.graph import op_counts  # noqa: E402
from compress.quant.checks import int8_checks, int8_conv_stats  # noqa: E402
from compress.quant.core import calibrate, prepare_float, quantize_prepared, range_dict  # noqa: E402
from compress.quant.cpu import cpu_int8_info, resolve_reduce_range  # noqa: E402
from recipes.loader import load_recipe  # noqa: E402
from tests.compress.quant.tiny_trained import SIZE, ort_session, train_tiny, two_class_test_images  # noqa: E402


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort_session(model).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def source():
    return open_dataset("fashion-mnist", SIZE)


@pytest.fixture(scope="module")
def tiny(source, tmp_path_factory):
    """(torch model, checkpoint path, fp32 ONNX proto) of the briefly trained tiny model."""
    from compress.models.checkpoint import save_checkpoint

    model = train_tiny(source)
    ckpt = save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pt", model, input_size=SIZE,
                           dataset="fashion-mnist")
    return model, ckpt, to_onnx(model, (SIZE, SIZE))


@pytest.fixture(scope="module")
def eval_subset(source):
    return two_class_test_images(source)


@pytest.fixture(scope="module")
def reader(source):
    return TrainSplitReader(source, size=128, batch_size=32, seed=0)


@pytest.fixture(scope="module")
def int8_default(tiny, reader, tmp_path_factory):
    """The int8 recipe applied to the tiny model: (recipe, prepared path, QuantizedGraph)."""
    wd = tmp_path_factory.mktemp("q")
    recipe = load_recipe("int8")
    prepared = prepare_float(tiny[2], recipe.quantize, wd)
    return recipe, prepared, quantize_prepared(prepared, calibrate(prepared, reader, recipe.calibration, wd),
                                               recipe, wd)


# -- calibration methods --------------------------------------------------------------------------------

def test_calibration_methods_give_different_valid_ranges(int8_default, reader, tmp_path):
    recipe, prepared, _ = int8_default
    ranges = {}
    for method in ("minmax", "percentile", "entropy"):
        cal = recipe.with_overrides("calibration", method=method, num_bins=256, percentile=99.9).calibration
        ranges[method] = calibrate(prepared, reader, cal, tmp_path)
    names = set(ranges["minmax"].data)
    assert names and all(set(r.data) == names for r in ranges.values())

    def hi(method, name):
        return float(np.asarray(ranges[method][name].range_value[1]).ravel()[0])

    def lo(method, name):
        return float(np.asarray(ranges[method][name].range_value[0]).ravel()[0])

    for name in names:
        for m in ranges:
            assert np.isfinite(lo(m, name)) and np.isfinite(hi(m, name)) and lo(m, name) <= hi(m, name)
        # percentile clips the tails of the minmax range, never widens it
        assert hi("percentile", name) <= hi("minmax", name) + 1e-6
        assert lo("percentile", name) >= lo("minmax", name) - 1e-6
    assert sum(hi("percentile", n) < hi("minmax", n) - 1e-6 for n in names) > len(names) // 4
    assert any(abs(hi("entropy", n) - hi("minmax", n)) > 1e-6 for n in names)


def test_calibration_feeds_ort_in_chunks_with_the_ranges_of_one_pass(int8_default, reader, tmp_path, monkeypatch):
    """ORT's calibrators keep every activation of one collect_data call in memory (more than 10 GB for 512
    images of MobileNetV3-Large at 224): calibration hands them chunks, whose merged ranges are the one-pass
    ranges (MinMax: exactly; percentile: the same histogram re-binned as its range grows)."""
    import compress.quant.core as core

    recipe, prepared, _ = int8_default
    calls = []

    class Counting(core._Chunk):
        def __init__(self, *args):
            super().__init__(*args)
            calls.append(self)

    ranges = {}
    for chunk in (10**9, 32):
        monkeypatch.setattr(core, "CALIBRATION_CHUNK_IMAGES", chunk)
        monkeypatch.setattr(core, "_Chunk", Counting)
        calls.clear()
        for method in ("minmax", "percentile"):
            cal = recipe.with_overrides("calibration", method=method, num_bins=512, percentile=99.9).calibration
            ranges[chunk, method] = range_dict(calibrate(prepared, reader, cal, tmp_path))
        assert [c.seen for c in calls] == ([128, 128] if chunk > 128 else [32] * 8)  # 128 images, batches of 32
    names = set(ranges[32, "minmax"])
    assert names == set(ranges[10**9, "minmax"]) == set(ranges[32, "percentile"])
    assert ranges[32, "minmax"] == ranges[10**9, "minmax"]
    for n in names:
        lo, hi = ranges[10**9, "percentile"][n]
        width = max(hi - lo, 1e-6)
        assert abs(ranges[32, "percentile"][n][0] - lo) <= 0.05 * width
        assert abs(ranges[32, "percentile"][n][1] - hi) <= 0.05 * width


# -- fixed qparams of hard-sigmoid ----------------------------------------------------------------------

def _qparams(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """tensor name -> (scale, zero point) of its QuantizeLinear."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]]))
            for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in inits}


@pytest.mark.parametrize("hswish, hsig", [("x_hardsigmoid", "op"), ("x_relu6", "relu6")])
def test_hard_sigmoid_qparams_are_fixed_not_calibrated(tiny, reader, tmp_path, hswish, hsig):
    recipe = load_recipe("int8").with_overrides("quantize", hswish=hswish, hard_sigmoid=hsig)
    prepared = prepare_float(tiny[2], recipe.quantize, tmp_path)
    ranges = calibrate(prepared, reader, recipe.calibration, tmp_path)
    # pretend calibration saw absurd ranges: fixed tensors must not care
    for name in ranges.data:
        td = ranges.data[name]
        lo, hi = td.range_value
        ranges.data[name] = type(td)(lowest=np.asarray(lo) * 10, highest=np.asarray(hi) * 10)
    qg = quantize_prepared(prepared, ranges, recipe, tmp_path)
    q = _qparams(qg.model)
    if hsig == "op":
        gates = [n.output[0] for n in onnx.load(str(prepared)).graph.node if n.op_type == "HardSigmoid"]
        assert len(gates) == 28  # 19 h-swish gates + 9 SE gates
        for g in gates:
            assert q[g] == (pytest.approx(1 / 255, rel=1e-6), 0)
    else:
        relu6 = [t for t in q if t.endswith("/relu6_output")]
        assert len(relu6) == 28
        for t in relu6:
            assert q[t] == (pytest.approx(6 / 255, rel=1e-6), 0)
        # the "* 1/6" is gone: every gate is its relu6 code read with scale 1/255, zero point 0
        assert qg.folded_gate_scales == 28
        assert not any(n.name.endswith("/GateScale") for n in qg.model.graph.node)
        inits = {i.name: numpy_helper.to_array(i) for i in qg.model.graph.initializer}
        folded = [n for n in qg.model.graph.node if n.op_type == "DequantizeLinear" and "GateScale" in n.input[1]]
        assert len(folded) == 28
        for n in folded:
            assert float(inits[n.input[1]]) == pytest.approx(1 / 255, rel=1e-6) and int(inits[n.input[2]]) == 0
    assert len(qg.fixed_qparams) >= 28


def test_folding_gate_scales_is_exact(int8_default, reader, tmp_path, eval_subset, monkeypatch):
    """The int8 graph before and after fold_gate_scales computes the same logits."""
    from compress.onnx import graph_passes
    from compress.quant import core as qmod

    recipe, prepared, _ = int8_default
    monkeypatch.setattr(qmod, "fold_gate_scales", lambda m: (m, 0))
    unfolded = quantize_prepared(prepared, calibrate(prepared, reader, recipe.calibration, tmp_path), recipe,
                                 tmp_path).model
    folded, n = graph_passes.fold_gate_scales(unfolded)
    assert n == 28 and op_counts(unfolded)["Mul"] - op_counts(folded)["Mul"] == 28
    onnx.checker.check_model(folded)
    x = eval_subset[0][:128]
    a, b = _run(unfolded, x), _run(folded, x)
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())


def test_gate_scales_are_folded_only_where_exact(int8_default, reader, tmp_path, eval_subset, monkeypatch):
    """fold_gate_scales removes a gate's requantization only when it gives the relu6 codes back (its scale is
    s_relu6 x 1/6, its zero point the relu6's).  Where a gate QuantizeLinear has any other scale, folding would
    change the function: those chains stay."""
    from compress.onnx import graph_passes
    from compress.quant import core as qmod

    recipe, prepared, _ = int8_default
    monkeypatch.setattr(qmod, "fold_gate_scales", lambda m: (m, 0))
    unfolded = quantize_prepared(prepared, calibrate(prepared, reader, recipe.calibration, tmp_path), recipe,
                                 tmp_path).model
    consumers = {i: n for n in unfolded.graph.node for i in n.input}
    gate_qs = [consumers[n.output[0]] for n in unfolded.graph.node if n.name.endswith(graph_passes.GATE_SCALE_SUFFIX)]
    assert len(gate_qs) == 28 and all(q.op_type == "QuantizeLinear" for q in gate_qs)
    other = onnx.ModelProto()
    other.CopyFrom(unfolded)
    inits = {i.name: i for i in other.graph.initializer}
    for q in gate_qs[:10]:  # give ten gates a scale the relu6 codes cannot be read with
        name = f"{q.input[1]}/wider"
        other.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[q.input[1]]) * 1.25,
                                                               name))
        next(n for n in other.graph.node if n.name == q.name).input[1] = name
    folded, n = graph_passes.fold_gate_scales(other)
    assert n == 18
    x = eval_subset[0][:128]
    np.testing.assert_allclose(_run(folded, x), _run(other, x), rtol=1e-5, atol=1e-5)


# -- the int8 model -------------------------------------------------------------------------------------

def test_int8_model_agrees_with_float_on_two_class_test_images(tiny, int8_default, eval_subset):
    recipe, prepared, qg = int8_default
    x, y = eval_subset
    ref, out = _run(tiny[2], x), _run(qg.model, x)
    assert (ref.argmax(1) == y).mean() >= 0.9  # the float model has learned its two classes
    agreement = (ref.argmax(1) == out.argmax(1)).mean()
    assert agreement >= 0.98, agreement
    # differential check on the logits themselves, finer than argmax
    assert np.abs(out - ref).mean() <= 0.1 * ref.std()


def test_int8_model_keeps_the_network_and_int8_convs(tiny, int8_default):
    recipe, prepared, qg = int8_default
    checks = int8_checks(qg.model, onnx.load(str(prepared)), recipe.quantize, (SIZE, SIZE))
    assert checks["onnx_checker"] == "passed" and checks["ort_runs"]
    assert checks["convs"] == 52 and checks["int8_conv_fraction"] == 1.0
    # weights int8 per-channel symmetric (zero point 0), one scale per output channel
    inits = {i.name: i for i in qg.model.graph.initializer}
    prod = {o: n for n in qg.model.graph.node for o in n.output}
    conv = next(n for n in qg.model.graph.node if n.op_type == "Conv")
    dq = prod[conv.input[1]]
    w, s, z = (inits[i] for i in dq.input[:3])
    assert w.data_type == onnx.TensorProto.INT8 and s.dims[0] == w.dims[0] > 1
    assert not numpy_helper.to_array(z).any()
    # activations uint8: the input's QuantizeLinear
    q_in = next(n for n in qg.model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    assert inits[q_in.input[2]].data_type == onnx.TensorProto.UINT8


def test_checks_enforce_the_int8_conv_floor(tiny, reader, int8_default, tmp_path):
    recipe, prepared, _ = int8_default
    model = onnx.load(str(prepared))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    r = recipe.with_overrides("quantize", nodes_to_exclude=tuple(convs[:8]))  # 44/52 = 85 % < 90 %
    ranges = calibrate(prepared, reader, r.calibration, tmp_path)
    qg = quantize_prepared(prepared, ranges, r, tmp_path)
    assert int8_conv_stats(qg.model)["fp32_convs"] == convs[:8]
    with pytest.raises(UserError, match="min_int8_conv_fraction"):
        int8_checks(qg.model, model, r.quantize, (SIZE, SIZE))
    relaxed = r.with_overrides("quantize", min_int8_conv_fraction=0.8)
    assert int8_checks(qg.model, model, relaxed.quantize, (SIZE, SIZE))["int8_convs"] == 44
    with pytest.raises(UserError, match="matches no node"):
        quantize_prepared(prepared, ranges, recipe.with_overrides("quantize", nodes_to_exclude=("nope*",)),
                          tmp_path)


@pytest.mark.parametrize("per_channel", [True, False])
def test_low_bit_weights_use_a_narrow_grid_on_int8_storage(tiny, reader, tmp_path, per_channel):
    """weight_bits = 4: every weight code in [-7, 7], each (non-zero) output channel, or each tensor, reaching
    +-7."""
    recipe = load_recipe("int8").with_overrides("quantize", weight_bits=4, per_channel=per_channel)
    prepared = prepare_float(tiny[2], recipe.quantize, tmp_path)
    model = quantize_prepared(prepared, calibrate(prepared, reader, recipe.calibration, tmp_path), recipe,
                              tmp_path).model
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            codes = inits[producers[n.input[1]].input[0]]
            assert codes.dtype == np.int8
            peaks = np.abs(codes.reshape(codes.shape[0] if per_channel else 1, -1).astype(int)).max(axis=1)
            assert peaks.max() == 7 and set(np.unique(peaks)) <= {0, 7}, n.name


@pytest.mark.parametrize("trans_b", [None, 0, 1])
def test_low_bit_gemm_weights_are_scaled_per_output_column(tmp_path, trans_b):
    """A Gemm's output channels are axis 0 of B only with transB = 1; absent transB means 0 (B is [K, N], outputs
    on axis 1).  The low-bit overrides scale each output channel on its own axis, and onnxruntime accepts them."""
    from onnx import TensorProto, helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from compress.quant.core import low_bit_weight_overrides
    from recipes.loader import QuantizeConfig

    rng = np.random.default_rng(0)
    k, n = 6, 4
    w = rng.standard_normal((k, n)).astype(np.float32) * np.array([0.1, 1.0, 5.0, 20.0], np.float32)  # [K, N]
    b = w.T.copy() if trans_b else w
    attrs = {} if trans_b is None else {"transB": trans_b}
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "B"], ["y"], name="fc", **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q = QuantizeConfig(weight_bits=4, per_channel=True)
    over = low_bit_weight_overrides(model, q)["B"]
    axis = 0 if trans_b else 1
    assert {o["axis"] for o in over} == {axis}
    np.testing.assert_allclose([float(o["scale"]) for o in over], np.abs(w).max(axis=0) / 7, rtol=1e-6)

    class One(CalibrationDataReader):
        def __init__(self):
            self.items = [{"x": rng.standard_normal((1, k)).astype(np.float32)}]

        def get_next(self):
            return self.items.pop() if self.items else None

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, str(src))
    quantize_static(str(src), str(dst), One(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, extra_options={"TensorQuantOverrides": {"B": over}})
    qm = onnx.load(str(dst))
    codes = numpy_helper.to_array(next(i for i in qm.graph.initializer if i.data_type == TensorProto.INT8
                                       and list(i.dims) == list(b.shape)))
    peaks = np.abs(np.moveaxis(codes.astype(int), axis, 0).reshape(n, -1)).max(axis=1)
    assert peaks.tolist() == [7, 7, 7, 7]  # every output column on its own 4-bit grid


def test_reduce_range_follows_vnni():
    vnni = "flags\t: fpu sse2 avx2 avx512f avx512_vnni\n"
    plain = "flags\t: fpu sse2 avx2\n"
    arm = "Features\t: fp asimd asimddp\n"
    assert resolve_reduce_range("auto", cpu_int8_info(vnni))[0] is False
    on, why = resolve_reduce_range("auto", cpu_int8_info(plain))
    assert on is True and "VNNI" in why
    assert resolve_reduce_range("always", cpu_int8_info(vnni))[0] is True
    assert resolve_reduce_range("never", cpu_int8_info(plain))[0] is False
    info = cpu_int8_info(arm)  # an Arm device's cpuinfo describes an Arm CPU, whatever host reads it
    assert info["machine"] == "aarch64" and not info["x86"] and info["arm_dot"] and info["vnni"] == []
    on, why = resolve_reduce_range("auto", info)
    assert on is False and "aarch64" in why
    assert cpu_int8_info(plain)["x86"] is True


# -- tuning (neural-compressor loop) --------------------------------------------------------------------

def test_tuning_falls_back_the_most_sensitive_layers(tiny, reader, source, tmp_path, monkeypatch):
    """Drive the loop with a scripted metric: int8 scores pass only with 2 layers in fp32."""
    from compress.quant import tuning

    recipe = load_recipe("int8-tuned").with_overrides(
        "tuning", calibration_methods=("minmax", "percentile"), eval_size=64, max_trials=10)
    prepared = prepare_float(tiny[2], recipe.quantize, tmp_path)
    built: list[tuple] = []
    real = tuning.quantize_prepared

    def spy(*a, extra_excluded=(), **k):
        built.append(tuple(extra_excluded))
        return real(*a, extra_excluded=extra_excluded, **k)

    def scripted_score(logits, labels, ref_correct, metric):
        return 0.9 if not built or len(built[-1]) >= 2 else 0.8  # fp32 baseline 0.9

    convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
    real_sensitivity = tuning._sensitivity
    measured: list[dict] = []

    def scripted_sensitivity(*a, **k):
        """The real per-layer measurement runs; the ranking is scripted, since whether keeping one layer of the
        tiny model in fp32 lowers its logit error depends on the CPU's int8 kernels (it did not on one Xeon)."""
        measured.extend(real_sensitivity(*a, **k))
        by_node = {m["node"]: m for m in measured}
        return [{**by_node[n], "gain": 1.0 - 0.1 * i} for i, n in enumerate(convs[:3])]

    monkeypatch.setattr(tuning, "quantize_prepared", spy)
    monkeypatch.setattr(tuning, "_score", scripted_score)
    monkeypatch.setattr(tuning, "_fallback_candidates", lambda model, excluded: convs[:3])
    monkeypatch.setattr(tuning, "_sensitivity", scripted_sensitivity)
    result = tuning.tune(prepared, reader, source, recipe, tmp_path)
    rep = result.report
    stages = [t["stage"] for t in rep["trials"]]
    assert sorted(m["node"] for m in measured) == sorted(convs[:3])  # every candidate layer measured
    assert all(np.isfinite(m["mse_all_int8"]) and np.isfinite(m["mse_without"]) for m in measured)
    assert stages[:2] == ["calibration", "calibration"] and stages[2:] == ["fallback", "fallback"]
    assert rep["met"] and len(rep["fallback_fp32_nodes"]) == 2
    assert set(rep["fallback_fp32_nodes"]) <= set(convs[:3])
    assert sorted(int8_conv_stats(result.graph.model)["fp32_convs"]) == sorted(rep["fallback_fp32_nodes"])
    # the recipe that reproduces the result without tuning
    assert not result.recipe.tuning.enabled
    assert set(result.recipe.quantize.nodes_to_exclude) == set(rep["fallback_fp32_nodes"])
    assert tomllib.loads(result.recipe.to_toml())["quantize"]["nodes_to_exclude"] == list(
        result.recipe.quantize.nodes_to_exclude)


def test_fallback_budget_counts_the_recipes_own_exclusions_by_node_name(tiny, tmp_path):
    """nodes_to_exclude holds fnmatch patterns; the budget subtracts the convs they resolve to."""
    from fnmatch import fnmatchcase

    from compress.quant.tuning import fallback_budget

    recipe = load_recipe("int8-tuned")
    prepared = onnx.load(str(prepare_float(tiny[2], recipe.quantize, tmp_path)))
    convs = [n.name for n in prepared.graph.node if n.op_type == "Conv"]
    assert fallback_budget(prepared, recipe) == int(0.1 * len(convs))  # 5 of 52
    pattern = "/features/features.1/*"
    hits = [c for c in convs if fnmatchcase(c, pattern)]
    assert 1 <= len(hits) < 5
    excluding = recipe.with_overrides("quantize", nodes_to_exclude=(pattern,))
    assert fallback_budget(prepared, excluding) == int(0.1 * len(convs)) - len(hits)


def test_retained_top1_does_not_let_gains_cancel_losses():
    from compress.quant.tuning import _score

    labels = np.array([0, 1, 2, 3])
    ref = np.eye(4)[[0, 1, 2, 0]]  # float: right on 3 of 4
    q = np.eye(4)[[0, 1, 1, 3]]  # int8: loses image 2, gains image 3
    ref_correct = ref.argmax(1) == labels
    assert _score(ref, labels, None, "retained_top1") == 0.75
    assert _score(q, labels, ref_correct, "top1") == 0.75  # plain top-1 sees no loss
    assert _score(q, labels, ref_correct, "retained_top1") == 0.5


# -- end to end -----------------------------------------------------------------------------------------

def test_quantize_command_writes_models_reports_and_recipe(tiny, tmp_path):
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["quantize", "--recipe", "int8", "--weights", str(tiny[1]),
                                    "--calibration-size", "64", "--limit-test", "200", "-o", str(out)])
    assert res.exit_code == 0, res.output
    for f in ("model_fp32.onnx", "model_int8.onnx", "report.json", "report.md", "recipe.toml"):
        assert (out / f).is_file(), f
    report = json.loads((out / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["fp32", "int8"] and report["variants"][0]["is_reference"]
    int8 = report["variants"][1]
    assert int8["agreement"] is not None and int8["latency_ms"]["median"] > 0
    assert int8["size_bytes"] < 0.5 * report["variants"][0]["size_bytes"]
    assert report["calibration"]["split"] == "train" and report["calibration"]["images"] == 64
    assert report["checks"]["int8_conv_fraction"] >= 0.9
    assert report["evaluation"]["images"] == 200
    written = load_recipe(out / "recipe.toml")
    assert written.calibration.size == 64 and written.quantize == load_recipe("int8").quantize
    meta = {p.key: p.value for p in onnx.load(str(out / "model_int8.onnx")).metadata_props}
    assert meta["mnv3_compress.recipe"] == "int8" and "mnv3_compress.preprocess" in meta
    assert "int8" in res.output and "report.md" in res.output
    # MACs: the network's (equal to float), and separately what the padded int8 graph executes
    fp32_macs = report["variants"][0]["macs"]
    from eval.model_info import count_macs

    assert fp32_macs == count_macs(tiny[2]) == report["variants"][0]["macs_executed"]
    assert int8["macs"] == fp32_macs < int8["macs_executed"] == count_macs(out / "model_int8.onnx")
    assert "executed)" in (out / "report.md").read_text()


def test_quantize_command_reports_bad_recipes_in_one_line(tmp_path):
    from click.testing import CliRunner

    from cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\nname = "b"\ndescription = "d"\n[quantize]\nactivation_type = "fp8"\n')
    res = CliRunner().invoke(main, ["quantize", "--recipe", str(bad), "-o", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "activation_type" in res.output and "'uint8'" in res.output
    assert not (tmp_path / "o" / "model_int8.onnx").exists()
