"""The executorch target (compress/targets/executorch.py): one quantization, carried into an XNNPACK .pte.

The network is tiny - the first five blocks of MobileNetV3-Small at width 0.5 (SE gates, h-swish, a residual
add), 32x32, trained for 20 steps on two Fashion-MNIST classes (tests/compress/quant/tiny_trained.py) - and its
reference is the ort-x86 int8 graph of the int8 recipe, calibrated on 64 train images.  Measured on 400 test
images of those two classes: how often the .pte's top-1 equals the ort-x86 int8 model's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibration.datasets import FASHION_MNIST_DIR, load_fashion_mnist, open_dataset  # noqa: E402
from calibration.reader import TrainSplitReader  # noqa: E402
from compress.errors import UserError  # noqa: E402
from compress.quant.core import range_dict  # noqa: E402
from compress.models.mobilenetv3 import arch_spec  # noqa: E402
from compress.targets.base import BuildInputs  # noqa: E402
from compress.targets.executorch import ExecuTorch, pte_facts  # noqa: E402
from compress.targets.table import ScaleTable, compare_scales  # noqa: E402
from recipes.loader import load_recipe  # noqa: E402
from tests.compress.quant.tiny_trained import CLASSES, SIZE, ort_session, train_tiny, two_class_test_images  # noqa: E402

SMALL = arch_spec("mobilenet_v3_small", 0.5, num_classes=10, dropout=0.0)
TINY = SMALL.replace(blocks=SMALL.blocks[:5], last_conv=6 * SMALL.blocks[4].out_ch)
CALIBRATION = 64


@pytest.fixture(scope="module")
def source():
    return open_dataset("fashion-mnist", SIZE)


@pytest.fixture(scope="module")
def tiny(source):
    return train_tiny(source, spec=TINY)


@pytest.fixture(scope="module")
def two_class_images(source):
    return two_class_test_images(source, 400)



def _ptq_reference(model, source, workdir, exclude=lambda prepared: []):
    """(int8 ONNX, table, build inputs) of the int8 recipe's ort-x86 graph, the nodes ``exclude(prepared graph)``
    names kept in fp32."""
    from compress.onnx.export import to_onnx
    from compress.quant.core import calibrate, prepare_float, quantize_prepared

    recipe = load_recipe("int8").with_overrides("calibration", size=CALIBRATION)
    fp32 = to_onnx(model, (SIZE, SIZE))
    prepared = prepare_float(fp32, recipe.quantize, workdir)
    ranges = calibrate(prepared, TrainSplitReader(source, CALIBRATION, 32, 0), recipe.calibration, workdir)
    graph = quantize_prepared(prepared, ranges, recipe, workdir, extra_excluded=exclude(onnx.load(str(prepared))))
    table = ScaleTable.from_int8(graph.model, fp32, range_dict(ranges), graph.excluded)
    return graph.model, table, BuildInputs(model, fp32, table, recipe, (SIZE, SIZE), Path(workdir))


def _agreement(target, pte, int8: onnx.ModelProto, images) -> tuple[float, float]:
    """(top-1 agreement of the .pte with the ort-x86 int8 model, the .pte's top-1 accuracy)."""
    x, labels = images
    ours = target.runner(pte, threads=1)(x)
    ref = ort_session(int8).run(None, {"input": x})[0]
    return float((ours.argmax(1) == ref.argmax(1)).mean()), float((ours.argmax(1) == labels).mean())


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """``quantize --recipe int8 --target ort-x86,executorch`` on the tiny model: (output dir, report)."""
    from compress.models.checkpoint import save_checkpoint
    from compress.quant.pipeline import quantize

    tmp = tmp_path_factory.mktemp("run")
    weights = save_checkpoint(tmp / "tiny.pt", tiny, input_size=SIZE, dataset="fashion-mnist")
    report = quantize("int8", weights=weights, calibration_size=CALIBRATION, output_dir=tmp / "out",
                      eval_limit=200, targets="ort-x86,executorch", progress=False)
    return tmp / "out", report


def _row(report) -> dict:
    return next(r for r in report["targets"]["results"] if r["target"] == "executorch")


def test_quantize_writes_and_measures_the_pte(run):
    out, report = run
    row = _row(report)
    assert (out / "model_int8_executorch.pte").read_bytes()[4:8] == b"ET12"  # an ExecuTorch program
    assert row["file"] == "model_int8_executorch.pte" and (out / "scales.json").is_file()
    assert row["latency_ms"]["median"] > 0 and row["runtime_fp32_ms"]["fp32"]["median"] > 0
    assert row["latency_ms"]["batch"] == 1 and row["latency_ms"]["threads"] == 1
    reference = next(r for r in report["targets"]["results"] if r["target"] == "ort-x86")
    assert row["speedup_vs_runtime_fp32"] > 0 and row["agreement_with_ort_x86_int8"] >= 0.95
    assert abs(row["accuracy"]["top1"] - reference["accuracy"]["top1"]) <= 0.02  # 200 images of all ten classes
    assert "| executorch | `model_int8_executorch.pte` |" in (out / "report.md").read_text()


def test_pte_agrees_with_the_ort_x86_int8_model(run, two_class_images):
    out, _ = run
    agree, top1 = _agreement(ExecuTorch(), (out / "model_int8_executorch.pte").read_bytes(),
                             onnx.load(str(out / "model_int8.onnx")), two_class_images)
    assert agree >= 0.95 and top1 > 0.9  # and a working classifier, not two constant outputs


def test_pte_carries_the_tables_scales(run):
    """Every activation scale and zero point the program quantizes with is the table's (uint8 convention), bit
    for bit; weight scales equal the table's (fc2's carry the gate's 1/6: read back x6, float32 rounding); the
    only values not in the table are the SE gates' grids and the logits'."""
    from compress.targets.registry import TARGETS

    out, report = run
    table = ScaleTable.from_json(json.loads((out / "scales.json").read_text()))
    acts, _ = TARGETS["executorch"].scales((out / "model_int8_executorch.pte").read_bytes())
    # the table's tensors the program has no own grid for: the relu6 inside h-swish and the SE gate (XNNPACK's
    # h-swish is one lookup table; the gate is fc2's clamped output, on the relu6 grid / 6)
    assert all(t.endswith("/relu6_output") for t in set(table.activations) - set(acts))
    s = _row(report)["scales"]
    assert s["activations_compared"] == sum(not t.endswith("/relu6_output") for t in table.activations)
    assert s["max_rel_scale_deviation"] == 0.0
    assert s["zero_point_mismatches"] == 0
    assert s["weights_compared"] == len(table.weights) and s["max_rel_weight_scale_deviation"] < 1e-6
    extras = _row(report)["extras"]
    gates = [t for t in extras["derived"] if t.endswith("scale_activation/HardSigmoid_output_0")]
    assert len(gates) == extras["folded_gates"] == 3
    assert set(extras["derived"]) - set(gates) == {"logits"} and s["artifact_only"] == len(extras["derived"])
    assert extras["weights_imposed"] == len(table.weights)
    # and the XNNPACK delegate inside the .pte (its flatbuffer) holds exactly the converted program's grids
    carried = extras["delegate_qparams"]
    assert carried["equal_to_program"] and carried["weights_equal_to_program"]
    assert carried["weights"] == len(table.weights) and carried["activation_grids"] == len(set(acts.values()))


def test_one_xnnpack_delegate_and_nothing_outside(run):
    out, report = run
    facts = pte_facts((out / "model_int8_executorch.pte").read_bytes())
    assert facts["delegate_partitions"] == 1 and facts["delegate_backends"] == {"XnnpackBackend": 1}
    assert facts["ops_outside_delegates"] == {}
    assert _row(report)["extras"]["delegate_partitions"] == 1


def test_the_peer_is_executorchs_own_int8_program(tiny, source, two_class_images, tmp_path):
    """The baseline benchmarks/deploy_targets.py stands ours next to: the stock XNNPACKQuantizer, calibrated,
    lowered to one delegate; an int8 program (its delegate carries int8 grids) that still classifies."""
    from compress.targets.executorch import delegate_qparams

    int8, _, inputs = _ptq_reference(tiny, source, tmp_path)
    reader = TrainSplitReader(source, 16, 8, 0)
    while (item := reader.get_next()) is not None:
        inputs.calibration.append(item["input"])
    target = ExecuTorch()
    pte = target.peer(inputs)
    facts = pte_facts(pte)
    # one delegate; outside it only the layout copies the stock lowering adds (ours moves them into fp32 input)
    assert facts["delegate_partitions"] == 1
    assert set(facts["ops_outside_delegates"]) <= {"dim_order_ops::_to_dim_order_copy"}
    grids, weight_scales = delegate_qparams(pte)
    assert len(grids) > 5 and len(weight_scales) > 5  # quantized, not a float program
    agree, top1 = _agreement(target, pte, int8, two_class_images)
    assert top1 > 0.9 and agree >= 0.9


def test_se_gate_fold_is_the_same_function(tiny, two_class_images):
    from compress.targets.executorch_pt2e import fold_se_gates

    folded, paths = fold_se_gates(tiny)
    x = torch.from_numpy(two_class_images[0][:64])
    with torch.no_grad():
        assert torch.allclose(folded(x), tiny(x), atol=1e-5)
    assert len(paths) == 3 and all(p.endswith(".fc2") for p in paths)


def test_an_unmapped_observer_is_a_one_line_error(tiny, source, tmp_path):
    _, table, inputs = _ptq_reference(tiny, source, tmp_path)
    missing = next(t for t in table.activations if t.endswith("/Mul_output_0"))
    del table.activations[missing]
    with pytest.raises(UserError) as err:
        ExecuTorch().build(inputs)
    assert missing in str(err.value) and "\n" not in str(err.value)


def test_a_missing_runtime_is_a_one_line_error(monkeypatch):
    import importlib.util

    from compress.targets.registry import parse_targets

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    with pytest.raises(UserError) as err:
        parse_targets("ort-x86,executorch")
    assert "pip install 'mnv3-compress[executorch]'" in str(err.value) and "\n" not in str(err.value)


def test_excluded_nodes_stay_float(tiny, source, two_class_images, tmp_path):
    """A tuning-style fallback (one depthwise conv) and a mixed-precision unit (a whole SE block: pool, fc1, relu,
    fc2, gate, product), kept in fp32 in the x86 graph, are float in the .pte too: their convs have no weight
    scale, and every scale the program does quantize with is still the table's."""
    from compress.quant.mixed_precision import layer_units

    conv = "/features/features.2/block/block.1/block.1.0/Conv"
    int8, table, inputs = _ptq_reference(
        tiny, source, tmp_path, lambda prepared: [conv, *layer_units(prepared)["features.4.block.2"].nodes])
    se_convs = {"/features/features.4/block/block.2/fc1/Conv", "/features/features.4/block/block.2/fc2/Conv"}
    assert conv in table.excluded and se_convs <= set(table.excluded) and not {conv, *se_convs} & set(table.weights)
    target = ExecuTorch()
    pte = target.build(inputs)
    acts, weights = target.scales(pte)
    assert set(weights) == set(table.weights)  # every int8 conv of the table, none of the float ones
    s = compare_scales(table, acts, weights)
    assert s["max_rel_scale_deviation"] == 0.0 and s["zero_point_mismatches"] == 0
    assert not any(t.startswith("/features/features.4/block/block.2/") and not t.endswith("/Mul_output_0")
                   for t in acts)  # nothing inside the float SE block is quantized
    extras = target.extras(pte, tmp_path)
    assert extras["float_nodes"] == sorted(table.excluded) and extras["delegate_qparams"]["weights"] == len(weights)
    assert extras["delegate_partitions"] == 1  # the float layers run inside the one XNNPACK delegate
    assert _agreement(target, pte, int8, two_class_images)[0] >= 0.95


@pytest.fixture(scope="module")
def qat(tiny, source, tmp_path_factory):
    """A few QAT steps on the tiny model, exported: (int8 ONNX, its table, build inputs)."""
    from compress.quant.core import calibrate
    from compress.quant.qat import freeze_bn_stats, freeze_observers, prepare_qat
    from compress.quant.qat_export import QAT_FLOAT_ONNX, export_qat, to_float
    from recipes.sections import CalibrationConfig

    tmp = tmp_path_factory.mktemp("qat")
    recipe = load_recipe("int8-qat")
    qm = prepare_qat(tiny, recipe.quantize, recipe.qat)
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "train")
    sel = np.flatnonzero(np.isin(labels, CLASSES))[-128:]  # train images the tiny model was not trained on
    x, y = source.preprocess(torch.from_numpy(images[sel])), torch.from_numpy(labels[sel]).long()
    opt = torch.optim.AdamW(qm.parameters(), lr=1e-4)
    qm.train()
    for step in range(4):  # observers see two batches, then BN statistics and observers freeze
        if step == 2:
            freeze_bn_stats(qm)
            freeze_observers(qm)
        loss = torch.nn.functional.cross_entropy(qm(x[32 * step:32 * step + 32]), y[32 * step:32 * step + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    graph, prepared = export_qat(qm.eval(), recipe, tmp, source.preprocess)
    float_onnx = onnx.load(str(Path(prepared).parent / QAT_FLOAT_ONNX))
    ranges = calibrate(prepared, TrainSplitReader(source, CALIBRATION, 32, 0), CalibrationConfig(), tmp)
    table = ScaleTable.from_int8(graph.model, float_onnx, range_dict(ranges), graph.excluded, "qat")
    return graph.model, table, BuildInputs(to_float(qm).cpu().eval(), float_onnx, table, recipe, (SIZE, SIZE), tmp)


def test_a_qat_table_reaches_the_pte_unchanged(qat, two_class_images, tmp_path):
    int8, table, inputs = qat
    assert table.source == "qat"
    target = ExecuTorch()
    pte = target.build(inputs)
    s = compare_scales(table, *target.scales(pte))
    assert s["activations_compared"] == sum(not t.endswith("/relu6_output") for t in table.activations)
    assert s["max_rel_scale_deviation"] == 0.0
    assert s["zero_point_mismatches"] == 0 and s["weights_compared"] == len(table.weights)
    assert s["max_rel_weight_scale_deviation"] < 1e-6
    assert _agreement(target, pte, int8, two_class_images)[0] >= 0.95
