"""Small ONNX passes that onnxruntime's quantization tooling does not do for us.

Before quantization (float graph in, float graph out, same function):

* :func:`unshare_initializers` gives every Conv/Gemm its own weight and bias tensors: the exporter's constant
  folding merges equal initializers (e.g. zero biases), but a quantized bias depends on its node's input and
  weight scales, so a shared one would be quantized with the wrong scale.
* :func:`rewrite_hswish` / :func:`rewrite_hard_sigmoid` express h-swish and the SE gate in one of
  :data:`HSWISH_FORMS` / :data:`HARD_SIGMOID_FORMS` (recipes name them; the recipe loader validates against
  these constants).  Which form quantizes best and runs fastest is measured by ``benchmarks/int8_latency.py``.
* Channel padding for ORT x86's int8 kernels lives in :mod:`compress.onnx.padding`.
* :func:`fixed_range_tensors` names the tensors whose range is fixed by the math, not by data: a hard-sigmoid
  output is in [0, 1], a relu6 output in [0, 6].  Their quantization parameters are set, not calibrated.

After quantization (QDQ graph in, QDQ graph out):

* :func:`fold_gate_scales` removes the ``* 1/6`` of the relu6 forms: ``DQ(q, s, z) * c`` is ``DQ(q, s*c, z)``,
  so the multiply and its QuantizeLinear/DequantizeLinear pair disappear and the gate is the relu6's uint8 code
  read with scale ``(6/255) * (1/6) = 1/255`` - exactly hard-sigmoid's fixed qparams, with no op at all.

Passes return new ModelProtos and keep node names stable, so recipes and tuning can refer to them.
"""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress.onnx.graph import producers_consumers

__all__ = ["rewrite_hswish", "rewrite_hard_sigmoid", "unshare_initializers", "fixed_range_tensors",
           "fold_gate_scales", "GATE_SCALE_SUFFIX", "HSWISH_FORMS", "HARD_SIGMOID_FORMS"]

# How h-swish reaches ORT (benchmarks/int8_latency.py measures every form unless --no-forms):
#   hardswish      one HardSwish op (what torch exports)
#   x_hardsigmoid  x * HardSigmoid(x)
#   x_relu6        x * Clip(x + 3, 0, 6) * (1/6)
HSWISH_FORMS = ("hardswish", "x_hardsigmoid", "x_relu6")
# The SE gate (torch Hardsigmoid):  op     one HardSigmoid op
#                                   relu6  Clip(x + 3, 0, 6) * (1/6), the + 3 folded into fc2's bias
HARD_SIGMOID_FORMS = ("op", "relu6")
GATE_SCALE_SUFFIX = "/GateScale"  # the Mul(., 1/6) nodes that fold_gate_scales removes
_RELU6_SUFFIX = "/relu6_output"
_HSIG_SUFFIX = "/gate_output"


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
    uint8 code with scale ``s_a * c``.  Returns the new model and the number of folded multiplies.

    A chain is folded only where that is exact: the QuantizeLinear after the multiply must use scale ``s_a * c``
    and ``a``'s zero point (the fixed qparams of the relu6 gates: 6/255 x 1/6 = 1/255), so it would give back
    ``a``'s codes unchanged.  With calibrated gate qparams the multiply's requantization changes codes, and the
    chain is left as it is."""
    out = copy.deepcopy(qdq)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    producer, consumers = producers_consumers(g)

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
        if not _requantizes_exactly(q_g, dq_a, float(s_a) * c, value):
            continue
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


def _requantizes_exactly(q: onnx.NodeProto, dq_a: onnx.NodeProto, scale: float, value) -> bool:
    """Whether ``Q(DQ(a) * c)`` with ``q``'s qparams gives ``a``'s codes back: ``q``'s scale is ``s_a * c`` (to
    float32 precision) and its zero point is ``a``'s, of the same type."""
    s_q = value(q.input[1]) if len(q.input) > 1 else None
    if s_q is None or s_q.size != 1 or not np.isclose(float(s_q), scale, rtol=1e-6, atol=0.0):
        return False
    z_q = value(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    z_a = value(dq_a.input[2]) if len(dq_a.input) > 2 and dq_a.input[2] else None
    if z_q is None or z_a is None:
        return z_q is None and z_a is None
    return z_q.dtype == z_a.dtype and z_q.size == 1 and int(z_q) == int(z_a)
