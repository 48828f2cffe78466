"""The ``litert`` target: a .tflite built from the scale table, run in LiteRT's interpreter with XNNPACK.

The tiny two-class model (tests/compress/quant/tiny_trained.py) is quantized by the int8 recipe (the ort-x86
reference graph and its table), then by QAT for a few steps (a QAT table); each table is built into a .tflite.
Marked ``litert``: these tests need the ``litert`` extra (``pip install -e '.[litert]'``) and fail, naming that
command, without it; ``-m 'not litert'`` leaves them out.
"""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibration.datasets import FASHION_MNIST_DIR, load_fashion_mnist, open_dataset  # noqa: E402
from calibration.reader import TrainSplitReader  # noqa: E402
from compress.errors import UserError  # noqa: E402
from compress.onnx.export import to_onnx  # noqa: E402
from compress.quant.core import calibrate, prepare_float, quantize_prepared, range_dict  # noqa: E402
from compress.targets.base import BuildInputs  # noqa: E402
from compress.targets.litert import LiteRT  # noqa: E402
from compress.targets.table import ScaleTable, compare_scales  # noqa: E402
from eval.accuracy import agreement  # noqa: E402
from recipes.loader import load_recipe  # noqa: E402
from recipes.sections import CalibrationConfig  # noqa: E402
from tests.compress.quant.tiny_trained import (CLASSES, SIZE, ort_session, train_tiny,  # noqa: E402
                                               two_class_test_images)

pytestmark = pytest.mark.litert

# tensors the x86 graph quantizes that have no tensor of their own in the .tflite: the flatten (a reshape on its
# input's grid) and a global pool over 1x1 features (removed by the converter; its grid is its input's)
NO_HOME = ("/Flatten_output_0", "/GlobalAveragePool_output_0")
DERIVED = ("/HardSwish/gate_output", "/scale_activation/HardSigmoid_output_0", "logits")



@pytest.fixture(scope="module")
def runtime():
    LiteRT().check_installed()  # without the extra: the one-line error with the pip command, not a skip


@pytest.fixture(scope="module")
def source():
    return open_dataset("fashion-mnist", SIZE)


@pytest.fixture(scope="module")
def tiny(source):
    return train_tiny(source)


@pytest.fixture(scope="module")
def images(source):
    return two_class_test_images(source)


@pytest.fixture(scope="module")
def reader(source):
    return TrainSplitReader(source, size=128, batch_size=32, seed=0)


@pytest.fixture(scope="module")
def ptq(runtime, tiny, reader, tmp_path_factory):
    """(BuildInputs of the int8 recipe's table, the ort-x86 int8 graph, the litert artifact)."""
    wd = tmp_path_factory.mktemp("litert-ptq")
    recipe = load_recipe("int8")
    fp32 = to_onnx(tiny, (SIZE, SIZE))
    prepared = prepare_float(fp32, recipe.quantize, wd)
    ranges = calibrate(prepared, reader, recipe.calibration, wd)
    graph = quantize_prepared(prepared, ranges, recipe, wd)
    table = ScaleTable.from_int8(graph.model, fp32, range_dict(ranges), graph.excluded, "calibration",
                                 recipe.quantize.weight_bits, graph.reduce_range)
    inputs = BuildInputs(tiny, fp32, table, recipe, (SIZE, SIZE), wd)
    return inputs, graph, LiteRT().build(inputs)


def _run(target: LiteRT, artifact: bytes, x: np.ndarray) -> np.ndarray:
    return target.runner(artifact, threads=1)(x)


def test_litert_int8_runs_and_agrees_with_the_ort_x86_int8(ptq, images):
    """Same top-1 as the ort-x86 int8 model on >= 99 % of the two classes' test images (100 % when written)."""
    inputs, graph, artifact = ptq
    x, y = images
    ours = _run(LiteRT(), artifact, x)
    ref = ort_session(graph.model).run(None, {"input": x})[0]
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert agreement(ours, ref) >= 0.99
    assert abs(np.mean(ours.argmax(1) == y) - np.mean(ref.argmax(1) == y)) <= 0.01
    assert np.mean(np.isin(ours.argmax(1), CLASSES)) > 0.9


