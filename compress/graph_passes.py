"""Small ONNX passes that onnxruntime's quantization tooling does not do for us.

Before quantization (float graph in, float graph out, same function):

* :func:`unshare_initializers` gives every Conv/Gemm its own weight and bias tensors: the exporter's constant
  folding merges equal initializers (e.g. zero biases), but a quantized bias depends on its node's input and
  weight scales, so a shared one would be quantized with the wrong scale.
* :func:`rewrite_hswish` / :func:`rewrite_hard_sigmoid` express h-swish and the SE gate in one of
  :data:`recipes.loader.HSWISH_FORMS` / :data:`recipes.loader.HARD_SIGMOID_FORMS`.  Which form quantizes best and
  runs fastest is measured by ``benchmarks/int8_latency.py --forms``.
* :func:`pad_depthwise_channels` pads depthwise convs to a channel multiple (with zero weights in the convs that
  feed and read them, so the function is unchanged): onnxruntime's fast symmetric int8 depthwise kernel
  (MLAS ``ConvSym`` depthwise, VNNI) needs the group count to be a multiple of 16; MobileNetV3's 72 / 88 / 120 /
  184 / 200-channel depthwise convs otherwise run a generic kernel 2-3x slower than their fp32 NCHWc version
  (``mnv3-compress profile``).
* :func:`pad_input_channels` does the same for the stem: a Conv reading the 3-channel image gets a fourth, zero
  input channel (a ``Pad``, zero weights), because MLAS's symmetric int8 conv kernels need input channels % 4 ==
  0; the 3-channel stem otherwise runs a generic path ~2x slower.
* :func:`fixed_range_tensors` names the tensors whose range is fixed by the math, not by data: a hard-sigmoid
  output is in [0, 1], a relu6 output in [0, 6].  Their quantization parameters are set, not calibrated.

After quantization (QDQ graph in, QDQ graph out):

* :func:`fold_gate_scales` removes the ``* 1/6`` of the relu6 forms: ``DQ(q, s, z) * c`` is ``DQ(q, s*c, z)``,
  so the multiply and its QuantizeLinear/DequantizeLinear pair disappear and the gate is the relu6's uint8 code
  read with scale ``(6/255) * (1/6) = 1/255`` - exactly hard-sigmoid's fixed qparams, with no op at all.

* :func:`fold_input_pads` moves that ``Pad`` into the integer domain: ``Q(x) -> DQ -> Pad -> Q`` becomes
  ``Q(x) -> Pad(uint8, the zero point)``, one QuantizeLinear and an 8-bit copy instead of two float passes.

Passes return new ModelProtos and keep node names stable, so recipes and tuning can refer to them.
"""
from __future__ import annotations

import copy
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["rewrite_hswish", "rewrite_hard_sigmoid", "unshare_initializers", "fixed_range_tensors",
           "fold_gate_scales", "pad_depthwise_channels", "pad_input_channels", "fold_input_pads", "conv_nodes",
           "op_counts", "GATE_SCALE_SUFFIX", "INPUT_PAD_SUFFIX"]

GATE_SCALE_SUFFIX = "/GateScale"  # the Mul(., 1/6) nodes that fold_gate_scales removes
INPUT_PAD_SUFFIX = "/InputPad"  # the Pad nodes of pad_input_channels (moved to uint8 by fold_input_pads)
_RELU6_SUFFIX = "/relu6_output"
_HSIG_SUFFIX = "/gate_output"


