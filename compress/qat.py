"""Quantization-aware training that mirrors the exported int8 graph, and its export with the learned qparams.

Built on torch's eager-mode QAT machinery (``torch.ao.quantization``), the way torchvision's quantizable
MobileNetV3 is: ``fuse_modules_qat`` fuses conv + BN (+ ReLU), the QAT module swap (``convert`` with the default
QAT mappings) turns them into ``ConvBn2d`` / ``ConvBnReLU2d`` / ``ConvReLU2d`` / ``Conv2d`` / ``Linear`` QAT
modules with per-channel symmetric weight fake quantization, and ``FakeQuantize`` / ``FixedQParamsFakeQuantize``
modules quantize the activations.  ``prepare_qat``'s automatic placement (an observer after every leaf module)
is not used: it would observe tensors the int8 graph never quantizes (fc2's pre-gate output, Dropout) and miss
ones it does (the relu6 inside h-swish), so the placement is explicit, one fake quant per QuantizeLinear of the
int8 graph :func:`compress.quantize.quantize` writes with the recipe's ``x_relu6`` / ``relu6`` forms:

* the image; every conv output (after ReLU when fused);
* h-swish ``x * relu6(x + 3) / 6``: ``relu6(x + 3)`` with fixed qparams (scale 6/255, zero point 0 for uint8),
  and the product;
* the SE: pooled input, fc1 + ReLU output, the gate ``relu6(fc2 + 3) / 6`` with fixed qparams, the product;
* every residual add; the pooled features (and Flatten, the same values); the classifier's hidden layer.

The logits stay float, as in the int8 graph.  Weights: per-channel (or per-tensor) symmetric int8 on the
folded conv + BN weights, codes in [-127, 127] (onnxruntime's symmetric int8 range), or the recipe's narrower
``weight_bits`` grid.

Export (:func:`export_qat`) never re-calibrates: the QAT model becomes a float MobileNetV3 whose conv weights
are the folded, fake-quantized weights (every value already on its int8 grid) and whose BN layers are the
identity, exported like any float model; then onnxruntime's QDQ quantizer writes the int8 graph with every
activation scale / zero point and every weight scale taken from the QAT model (``TensorQuantOverrides``).  A
QuantizeLinear that the QAT model has no fake quant for, a fake quant with no QuantizeLinear, a conv without a
QAT weight quantizer and an int32 bias that saturates are errors, never a silent calibration or a drift.

PT2E (``prepare_qat_pt2e``) is not part of torch 2.13's ``torch.ao`` (it moved to torchao, which is not a
dependency here), and its ONNX export of QDQ graphs goes through the dynamo exporter; the eager modules above
export through the same legacy exporter as every other model of this project.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.ao import quantization as tq
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization.quantization_mappings import get_default_qat_module_mappings

from compress.errors import UserError
from compress.mobilenetv3 import ConvBNAct, InvertedResidual, MobileNetV3, SqueezeExcitation
from compress.quantize import prepare_float, quantize_prepared, weight_scale_overrides
from recipes.loader import QATConfig, QuantizeConfig

__all__ = ["QATMobileNetV3", "prepare_qat", "freeze_bn_stats", "freeze_observers", "to_float", "qat_qparams",
           "onnx_scope", "FreezeSchedule", "qat_fingerprint", "check_qat_recipe"]

log = logging.getLogger(__name__)
RELU6_SCALE = 6.0 / 255.0  # the relu6 of h-swish and of the SE gate: [0, 6] on 256 codes


# -- fake quantizers ---------------------------------------------------------------------------------------

def _act_range(activation_type: str) -> tuple[torch.dtype, int, int]:
    return (torch.quint8, 0, 255) if activation_type == "uint8" else (torch.qint8, -128, 127)


def weight_qmax(q: QuantizeConfig, reduce_range: bool = False) -> int:
    """Largest weight code: 127 (symmetric int8 as onnxruntime writes it), 63 with ``reduce_range``, or
    ``2^(bits-1) - 1`` for the recipe's narrower grids."""
    qmax = 2 ** (q.weight_bits - 1) - 1
    return min(qmax, 63) if reduce_range else qmax


