"""Shared by the evaluator tests: a tiny MobileNetV3 and hand-built ONNX graphs whose output is known."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def tiny_torch_model():
    from compress.models.mobilenetv3 import mobilenet_v3_small

    torch.manual_seed(0)
    return mobilenet_v3_small(width_mult=0.25, num_classes=10).eval()


def constant_logits_model(logits, input_shape=("N", 3, 32, 32)) -> onnx.ModelProto:
    """Logits = 0 * mean(input) + ``logits``: the output is known without running anything."""
    c = np.asarray(logits, dtype=np.float32)
    channels = input_shape[1]
    zeros = numpy_helper.from_array(np.zeros((channels, len(c)), np.float32), "zeros")
    const = numpy_helper.from_array(c, "const")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "zeros"], ["mm"]),
             helper.make_node("Add", ["mm", "const"], ["logits"])]
    graph = helper.make_graph(nodes, "constant", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                list(input_shape))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(c)])],
                              [zeros, const])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def quantize_tiny(src, dst, fmt: str = "QDQ", seed: int = 0):
    """Static int8 quantization with onnxruntime (QDQ or QOperator), calibrated on two random batches:
    only the graph structure matters to the tests that use it."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(seed)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}
                                 for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    logging.getLogger().setLevel(logging.ERROR)  # ORT's "consider pre-processing" advice
    quantize_static(str(src), str(dst), Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return Path(dst)


def conv_gemm_model(input_shape=(1, 3, 8, 8)) -> onnx.ModelProto:
    """Conv 3->4 (3x3, stride 1, pad 1) -> depthwise Conv 4->4 (3x3, stride 2, pad 1) -> pool -> Gemm 4->5."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("w1", (4, 3, 3, 3)), ("w2", (4, 1, 3, 3)), ("fc", (5, 4)), ("fc_b", (5,)))]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=4),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fc_b"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "conv_gemm",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [input_shape[0], 5])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