def _producers_consumers(g: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
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


def _const(graph: onnx.GraphProto, name: str, value: float) -> str:
    """Add (once) a float32 scalar initializer called ``name``."""
    if not any(i.name == name for i in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
    return name


def _relu6_gate(g: onnx.GraphProto, x: str, gate: str, base: str) -> list[onnx.NodeProto]:
    """``gate = Clip(x + 3, 0, 6) * (1/6)`` == torch's Hardsigmoid(x)."""
    three, zero, six, sixth = (_const(g, "hsig.three", 3.0), _const(g, "hsig.zero", 0.0),
                               _const(g, "hsig.six", 6.0), _const(g, "hsig.one_sixth", 1.0 / 6.0))
    shifted, relu6 = f"{base}/add_output", f"{base}{_RELU6_SUFFIX}"
    return [
        helper.make_node("Add", [x, three], [shifted], name=f"{base}/Add"),
        helper.make_node("Clip", [shifted, zero, six], [relu6], name=f"{base}/Relu6"),
        helper.make_node("Mul", [relu6, sixth], [gate], name=f"{base}{GATE_SCALE_SUFFIX}"),
    ]


def rewrite_hswish(model: onnx.ModelProto, form: str) -> onnx.ModelProto:
    """Replace every ``HardSwish(x)`` by the equivalent subgraph ``form``.

    * ``hardswish``: unchanged (ORT has no HardSwish kernel; its optimizer expands it to HardSigmoid * x).
    * ``x_hardsigmoid``: ``x * HardSigmoid(x, alpha=1/6, beta=0.5)``: float HardSigmoid between DQ and Q, the
      product as QLinearMul.
    * ``x_relu6``: ``x * (Clip(x + 3, 0, 6) * 1/6)``: QLinearAdd (the clip is the Q range) and QLinearMul only,
      once :func:`fold_gate_scales` has removed the ``* 1/6``.
    """
    from recipes.loader import HSWISH_FORMS

    if form not in HSWISH_FORMS:
        raise ValueError(f"hswish form {form!r} is not one of {HSWISH_FORMS}")
    out = copy.deepcopy(model)
    if form == "hardswish":
        return out
    g = out.graph
    new_nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if n.op_type != "HardSwish":
            new_nodes.append(n)
            continue
        x, y, base = n.input[0], n.output[0], n.name or n.output[0]
        gate = f"{base}{_HSIG_SUFFIX}"
        if form == "x_hardsigmoid":
            new_nodes.append(helper.make_node("HardSigmoid", [x], [gate], name=f"{base}/HardSigmoid",
                                              alpha=1.0 / 6.0, beta=0.5))
        else:
            new_nodes += _relu6_gate(g, x, gate, base)
        new_nodes.append(helper.make_node("Mul", [x, gate], [y], name=f"{base}/Mul"))
    del g.node[:]
    g.node.extend(new_nodes)
    return out


def rewrite_hard_sigmoid(model: onnx.ModelProto, form: str) -> onnx.ModelProto:
    """Replace torch's ``HardSigmoid(alpha=1/6, beta=0.5)`` (the SE gate) by ``form``.

    * ``op``: unchanged.
    * ``relu6``: ``Clip(x + 3, 0, 6) * 1/6``; when ``x`` is a Conv output read by nothing else (the SE's fc2),
      the ``+ 3`` goes into that conv's bias, so the whole gate is the conv's uint8 output.
    """
    from recipes.loader import HARD_SIGMOID_FORMS

    if form not in HARD_SIGMOID_FORMS:
        raise ValueError(f"hard_sigmoid form {form!r} is not one of {HARD_SIGMOID_FORMS}")
    out = copy.deepcopy(model)
    if form == "op":
        return out
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers = Counter(name for n in g.node for name in n.input)
    graph_outputs = {o.name for o in g.output}
    new_nodes: list[onnx.NodeProto] = []
    for n in g.node:
        alpha = next((a.f for a in n.attribute if a.name == "alpha"), 0.2)
        beta = next((a.f for a in n.attribute if a.name == "beta"), 0.5)
        if n.op_type != "HardSigmoid" or not (abs(alpha - 1 / 6) < 1e-6 and abs(beta - 0.5) < 1e-6):
            new_nodes.append(n)
            continue
        x, base = n.input[0], n.name or n.output[0]
        nodes = _relu6_gate(g, x, n.output[0], base)
        conv = producer.get(x)
        if (conv is not None and conv.op_type == "Conv" and len(conv.input) == 3 and conv.input[2] in inits
                and readers[x] == 1 and x not in graph_outputs and readers[conv.input[2]] == 1):
            bias = inits[conv.input[2]]
            bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(3.0), bias.name))
            nodes[1].input[0] = x  # Clip(conv + 3 folded into the bias, 0, 6)
            nodes = nodes[1:]
        new_nodes += nodes
    del g.node[:]
    g.node.extend(new_nodes)
    return out