def _act_fq(q: QuantizeConfig, momentum: float) -> tq.FakeQuantize:
    dtype, lo, hi = _act_range(q.activation_type)
    return tq.FakeQuantize(observer=tq.MovingAverageMinMaxObserver, averaging_constant=momentum, quant_min=lo,
                           quant_max=hi, dtype=dtype, qscheme=torch.per_tensor_affine)


def _relu6_fq(q: QuantizeConfig) -> tq.FixedQParamsFakeQuantize:
    """Fixed qparams for a relu6 output: [0, 6] exactly, the clamp of relu6 included."""
    dtype, lo, hi = _act_range(q.activation_type)
    return tq.FixedQParamsFakeQuantize(observer=tq.FixedQParamsObserver.with_args(
        scale=RELU6_SCALE, zero_point=lo, dtype=dtype, quant_min=lo, quant_max=hi))


def _weight_qconfig(q: QuantizeConfig, reduce_range: bool) -> tq.QConfig:
    qmax = weight_qmax(q, reduce_range)
    if q.per_channel:
        # averaging_constant 1: the range of the current weights, as onnxruntime computes it at export
        weight = tq.FakeQuantize.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0,
                                           quant_min=-qmax, quant_max=qmax, dtype=torch.qint8,
                                           qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        weight = tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, averaging_constant=1.0,
                                           quant_min=-qmax, quant_max=qmax, dtype=torch.qint8,
                                           qscheme=torch.per_tensor_symmetric)
    # the activation entry is unused: activations get explicit fake quants below
    return tq.QConfig(activation=tq.NoopObserver, weight=weight)


# -- quantizable building blocks -----------------------------------------------------------------------

class QuantHardswish(nn.Module):
    """h-swish in its quantization-friendly form ``x * relu6(x + 3) / 6``: ``relu6(x + 3)`` on the fixed grid
    [0, 6] / 255 (so the gate is exactly ``code / 255``), the product fake-quantized.  ``inp`` quantizes ``x``
    when no conv output quantizer precedes it (the classifier's Linear)."""

    def __init__(self, gate: nn.Module, out: nn.Module, inp: nn.Module | None = None) -> None:
        super().__init__()
        self.inp = inp if inp is not None else nn.Identity()
        self.gate = gate
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        return self.out(x * (self.gate(x + 3.0) / 6.0))


class QuantSqueezeExcitation(nn.Module):
    """SE with quantized pooling, fc1 + ReLU (fused), the gate ``relu6(fc2 + 3) / 6`` on fixed qparams and a
    quantized product; the submodule names of :class:`~compress.mobilenetv3.SqueezeExcitation` are kept."""

    def __init__(self, se: SqueezeExcitation, q: QuantizeConfig, momentum: float) -> None:
        super().__init__()
        self.avgpool = se.avgpool
        self.pool_fq = _act_fq(q, momentum)
        self.fc1 = se.fc1
        self.fc1_fq = _act_fq(q, momentum)
        self.fc2 = se.fc2
        self.gate = _relu6_fq(q)
        self.out = _act_fq(q, momentum)

    def forward(self, x: Tensor) -> Tensor:
        s = self.fc1_fq(self.fc1(self.pool_fq(self.avgpool(x))))
        return self.out((self.gate(self.fc2(s) + 3.0) / 6.0) * x)


class QuantInvertedResidual(nn.Module):
    """The block with its residual add fake-quantized (torchvision's FloatFunctional add)."""

    def __init__(self, block: InvertedResidual, q: QuantizeConfig, momentum: float) -> None:
        super().__init__()
        self.cfg = block.cfg
        self.use_res_connect = block.use_res_connect
        self.block = block.block
        self.add_fq = _act_fq(q, momentum) if self.use_res_connect else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return self.add_fq(x + y) if self.use_res_connect else y


