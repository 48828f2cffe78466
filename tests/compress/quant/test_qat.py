"""QAT (compress/qat.py): fake quant placed where the int8 graph quantizes, freeze points, export with the
learned scales, agreement of the exported int8 ONNX with the fake-quant torch model, resume, the CLI.

The start model is the tiny two-class model of tests/compress/quant/tiny_trained.py; QAT runs a few steps on the
train images of those classes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibration.datasets import FASHION_MNIST_DIR, load_fashion_mnist, open_dataset  # noqa: E402
from compress.errors import UserError  # noqa: E402
from compress.quant.qat import QATMobileNetV3, freeze_bn_stats, freeze_observers, onnx_scope, prepare_qat  # noqa: E402
from compress.quant.qat_export import export_qat, to_float  # noqa: E402
from compress.quant.qat_train import FreezeSchedule, qat_fingerprint, run_qat  # noqa: E402
from recipes.loader import QATConfig, RecipeError, load_recipe  # noqa: E402
from tests.compress.quant.tiny_trained import CLASSES, SIZE, ort_session, train_tiny, two_class_test_images  # noqa: E402


@pytest.fixture(scope="module")
def source():
    return open_dataset("fashion-mnist", SIZE)


@pytest.fixture(scope="module")
def tiny(source):
    return train_tiny(source)


@pytest.fixture(scope="module")
def batches(source):
    """Twelve shuffled batches of the two classes' train images."""
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, "train")
    sel = np.flatnonzero(np.isin(labels, CLASSES))
    sel = np.random.default_rng(1).permutation(sel)[:12 * 32]
    x = source.preprocess(torch.from_numpy(images[sel]))
    y = torch.from_numpy(labels[sel]).long()
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(sel), 32)]


def _qat_steps(model: QATMobileNetV3, batches, lr: float = 1e-4, freeze_at: tuple[int, int] = (6, 9)):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = FreezeSchedule(freeze_at[0] / len(batches), freeze_at[1] / len(batches))
    model.train()
    for step, (x, y) in enumerate(batches):
        sched(model, step, len(batches))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sched


@pytest.fixture(scope="module")
def trained(tiny, batches, tmp_path_factory):
    """(recipe, frozen QAT model, int8 graph, prepared float path) after a few QAT steps."""
    recipe = load_recipe("int8-qat")
    qm = prepare_qat(tiny, recipe.quantize, recipe.qat)
    events = _qat_steps(qm, batches).events
    assert events == ["BN statistics frozen at step 6", "observers frozen at step 9"]
    qm.eval()
    graph, prepared = export_qat(qm, recipe, tmp_path_factory.mktemp("qat"), open_dataset("fashion-mnist", SIZE)
                                 .preprocess)
    return recipe, qm, graph, prepared


# -- placement ---------------------------------------------------------------------------------------------

def test_onnx_scope_follows_the_exporter_naming():
    assert onnx_scope("features.4.block.0.0") == "/features/features.4/block/block.0/block.0.0"
    assert onnx_scope("classifier.0") == "/classifier/classifier.0"
    assert onnx_scope("features.4.block.2.fc1") == "/features/features.4/block/block.2/fc1"
    assert onnx_scope("avgpool") == "/avgpool"


def test_prepare_fuses_and_leaves_the_float_model_alone(tiny):
    from torch.ao.nn.intrinsic import qat as nniqat
    from torch.ao.nn.qat import Linear as QATLinear

    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    qm = prepare_qat(tiny, load_recipe("int8-qat").quantize, QATConfig())
    kinds = [type(m) for m in qm.modules()]
    assert nniqat.ConvBn2d in kinds and nniqat.ConvBnReLU2d in kinds and nniqat.ConvReLU2d in kinds
    assert kinds.count(QATLinear) == 2
    assert kinds.count(torch.nn.BatchNorm2d) == kinds.count(nniqat.ConvBn2d) + kinds.count(nniqat.ConvBnReLU2d)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert not any(isinstance(m, torch.ao.quantization.FakeQuantizeBase) for m in tiny.modules())
    # every conv and both Linears carry a per-channel weight fake quant on onnxruntime's [-127, 127] grid
    weight_fqs = [m.weight_fake_quant for m in qm.modules() if hasattr(m, "weight_fake_quant")]
    assert len(weight_fqs) == len(qm.weight_sites) == 54
    assert all(f.quant_min == -127 and f.quant_max == 127 and f.is_per_channel for f in weight_fqs)


