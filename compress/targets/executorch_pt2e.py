"""The PT2E half of the ``executorch`` target: XNNPACK's own int8 placement, every observer replaced by the scale
table's value, and the scales read back from the converted program.

**Placement** is ``XNNPACKQuantizer``'s (what XNNPACK fuses: a conv with its ReLU, h-swish as XNNPACK's int8
lookup table between the conv's output grid and its reader's input grid), with three changes:

* the SE gate is folded into fc2 the way the x86 graph folds it (``+ 3`` into the bias, ``/ 6`` into the scale):
  ``hardsigmoid(fc2(s)) = clamp(fc2'(s), 0, 1)`` with ``fc2' = (W / 6, (b + 3) / 6)``.  fc2's weight codes are
  the table's (scale / 6), and the gate is fc2's clamped int8 output on the table's gate grid (its relu6 grid
  / 6) - the x86 graph's arithmetic, with no float op and no lifted constant left;
* a global average pool gets its own output scale (XNNPACK shares its input's; the table has one of its own);
* nodes the table excludes (tuning's fallbacks, mixed precision's fp32 layers) are not annotated: they stay
  float (the quantizer's filter), their neighbours keep the table's scales.

**Mapping.**  Each observer watches one fx node; its innermost module (``nn_module_stack``, e.g.
``features.4.block.2``) and aten op give the float ONNX graph's node (:func:`compress.quant.qat.onnx_scope` +
``Conv`` / ``Mul`` / ...) and so its output tensor - the table's key.  Activation observers become
``FixedQParamsObserver(s, z - 128)`` (uint8 -> int8, the same grid); weight observers return the table's
per-channel scales (cut to the real channel count).  Derived, not in the x86 table: the SE gate (its relu6 grid
/ 6) and the logits (ORT's rule over ``table.ranges``).  Anything else without a table value is an error.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import nn

from compress.errors import UserError
from compress.models.mobilenetv3 import SqueezeExcitation
from compress.quant.qat import onnx_scope
from compress.targets.table import ScaleTable

__all__ = ["GraphNames", "fold_se_gates", "prepare", "impose", "converted_scales", "ReadBack"]

_ONNX_OPS = {"conv2d": "Conv", "linear": "Gemm", "relu": "Relu", "hardswish": "HardSwish",
             "hardsigmoid": "HardSigmoid", "hardtanh": "HardSigmoid", "add": "Add", "mul": "Mul",
             "adaptive_avg_pool2d": "GlobalAveragePool", "mean": "GlobalAveragePool", "flatten": "Flatten"}
_IDENTITY = ("dropout", "dropout_", "clone", "alias", "detach", "contiguous")  # the identity at inference
GATE_FACTOR = 6.0  # relu6(x + 3) / 6: the x86 gate's grid is 6x the gate's


def aten_name(n: torch.fx.Node) -> str:
    return getattr(n.target, "__name__", str(n.target)).split(".")[0]


def module_path(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return path.replace("L['self'].", "").replace("L__self__.", "")


class GraphNames:
    """fx nodes -> the float ONNX graph's node and tensor names (the table's keys)."""

    def __init__(self, fp32: onnx.ModelProto, excluded=()) -> None:
        self.outputs = {n.name: n.output[0] for n in fp32.graph.node}
        self.input = fp32.graph.input[0].name
        self.graph_outputs = {o.name for o in fp32.graph.output}
        self.excluded = tuple(excluded)

    def node(self, n: torch.fx.Node) -> str | None:
        op = _ONNX_OPS.get(aten_name(n)) if n.op == "call_function" else None
        if op is None:
            return None
        path = module_path(n)
        return f"{onnx_scope(path)}/{op}" if path else f"/{op}"

    def tensor(self, n: torch.fx.Node) -> str | None:
        while n.op == "call_function" and aten_name(n) in _IDENTITY:
            n = n.args[0]
        if n.op == "placeholder":
            return self.input
        node = self.node(n)
        return self.outputs.get(node) if node else None

    def is_excluded(self, n: torch.fx.Node) -> bool:
        node = self.node(n)
        return node is not None and any(e == node or e.startswith(node + "/") for e in self.excluded)

    def keep(self, n: torch.fx.Node) -> bool:
        """The quantizer's filter: False for the nodes the table keeps in float."""
        return not self.is_excluded(n)