@dataclass
class _Site:
    """One activation fake quant: its module name here and the ONNX tensors it stands for (the first is the
    one quantized; the others are the inputs of a Relu / Clip that onnxruntime folds into that quantization)."""
    module: str
    tensors: tuple[str, ...]


@dataclass
class _WeightSite:
    """One quantized conv / linear: its QAT module, the float model's path, the ONNX node that uses it."""
    module: str
    float_path: str
    kind: str  # "convbn" (ConvBNAct conv + BN) or "plain" (SE fc1 / fc2, Linear: own bias, no BN)
    node: str


class QATMobileNetV3(nn.Module):
    """A :class:`~compress.mobilenetv3.MobileNetV3` prepared for QAT (build it with :func:`prepare_qat`).

    ``eval()`` turns the activation observers off (evaluation never moves a range); ``train()`` turns them
    back on unless :func:`freeze_observers` froze them.
    """

    def __init__(self, float_model: MobileNetV3) -> None:
        super().__init__()
        self.spec = float_model.spec
        self.features = float_model.features
        self.avgpool = float_model.avgpool
        self.classifier = float_model.classifier
        self.input_fq: nn.Module = nn.Identity()
        self.pool_fq: nn.Module = nn.Identity()
        self.sites: list[_Site] = []
        self.weight_sites: list[_WeightSite] = []
        self.observers_frozen = False
        self.bn_frozen = False
        self.reduce_range = False  # the weight grid was built for 7-bit weights (export must say the same)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(self.input_fq(x))
        return self.classifier(torch.flatten(self.pool_fq(self.avgpool(x)), 1))

    def train(self, mode: bool = True) -> "QATMobileNetV3":
        super().train(mode)
        self.apply(tq.enable_observer if mode and not self.observers_frozen else tq.disable_observer)
        if self.bn_frozen:
            self.apply(nniqat.freeze_bn_stats)
        return self

    def fake_quants(self) -> Iterator[tuple[str, tq.FakeQuantizeBase]]:
        for name, m in self.named_modules():
            if isinstance(m, tq.FakeQuantizeBase):
                yield name, m


def freeze_bn_stats(model: QATMobileNetV3) -> None:
    """BN running statistics stop moving; the folded weights use them from now on (torchvision's QAT step)."""
    model.bn_frozen = True
    model.apply(nniqat.freeze_bn_stats)


def freeze_observers(model: QATMobileNetV3) -> None:
    """Activation ranges and weight scales stop moving: what is trained from now on is what is exported."""
    model.observers_frozen = True
    model.apply(tq.disable_observer)


# -- ONNX names --------------------------------------------------------------------------------------------

def onnx_scope(path: str) -> str:
    """The node-name scope torch's ONNX exporter gives the module at ``path`` (``features.4.block.0.0`` ->
    ``/features/features.4/block/block.0/block.0.0``): an indexed child extends its parent's scope name."""
    parts: list[str] = []
    for p in path.split("."):
        parts.append(f"{parts[-1]}.{p}" if p.isdigit() and parts else p)
    return "/" + "/".join(parts)


# -- prepare -------------------------------------------------------------------------------------------------

def check_qat_recipe(q: QuantizeConfig) -> None:
    """QAT mirrors one int8 graph shape: the recipe must ask for that shape."""
    wrong = []
    if q.hswish != "x_relu6":
        wrong.append(f'hswish = "x_relu6" (got {q.hswish!r})')
    if q.hard_sigmoid != "relu6":
        wrong.append(f'hard_sigmoid = "relu6" (got {q.hard_sigmoid!r})')
    if not q.hard_sigmoid_fixed_qparams:
        wrong.append("hard_sigmoid_fixed_qparams = true")
    if not q.quantize_head:
        wrong.append("quantize_head = true")
    if q.nodes_to_exclude:
        wrong.append("nodes_to_exclude = []")
    if wrong:
        raise UserError("QAT mirrors the int8 graph of the x_relu6 / relu6 forms with every layer quantized; "
                        "set in [quantize]: " + "; ".join(wrong))