def test_fake_quants_mirror_every_quantize_linear_of_the_ptq_graph(tiny, trained, tmp_path):
    """The QAT model quantizes exactly the tensors the int8 recipe's graph quantizes: one fake quant per
    activation QuantizeLinear of the PTQ graph of the same network (the stem Pad's copy aside)."""
    from calibration.reader import TrainSplitReader
    from compress.onnx.export import to_onnx
    from compress.quant.core import calibrate, prepare_float, quantize_prepared

    recipe = trained[0]
    ptq_recipe = load_recipe("int8").replace(quantize=recipe.quantize)
    prepared = prepare_float(to_onnx(tiny, (SIZE, SIZE)), recipe.quantize, tmp_path)
    reader = TrainSplitReader(open_dataset("fashion-mnist", SIZE), size=32, batch_size=32, seed=0)
    ptq = quantize_prepared(prepared, calibrate(prepared, reader, ptq_recipe.calibration, tmp_path), ptq_recipe,
                            tmp_path).model
    inits = {i.name for i in ptq.graph.initializer}
    quantized = {n.input[0] for n in ptq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    mirrored = {t for s in trained[1].sites for t in s.tensors}
    assert quantized <= mirrored
    primary = {s.tensors[0] for s in trained[1].sites}
    assert primary - quantized == set()  # no fake quant where the int8 graph has no QuantizeLinear


# -- training controls -------------------------------------------------------------------------------------

def test_freeze_points_and_eval_keep_ranges_still(tiny, batches):
    qm = prepare_qat(tiny, load_recipe("int8-qat").quantize, QATConfig())
    x = batches[0][0]
    qm.train()
    qm(x)
    scale = qm.input_fq.scale.clone()
    qm.eval()
    qm(x * 5)  # evaluation never moves a range
    assert torch.equal(qm.input_fq.scale, scale)
    qm.train()
    qm(x * 5)
    assert not torch.equal(qm.input_fq.scale, scale)
    freeze_bn_stats(qm)
    bn = qm.features[0][0].bn
    mean = bn.running_mean.clone()
    qm.train()
    qm(x * 3)
    assert torch.equal(bn.running_mean, mean) and qm.bn_frozen
    freeze_observers(qm)
    scale = qm.input_fq.scale.clone()
    qm.train()  # train() does not undo a freeze
    qm(x * 7)
    assert torch.equal(qm.input_fq.scale, scale)


def test_export_needs_frozen_observers(tiny):
    qm = prepare_qat(tiny, load_recipe("int8-qat").quantize, QATConfig())
    with pytest.raises(UserError, match="freeze"):
        to_float(qm)


def test_qat_recipes_validate():
    from compress.models.mobilenetv3 import mobilenet_v3_small
    from recipes.loader import QuantizeConfig

    with pytest.raises(UserError, match="x_relu6"):
        prepare_qat(mobilenet_v3_small(num_classes=10), QuantizeConfig(hswish="hardswish", hard_sigmoid="relu6"),
                    QATConfig())
    with pytest.raises(RecipeError, match="qat.enabled cannot be combined"):
        load_recipe("int8-qat").with_overrides("mixed_precision", enabled=True)
    with pytest.raises(RecipeError, match="freeze_bn_epochs"):
        load_recipe("int8-qat").with_overrides("qat", freeze_bn_epochs=5.0)
    with pytest.raises(RecipeError, match="freeze_observers_epochs"):  # observers must see data first
        load_recipe("int8-qat").with_overrides("qat", freeze_observers_epochs=0.0)


# -- export ------------------------------------------------------------------------------------------------

def test_exported_int8_keeps_the_learned_scales_and_weight_codes(trained):
    """No re-calibration: every activation QuantizeLinear uses the QAT model's scale and zero point, and
    every weight's int8 codes times its scale are the QAT model's fake-quantized folded weights."""
    _, qm, graph, _ = trained
    model = graph.model
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    mods = dict(qm.named_modules())
    by_tensor = {t: mods[s.module] for s in qm.sites for t in s.tensors[:1]}
    checked = 0
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in by_tensor:
            fq = by_tensor[n.input[0]]
            fixed = isinstance(fq, torch.ao.quantization.FixedQParamsFakeQuantize)
            scale, zp = fq.calculate_qparams() if fixed else (fq.scale, fq.zero_point)
            assert float(inits[n.input[1]]) == pytest.approx(float(scale), rel=1e-6), n.input[0]
            assert int(inits[n.input[2]]) == int(zp), n.input[0]
            checked += 1
    assert checked >= len(qm.sites) - 2
    flt = to_float(qm)
    fmods = dict(flt.named_modules())
    producers = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    for ws in qm.weight_sites:
        dq = producers[nodes[ws.node].input[1]]
        codes, scales = inits[dq.input[0]], inits[dq.input[1]]
        w = fmods[ws.float_path].weight.detach().numpy()
        w = w.reshape(w.shape[0], -1)
        c = w.shape[0]
        deq = (codes.reshape(codes.shape[0], -1)[:c, :w.shape[1]].astype(np.float32)
               * scales.reshape(-1, 1)[:c])
        np.testing.assert_allclose(deq, w, rtol=1e-5, atol=1e-7, err_msg=ws.node)
        assert np.abs(codes).max() <= 127


def test_fake_quant_model_and_exported_onnx_agree(trained, source):
    _, qm, graph, _ = trained
    x, labels = two_class_test_images(source)
    with torch.no_grad():
        ref = qm(torch.from_numpy(x)).numpy()
    out = ort_session(graph.model).run(None, {"input": x})[0]
    agree = float((ref.argmax(1) == out.argmax(1)).mean())
    assert agree >= 0.99
    assert (out.argmax(1) == labels).mean() > 0.9  # a working classifier, not two constant outputs
    spread = ref.max() - ref.min()
    assert np.abs(ref - out).max() < 0.1 * spread


def test_low_bit_weights_stay_on_their_grid(tiny, batches, tmp_path):
    recipe = load_recipe("w4a8-qat")
    assert recipe.quantize.weight_bits == 4
    qm = prepare_qat(tiny, recipe.quantize, recipe.qat)
    assert all(m.weight_fake_quant.quant_max == 7 for m in qm.modules() if hasattr(m, "weight_fake_quant"))
    _qat_steps(qm, batches[:4], freeze_at=(2, 3))
    graph, _ = export_qat(qm.eval(), recipe, tmp_path, open_dataset("fashion-mnist", SIZE).preprocess)
    producers = {o: n for n in graph.model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.model.graph.initializer}
    convs = [n for n in graph.model.graph.node if n.op_type in ("Conv", "Gemm")]
    codes = [inits[producers[n.input[1]].input[0]] for n in convs]
    assert max(int(np.abs(c).max()) for c in codes) == 7


# -- the recipe step: train, checkpoint, resume ------------------------------------------------------------

def test_run_qat_checkpoints_and_resumes(tiny, source, tmp_path, monkeypatch):
    """Interrupted after BN froze (step 2) at the first step of epoch 2 (step 3), resumed: the freeze is
    restored before the next forward, BN statistics do not move again, and the result equals an uninterrupted
    run.  A finished checkpoint is reused without training."""
    recipe = load_recipe("int8-qat").with_overrides("qat", epochs=2, limit_train=96, batch_size=32, limit_test=64,
                                                    freeze_bn_epochs=0.5, freeze_observers_epochs=1.5)
    q, qat = recipe.quantize, recipe.qat
    fp = qat_fingerprint(tiny, q, qat, False)
    straight = run_qat(tiny, source, q, qat, tmp_path / "straight.pt", fp, progress=False)
    assert straight.report["freeze_events"] == ["BN statistics frozen at step 2", "observers frozen at step 5"]

    ckpt = tmp_path / "qat.pt"
    original = FreezeSchedule.__call__

    def interrupt(self, model, step, steps_per_epoch):
        if step == steps_per_epoch:  # the first step of the second epoch
            raise KeyboardInterrupt
        original(self, model, step, steps_per_epoch)

    monkeypatch.setattr(FreezeSchedule, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_qat(tiny, source, q, qat, ckpt, fp, progress=False)
    first = torch.load(ckpt, weights_only=True)
    assert first["epoch"] == 1
    monkeypatch.setattr(FreezeSchedule, "__call__", original)
    res = run_qat(tiny, source, q, qat, ckpt, fp, progress=False)
    assert res.report["resumed_from_epoch"] == 1 and len(res.report["history"]) == 2
    assert res.report["freeze_events"][0] == "BN statistics frozen at step 2 (re-applied at step 3 on resume)"
    bn_keys = [k for k in first["state_dict"] if k.endswith(("bn.running_mean", "bn.running_var"))]
    final = res.model.state_dict()
    assert bn_keys and all(torch.equal(first["state_dict"][k], final[k]) for k in bn_keys)
    reference = straight.model.state_dict()
    for k, v in final.items():
        assert torch.allclose(v.float(), reference[k].float(), atol=1e-6), k
    again = run_qat(tiny, source, q, qat, ckpt, fp, progress=False)  # finished: reused, not retrained
    assert again.report["resumed_from_epoch"] == 2 and again.report["freeze_events"] == []
    assert torch.equal(again.model.input_fq.scale, res.model.input_fq.scale)


def test_fingerprint_ignores_export_only_settings(tiny):
    recipe = load_recipe("int8-qat")
    fp = qat_fingerprint(tiny, recipe.quantize, recipe.qat, False)
    export_only = recipe.with_overrides("qat", min_onnx_agreement=0.5, compare_ptq=False).with_overrides(
        "quantize", depthwise_channel_multiple=0)
    assert qat_fingerprint(tiny, export_only.quantize, export_only.qat, False) == fp
    assert qat_fingerprint(tiny, recipe.quantize, recipe.with_overrides("qat", lr=1e-3).qat, False) != fp
    assert qat_fingerprint(tiny, recipe.quantize, recipe.qat, True) != fp
    assert qat_fingerprint(tiny, recipe.quantize, recipe.qat, False, data="other") != fp


@pytest.mark.parametrize("arch,width,minimal", [("mobilenet_v3_small", 1.0, True),
                                                ("mobilenet_v3_large", 0.75, False)])
def test_placement_covers_other_architectures(arch, width, minimal, batches, tmp_path):
    """Minimalistic (ReLU everywhere, no SE) and Large at width 0.75: the export finds a QuantizeLinear for
    every fake quant and a fake quant for every QuantizeLinear and weight (both checked inside export_qat)."""
    from compress.models.mobilenetv3 import arch_spec, build_model

    torch.manual_seed(0)
    model = build_model(arch_spec(arch, width, minimal, num_classes=10)).eval()
    recipe = load_recipe("int8-qat")
    qm = prepare_qat(model, recipe.quantize, recipe.qat)
    qm.train()
    with torch.no_grad():
        qm(batches[0][0])
    freeze_bn_stats(qm)
    freeze_observers(qm)
    graph, _ = export_qat(qm.eval(), recipe, tmp_path, open_dataset("fashion-mnist", SIZE).preprocess)
    qlinear = sum(1 for n in graph.model.graph.node if n.op_type == "QuantizeLinear")
    assert qlinear >= len(qm.sites) - 1 and len(qm.weight_sites) == sum(
        1 for n in graph.model.graph.node if n.op_type in ("Conv", "Gemm"))


def test_seven_bit_weights_follow_the_qat_model(tiny, batches, tmp_path):
    """A QAT model built for 7-bit weights (CPUs without VNNI) trains on onnxruntime's own reduced grid (the one
    the PTQ baseline uses: [-64, 64], scale absmax / 64) and exports it even where the exporting CPU has VNNI."""
    import onnx
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(onnx.TensorProto.INT8, reduce_range=True, symmetric=True))
    recipe = load_recipe("int8-qat")
    qm = prepare_qat(tiny, recipe.quantize, recipe.qat, reduce_range=True)
    fqs = [m.weight_fake_quant for m in qm.modules() if hasattr(m, "weight_fake_quant")]
    assert fqs and all((fq.quant_min, fq.quant_max) == (qmin, qmax) for fq in fqs)
    _qat_steps(qm, batches[:3], freeze_at=(1, 2))
    vnni = {"machine": "x86_64", "x86": True, "vnni": ["avx512_vnni"], "avx2": True, "avx512": True,
            "arm_dot": False}
    graph, _ = export_qat(qm.eval(), recipe, tmp_path, open_dataset("fashion-mnist", SIZE).preprocess, cpu=vnni)
    assert graph.reduce_range and "7-bit" in graph.reduce_range_reason
    producers = {o: n for n in graph.model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.model.graph.initializer}
    codes = [inits[producers[n.input[1]].input[0]] for n in graph.model.graph.node if n.op_type == "Conv"]
    assert max(int(np.abs(c).max()) for c in codes) == qmax


def test_quantize_command_runs_a_qat_recipe(tiny, tmp_path):
    from click.testing import CliRunner

    from cli import main
    from compress.models.checkpoint import save_checkpoint

    weights = save_checkpoint(tmp_path / "tiny.pt", tiny, input_size=SIZE, dataset="fashion-mnist")
    rec = load_recipe("int8-qat").with_overrides("qat", epochs=1, limit_train=128, batch_size=32, limit_test=64,
                                                 freeze_bn_epochs=0.5, freeze_observers_epochs=0.75,
                                                 min_onnx_agreement=0.95)
    rec = rec.with_overrides("calibration", size=32)
    (tmp_path / "quick.toml").write_text(rec.to_toml())
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["quantize", "--recipe", str(tmp_path / "quick.toml"), "--weights",
                                    str(weights), "--limit-test", "300", "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 0, res.output
    for f in ("model_fp32.onnx", "model_int8.onnx", "model_int8_ptq.onnx", "report.json", "report.md",
              "recipe.toml", "qat_checkpoint.pt"):
        assert (out / f).is_file(), f
    report = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["fp32", "int8", "int8-ptq"]
    q = report["qat"]
    assert q["onnx_vs_fake_quant_agreement"] >= 0.95 and len(q["history"]) == 1
    assert report["quantization"]["calibration_method"] == "none (QAT scales)"
    assert report["checks"]["int8_conv_fraction"] == 1.0
    assert "QAT: fake-quant torch model top-1" in res.output
    md = (out / "report.md").read_text()
    assert "## Quantization-aware training" in md and "| 1 |" in md and "int8-ptq" in md