def fold_se_gates(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose SE gates are ``clamp(fc2'(s), 0, 1)``, ``fc2' = (W / 6, (b + 3) / 6)`` (the same
    function); returns it and the fc2 module paths."""
    m = copy.deepcopy(model).cpu().eval()
    folded = []
    for path, mod in m.named_modules():
        if isinstance(mod, SqueezeExcitation) and isinstance(mod.scale_activation, nn.Hardsigmoid):
            with torch.no_grad():
                mod.fc2.weight.div_(GATE_FACTOR)
                mod.fc2.bias.copy_((mod.fc2.bias + 3.0) / GATE_FACTOR)
            mod.scale_activation = nn.Hardtanh(0.0, 1.0)
            folded.append(f"{path}.fc2")
    return m, folded


def _annotate_gates(gm: torch.fx.GraphModule, cfg, keep: Callable) -> None:
    """conv -> hardtanh(0, 1) (a folded SE gate): the conv quantizes its input and weight, the clamp its output;
    XNNPACK fuses the clamp into the conv."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    for n in gm.graph.nodes:
        conv = n.args[0] if n.op == "call_function" and aten_name(n) == "hardtanh" else None
        if conv is None or aten_name(conv) != "conv2d" or len(conv.users) != 1 or not (keep(n) and keep(conv)):
            continue
        conv.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={conv.args[0]: cfg.input_activation, conv.args[1]: cfg.weight}, _annotated=True)
        n.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=cfg.output_activation,
                                                                  _annotated=True)


def _unshare_pools(gm: torch.fx.GraphModule, cfg) -> None:
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    for n in gm.graph.nodes:
        a = n.meta.get("quantization_annotation")
        if n.op == "call_function" and aten_name(n) == "adaptive_avg_pool2d" and a is not None and a._annotated:
            n.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map=a.input_qspec_map, output_qspec=cfg.output_activation, _annotated=True)


def table_quantizer(names: GraphNames):
    """XNNPACKQuantizer (int8 per-channel symmetric weights, int8 activations), shaped as the module says."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)

    cfg = get_symmetric_quantization_config(is_per_channel=True)

    class TablePlacement(XNNPACKQuantizer):
        def annotate(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
            _annotate_gates(gm, cfg, names.keep)
            gm = super().annotate(gm)
            _unshare_pools(gm, cfg)
            return gm

    return TablePlacement().set_global(cfg).set_filter_function(names.keep)


def export(model: nn.Module, shape: tuple[int, ...]):
    return torch.export.export(model.eval(), (torch.zeros(shape),), strict=False)


def prepare(model: nn.Module, shape: tuple[int, ...], quantizer) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    return prepare_pt2e(export(model, shape).module(), quantizer)


@dataclass
class Imposed:
    """What :func:`impose` did: counts by source, the derived tensors and why."""
    from_table: int = 0
    weights: int = 0
    derived: dict[str, str] = field(default_factory=dict)


def _observers(gm: torch.fx.GraphModule) -> list[list[torch.fx.Node]]:
    """The observer nodes prepare_pt2e inserted, grouped by observer instance (a shared one watches several)."""
    groups: dict[int, list[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and "activation_post_process" in str(n.target):
            groups.setdefault(id(getattr(gm, n.target)), []).append(n)
    return list(groups.values())


def _weight_consumer(obs: torch.fx.Node) -> torch.fx.Node | None:
    """The conv / linear whose weight ``obs`` observes, else None."""
    if obs.args[0].op != "get_attr":
        return None
    return next((u for u in obs.users if aten_name(u) in ("conv2d", "linear") and u.args[1] is obs), None)


def int8_from_range(lo: float, hi: float) -> tuple[float, int]:
    """onnxruntime's asymmetric rule for a range (it includes 0), on the int8 grid [-128, 127]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    s = (hi - lo) / 255.0 or 1.0
    return float(np.float32(s)), int(np.clip(round(-128 - lo / s), -128, 127))


class ActivationScales:
    """An observed tensor -> its int8 (scale, zero point) and where it came from, or None (unmapped)."""

    def __init__(self, table: ScaleTable, names: GraphNames) -> None:
        self.table, self.names = table, names

    def __call__(self, observed: torch.fx.Node) -> tuple[float, int, str] | None:
        t = self.names.tensor(observed)
        acts = self.table.activations
        if t in acts:
            s, z = acts[t]
            return s, z - 128, "table"
        node = self.names.node(observed)
        if aten_name(observed) in ("hardtanh", "hardsigmoid") and node is not None:
            if f"{node}/relu6_output" in acts:  # the x86 gate relu6(x + 3) on its [0, 6] grid; the gate is 1/6 of it
                s, z = acts[f"{node}/relu6_output"]
                return float(np.float32(s / GATE_FACTOR)), z - 128, "SE gate: the x86 gate's relu6 grid / 6"
        if t in self.names.graph_outputs and t in self.table.ranges:  # the logits: the x86 graph leaves them float
            s, z = int8_from_range(*self.table.ranges[t])
            lo, hi = self.table.ranges[t]
            return s, z, f"graph output: its calibrated range [{lo:.4g}, {hi:.4g}]"
        return None