def prepare_qat(model: MobileNetV3, q: QuantizeConfig, qat: QATConfig, reduce_range: bool = False
                ) -> QATMobileNetV3:
    """A QAT copy of ``model`` (which is left untouched): fused, weight fake quant swapped in, activation fake
    quants placed where the int8 graph quantizes (see the module docstring)."""
    check_qat_recipe(q)
    m = copy.deepcopy(model).train()
    spec = m.spec
    groups: list[list[str]] = []
    for name, mod in m.named_modules():
        if isinstance(mod, ConvBNAct):
            groups.append([f"{name}.0", f"{name}.1"] + ([f"{name}.2"] if len(mod) > 2
                                                          and isinstance(mod[2], nn.ReLU) else []))
        elif isinstance(mod, SqueezeExcitation):
            groups.append([f"{name}.fc1", f"{name}.activation"])
    tq.fuse_modules_qat(m, groups, inplace=True)

    qconfig = _weight_qconfig(q, reduce_range)

    def configure(mod: nn.Module) -> None:  # as propagate_qconfig_ would: a fused module and its parts
        for sub in mod.modules():
            sub.qconfig = qconfig

    weight_sites: list[_WeightSite] = []
    for name, mod in m.named_modules():
        if isinstance(mod, ConvBNAct):
            configure(mod[0])
            weight_sites.append(_WeightSite(f"{name}.0", f"{name}.0", "convbn", f"{onnx_scope(name + '.0')}/Conv"))
        elif isinstance(mod, SqueezeExcitation):
            for fc in ("fc1", "fc2"):
                configure(getattr(mod, fc))
                weight_sites.append(_WeightSite(f"{name}.{fc}", f"{name}.{fc}", "plain",
                                                f"{onnx_scope(name + '.' + fc)}/Conv"))
    for i in (0, 3):
        configure(m.classifier[i])
        weight_sites.append(_WeightSite(f"classifier.{i}", f"classifier.{i}", "plain",
                                        f"{onnx_scope(f'classifier.{i}')}/Gemm"))
    # remove_qconfig=False as prepare_qat does: removing would also strip the new weight fake quants' observers
    tq.convert(m, mapping=get_default_qat_module_mappings(), inplace=True, remove_qconfig=False)

    mom = qat.observer_momentum
    out = QATMobileNetV3(m)
    out.reduce_range = reduce_range
    out.weight_sites = weight_sites
    sites: list[_Site] = [_Site("input_fq", ("input",))]
    out.input_fq = _act_fq(q, mom)

    def conv_act(seq: nn.Sequential, path: str, qpath: str) -> None:
        """ConvBNAct after fusion: [QAT conv, Identity, act?]; the conv output quantizer goes at [1]."""
        act = seq[2] if len(seq) > 2 else None
        seq[1] = _act_fq(q, mom)
        if isinstance(act, nn.Hardswish):
            sites.append(_Site(f"{qpath}.1", (f"{onnx_scope(path + '.0')}/Conv_output_0",)))
            seq[2] = QuantHardswish(_relu6_fq(q), _act_fq(q, mom))
            hs = onnx_scope(path + ".2") + "/HardSwish"
            sites.append(_Site(f"{qpath}.2.gate", (f"{hs}/relu6_output", f"{hs}/add_output")))
            sites.append(_Site(f"{qpath}.2.out", (f"{hs}_output_0",)))
        elif len(seq) > 2:  # ReLU fused into the conv: the quantized tensor is the Relu's output
            sites.append(_Site(f"{qpath}.1", (f"{onnx_scope(path + '.2')}/Relu_output_0",
                                              f"{onnx_scope(path + '.0')}/Conv_output_0")))
        else:
            sites.append(_Site(f"{qpath}.1", (f"{onnx_scope(path + '.0')}/Conv_output_0",)))

    for i, layer in enumerate(out.features):
        path = f"features.{i}"
        if isinstance(layer, ConvBNAct):
            conv_act(layer, path, path)
            continue
        assert isinstance(layer, InvertedResidual)
        qblock = QuantInvertedResidual(layer, q, mom)
        for j, sub in enumerate(qblock.block):
            sp = f"{path}.block.{j}"
            if isinstance(sub, ConvBNAct):
                conv_act(sub, sp, sp)
            elif isinstance(sub, SqueezeExcitation):
                qblock.block[j] = QuantSqueezeExcitation(sub, q, mom)
                sites += [_Site(f"{sp}.pool_fq", (f"{onnx_scope(sp + '.avgpool')}/GlobalAveragePool_output_0",)),
                          _Site(f"{sp}.fc1_fq", (f"{onnx_scope(sp + '.activation')}/Relu_output_0",
                                                 f"{onnx_scope(sp + '.fc1')}/Conv_output_0")),
                          _Site(f"{sp}.gate", (f"{onnx_scope(sp + '.scale_activation')}/HardSigmoid/relu6_output",
                                               f"{onnx_scope(sp + '.fc2')}/Conv_output_0")),
                          _Site(f"{sp}.out", (f"{onnx_scope(sp)}/Mul_output_0",))]
        if qblock.use_res_connect:
            sites.append(_Site(f"{path}.add_fq", (f"{onnx_scope(path)}/Add_output_0",)))
        out.features[i] = qblock

    out.pool_fq = _act_fq(q, mom)
    sites.append(_Site("pool_fq", ("/avgpool/GlobalAveragePool_output_0", "/Flatten_output_0")))
    if isinstance(out.classifier[1], nn.Hardswish):
        out.classifier[1] = QuantHardswish(_relu6_fq(q), _act_fq(q, mom), inp=_act_fq(q, mom))
        hs = onnx_scope("classifier.1") + "/HardSwish"
        sites += [_Site("classifier.1.inp", (f"{onnx_scope('classifier.0')}/Gemm_output_0",)),
                  _Site("classifier.1.gate", (f"{hs}/relu6_output", f"{hs}/add_output")),
                  _Site("classifier.1.out", (f"{hs}_output_0",))]
    else:  # minimalistic: Linear -> ReLU; the quantized tensor is the Relu's output
        out.classifier[1] = nn.Sequential(out.classifier[1], _act_fq(q, mom))
        sites.append(_Site("classifier.1.1", (f"{onnx_scope('classifier.1')}/Relu_output_0",
                                              f"{onnx_scope('classifier.0')}/Gemm_output_0")))
    out.sites = sites
    return out.to(next(model.parameters()).device).train()


