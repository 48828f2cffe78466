"""fp32 ONNX export: matches torch, carries the metadata a deployment needs, is written atomically."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from calibration.preprocess import Preprocess
from compress.errors import UserError
from compress.models.mobilenetv3 import count_params, mobilenet_v3_large, mobilenet_v3_small
from compress.onnx.export import export_onnx
from compress.onnx.metadata import get_metadata

PRE = Preprocess((40, 40), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), grayscale_to_rgb=True)


@pytest.mark.parametrize("builder", [mobilenet_v3_small, mobilenet_v3_large])
def test_onnx_matches_torch_and_has_dynamic_batch(tmp_path, builder):
    model = builder(num_classes=10).eval()
    # non-trivial BN statistics so that folding is exercised
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = export_onnx(model, tmp_path / "m.onnx", PRE)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version >= 17
    assert "Identity" not in {n.op_type for n in proto.graph.node}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 40, 40)
    with torch.no_grad():
        ref = model(x).numpy()
    got = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_metadata_says_how_to_feed_the_model(tmp_path):
    model = mobilenet_v3_small(num_classes=10)
    meta = get_metadata(onnx.load(export_onnx(model, tmp_path / "m.onnx", PRE, recipe="fp32")))
    pre = json.loads(meta["preprocess"])
    assert pre["input_size"] == [40, 40] and pre["mean"] == [0.5] * 3 and pre["std"] == [0.25] * 3
    assert pre["grayscale_to_rgb"] is True and pre["resize"] is None and pre["interpolation"] == "bilinear"
    assert Preprocess.from_json(meta["preprocess"]) == PRE
    assert meta["recipe"] == "fp32" and meta["arch"] == "mobilenet_v3_small"
    assert int(meta["params"]) == count_params(model)


def test_failed_validation_keeps_no_file(tmp_path, monkeypatch):
    import compress.onnx.export as ex

    def broken(*a, **k):
        raise RuntimeError("exported ONNX disagrees with torch")

    monkeypatch.setattr(ex, "validate", broken)
    with pytest.raises(RuntimeError):
        export_onnx(mobilenet_v3_small(num_classes=10), tmp_path / "m.onnx", PRE)
    assert list(tmp_path.iterdir()) == []


def test_old_opset_is_refused(tmp_path):
    with pytest.raises(UserError, match="opset"):
        export_onnx(mobilenet_v3_small(num_classes=10), tmp_path / "m.onnx", PRE, opset=13)