def test_every_scale_is_the_tables(ptq):
    """Read back from the .tflite: every activation grid and weight scale is the table's, exactly; what the
    table has and the .tflite not is only the forms' no-home tensors, what only the .tflite has is derived."""
    inputs, _, artifact = ptq
    table = inputs.table
    acts, weights = LiteRT().scales(artifact)
    cmp = compare_scales(table, acts, weights)
    assert cmp["max_rel_scale_deviation"] == 0.0 and cmp["zero_point_mismatches"] == 0
    assert cmp["weights_compared"] == len(table.weights) and cmp["max_rel_weight_scale_deviation"] == 0.0
    assert all(k.endswith(NO_HOME) for k in set(table.activations) - set(acts))
    assert all(k.endswith(DERIVED) for k in set(acts) - set(table.activations))
    assert cmp["activations_compared"] >= len(table.activations) - sum(k.endswith(NO_HOME) for k in table.activations)
    assert acts["input"] == table.activations["input"]  # the float input's QUANTIZE uses the table's grid
    lo, hi = table.ranges["logits"]
    s, z = acts["logits"]  # derived from the calibrated range (the x86 graph leaves the logits float)
    assert s == pytest.approx((max(hi, 0) - min(lo, 0)) / 255, rel=1e-6)
    assert -z * s <= lo + s / 2 and (255 - z) * s >= hi - s / 2  # the range, to half a step (z is rounded)


def test_one_xnnpack_partition_with_float_io(ptq):
    inputs, _, artifact = ptq
    from ai_edge_litert.interpreter import Interpreter

    extras = LiteRT().extras(artifact, inputs.workdir)
    assert extras["xnnpack_partitions"] == 1 and extras["ops_outside_delegate"] == {}
    it = Interpreter(model_content=artifact)
    assert it.get_input_details()[0]["dtype"] == np.float32 and it.get_output_details()[0]["dtype"] == np.float32
    assert list(it.get_input_details()[0]["shape"]) == [1, 3, SIZE, SIZE]


def test_int8_io_and_the_depthwise_gate(ptq, images, monkeypatch):
    """``litert-int8-io``: int8 input on the table's input grid and int8 logits.  Built here with every h-swish in
    the depthwise-gate form (the one small conv outputs get): still one partition, the table's scales, the same
    predictions as the ort-x86 int8 model on >= 99 % of the images."""
    from ai_edge_litert.interpreter import Interpreter

    from compress.targets import litert_program
    from compress.targets.registry import TARGETS

    inputs, graph, _ = ptq
    monkeypatch.setattr(litert_program, "_XNNPACK_ADD_MIN_RATIO", float("inf"))  # no h-swish in the add form
    target = TARGETS["litert-int8-io"]
    int8_io = target.build(inputs)
    it = Interpreter(model_content=int8_io)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    s, z = inputs.table.activations["input"]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    assert inp["quantization"] == (pytest.approx(s, rel=1e-7), z - 128)
    extras = target.extras(int8_io, inputs.workdir)
    assert extras["xnnpack_partitions"] == 1 and extras["ops_outside_delegate"] == {}
    acts, weights = target.scales(int8_io)
    cmp = compare_scales(inputs.table, acts, weights)
    assert cmp["max_rel_scale_deviation"] == 0.0 and cmp["max_rel_weight_scale_deviation"] == 0.0
    assert any(k.endswith("/HardSwish/relu6_output") for k in set(inputs.table.activations) - set(acts))  # dw
    x = images[0][:300]
    assert agreement(_run(target, int8_io, x), ort_session(graph.model).run(None, {"input": x})[0]) >= 0.99


def test_deploy_form_computes_the_float_network(tiny, source):
    """Each h-swish form computes h-swish (the depthwise gate's clamp is its int8 output grid: clamped here);
    the form follows the scale of the h-swish's input."""
    from compress.targets.litert_program import deploy_form, hswish_form

    assert hswish_form(0.05) == ("add", 0) and hswish_form(1e-6) == ("dw", 127)
    assert hswish_form(1e-8) == ("dw", 7) and hswish_form(1e-12) == ("half", 0)  # the bias code 3 k / s_x fits
    x = torch.from_numpy(two_class_test_images(source, 16)[0])
    for scale, form in ((None, "HSwish"), (1e-6, "HSwishDW")):
        model = deploy_form(tiny, lambda path: scale)
        sites = [m for m in model.modules() if type(m).__name__.startswith("HSwish")]
        assert sites and all(type(m).__name__ == form for m in sites)
        for m in sites:
            if form == "HSwishDW":
                m.gate.register_forward_hook(lambda mod, args, out: out.clamp(0.0, 1.0))
        with torch.no_grad():  # float32 rounding of another formula: relative to logits of ~14 (1.6e-4 on a Xeon)
            torch.testing.assert_close(model(x), tiny(x), rtol=2e-5, atol=1e-4, msg=form)
    half = deploy_form(tiny, lambda path: 1e-12)  # x within 1e-6 of 0: the gate is 1/2 on its grid
    assert all(type(m).__name__ == "HSwishHalf" for m in half.modules() if type(m).__name__.startswith("HSwish"))