# what changes the trained model (a QAT checkpoint is reused only when these match); export-only settings such
# as min_onnx_agreement, compare_ptq or the graph shaping passes may change between runs
_TRAINING_QUANTIZE_KEYS = ("activation_type", "per_channel", "weight_bits", "hswish", "hard_sigmoid")
_EXPORT_ONLY_QAT_KEYS = ("compare_ptq", "min_onnx_agreement", "limit_test")


def qat_fingerprint(model: nn.Module, q: QuantizeConfig, qat: QATConfig, reduce_range: bool, data: str = "") -> str:
    """What a QAT checkpoint must match to be resumed or reused: the start model's weights, the [quantize] keys
    that shape the fake quantization, the [qat] training keys, the weight range and the data (``data``: the
    dataset's name and input size)."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    doc = {"quantize": {k: getattr(q, k) for k in _TRAINING_QUANTIZE_KEYS},
           "qat": {k: v for k, v in qat.__dict__.items() if k not in _EXPORT_ONLY_QAT_KEYS},
           "reduce_range": reduce_range, "data": data}
    h.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class FreezeSchedule:
    """The recipe's freeze points (in epochs) as a step hook for :func:`compress.train.fit`."""
    freeze_bn_epochs: float
    freeze_observers_epochs: float
    events: list[str] = field(default_factory=list)

    def steps(self, steps_per_epoch: int) -> tuple[int, int]:
        """(BN freeze step, observer freeze step); observers see at least one step before they freeze."""
        return (math.ceil(self.freeze_bn_epochs * steps_per_epoch),
                max(1, math.ceil(self.freeze_observers_epochs * steps_per_epoch)))

    def __call__(self, model: nn.Module, step: int, steps_per_epoch: int) -> None:
        bn_step, obs_step = self.steps(steps_per_epoch)
        if not model.bn_frozen and step >= bn_step:
            freeze_bn_stats(model)
            self.events.append(f"BN statistics frozen at step {bn_step}"
                               + ("" if step == bn_step else f" (re-applied at step {step} on resume)"))
        if not model.observers_frozen and step >= obs_step:
            freeze_observers(model)
            self.events.append(f"observers frozen at step {obs_step}"
                               + ("" if step == obs_step else f" (re-applied at step {step} on resume)"))


