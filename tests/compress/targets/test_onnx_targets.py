"""The scale table and the ONNX-based targets: ort-x86 (the reference), ort-arm64 and OpenVINO carry the same
scales (calibrated and QAT's), run, and predict what the reference int8 model predicts.

The model is the briefly trained tiny MobileNetV3-Small of tests/compress/quant/tiny_trained.py at 32x32;
agreement is measured on 600 test images of its two classes.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from calibration.datasets import open_dataset
from calibration.reader import TrainSplitReader
from compress.errors import UserError
from compress.onnx.export import to_onnx
from compress.quant.core import calibrate, prepare_float, quantize_prepared
from compress.targets.base import BuildInputs
from compress.targets.openvino import OpenVINO, stem_activation_input
from compress.targets.ort import OrtArm64
from compress.targets.registry import parse_targets
from compress.targets.table import ScaleTable, compare_scales, table_qat_params
from recipes.loader import load_recipe
from tests.compress.quant.tiny_trained import SIZE, ort_session, train_tiny, two_class_test_images


@pytest.fixture(scope="module")
def source():
    return open_dataset("fashion-mnist", SIZE)


@pytest.fixture(scope="module")
def ptq(source, tmp_path_factory):
    """(BuildInputs from a calibrated int8 graph, that int8 graph, 600 two-class test images)."""
    model = train_tiny(source)
    wd = tmp_path_factory.mktemp("ptq")
    recipe = load_recipe("int8")
    fp32 = to_onnx(model, (SIZE, SIZE))
    prepared = prepare_float(fp32, recipe.quantize, wd)
    ranges = calibrate(prepared, TrainSplitReader(source, 128, 32, 0), recipe.calibration, wd)
    graph = quantize_prepared(prepared, ranges, recipe, wd)
    ranges = {k: (float(np.asarray(v.range_value[0]).reshape(-1)[0]), float(np.asarray(v.range_value[1]).reshape(-1)[0]))
              for k, v in ranges.data.items()}
    table = ScaleTable.from_int8(graph.model, fp32, ranges, graph.excluded)
    inputs = BuildInputs(model, fp32, table, recipe, (SIZE, SIZE), wd)
    return inputs, graph.model, two_class_test_images(source)[0]


def _logits(model_bytes: bytes, x: np.ndarray, batch: int | None = None) -> np.ndarray:
    sess = ort_session(onnx.load_from_string(model_bytes))
    if batch is None:
        return sess.run(None, {"input": x})[0]
    return np.concatenate([sess.run(None, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def test_the_table_is_the_reference_graphs_scales_without_its_padding(ptq):
    inputs, int8, _ = ptq
    table = inputs.table
    qlinear = [n for n in int8.graph.node if n.op_type == "QuantizeLinear"
               and n.input[0] not in {i.name for i in int8.graph.initializer}]
    assert len(table.activations) == len(qlinear) > 100
    fp32_inits = {i.name: i for i in inputs.fp32_onnx.graph.initializer}
    for n in inputs.fp32_onnx.graph.node:  # one scale per real output channel: the 16-padding is cut off
        if n.op_type == "Conv":
            assert table.weights[n.name].size == fp32_inits[n.input[1]].dims[0], n.name
    assert any(table.weights[n.name].size % 16 for n in inputs.fp32_onnx.graph.node if n.op_type == "Conv")
    assert "logits" in table.ranges  # the x86 graph leaves the logits float: their range is kept, derived
    with tempfile.TemporaryDirectory() as tmp:
        again = ScaleTable.from_json(json.loads(table.save(Path(tmp) / "scales.json").read_text()))
    assert again.activations == table.activations and again.ranges == table.ranges
    assert all(np.array_equal(again.weights[k], v) for k, v in table.weights.items())


def test_imposing_the_table_on_the_same_shape_reproduces_the_reference_exactly(ptq, tmp_path):
    inputs, int8, x = ptq
    prepared = prepare_float(inputs.fp32_onnx, inputs.recipe.quantize, tmp_path)
    params = table_qat_params(inputs.table, onnx.load(str(prepared)))
    again = quantize_prepared(prepared, None, inputs.recipe, tmp_path, qat_params=params).model
    np.testing.assert_array_equal(_logits(again.SerializeToString(), x), _logits(int8.SerializeToString(), x))


def test_ort_arm64_has_no_x86_padding_a_fixed_batch_and_the_same_function(ptq):
    inputs, int8, x = ptq
    target = OrtArm64()
    artifact = target.build(inputs)
    model = onnx.load_from_string(artifact)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in model.graph.node if n.op_type == "Conv"]
    assert any(g > 1 and g % 16 for g in groups)  # depthwise convs keep their own channel counts
    assert not any(n.op_type == "Pad" for n in model.graph.node)  # nor is the stem padded to 4 channels
    acts, weights = target.scales(artifact)
    dev = compare_scales(inputs.table, acts, weights)
    assert dev["table_only"] == 0 and dev["max_rel_scale_deviation"] == 0.0 and dev["zero_point_mismatches"] == 0
    assert dev["weights_compared"] > 50 and dev["max_rel_weight_scale_deviation"] == 0.0
    # the x86 padding is exact, so the two graphs compute the same int8 network
    np.testing.assert_allclose(_logits(artifact, x[:64], batch=1), _logits(int8.SerializeToString(), x[:64]),
                               rtol=1e-5, atol=1e-5)
    facts = target.extras(artifact, inputs.workdir)
    assert facts["nnapi_partitions"] == 1 and facts["nnapi_nodes"].split("/")[0] == facts["nnapi_nodes"].split("/")[1]
    assert facts["ort_format_conversion"] and any(f.endswith(".ort") for f in facts["ort_files"])


def test_openvino_carries_the_table_and_predicts_what_the_reference_predicts(ptq):
    inputs, int8, x = ptq
    target = OpenVINO()
    artifact = target.build(inputs)
    model = onnx.load_from_string(artifact)
    ops = {n.op_type for n in model.graph.node}
    assert "HardSwish" in ops and "HardSigmoid" not in ops  # the gate as Add/Clip/Mul, h-swish one op
    acts, weights = target.scales(artifact)
    dev = compare_scales(inputs.table, acts, weights)
    assert dev["activations_compared"] > 50 and dev["max_rel_scale_deviation"] < 1e-6
    assert dev["zero_point_mismatches"] == 0
    # every conv / Gemm weight scale read back from OpenVINO's own graph, keyed as the table
    assert dev["weights_compared"] == len(inputs.table.weights) and dev["max_rel_weight_scale_deviation"] < 1e-6
    # h-swish on the conv's float output (NNCF's post-op placement), except the stem's, rounded on x86's grid
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    rounded = [n.input[0] in dq_outputs for n in model.graph.node if n.op_type == "HardSwish"]
    assert len(rounded) > 3 and rounded[0] and not any(rounded[1:])
    stem = stem_activation_input(model)
    assert acts[stem][1] == inputs.table.activations[stem][1]
    assert acts[stem][0] == pytest.approx(inputs.table.activations[stem][0], rel=1e-6)
    run = target.runner(artifact, threads=1)
    ours = np.concatenate([run(x[i:i + 1]) for i in range(len(x))])
    ref = _logits(int8.SerializeToString(), x)
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.97
    assert target.extras(artifact, inputs.workdir)["u8_convolutions"] >= 40


def test_qat_scales_reach_every_onnx_target_unchanged(source, tmp_path):
    """A table read from a QAT export (learned scales, no calibration) is what ort-arm64 and OpenVINO carry."""
    import torch

    from compress.quant.qat import freeze_bn_stats, freeze_observers, prepare_qat
    from compress.quant.qat_export import QAT_FLOAT_ONNX, export_qat, to_float

    model = train_tiny(source)
    recipe = load_recipe("int8-qat")
    qm = prepare_qat(model, recipe.quantize, recipe.qat).train()
    x, _ = next(iter(source.loader("train", batch_size=64, limit=64)))
    with torch.no_grad():
        qm(x)
    freeze_bn_stats(qm)
    freeze_observers(qm)
    graph, prepared = export_qat(qm.eval(), recipe, tmp_path, source.preprocess)
    qat_fp32 = onnx.load(str(Path(prepared).parent / QAT_FLOAT_ONNX))
    table = ScaleTable.from_int8(graph.model, qat_fp32, source="qat")
    inputs = BuildInputs(to_float(qm), qat_fp32, table, recipe, (SIZE, SIZE), tmp_path)
    for target in (OrtArm64(), OpenVINO()):
        acts, weights = target.scales(target.build(inputs))
        dev = compare_scales(table, acts, weights)
        assert dev["activations_compared"] > 50 and dev["max_rel_scale_deviation"] < 1e-6, target.name
        assert dev["zero_point_mismatches"] == 0, target.name
        assert dev["weights_compared"] == len(table.weights) and dev["max_rel_weight_scale_deviation"] < 1e-6


def test_targets_are_parsed_with_the_reference_first_and_missing_runtimes_named(monkeypatch):
    assert [t.name for t in parse_targets("openvino,ort-x86,openvino")] == ["ort-x86", "openvino"]
    with pytest.raises(UserError, match="unknown target 'tflite'"):
        parse_targets("tflite")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'mnv3-compress\[openvino\]'"):
        parse_targets("ort-x86,openvino")
