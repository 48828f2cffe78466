"""compress/onnx/padding.py: zero channels for onnxruntime's x86 int8 kernels, the function unchanged.

A MobileNetV3-Small at width 0.5 with random BN statistics (so every bias is non-zero) at 32x32: its
depthwise convs have 8, 40, 72 and 120 channels, so padding has work to do.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress.onnx.export import to_onnx
from compress.onnx.graph_passes import rewrite_hard_sigmoid, rewrite_hswish, unshare_initializers
from compress.onnx.padding import INPUT_PAD_SUFFIX, pad_depthwise_channels, pad_input_channels

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


@pytest.mark.parametrize("hswish, hsig", [("hardswish", "op"), ("x_relu6", "relu6")])
def test_padding_depthwise_channels_keeps_the_function(fp32, x, hswish, hsig):
    shaped = rewrite_hard_sigmoid(rewrite_hswish(unshare_initializers(fp32), hswish), hsig)
    assert any(g % 16 for g in _dw_groups(shaped))
    padded, n = pad_depthwise_channels(shaped, 16)
    onnx.checker.check_model(padded)
    assert n == sum(1 for g in _dw_groups(shaped) if g % 16)
    assert all(g % 16 == 0 for g in _dw_groups(padded))
    assert [nd.name for nd in padded.graph.node] == [nd.name for nd in shaped.graph.node]
    ref, out = _run(shaped, x), _run(padded, x)
    assert np.abs(ref).max() > 1e-2  # a model with real outputs
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_padding_leaves_regions_it_cannot_prove(x):
    """A depthwise conv whose channels reach a residual Add with an unpadded tensor is not padded."""
    rng = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), f"w{len(inits)}")  # noqa: E731
    inits = []
    inits.append(w(24, 3, 1, 1))
    inits.append(w(24, 1, 3, 3))
    nodes = [helper.make_node("Conv", ["input", inits[0].name], ["a"], name="expand"),
             helper.make_node("Conv", ["a", inits[1].name], ["b"], name="dw", group=24, pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "b"], ["out"], name="residual")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [8, 3, SIZE, SIZE])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    padded, n = pad_depthwise_channels(m, 16)
    assert n == 0 and _dw_groups(padded) == [24]


def test_padding_the_stem_input_channels_keeps_the_function(fp32, x):
    padded, n = pad_input_channels(fp32, 4)
    onnx.checker.check_model(padded)
    assert n == 1
    pad = padded.graph.node[0]
    assert pad.op_type == "Pad" and pad.name.endswith(INPUT_PAD_SUFFIX) and pad.input[0] == "input"
    stem = next(nd for nd in padded.graph.node if nd.op_type == "Conv")
    w = next(i for i in padded.graph.initializer if i.name == stem.input[1])
    assert list(w.dims)[:2] == [list(w.dims)[0], 4]
    np.testing.assert_allclose(_run(padded, x), _run(fp32, x), rtol=1e-4, atol=1e-5)
    assert pad_input_channels(padded, 4)[1] == 0  # already aligned
