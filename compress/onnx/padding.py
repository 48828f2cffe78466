"""Channel padding for onnxruntime's x86 int8 kernels (float graph in, float graph out, same function).

* :func:`pad_depthwise_channels` pads depthwise convs to a channel multiple (with zero weights in the convs that
  feed and read them, so the function is unchanged): onnxruntime's fast symmetric int8 depthwise kernel
  (MLAS ``ConvSym`` depthwise, VNNI) needs the group count to be a multiple of 16; MobileNetV3's 72 / 88 / 120 /
  184 / 200-channel depthwise convs otherwise run a generic kernel 2-3x slower than their fp32 NCHWc version
  (``mnv3-compress profile``).
* :func:`pad_input_channels` does the same for the stem: a Conv reading the 3-channel image gets a fourth, zero
  input channel (a ``Pad``, zero weights), because MLAS's symmetric int8 conv kernels need input channels % 4 ==
  0; the 3-channel stem otherwise runs a generic path ~2x slower.
* :func:`fold_input_pads` (after quantization, QDQ graph in and out) moves that ``Pad`` into the integer domain:
  ``Q(x) -> DQ -> Pad -> Q`` becomes ``Q(x) -> Pad(uint8, the zero point)``, one QuantizeLinear and an 8-bit
  copy instead of two float passes.

Passes return new ModelProtos and keep node names stable.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.onnx.graph import attr_int, is_scalar_initializer, producers_consumers

__all__ = ["pad_depthwise_channels", "pad_input_channels", "fold_input_pads", "INPUT_PAD_SUFFIX"]

INPUT_PAD_SUFFIX = "/InputPad"  # the Pad nodes of pad_input_channels (moved to uint8 by fold_input_pads)


def pad_depthwise_channels(model: onnx.ModelProto, multiple: int = 16) -> tuple[onnx.ModelProto, int]:
    """Pad every depthwise Conv whose channel count is not a multiple of ``multiple`` (and the tensors around
    it) to the next multiple, adding zero channels: the convs that produce those channels get zero filters and
    zero biases, depthwise convs zero filters, convs that read them zero input weights.  Between them only
    channel-wise ops may sit (Relu, Clip, HardSwish, HardSigmoid, Add/Mul with scalar constants, products of
    such tensors, GlobalAveragePool: every h-swish / SE-gate form), and every path out of the padded channels
    ends in a conv that reads them with zero weights, so every output is unchanged.  Returns the new model and
    the number of padded depthwise convs; a region that reaches anything else (a graph output, a residual Add,
    a Gemm) is left as it is.  Needs private Conv initializers (:func:`unshare_initializers`)."""
    out = copy.deepcopy(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    producer, consumers = producers_consumers(g)
    boundary = {i.name for i in g.input} | {o.name for o in g.output}
    done: set[str] = set()
    padded = 0
    for dw in list(g.node):
        if dw.op_type != "Conv" or dw.name in done or dw.input[1] not in inits:
            continue
        c = int(inits[dw.input[1]].dims[0])
        if attr_int(dw, "group", 1) != c or c <= 1 or c % multiple == 0 or inits[dw.input[1]].dims[1] != 1:
            continue
        region = _channel_region(dw, c, inits, producer, consumers, boundary)
        if region is None:
            continue
        sources, dws, sinks = region
        new_c = -(-c // multiple) * multiple
        for n, axis in [(n, 0) for n in sources + dws] + [(n, 1) for n in sinks]:
            w = numpy_helper.to_array(inits[n.input[1]])
            widths = [(0, 0)] * w.ndim
            widths[axis] = (0, new_c - c)
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(np.pad(w, widths), n.input[1]))
            if axis == 0 and len(n.input) > 2 and n.input[2]:
                b = numpy_helper.to_array(inits[n.input[2]])
                inits[n.input[2]].CopyFrom(numpy_helper.from_array(np.pad(b, (0, new_c - c)), n.input[2]))
        for n in dws:
            next(a for a in n.attribute if a.name == "group").i = new_c
            done.add(n.name)
        padded += len(dws)
    if padded:
        del g.value_info[:]  # channel counts changed; shape inference (quant_pre_process) recomputes them
    return out, padded


# ops that act on each channel alone; whatever they make of a padded channel only ever reaches a conv that reads
# it with zero weights (a depthwise conv's zero filter and bias turn it back into 0), so the outputs stay exact
_CHANNELWISE = ("Relu", "Clip", "Add", "Mul", "HardSwish", "HardSigmoid", "GlobalAveragePool")


def _channel_region(dw, c, inits, producer, consumers, boundary):
    """The convs around depthwise conv ``dw`` that share its ``c`` channels: (sources, depthwise, sinks), or
    None when the channels reach an op that is not channel-wise."""
    sources: dict[str, onnx.NodeProto] = {}
    dws: dict[str, onnx.NodeProto] = {dw.name: dw}
    sinks: dict[str, onnx.NodeProto] = {}
    seen: set[str] = set()
    todo = [dw.input[0], dw.output[0]]
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in boundary or t in inits:
            return None
        p = producer.get(t)
        if p is None:
            return None
        if p.op_type == "Conv" and p.name not in dws:
            if p.input[1] not in inits or int(inits[p.input[1]].dims[0]) != c or attr_int(p, "group", 1) != 1:
                return None
            sources[p.name] = p
        elif p.op_type in _CHANNELWISE and p.name not in dws:
            ins = [i for i in p.input if i]
            if p.op_type in ("Add", "Mul", "Clip"):
                consts = [i for i in ins[1:] if is_scalar_initializer(i, inits)] if p.op_type == "Clip" else \
                    [i for i in ins if is_scalar_initializer(i, inits)]
                if p.op_type == "Clip" and len(consts) != len(ins) - 1:
                    return None
                if p.op_type in ("Add",) and len(consts) != 1:
                    return None  # a residual Add: the other operand has real channels
                todo += [i for i in ins if i not in consts]
            else:
                todo += ins
        elif p.name not in dws:
            return None
        for n in consumers.get(t, []):
            if n.op_type == "Conv":
                if n.input[0] != t:
                    return None
                if n.input[1] not in inits:
                    return None
                if attr_int(n, "group", 1) == c and int(inits[n.input[1]].dims[1]) == 1:
                    dws[n.name] = n
                    todo.append(n.output[0])
                elif attr_int(n, "group", 1) == 1 and int(inits[n.input[1]].dims[1]) == c:
                    sinks[n.name] = n
                else:
                    return None
            elif n.op_type in _CHANNELWISE:
                if n.op_type == "Add" and not any(is_scalar_initializer(i, inits) for i in n.input):
                    return None
                todo += [o for o in n.output] + [i for i in n.input if i and not is_scalar_initializer(i, inits)]
            else:
                return None
    return list(sources.values()), list(dws.values()), list(sinks.values())


def pad_input_channels(model: onnx.ModelProto, multiple: int = 4) -> tuple[onnx.ModelProto, int]:
    """Give every plain Conv that reads a graph input directly (the stem) ``multiple``-aligned input channels:
    a ``Pad`` of the input with zero channels (node ``<conv>/InputPad``; after quantization
    :func:`fold_input_pads` runs it on the quantized input) and zero weights for them.  Same function.
    Returns the model and the number of padded convs."""
    out = copy.deepcopy(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    graph_inputs = {i.name for i in g.input} - set(inits)
    new_nodes: list[onnx.NodeProto] = []
    padded = 0
    for n in g.node:
        if (n.op_type == "Conv" and n.input[0] in graph_inputs and n.input[1] in inits
                and attr_int(n, "group", 1) == 1 and inits[n.input[1]].dims[1] % multiple):
            w = numpy_helper.to_array(inits[n.input[1]])
            extra = -(-w.shape[1] // multiple) * multiple - w.shape[1]
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(
                np.pad(w, [(0, 0), (0, extra)] + [(0, 0)] * (w.ndim - 2)), n.input[1]))
            base = n.name.rsplit("/", 1)[0] if "/" in n.name else n.name
            pads = f"{base}{INPUT_PAD_SUFFIX}/pads"
            g.initializer.append(numpy_helper.from_array(
                np.array([0, 0] + [0] * (w.ndim - 2) + [0, extra] + [0] * (w.ndim - 2), np.int64), pads))
            padded_x = f"{base}{INPUT_PAD_SUFFIX}_output"
            new_nodes.append(helper.make_node("Pad", [n.input[0], pads], [padded_x], name=f"{base}{INPUT_PAD_SUFFIX}",
                                              mode="constant"))
            n.input[0] = padded_x
            padded += 1
        new_nodes.append(n)
    if padded:
        del g.node[:]
        g.node.extend(new_nodes)
        del g.value_info[:]
    return out, padded


def fold_input_pads(qdq: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``x -> Q(s1, z1) -> DQ -> Pad(0) -> Q(s2, z2) -> ...`` (the ``*/InputPad`` nodes) becomes
    ``x -> Q(s2, z2) -> Pad(constant z2) -> ...``: padding the 8-bit codes with the zero point is padding with
    0.0.  Returns the new model and the number of folded pads."""
    out = copy.deepcopy(qdq)
    g = out.graph
    producer, consumers = producers_consumers(g)
    remove: set[int] = set()
    folded = 0
    for pad in list(g.node):
        if pad.op_type != "Pad" or not pad.name.endswith(INPUT_PAD_SUFFIX):
            continue
        dq = producer.get(pad.input[0])
        q1 = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        after = consumers.get(pad.output[0], [])
        if (q1 is None or q1.op_type != "QuantizeLinear" or len(after) != 1 or after[0].op_type != "QuantizeLinear"
                or len(consumers[q1.output[0]]) != 1 or len(consumers[dq.output[0]]) != 1 or len(after[0].input) < 3):
            continue
        q2 = after[0]
        if len(pad.input) > 2 and pad.input[2]:
            continue  # an explicit constant value: leave it
        q1.input[1], q1.input[2] = q2.input[1], q2.input[2]  # quantize x with the padded tensor's qparams
        pads = pad.input[1]
        del pad.input[:]
        pad.input.extend([q1.output[0], pads, q2.input[2]])  # constant_value = the zero point
        pad.output[0] = q2.output[0]
        remove.update({id(dq), id(q2)})
        folded += 1
    keep = [n for n in g.node if id(n) not in remove]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    for i in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(i)
    return out, folded
