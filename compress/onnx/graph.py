"""Small read-only views of an ONNX graph shared by the passes: who writes and reads each tensor, attributes."""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import onnx

__all__ = ["producers_consumers", "op_counts", "conv_nodes", "attr_int", "is_scalar_initializer", "weight_channel_axis",
           "fix_batch", "quantized_tensor_name"]


def producers_consumers(g: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """Who writes each tensor, and who reads it."""
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    return producer, consumers


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def conv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def is_scalar_initializer(name: str, inits: dict) -> bool:
    return name in inits and int(np.prod(inits[name].dims)) <= 1


def weight_channel_axis(node: onnx.NodeProto) -> int:
    """The axis of a Conv / Gemm weight that holds its output channels (onnxruntime's per-channel axis): 0 for
    Conv and for Gemm with ``transB = 1``; 1 for Gemm without it (``transB`` absent means 0: B is [K, N])."""
    if node.op_type == "Gemm":
        return 0 if attr_int(node, "transB", 0) else 1
    return 0


def fix_batch(model: onnx.ModelProto, batch: int = 1) -> onnx.ModelProto:
    """A copy whose graph inputs and outputs have a static batch (mobile runtimes and NNAPI want fixed shapes)."""
    import copy

    out = copy.deepcopy(model)
    for v in list(out.graph.input) + list(out.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    del out.graph.value_info[:]  # inferred with the dynamic batch
    return out


_RENAMED_OUTPUT = "_QuantizeLinear_Input"  # onnxruntime renames the producer tensor of a quantized graph output


def quantized_tensor_name(name: str, graph_outputs) -> str:
    """The float graph's name of a tensor a QuantizeLinear reads: onnxruntime's QDQ quantizer renames a graph
    output ``X`` it quantizes (its producer writes ``X_QuantizeLinear_Input``, the DequantizeLinear writes X)."""
    if name.endswith(_RENAMED_OUTPUT) and name[:-len(_RENAMED_OUTPUT)] in graph_outputs:
        return name[:-len(_RENAMED_OUTPUT)]
    return name