def impose(prepared: torch.fx.GraphModule, table: ScaleTable, names: GraphNames, folded: list[str]) -> Imposed:
    """Replace every observer of ``prepared`` by the table's qparams (see the module docstring); an observer
    without one is a one-line error."""
    from torchao.quantization.pt2e.observer import FixedQParamsObserver

    act_scales, done, unmapped = ActivationScales(table, names), Imposed(), []
    for nodes in _observers(prepared):
        conv = _weight_consumer(nodes[0])
        if conv is not None:
            scales = _weight_scales(table, names, conv, nodes[0].args[0], prepared, folded)
            if scales is None:
                unmapped.append(f"weight of {names.node(conv) or conv.name}")
                continue
            new = fixed_per_channel_observer(scales)
            done.weights += 1
        else:
            found = [v for v in (act_scales(n.args[0]) for n in nodes) if v is not None]
            if not found:
                unmapped.append(f"tensor {names.tensor(nodes[0].args[0]) or nodes[0].args[0].name!r}")
                continue
            if len({(float(np.float32(s)), z) for s, z, _ in found}) > 1:
                raise UserError(f"executorch: one quantization point of the program joins tensors with different "
                                f"table scales ({', '.join(str(names.tensor(n.args[0])) for n in nodes)})")
            s, z, why = found[0]
            if why == "table":
                done.from_table += 1
            else:
                done.derived[str(names.tensor(nodes[0].args[0]))] = why
            new = FixedQParamsObserver(scale=float(s), zero_point=int(z), dtype=torch.int8,
                                       qscheme=torch.per_tensor_affine, quant_min=-128, quant_max=127)
        for n in nodes:
            setattr(prepared, n.target, new)
    if unmapped:
        raise UserError(f"executorch: {len(unmapped)} quantization point(s) of the XNNPACK program have no scale in "
                        f"the table (first: {unmapped[0]}); the table does not describe this network")
    return done


def _weight_scales(table: ScaleTable, names: GraphNames, conv: torch.fx.Node, weight: torch.fx.Node,
                   gm: torch.fx.GraphModule, folded: list[str]) -> torch.Tensor | None:
    node = names.node(conv)
    s = table.weights.get(node) if node else None
    if s is None:
        return None
    channels = int(_attr(gm, weight.target).shape[0])
    s = np.asarray(s, np.float64).reshape(-1)
    s = np.full(channels, s[0]) if s.size == 1 else s[:channels]  # per-tensor tables: one scale, every channel
    if s.size != channels:
        return None
    if module_path(conv) in folded:
        s = s / GATE_FACTOR
    return torch.from_numpy(s.astype(np.float32))


def _attr(gm: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        gm = getattr(gm, part)
    return gm


def fixed_per_channel_observer(scales: torch.Tensor) -> nn.Module:
    """An observer that returns ``scales`` (per output channel, symmetric int8 [-127, 127], zero point 0)."""
    return _fixed_per_channel_class()(scales)


@functools.lru_cache(maxsize=None)
def _fixed_per_channel_class() -> type:
    from torchao.quantization.pt2e.observer import ObserverBase

    class FixedPerChannelObserver(ObserverBase):
        def __init__(self, scale: torch.Tensor) -> None:
            super().__init__(dtype=torch.int8)
            self.qscheme, self.ch_axis, self.quant_min, self.quant_max = torch.per_channel_symmetric, 0, -127, 127
            self.register_buffer("scale", scale.clone())
            self.register_buffer("zero_point", torch.zeros(scale.numel(), dtype=torch.int64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def calculate_qparams(self):
            return self.scale, self.zero_point

    return FixedPerChannelObserver


def _value(gm: torch.fx.GraphModule, v: Any) -> Any:
    return _attr(gm, v.target) if isinstance(v, torch.fx.Node) and v.op == "get_attr" else v


@dataclass
class ReadBack:
    """The scales a converted program carries, keyed like the table (``acts``: uint8 convention; ``weights``: a
    folded fc2 times 6, the same codes as the table's weight), and as the program holds them (``qparams``: int8
    (scale, zero point) of every quantize node; ``weight_scales``: every weight's per-channel scales)."""
    acts: dict[str, tuple[float, int]] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    qparams: set[tuple[float, int]] = field(default_factory=set)
    weight_scales: list[np.ndarray] = field(default_factory=list)


def converted_scales(converted: torch.fx.GraphModule, names: GraphNames, folded: list[str]) -> ReadBack:
    """Every activation quantize node's scale and zero point, keyed by the tensor it quantizes, and every
    weight's per-channel scales, keyed by its conv / Gemm node."""
    out = ReadBack()
    for n in converted.graph.nodes:
        op = aten_name(n) if n.op == "call_function" else ""
        if op == "quantize_per_tensor":
            s, z = float(_value(converted, n.args[1])), int(_value(converted, n.args[2]))
            out.acts[names.tensor(n.args[0]) or f"<{n.args[0].name}>"] = (s, z + 128)
            out.qparams.add((s, z))
        elif op == "dequantize_per_channel":
            conv = next((u for u in n.users if aten_name(u) in ("conv2d", "linear")), None)
            s = np.asarray(_value(converted, n.args[1]), np.float32).reshape(-1)
            out.weight_scales.append(s)
            if conv is not None and names.node(conv) is not None:
                factor = GATE_FACTOR if module_path(conv) in folded else 1.0
                out.weights[names.node(conv)] = (s.astype(np.float64) * factor).astype(np.float32)
    return out
