"""Any torchvision-layout MobileNetV3 checkpoint loads by itself: architecture, width, variant and classes are read
from the weights (compress/models/infer.py), through load_model and through the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from cli import main
from compress.errors import UserError
from compress.models.checkpoint import load_model
from compress.models.infer import infer_architecture
from compress.models.mobilenetv3 import MobileNetV3, arch_spec

# (arch, width_mult, minimalistic, classes): torchvision's constructors take all of these
CASES = [("mobilenet_v3_small", 0.5, False, 10), ("mobilenet_v3_small", 0.75, False, 10),
         ("mobilenet_v3_large", 1.0, False, 10), ("mobilenet_v3_large", 1.25, False, 10),
         ("mobilenet_v3_small", 1.0, True, 10), ("mobilenet_v3_large", 0.75, True, 10),
         ("mobilenet_v3_large", 1.0, False, 1000), ("mobilenet_v3_small", 0.75, False, 1000)]
IDS = [f"{a.split('_')[-1]}-{w}{'-min' if m else ''}-{c}" for a, w, m, c in CASES]


def _checkpoint(tmp_path, arch, width, mini, classes):
    """A torchvision-layout state_dict (a plain .pth, no metadata) of a model with trained-looking BN stats."""
    torch.manual_seed(0)
    model = MobileNetV3(arch_spec(arch, width, mini, classes)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
    path = tmp_path / "tv.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("arch, width, mini, classes", CASES, ids=IDS)
def test_architecture_is_read_from_the_weights(tmp_path, arch, width, mini, classes):
    src, path = _checkpoint(tmp_path, arch, width, mini, classes)
    found = infer_architecture(src.state_dict())
    assert (found.arch, found.width_mult, found.minimalistic, found.num_classes) == (arch, width, mini, classes)
    loaded = load_model(path)  # no options at all
    assert loaded.spec == src.spec and loaded.source == "torchvision"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), src(x), rtol=0, atol=0)


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("arch, width, mini, classes", CASES, ids=IDS)
def test_export_and_quantize_with_only_weights(tmp_path, arch, width, mini, classes):
    """``export`` and ``quantize`` need no architecture option: the fp32 ONNX each writes reproduces the source
    model.  A 10-class checkpoint without metadata names its data (--dataset); a 1000-class one is ImageNet."""
    src, path = _checkpoint(tmp_path, arch, width, mini, classes)
    data = ["--dataset", "fashion-mnist"] if classes == 10 else ["--dataset", "synthetic"]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = src(torch.from_numpy(x)).numpy()
    export_args = ["export", "--weights", str(path), "--input-size", "32", "-o", str(tmp_path / "m.onnx")]
    res = CliRunner().invoke(main, export_args + (data if classes == 10 else []))
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(_ort(tmp_path / "m.onnx", x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    out = tmp_path / "q"
    res = CliRunner().invoke(main, ["quantize", "--weights", str(path), "--input-size", "32", *data,
                                    "--calibration-size", "16", "--limit-test", "32", "-o", str(out)])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(_ort(out / "model_fp32.onnx", x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["arch"] == arch and report["checks"]["int8_conv_fraction"] >= 0.9


def test_a_contradictory_width_is_one_line_naming_what_the_weights_are(tmp_path):
    _, path = _checkpoint(tmp_path, "mobilenet_v3_small", 0.75, False, 10)
    with pytest.raises(UserError) as e:
        load_model(path, width_mult=1.0)
    msg = str(e.value)
    assert "\n" not in msg and "are mobilenet_v3_small width 0.75, 10 classes" in msg and "--width-mult 1" in msg
    res = CliRunner().invoke(main, ["export", "--weights", str(path), "--width-mult", "1.0", "--dataset",
                                    "fashion-mnist", "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 1 and "--width-mult 1 contradicts them" in res.output
    assert not (tmp_path / "m.onnx").exists()
    assert load_model(path, width_mult=0.75, arch="mobilenet_v3_small").spec.width_mult == 0.75  # agreeing: fine


def test_weights_that_are_not_a_mobilenetv3_say_so(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"features.0.0.weight": torch.zeros(16, 3, 3, 3), "classifier.3.weight": torch.zeros(10, 8)}, path)
    with pytest.raises(UserError, match="not a MobileNetV3 in torchvision's layout: 0 inverted-residual blocks"):
        load_model(path)
