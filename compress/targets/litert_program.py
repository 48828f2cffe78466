"""The PT2E program the ``litert`` target converts: the float network in the forms XNNPACK runs in int8 inside
one delegate, every quantization point's parameters taken from the scale table (none calibrated here).

Forms (each computes the float network's function):

* BN folded into its conv (a QAT model's BN is already the identity holding the folded bias: folding is exact).
* h-swish ``x * relu6(x + 3) / 6``, per site, in the first of three forms XNNPACK takes in int8 (TFLite's int8
  HARD_SWISH is not delegated: the peer's 14-21 partitions; a float h-swish between Q/DQ is fused back into it
  by the converter):

  - ``add`` (the x86 graph's): ``r = relu6(x + 3)`` on the table's relu6 grid (one int8 ADD, the relu6 fused),
    ``g = r * 1/6`` onto the gate grid 1/255 (exact: the same codes), ``x * g``.  XNNPACK's ADD takes input /
    output scale ratios in [1/1024, 256) only: x's scale must be at least 6/255/1024;
  - ``dw`` below that (a conv output that small): the gate ``clamp(x / 6 + 1/2, 0, 1)`` as a 1x1 depthwise conv
    (weight 1/6, exact as the code k on the grid 1/(6 k); bias 1/2 as the int32 code ``3 k / s_x``, k = 127 or
    less where that would overflow) whose output grid 1/255 (zero point -128: [0, 1]) is the clamp, then
    ``x * g``.  As fast as ``add``; its bias rounding moves ~1 % of the gate codes by one against the x86 graph;
  - ``half`` where even k = 1 overflows (s_x < 3 / (2^31 - 1): x is then within 1e-6 of 0 and the gate cannot
    leave 1/2 on its grid): ``x * 1/2``.

  A 2-D input (the classifier's) is viewed as ``N x C x 1 x 1`` for a depthwise gate.
* SE gate as the x86 graph has it: fc2 with the + 3 in its bias, its output on the relu6 grid [0, 6] (the table's
  6/255), then ``* 1/6`` onto the gate grid 1/255, then the product with the block's features.

Mapping (the rule the table's keys follow, :func:`compress.quant.qat.onnx_scope`): a quantization point's innermost
module path and what it computes give the ONNX tensor the x86 graph quantizes for the same value - a conv's
output ``{scope}/Conv_output_0`` (or its Relu's, which the conv fuses), ``{scope}/Add_output_0``,
``{scope}/HardSwish_output_0`` ...; weights ``{scope}/Conv`` / ``{scope}/Gemm``.  uint8 ``(s, z)`` -> int8
``(s, z - 128)``, the same real grid.  Values the x86 graph leaves float or folds away are *derived*: the
h-swish gate ``.../HardSwish/gate_output`` (1/255), the SE gate ``.../HardSigmoid_output_0`` (1/255) and the
logits (from the table's calibrated range).  A point with neither a table entry nor a derivation is a one-line
error; so is an op with no int8 form here, and a table with fp32 nodes (tuning's fallbacks, mixed precision):
litert-torch's converter quantizes a float conv between Q/DQ itself, so they cannot stay float.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import numpy as np

from compress.errors import UserError
from compress.quant.qat import onnx_scope
from compress.targets.table import ScaleTable

__all__ = ["table_program", "deploy_form", "point_key", "hswish_form", "GATE_GRID", "RELU6_GRID"]

GATE_GRID = (1.0 / 255.0, 0)  # [0, 1], uint8 convention (int8: zero point -128)
RELU6_GRID = (6.0 / 255.0, 0)  # [0, 6]
_XNNPACK_ADD_MIN_RATIO = 1.0 / 1024.0  # XNNPACK's int8 ADD: input scale / output scale in [1/1024, 256)
# aten op -> what it computes, for the table's names (None: a view, sharing its input's grid)
_KINDS = {"conv2d": "conv", "linear": "linear", "relu": "relu", "relu6": "relu6", "hardtanh": "relu6",
          "add": "add", "mul": "mul", "adaptive_avg_pool2d": "pool", "mean": "pool", "flatten": None, "view": None,
          "reshape": None, "unsqueeze": None, "squeeze": None}
_ONNX_OP = {"conv": "Conv", "linear": "Gemm", "relu": "Relu", "add": "Add", "mul": "Mul",
            "pool": "GlobalAveragePool", "flatten": "Flatten"}
_CLAMPS = ("relu", "relu6")


def point_key(path: str, cls: str, parent_cls: str, kind: str) -> tuple[str, tuple[float, int] | None]:
    """The table key of the value an op of ``kind`` computes in the module at ``path`` (class name ``cls``, its
    parent's ``parent_cls``), and the derived uint8 grid used when the table has no entry (None: required)."""
    scope = onnx_scope(path) if path else ""
    if cls == "HSwish" and kind in ("add", "relu6"):  # x + 3, its relu6 fused
        return f"{scope}/HardSwish/relu6_output", RELU6_GRID
    if (cls == "HSwish" and kind == "mul_const") or (parent_cls == "HSwishDW" and kind == "conv"):
        base = scope if cls == "HSwish" else onnx_scope(path.rpartition(".")[0])  # the gate conv: <h-swish>.gate
        return f"{base}/HardSwish/gate_output", GATE_GRID
    if cls.startswith("HSwish") and kind in ("mul", "mul_const"):
        return f"{scope}/HardSwish_output_0", None
    if cls == "SEGate" and kind in ("relu6", "conv"):  # fc2 (+3) fused with its relu6
        return f"{scope}/HardSigmoid/relu6_output", RELU6_GRID
    if cls == "SEGate" and kind == "mul_const":
        return f"{scope}/HardSigmoid_output_0", GATE_GRID
    kind = "mul" if kind == "mul_const" else kind
    if kind not in _ONNX_OP:
        raise UserError(f"litert: no int8 form for {kind!r} in {path or 'the model'} ({cls})")
    return f"{scope}/{_ONNX_OP[kind]}_output_0", None


# -- the deploy form ----------------------------------------------------------------------------------------

def _modules():
    """The deploy-form modules (torch is imported only when the litert target builds)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def const(v: float, rank: int = 4):
        return torch.full((1,) * rank, v)  # of the input's rank: a 0-D one is reshaped around its op

    class HSwish(nn.Module):
        """h-swish in the ``add`` form: ``x * (relu6(x + 3) * 1/6)``, for inputs of rank ``rank``."""

        def __init__(self, channels: int, rank: int) -> None:
            super().__init__()
            self.register_buffer("three", const(3.0, rank))
            self.register_buffer("sixth", const(1.0 / 6.0, rank))

        def forward(self, x):
            return x * (F.relu6(x + self.three) * self.sixth)

    class HSwishDW(nn.Module):
        """h-swish in the ``dw`` form: ``x * gate(x)``, the gate a 1x1 depthwise conv (weight code ``code``)."""

        def __init__(self, channels: int, rank: int, code: int) -> None:
            super().__init__()
            self.code = code
            self.gate = nn.Conv2d(channels, channels, 1, groups=channels)
            with torch.no_grad():
                self.gate.weight.fill_(1.0 / 6.0)
                self.gate.bias.fill_(0.5)

        def forward(self, x):
            if x.dim() == 2:
                return x * self.gate(x.reshape(x.shape[0], x.shape[1], 1, 1)).flatten(1)
            return x * self.gate(x)  # no clamp op: the gate's output grid [0, 1] is the clamp (an explicit one
            # becomes a float RELU_0_TO_1 outside the delegate)

    class HSwishHalf(nn.Module):
        """h-swish in the ``half`` form: ``x * 1/2``."""

        def __init__(self, channels: int, rank: int) -> None:
            super().__init__()
            self.register_buffer("one_half", const(0.5, rank))

        def forward(self, x):
            return x * self.one_half

    class SEGate(nn.Module):
        """The SE's hard-sigmoid after fc2, whose bias holds the + 3: relu6 onto [0, 6], then * 1/6."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("sixth", torch.full((1, 1, 1, 1), 1.0 / 6.0))

        def forward(self, y):
            return F.relu6(y) * self.sixth

    return {"add": HSwish, "dw": HSwishDW, "half": HSwishHalf}, SEGate


def deploy_form(model, input_scale: Callable[[str], float | None]):
    """A copy of ``model`` (a MobileNetV3) in the forms above.  ``input_scale(path)``: the table's scale of the
    input of the h-swish at ``path`` (None when the table has none: the gate conv is kept)."""
    import torch
    from torch import nn

    from compress.models.mobilenetv3 import ConvBNAct, SqueezeExcitation

    forms, SEGate = _modules()
    m = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        for path, mod in list(m.named_modules()):
            if isinstance(mod, ConvBNAct) and isinstance(mod[1], nn.BatchNorm2d):
                conv, bn = mod[0], mod[1]
                k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = bn.bias - bn.running_mean * k + (conv.bias * k if conv.bias is not None else 0.0)
                conv.weight.mul_(k.reshape(-1, 1, 1, 1))
                conv.bias = nn.Parameter(bias)
                mod[1] = nn.Identity()
            if isinstance(mod, SqueezeExcitation):
                mod.fc2.bias += 3.0
                mod.scale_activation = SEGate()
            if isinstance(mod, nn.Sequential):
                for i, child in enumerate(mod):
                    if isinstance(child, nn.Dropout):
                        mod[i] = nn.Identity()
                    elif isinstance(child, nn.Hardswish):
                        form, code = hswish_form(input_scale(f"{path}.{i}" if path else str(i)))
                        site = _site(mod, i)
                        mod[i] = forms[form](*site, code) if form == "dw" else forms[form](*site)
    return m


def hswish_form(s_x: float | None) -> tuple[str, int]:
    """(form, depthwise weight code) of the h-swish whose input has the scale ``s_x`` (module docstring)."""
    if s_x is None or s_x / RELU6_GRID[0] >= _XNNPACK_ADD_MIN_RATIO:
        return "add", 0
    code = int(min(127, (2**31 - 1) * s_x / 3.0))  # the bias code 3 k / s_x fits int32
    return ("dw", code) if code >= 1 else ("half", 0)


def _site(seq, i: int) -> tuple[int, int]:
    """(channels, rank) of the value the h-swish at ``seq[i]`` reads: the conv's or linear's before it."""
    from torch import nn

    for prev in reversed(list(seq)[:i]):
        if isinstance(prev, nn.Conv2d):
            return prev.out_channels, 4
        if isinstance(prev, nn.Linear):
            return prev.out_features, 2
    raise UserError("litert: an h-swish without a conv or linear before it has no int8 form here")


def hswish_input_key(model, path: str) -> str | None:
    """The table key of the value the h-swish at ``path`` reads: its ConvBNAct's conv or the Linear before it."""
    parent_path, _, index = path.rpartition(".")
    seq = model.get_submodule(parent_path) if parent_path else model
    from torch import nn

    for j in range(int(index) - 1, -1, -1):
        prev = seq[j]
        prev_path = f"{parent_path}.{j}" if parent_path else str(j)
        if isinstance(prev, nn.Conv2d):
            return f"{onnx_scope(prev_path)}/Conv_output_0"
        if isinstance(prev, nn.Linear):
            return f"{onnx_scope(prev_path)}/Gemm_output_0"
    return None


# -- the quantizer: the table's parameters on every quantization point --------------------------------------

def _specs():
    import torch
    from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import FixedQParamsQuantizationSpec, QuantizationSpec

    class TableWeightObserver(PerChannelMinMaxObserver):
        """Per-output-channel symmetric int8 weights on the table's scales (nothing is observed)."""

        def __init__(self, scales=(), **_: Any) -> None:
            super().__init__(ch_axis=0, dtype=torch.int8, qscheme=torch.per_channel_symmetric, quant_min=-127,
                             quant_max=127)
            self.register_buffer("table_scales", torch.tensor(scales, dtype=torch.float32))

        def calculate_qparams(self):
            return self.table_scales.clone(), torch.zeros(self.table_scales.numel(), dtype=torch.int64)

    def activation(s: float, z_uint8: int):
        return FixedQParamsQuantizationSpec(dtype=torch.int8, scale=float(s), zero_point=int(z_uint8) - 128,
                                            quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)

    def weight(scales: np.ndarray):
        return QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric,
                                ch_axis=0, observer_or_fake_quant_ctr=TableWeightObserver.with_args(
                                    scales=tuple(float(v) for v in scales)))

    def constant(value: float):
        """A constant operand (1/6, 1/2) on the grid |c| / 127: its code 127 is exact."""
        return FixedQParamsQuantizationSpec(dtype=torch.int8, scale=abs(value) / 127.0, zero_point=0,
                                            quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)

    return activation, weight, constant