# -- export ----------------------------------------------------------------------------------------------

def _folded(mod: nn.Module, kind: str) -> tuple[Tensor, Tensor]:
    """(weight, bias) the int8 graph's node computes with: conv + BN folded with the running statistics, the
    weight already fake-quantized with its frozen scale (so every value sits on the int8 grid)."""
    w = mod.weight.detach()
    bias = mod.bias.detach() if mod.bias is not None else torch.zeros(w.shape[0], device=w.device)
    if kind == "convbn":
        bn = mod.bn
        std = torch.sqrt(bn.running_var + bn.eps)
        factor = bn.weight.detach() / std
        w = w * factor.reshape(-1, *([1] * (w.ndim - 1)))
        bias = bn.bias.detach() + (bias - bn.running_mean) * factor
    fq = mod.weight_fake_quant
    with torch.no_grad():
        if fq.is_per_channel:
            wq = torch.fake_quantize_per_channel_affine(w, fq.scale, fq.zero_point.to(torch.int32), fq.ch_axis,
                                                        fq.quant_min, fq.quant_max)
        else:
            wq = torch.fake_quantize_per_tensor_affine(w, float(fq.scale), int(fq.zero_point), fq.quant_min,
                                                       fq.quant_max)
    return wq, bias


def to_float(model: QATMobileNetV3) -> MobileNetV3:
    """The float MobileNetV3 that computes the QAT model without its activation fake quants: folded,
    grid-valued weights; BN layers are the identity (weight 1, mean 0, var 1, eps 0) holding the folded bias.
    Export it like any float model; :func:`qat_qparams` supplies the quantization parameters."""
    if not model.observers_frozen:
        raise UserError("freeze the QAT model's observers before export (the exported scales must be final)")
    flt = MobileNetV3(model.spec).to(next(model.parameters()).device).eval()
    mods = dict(model.named_modules())
    fmods = dict(flt.named_modules())
    with torch.no_grad():
        for s in model.weight_sites:
            w, b = _folded(mods[s.module], s.kind)
            target = fmods[s.float_path]
            target.weight.copy_(w.reshape(target.weight.shape))
            if s.kind == "convbn":
                bn = fmods[s.float_path.rsplit(".", 1)[0] + ".1"]
                bn.weight.fill_(1.0)
                bn.bias.copy_(b)
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0)
                bn.eps = 0.0
            else:
                target.bias.copy_(b)
    return flt


def _qparams(fq: tq.FakeQuantizeBase) -> tuple[np.ndarray, np.ndarray]:
    scale, zp = fq.calculate_qparams() if isinstance(fq, tq.FixedQParamsFakeQuantize) else (fq.scale, fq.zero_point)
    return scale.detach().cpu().numpy().astype(np.float32), zp.detach().cpu().numpy()


