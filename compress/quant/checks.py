"""What must hold for every int8 graph the project writes: valid, whole, int8 where the recipe says, runnable."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx

from compress.errors import UserError
from compress.onnx.graph import conv_nodes, op_counts, producers_consumers, quantized_tensor_name
from compress.onnx.graph_passes import GATE_SCALE_SUFFIX
from recipes.loader import QuantizeConfig

__all__ = ["int8_checks", "int8_conv_stats", "check_covered", "check_bias_range"]

_REMOVABLE = ("Relu", "Clip")  # ORT's QDQ quantizer folds them into the following QuantizeLinear's range


def check_covered(int8: onnx.ModelProto, given: set[str], quantized: Sequence[str]) -> None:
    """A QAT export quantizes exactly what the QAT model quantized: every activation QuantizeLinear uses a
    scale the QAT model gave (no calibration), and every tensor the QAT model quantized has a QuantizeLinear."""
    inits = {i.name for i in int8.graph.initializer}
    outputs = {o.name for o in int8.graph.output}
    q_inputs = {quantized_tensor_name(n.input[0], outputs) for n in int8.graph.node
                if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    missing = sorted(q_inputs - given)
    if missing:
        raise UserError(f"QAT export: onnxruntime quantizes {len(missing)} tensor(s) the QAT model has no fake "
                        f"quant for, e.g. {missing[0]!r}")
    unquantized = [t for t in quantized if t not in q_inputs]
    if unquantized:
        raise UserError(f"QAT export: {len(unquantized)} tensor(s) fake-quantized in training stay float in the "
                        f"int8 graph, e.g. {unquantized[0]!r}")


def check_bias_range(int8: onnx.ModelProto) -> None:
    """int32 biases at the type's limits were clipped by the quantizer (a bias far larger than input scale x
    weight scale): the int8 model would silently compute something else."""
    limits = (np.iinfo(np.int32).min, np.iinfo(np.int32).max)
    for init in int8.graph.initializer:
        if init.data_type == onnx.TensorProto.INT32:
            b = onnx.numpy_helper.to_array(init)
            if b.size and (b.min() <= limits[0] or b.max() >= limits[1]):
                raise UserError(f"int32 bias {init.name!r} saturates (input scale x weight scale is too small "
                                f"for it): that layer cannot be quantized with these scales")


def int8_conv_stats(model: onnx.ModelProto) -> dict[str, Any]:
    """Convs whose weight is an int8 initializer seen through DequantizeLinear (the QDQ form of int8 weights)."""
    inits = {i.name: i for i in model.graph.initializer}
    prod, _ = producers_consumers(model.graph)
    convs = conv_nodes(model)
    int8, fp32 = [], []
    for c in convs:
        p = prod.get(c.input[1])
        ok = (p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits
              and inits[p.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
        (int8 if ok else fp32).append(c.name)
    return {"convs": len(convs), "int8_convs": len(int8), "fraction": len(int8) / max(1, len(convs)),
            "fp32_convs": fp32}


def int8_checks(int8: onnx.ModelProto, prepared: onnx.ModelProto, q: QuantizeConfig,
                input_size: Sequence[int]) -> dict[str, Any]:
    """What must hold for every int8 model; raises UserError on a violation, returns the facts otherwise."""
    import onnxruntime as ort

    onnx.checker.check_model(int8)
    # Every float node must still be there, by name, except two exact folds: ORT's QDQ quantizer folds Relu/Clip
    # into the range of the following QuantizeLinear (the uint8 range starts at 0 / ends at the clip bound), and
    # fold_gate_scales folds the relu6 gates' "* 1/6" into a DequantizeLinear scale.
    kept = {n.name for n in int8.graph.node}
    lost = [n for n in prepared.graph.node if n.name not in kept and n.op_type not in _REMOVABLE
            and not n.name.endswith(GATE_SCALE_SUFFIX)]
    if lost:
        raise UserError(f"the int8 model lost part of the network: {len(lost)} nodes missing, e.g. "
                        f"{lost[0].op_type} {lost[0].name!r}")
    int8_ops = op_counts(int8)
    stats = int8_conv_stats(int8)
    if stats["fraction"] + 1e-9 < q.min_int8_conv_fraction:
        raise UserError(f"only {stats['int8_convs']}/{stats['convs']} convs have int8 weights "
                        f"({stats['fraction']:.0%}), the recipe requires min_int8_conv_fraction = "
                        f"{q.min_int8_conv_fraction}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(int8.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, *input_size)).astype(np.float32)
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    if not np.isfinite(y).all():
        raise UserError("the int8 model produces non-finite outputs")
    return {"onnx_checker": "passed", "ort_runs": True, "int8_convs": stats["int8_convs"], "convs": stats["convs"],
            "int8_conv_fraction": round(stats["fraction"], 4), "fp32_convs": stats["fp32_convs"],
            "quantize_linear_nodes": int8_ops.get("QuantizeLinear", 0),
            "dequantize_linear_nodes": int8_ops.get("DequantizeLinear", 0)}