def _op(n) -> str:
    return str(n.target).split(".")[1] if n.op == "call_function" and str(n.target).startswith("aten.") else ""


def _path(n) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return path.replace("L['self'].", "").replace("L__self__.", "")


class _Annotator:
    """Annotates an exported deploy-form graph with the table's quantization parameters (see the module
    docstring); ``derived`` and ``from_table`` record where each point's parameters came from."""

    def __init__(self, table: ScaleTable, model, io: tuple[str, str]) -> None:
        self.table, self.modules, self.io = table, dict(model.named_modules()), io
        self.activation, self.weight, self.constant = _specs()
        self.from_table: list[str] = []
        self.derived: list[str] = []
        self.specs: dict[Any, Any] = {}  # node -> its output spec (for the bias check)

    def act(self, key: str, derived: tuple[float, int] | None, where: str):
        if key in self.table.activations:
            self.from_table.append(key)
            return self.activation(*self.table.activations[key])
        if derived is None:
            raise UserError(f"litert: scales.json has no scale for {key} ({where}): the table does not match "
                            f"this network")
        self.derived.append(key)
        return self.activation(*derived)

    def logits(self, key: str):
        if key in self.table.activations:
            return self.act(key, None, "the output")
        if key not in self.table.ranges:
            raise UserError(f"litert: scales.json has no range for the output {key!r}")
        lo, hi = self.table.ranges[key]
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        s = max((hi - lo) / 255.0, 2.0**-20)
        self.derived.append(key)
        return self.activation(s, int(np.clip(round(-lo / s), 0, 255)))

    def classes(self, path: str) -> tuple[str, str]:
        mod = self.modules.get(path)
        parent = self.modules.get(path.rpartition(".")[0]) if path else None
        return type(mod).__name__ if mod is not None else "", type(parent).__name__ if parent is not None else ""

    def annotate(self, gm) -> None:
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

        out_node = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                spec = self.act(self.io[0], None, "the input")
                n.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=spec, _annotated=True)
                self.specs[n] = spec
                continue
            if n.op != "call_function":
                continue
            op = _op(n)
            if op not in _KINDS:
                raise UserError(f"litert: no int8 form for torch op {n.target} in {_path(n) or 'the model'}")
            kind = _KINDS[op]
            if kind is None:  # a view: its input's grid
                spec = SharedQuantizationSpec(n.args[0])
                self.specs[n] = self.specs.get(n.args[0])
            else:
                inputs, spec = self._annotate_op(gm, n, kind, n is out_node)
                n.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=spec,
                                                                           _annotated=True)
                self.specs[n] = spec
                continue
            n.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=spec, _annotated=True)

    def _annotate_op(self, gm, n, kind: str, is_output: bool):
        path = _path(n)
        cls, parent_cls = self.classes(path)
        inputs = {}
        node_name = f"{onnx_scope(path)}/{'Gemm' if kind == 'linear' else 'Conv'}"
        if kind in ("conv", "linear"):
            w = _attr(gm, n.args[1].target)
            scales = self._weight_scales(node_name, path, parent_cls, int(w.shape[0]))
            inputs[n.args[1]] = self.weight(scales)
            if len(n.args) > 2 and n.args[2] is not None:
                self._check_bias(n, _attr(gm, n.args[2].target), scales, node_name)
        for a in n.args[:2]:
            if kind in ("add", "mul") and getattr(a, "op", "") == "get_attr":
                inputs[a] = self.constant(float(_attr(gm, a.target).abs().max()))
                kind = "mul_const" if kind == "mul" else kind
        users = list(n.users)
        if kind in ("conv", "linear", "add") and len(users) == 1 and _KINDS.get(_op(users[0])) in _CLAMPS:
            return inputs, None  # the clamp after it carries the grid (the op fuses it)
        if is_output:
            return inputs, self.logits(self.io[1])
        key, derived = point_key(path, cls, parent_cls, kind)
        return inputs, self.act(key, derived, f"{kind} in {path or 'the model'}")

    def _weight_scales(self, node_name: str, path: str, parent_cls: str, channels: int) -> np.ndarray:
        if parent_cls == "HSwishDW":  # the gate conv: weight 1/6 as the code k (derived, exact)
            self.derived.append(node_name)
            return np.full(channels, 1.0 / (6.0 * self.modules[path.rpartition(".")[0]].code), np.float32)
        s = self.table.weights.get(node_name)
        if s is None:
            raise UserError(f"litert: scales.json has no weight scales for {node_name}")
        s = np.asarray(s, np.float32).reshape(-1)
        if s.size not in (1, channels):
            raise UserError(f"litert: {node_name} has {channels} output channels but {s.size} weight scales")
        return np.broadcast_to(s, (channels,)).copy()

    def _check_bias(self, n, bias, scales: np.ndarray, node_name: str) -> None:
        """int8 kernels add the bias as int32 codes of ``s_input * s_weight``: it must fit."""
        src = n.args[0]
        spec = self.specs.get(src)
        s_in = getattr(spec, "scale", None)
        if s_in is None:
            return
        codes = np.abs(bias.detach().numpy()) / (s_in * scales)
        if codes.max() > 2**31 - 1:
            raise UserError(f"litert: the bias of {node_name} overflows int32 on the table's scales "
                            f"(input scale {s_in:.3g}): this table cannot be run in int8 here")


