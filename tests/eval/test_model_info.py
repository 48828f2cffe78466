"""MACs and params against hand counts and the published MobileNetV3 figures; machine facts."""
from __future__ import annotations

import onnx
import pytest
from eval_helpers import conv_gemm_model, quantize_tiny

from compress.models.mobilenetv3 import count_params, mobilenet_v3_large, mobilenet_v3_small
from compress.onnx.export import to_onnx
from compress.onnx.metadata import set_metadata
from eval.model_info import ISA_FLAGS, count_macs, input_shape, machine_info, model_params


def test_macs_by_hand():
    # conv1: 4 out ch x 8x8 x (3 in ch x 3x3) = 6912; depthwise: 4 x 4x4 x (1 x 3x3) = 576; gemm: 4 x 5 = 20
    model = conv_gemm_model()
    assert count_macs(model) == 6912 + 576 + 20
    # a symbolic batch is counted at batch 1
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert count_macs(model) == 6912 + 576 + 20


@pytest.mark.parametrize("builder, params, macs, published", [
    # Counted: every Conv (stem, expand, depthwise, project, SE fc1/fc2 as 1x1 convs, last conv) and both
    # classifier Linears (Gemm), batch 1 @224.  Not counted: BN (folded), activations, pooling, SE gate
    # multiply, residual adds, biases.  Published: torchvision's weights metadata (_ops 0.217 / 0.057 GFLOPS,
    # i.e. GMACs) and the paper (219 M / 56 M MAdds).
    (mobilenet_v3_large, 5_483_032, 216_589_760, (217e6, 219e6)),
    (mobilenet_v3_small, 2_542_856, 56_510_400, (57e6, 56e6)),
])
def test_published_params_and_macs(builder, params, macs, published):
    model = builder()
    assert count_params(model) == params
    proto = set_metadata(to_onnx(model, (224, 224)), {"params": count_params(model)})
    assert model_params(proto) == params
    counted = count_macs(proto)
    assert counted == macs
    torchvision, paper = published
    assert abs(counted - torchvision) / torchvision < 0.01
    assert abs(counted - paper) / paper < 0.015


def test_int8_models_count_the_same_macs_and_params(tiny, tmp_path):
    _, fp32 = tiny
    macs = count_macs(fp32)
    assert macs > 0
    for fmt in ("QDQ", "QOperator"):  # QOperator has com.microsoft ops (QLinearAdd) onnx cannot infer
        q = quantize_tiny(fp32, tmp_path / f"tiny_{fmt}.onnx", fmt)
        ops = {n.op_type for n in onnx.load(str(q)).graph.node}
        assert ("QLinearConv" in ops) == (fmt == "QOperator")
        assert count_macs(q) == macs
        assert model_params(q) == model_params(fp32) == count_params(tiny[0])


def test_input_shape_from_metadata_and_graph(tiny):
    assert input_shape(onnx.load(str(tiny[1])), batch=4) == (4, 3, 32, 32)
    assert input_shape(conv_gemm_model()) == (1, 3, 8, 8)
    assert model_params(conv_gemm_model()) is None


def test_machine_info():
    info = machine_info()
    assert set(info) == {"cpu", "cores", "isa", "onnxruntime", "torch"}
    assert isinstance(info["cores"], int) and info["cores"] >= 1
    assert set(info["isa"]) <= set(ISA_FLAGS)
    import onnxruntime
    import torch

    assert info["onnxruntime"] == onnxruntime.__version__
    assert info["torch"] == torch.__version__