def unshare_initializers(model: onnx.ModelProto, op_types: tuple[str, ...] = ("Conv", "Gemm")) -> onnx.ModelProto:
    """Give each ``op_types`` node private copies of initializers that other nodes also read."""
    out = copy.deepcopy(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    users = Counter(name for n in g.node for name in n.input if name in inits)
    seen: Counter = Counter()
    for n in g.node:
        if n.op_type not in op_types:
            continue
        for k, name in enumerate(n.input):
            if name in inits and users[name] > 1:
                seen[name] += 1
                if seen[name] == 1:
                    continue  # the first user keeps the original
                clone = copy.deepcopy(inits[name])
                clone.name = f"{name}.{n.name or n.output[0]}.{k}"
                g.initializer.append(clone)
                n.input[k] = clone.name
    return out


def _attr_i(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _scalar_init(name: str, inits: dict) -> bool:
    return name in inits and int(np.prod(inits[name].dims)) <= 1


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
    producer, consumers = _producers_consumers(g)
    boundary = {i.name for i in g.input} | {o.name for o in g.output}
    done: set[str] = set()
    padded = 0
    for dw in list(g.node):
        if dw.op_type != "Conv" or dw.name in done or dw.input[1] not in inits:
            continue
        c = int(inits[dw.input[1]].dims[0])
        if _attr_i(dw, "group", 1) != c or c <= 1 or c % multiple == 0 or inits[dw.input[1]].dims[1] != 1:
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
            if p.input[1] not in inits or int(inits[p.input[1]].dims[0]) != c or _attr_i(p, "group", 1) != 1:
                return None
            sources[p.name] = p
        elif p.op_type in _CHANNELWISE and p.name not in dws:
            ins = [i for i in p.input if i]
            if p.op_type in ("Add", "Mul", "Clip"):
                consts = [i for i in ins[1:] if _scalar_init(i, inits)] if p.op_type == "Clip" else \
                    [i for i in ins if _scalar_init(i, inits)]
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
                if _attr_i(n, "group", 1) == c and int(inits[n.input[1]].dims[1]) == 1:
                    dws[n.name] = n
                    todo.append(n.output[0])
                elif _attr_i(n, "group", 1) == 1 and int(inits[n.input[1]].dims[1]) == c:
                    sinks[n.name] = n
                else:
                    return None
            elif n.op_type in _CHANNELWISE:
                if n.op_type == "Add" and not any(_scalar_init(i, inits) for i in n.input):
                    return None
                todo += [o for o in n.output] + [i for i in n.input if i and not _scalar_init(i, inits)]
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
                and _attr_i(n, "group", 1) == 1 and inits[n.input[1]].dims[1] % multiple):
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
    producer, consumers = _producers_consumers(g)
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


def fixed_range_tensors(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Tensors whose range is known exactly: outputs of torch-style HardSigmoid and of the relu6 gates [0, 1]
    (``*/gate_output`` and the SE gate), the relu6 outputs themselves [0, 6]."""
    fixed: dict[str, tuple[float, float]] = {}
    for n in model.graph.node:
        if n.op_type == "HardSigmoid":
            fixed[n.output[0]] = (0.0, 1.0)
        elif n.op_type == "Clip" and n.output[0].endswith(_RELU6_SUFFIX):
            fixed[n.output[0]] = (0.0, 6.0)
        elif n.op_type == "Mul" and n.name.endswith(GATE_SCALE_SUFFIX):
            fixed[n.output[0]] = (0.0, 1.0)
    return fixed


def fold_gate_scales(qdq: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Remove ``DQ(a) -> Mul(., DQ(c)) -> Q -> DQ`` chains of the ``*/GateScale`` nodes by reading ``a``'s
    uint8 code with scale ``s_a * c``.  Returns the new model and the number of folded multiplies."""
    out = copy.deepcopy(qdq)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    producer, consumers = _producers_consumers(g)

    def value(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def dq_value(name: str) -> float | None:
        """The float constant behind ``name`` (an initializer or DQ(initializer))."""
        v = value(name)
        if v is not None:
            return float(v)
        p = producer.get(name)
        if p is not None and p.op_type == "DequantizeLinear" and all(i in inits for i in p.input):
            q, s = value(p.input[0]).astype(np.float64), value(p.input[1]).astype(np.float64)
            z = value(p.input[2]).astype(np.float64) if len(p.input) > 2 and p.input[2] else 0.0
            return float((q - z) * s)
        return None

    remove: set[int] = set()
    folded = 0
    for mul in list(g.node):
        if mul.op_type != "Mul" or not mul.name.endswith(GATE_SCALE_SUFFIX):
            continue
        dq_a = producer.get(mul.input[0])
        c = dq_value(mul.input[1])
        q_out = consumers.get(mul.output[0], [])
        if (dq_a is None or dq_a.op_type != "DequantizeLinear" or c is None or len(q_out) != 1
                or q_out[0].op_type != "QuantizeLinear" or dq_a.input[1] not in inits):
            continue
        q_g = q_out[0]
        dq_gs = consumers.get(q_g.output[0], [])
        if not dq_gs or any(d.op_type != "DequantizeLinear" for d in dq_gs):
            continue
        s_a = value(dq_a.input[1])
        new_scale = numpy_helper.from_array((s_a.astype(np.float64) * c).astype(np.float32),
                                            f"{mul.name}/folded_scale")
        g.initializer.append(new_scale)
        for d in dq_gs:
            d.input[0] = dq_a.input[0]
            d.input[1] = new_scale.name
            if len(dq_a.input) > 2:
                if len(d.input) > 2:
                    d.input[2] = dq_a.input[2]
                else:
                    d.input.append(dq_a.input[2])
        remove.update({id(mul), id(q_g)})
        if len(consumers[mul.input[0]]) == 1:
            remove.add(id(dq_a))
        cdq = producer.get(mul.input[1])
        if cdq is not None and len(consumers[mul.input[1]]) == 1:
            remove.add(id(cdq))
        folded += 1
    keep = [n for n in g.node if id(n) not in remove]
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    dead = [i for i in g.initializer if i.name not in used]
    for i in dead:
        g.initializer.remove(i)
    return out, folded