@dataclass
class QATParams:
    overrides: dict[str, list[dict[str, Any]]]  # onnxruntime TensorQuantOverrides
    ranges: dict[str, tuple[float, float]]  # the real range each activation scale / zero point encodes
    reduce_range: bool  # the QAT model's weight grid: the export reports (and must use) the same
    quantized: tuple[str, ...] = ()  # the tensors the QAT model quantizes: each needs a QuantizeLinear


def qat_qparams(model: QATMobileNetV3, prepared: onnx.ModelProto, q: QuantizeConfig) -> QATParams:
    """Every scale / zero point of ``model`` as onnxruntime ``TensorQuantOverrides`` for the tensors of the
    prepared float graph (exported from :func:`to_float`, then ``compress.quantize.prepare_float``)."""
    _, lo, hi = _act_range(q.activation_type)
    np_zp = np.uint8 if q.activation_type == "uint8" else np.int8
    tensors = {v for n in prepared.graph.node for v in n.output} | {i.name for i in prepared.graph.input}
    nodes = {n.name: n for n in prepared.graph.node}
    inits = {i.name: i for i in prepared.graph.initializer}
    mods = dict(model.named_modules())
    overrides: dict[str, list[dict[str, Any]]] = {}
    ranges: dict[str, tuple[float, float]] = {}
    for site in model.sites:
        scale, zp = _qparams(mods[site.module])
        s, z = float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])
        for t in site.tensors:
            if t not in tensors:
                raise UserError(f"QAT export: the float graph has no tensor {t!r} for fake quant {site.module!r} "
                                f"(the exporter's names changed?)")
            overrides[t] = [{"scale": np.array(s, dtype=np.float32), "zero_point": np.array(z, dtype=np_zp)}]
            ranges[t] = ((lo - z) * s, (hi - z) * s)
    for n in prepared.graph.node:  # the stem's channel Pad (pad_input_channels): the image's values plus zeros
        if n.op_type == "Pad" and n.input[0] in overrides and n.output[0] not in overrides:
            overrides[n.output[0]], ranges[n.output[0]] = overrides[n.input[0]], ranges[n.input[0]]
    for ws in model.weight_sites:
        node = nodes.get(ws.node)
        if node is None or node.input[1] not in inits:
            raise UserError(f"QAT export: no node {ws.node!r} with a weight initializer in the float graph")
        fq = mods[ws.module].weight_fake_quant
        scale, _ = _qparams(fq)
        if fq.is_per_channel:
            # depthwise padding (compress.graph_passes.pad_depthwise_channels) appends zero channels: any scale
            scale = np.concatenate([scale, np.ones(int(inits[node.input[1]].dims[0]) - scale.size, np.float32)])
        overrides[node.input[1]] = weight_scale_overrides(scale, fq.is_per_channel)
    covered = {nodes[ws.node].input[1] for ws in model.weight_sites}
    stray = [n.name for n in prepared.graph.node if n.op_type in ("Conv", "Gemm") and n.input[1] in inits
             and n.input[1] not in covered]
    if stray:
        raise UserError(f"QAT export: {len(stray)} conv/gemm node(s) have no QAT weight quantizer, e.g. "
                        f"{stray[0]!r}")
    return QATParams(overrides, ranges, model.reduce_range, tuple(s.tensors[0] for s in model.sites))


# -- the recipe step: train, then export ------------------------------------------------------------------

@dataclass
class QATResult:
    model: QATMobileNetV3  # frozen, in eval mode
    report: dict[str, Any]


def _train_config(qat: QATConfig):
    from compress.train import TrainConfig

    return TrainConfig(epochs=qat.epochs, batch_size=qat.batch_size, lr=qat.lr, weight_decay=qat.weight_decay,
                       label_smoothing=qat.label_smoothing, schedule=qat.schedule, pad_crop=qat.pad_crop,
                       hflip=qat.hflip, limit_train=qat.limit_train or None, limit_test=qat.limit_test or None,
                       seed=qat.seed)