def _attr(gm, target: str):
    return functools.reduce(getattr, target.split("."), gm)


def table_program(model, table: ScaleTable, shape: tuple[int, ...], io: tuple[str, str]) -> tuple[Any, dict]:
    """The converted PT2E program (quantize / dequantize nodes with the table's parameters, not folded) of
    ``model``'s deploy form at the static input ``shape``; ``io``: the table's names of the input and the output.
    Returns (program, {"from_table": [...], "derived": [...]})."""
    if table.excluded:
        raise UserError(f"litert: the table keeps {len(table.excluded)} node(s) in fp32 ({table.excluded[0]} ...); "
                        f"litert-torch would quantize them anyway: use a recipe without fp32 fallbacks for this "
                        f"target")
    import torch
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import Quantizer

    def scale_of(path: str) -> float | None:
        key = hswish_input_key(model, path)
        return table.activations[key][0] if key in table.activations else None

    form = deploy_form(model, scale_of)
    x = torch.zeros(shape)
    annotator = _Annotator(table, form, io)

    class TableQuantizer(Quantizer):
        def annotate(self, gm):
            annotator.annotate(gm)
            return gm

        def validate(self, gm) -> None:
            pass

    exported = torch.export.export(form, (x,), strict=False).module()
    prepared = prepare_pt2e(exported, TableQuantizer())
    with torch.no_grad():
        prepared(x)  # the weight observers see their weights once
    program = convert_pt2e(prepared, fold_quantize=False)  # litert-torch folds them itself (QAT: issue 400)
    move_exported_model_to_eval(program)
    torch.nn.Module.train(program, False)  # the flag litert-torch checks (the graph is already eval's)
    return program, {"from_table": annotator.from_table, "derived": annotator.derived}