def test_a_point_without_a_scale_is_a_one_line_error(ptq, tiny):
    inputs, _, _ = ptq
    table = copy.deepcopy(inputs.table)
    key = next(k for k in table.activations if k.endswith("/Add_output_0"))
    del table.activations[key]
    with pytest.raises(UserError, match="no scale for " + re.escape(key)) as e:
        LiteRT().build(BuildInputs(tiny, inputs.fp32_onnx, table, inputs.recipe, (SIZE, SIZE), inputs.workdir))
    assert "\n" not in str(e.value)
    table = copy.deepcopy(inputs.table)
    node = next(iter(table.weights))
    del table.weights[node]
    with pytest.raises(UserError, match="no weight scales for " + re.escape(node)):
        LiteRT().build(BuildInputs(tiny, inputs.fp32_onnx, table, inputs.recipe, (SIZE, SIZE), inputs.workdir))


def test_fp32_nodes_in_the_table_are_refused(ptq, tiny):
    inputs, _, _ = ptq
    table = copy.deepcopy(inputs.table)
    table.excluded = [next(iter(table.weights))]
    with pytest.raises(UserError, match="fp32") as e:
        LiteRT().build(BuildInputs(tiny, inputs.fp32_onnx, table, inputs.recipe, (SIZE, SIZE), inputs.workdir))
    assert "\n" not in str(e.value)


def test_a_missing_runtime_is_the_one_line_pip_error(monkeypatch):
    import importlib.util

    from compress.targets.registry import parse_targets

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ai_edge_litert" else real(name, *a))
    with pytest.raises(UserError) as e:
        parse_targets("ort-x86,litert")
    assert str(e.value) == "this target needs ai_edge_litert: pip install 'mnv3-compress[litert]'"


@pytest.fixture(scope="module")
def qat(runtime, tiny, source, reader, tmp_path_factory):
    """(BuildInputs of a QAT table, the QAT int8 graph, the litert artifact): a few QAT steps, then export."""
    from compress.quant.qat import prepare_qat
    from compress.quant.qat_export import export_qat, to_float
    from compress.quant.qat_train import FreezeSchedule

    wd = tmp_path_factory.mktemp("litert-qat")
    recipe = load_recipe("int8-qat")
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "train")
    sel = np.random.default_rng(1).permutation(np.flatnonzero(np.isin(labels, CLASSES)))[:10 * 32]
    xs, ys = source.preprocess(torch.from_numpy(images[sel])), torch.from_numpy(labels[sel]).long()
    qm = prepare_qat(copy.deepcopy(tiny), recipe.quantize, recipe.qat)
    opt = torch.optim.AdamW(qm.parameters(), lr=1e-3)
    sched = FreezeSchedule(0.5, 0.8)
    qm.train()
    for step in range(10):
        sched(qm, step, 10)
        loss = torch.nn.functional.cross_entropy(qm(xs[step * 32:(step + 1) * 32]), ys[step * 32:(step + 1) * 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    qm.eval()
    graph, prepared = export_qat(qm, recipe, wd, source.preprocess)
    flt = to_float(qm).eval()
    fp32 = to_onnx(flt, (SIZE, SIZE))
    ranges = range_dict(calibrate(prepared, reader, CalibrationConfig(method="minmax"), wd))
    table = ScaleTable.from_int8(graph.model, fp32, ranges, graph.excluded, "qat", recipe.quantize.weight_bits,
                                 graph.reduce_range)
    inputs = BuildInputs(flt, fp32, table, recipe, (SIZE, SIZE), wd)
    return inputs, graph, LiteRT().build(inputs)


def test_qat_table_reaches_the_tflite(qat, ptq, images):
    """QAT's learned scales (not a calibration's: they differ from the PTQ table's) are the .tflite's, and it
    predicts what the QAT int8 ONNX predicts."""
    inputs, graph, artifact = qat
    acts, weights = LiteRT().scales(artifact)
    cmp = compare_scales(inputs.table, acts, weights)
    assert inputs.table.source == "qat" and cmp["activations_compared"] > 50
    assert cmp["max_rel_scale_deviation"] == 0.0 and cmp["zero_point_mismatches"] == 0
    assert cmp["max_rel_weight_scale_deviation"] == 0.0 and cmp["weights_compared"] == len(inputs.table.weights)
    ptq_table = ptq[0].table
    moved = [k for k in acts if k in ptq_table.activations and abs(acts[k][0] / ptq_table.activations[k][0] - 1) > 0.01]
    assert len(moved) > 10
    x = images[0][:300]
    ref = ort_session(graph.model).run(None, {"input": x})[0]
    assert agreement(_run(LiteRT(), artifact, x), ref) >= 0.99
