"""compress/onnx/graph_passes.py: the h-swish / SE-gate forms compute the same function; private initializers.

The activation forms are checked on the briefly trained tiny model (tests/compress/quant/tiny_trained.py), whose
outputs have real margins.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from calibration.datasets import open_dataset
from compress.onnx.export import to_onnx
from compress.onnx.graph import op_counts
from compress.onnx.graph_passes import rewrite_hard_sigmoid, rewrite_hswish, unshare_initializers
from tests.compress.quant.tiny_trained import SIZE, ort_session, train_tiny, two_class_test_images


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort_session(model).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def source():
    return open_dataset("fashion-mnist", SIZE)


@pytest.fixture(scope="module")
def tiny(source):
    model = train_tiny(source)
    return model, None, to_onnx(model, (SIZE, SIZE))


@pytest.fixture(scope="module")
def eval_subset(source):
    return two_class_test_images(source)


@pytest.mark.parametrize("hswish, hsig", [("x_hardsigmoid", "op"), ("x_relu6", "op"), ("x_relu6", "relu6"),
                                          ("hardswish", "relu6")])
def test_activation_forms_compute_the_same_function(tiny, eval_subset, hswish, hsig):
    fp32 = tiny[2]
    shaped = rewrite_hard_sigmoid(rewrite_hswish(unshare_initializers(fp32), hswish), hsig)
    onnx.checker.check_model(shaped)
    ops = op_counts(shaped)
    assert ("HardSwish" in ops) == (hswish == "hardswish")
    if hsig == "relu6":
        assert ops.get("HardSigmoid", 0) == (op_counts(fp32)["HardSwish"] if hswish == "x_hardsigmoid" else 0)
    x = eval_subset[0][:64]
    np.testing.assert_allclose(_run(shaped, x), _run(fp32, x), rtol=1e-4, atol=1e-4)


def test_unshare_gives_every_conv_private_initializers():
    from compress.models.checkpoint import load_model

    fp32 = to_onnx(load_model(None, num_classes=10).model, (SIZE, SIZE))  # random init: zero biases get merged
    def shared(m):
        users = {}
        for n in m.graph.node:
            if n.op_type in ("Conv", "Gemm"):
                for i in n.input[1:]:
                    users[i] = users.get(i, 0) + 1
        return [k for k, v in users.items() if v > 1]
    assert shared(fp32), "expected the exporter to merge equal initializers"
    assert shared(unshare_initializers(fp32)) == []