def run_qat(model: MobileNetV3, source, q: QuantizeConfig, qat: QATConfig, checkpoint, fingerprint: str,
            reduce_range: bool = False, progress: bool = True, dist=None) -> QATResult:
    """Prepare ``model`` for QAT and fine-tune it with ``qat`` on ``source``'s train split (progress bar, test
    top-1 after each epoch), freezing BN statistics and observers at the recipe's points.

    ``checkpoint`` is written after every epoch; when it exists with the same ``fingerprint`` (recipe and start
    model) the run resumes from it, and a finished one is reused without training.  Returns the frozen model
    in eval mode.
    """
    from compress.checkpoint import read_checkpoint
    from compress.train import fit

    qm = prepare_qat(model, q, qat, reduce_range)
    resume_state = None
    resumed_from = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = read_checkpoint(checkpoint)
        if isinstance(state, dict) and state.get("qat_fingerprint") == fingerprint and "state_dict" in state:
            qm.load_state_dict(state["state_dict"])
            resume_state, resumed_from = state, int(state.get("epoch", 0))
            if progress:
                log.warning("QAT: resuming from %s (epoch %d/%d)", checkpoint, resumed_from, qat.epochs)
        elif progress:
            log.warning("QAT: %s belongs to another recipe or model; training from the start", checkpoint)
    cfg = _train_config(qat)
    schedule = FreezeSchedule(qat.freeze_bn_epochs, qat.freeze_observers_epochs)
    t0 = time.time()
    if resume_state is not None and resumed_from >= qat.epochs:
        history = list(resume_state.get("history", []))
    else:
        meta = {"dataset": source.name, "input_size": source.preprocess.input_size[0],
                "preprocess": source.preprocess.to_json(), "qat_fingerprint": fingerprint}
        history = fit(qm, source, cfg, checkpoint, resume_state, meta, progress, dist=dist,
                      step_hook=schedule)["history"]
    freeze_bn_stats(qm)
    freeze_observers(qm)
    qm.eval()
    report = {"epochs": qat.epochs, "resumed_from_epoch": resumed_from, "history": history,
              "freeze_events": schedule.events, "train_seconds": round(time.time() - t0, 1),
              "fake_quant_modules": sum(1 for _ in qm.fake_quants()), "activation_sites": len(qm.sites),
              "weight_sites": len(qm.weight_sites), "machinery": "torch.ao.quantization eager-mode QAT "
              "(fuse_modules_qat, QAT module swap, FakeQuantize / FixedQParamsFakeQuantize)"}
    return QATResult(qm, report)


def export_qat(model: QATMobileNetV3, recipe, workdir, preprocess, cpu=None, extra_meta=None):
    """The frozen QAT model as a QDQ int8 graph with its own scales: (QuantizedGraph, prepared float path).

    :func:`to_float` -> fp32 ONNX -> ``prepare_float`` (the recipe's graph shaping) -> ``quantize_prepared``
    with :func:`qat_qparams` as the only source of quantization parameters.
    """
    from compress.export import export_onnx

    work = Path(workdir) / "qat"
    work.mkdir(parents=True, exist_ok=True)
    flt = to_float(model)
    path = work / "qat_float.onnx"
    export_onnx(flt.cpu(), path, preprocess, recipe="qat-float", extra_meta=extra_meta or {})
    prepared_path = prepare_float(onnx.load(str(path)), recipe.quantize, work)
    params = qat_qparams(model, onnx.load(str(prepared_path)), recipe.quantize)
    return quantize_prepared(prepared_path, None, recipe, work, cpu=cpu, qat_params=params), prepared_path


@torch.no_grad()
def fake_quant_logits(model: QATMobileNetV3, source, limit: int | None = None, batch_size: int = 500
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of the frozen fake-quant torch model on the test split (compare with the ONNX's)."""
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    for x, y in source.loader("test", batch_size=batch_size, limit=limit):
        logits.append(model(x.to(device)).float().cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)
