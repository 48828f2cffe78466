"""Quantization-aware training that mirrors the exported int8 graph.

Built on torch's eager-mode QAT machinery (``torch.ao.quantization``), the way torchvision's quantizable
MobileNetV3 is: ``fuse_modules_qat`` fuses conv + BN (+ ReLU), the QAT module swap (``convert`` with the default
QAT mappings) turns them into ``ConvBn2d`` / ``ConvBnReLU2d`` / ``ConvReLU2d`` / ``Conv2d`` / ``Linear`` QAT
modules with per-channel symmetric weight fake quantization, and ``FakeQuantize`` / ``FixedQParamsFakeQuantize``
modules quantize the activations.  ``prepare_qat``'s automatic placement (an observer after every leaf module)
is not used: it would observe tensors the int8 graph never quantizes (fc2's pre-gate output, Dropout) and miss
ones it does (the relu6 inside h-swish), so the placement is explicit, one fake quant per QuantizeLinear of the
int8 graph :func:`compress.quant.core.quantize_prepared` writes with the recipe's ``x_relu6`` / ``relu6`` forms:

* the image; every conv output (after ReLU when fused);
* h-swish ``x * relu6(x + 3) / 6``: ``relu6(x + 3)`` with fixed qparams (scale 6/255, zero point 0 for uint8),
  and the product;
* the SE: pooled input, fc1 + ReLU output, the gate ``relu6(fc2 + 3) / 6`` with fixed qparams, the product;
* every residual add; the pooled features (and Flatten, the same values); the classifier's hidden layer.

The logits stay float, as in the int8 graph.  Weights: per-channel (or per-tensor) symmetric int8 on the
folded conv + BN weights, codes in [-127, 127] (onnxruntime's symmetric int8 range), or the recipe's narrower
``weight_bits`` grid.

Training it (freeze points, resume, the fingerprint of what shapes it) is :mod:`compress.quant.qat_train`; the
export with the learned qparams (no re-calibration) is :mod:`compress.quant.qat_export`.

PT2E (``prepare_qat_pt2e``) is not part of torch 2.13's ``torch.ao`` (it moved to torchao, which is not a
dependency here), and its ONNX export of QDQ graphs goes through the dynamo exporter; the eager modules above
export through the same legacy exporter as every other model of this project.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.ao import quantization as tq
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization.quantization_mappings import get_default_qat_module_mappings

from compress.errors import UserError
from compress.models.mobilenetv3 import ConvBNAct, InvertedResidual, MobileNetV3, SqueezeExcitation
from recipes.loader import QATConfig, QuantizeConfig

__all__ = ["QATMobileNetV3", "prepare_qat", "freeze_bn_stats", "freeze_observers", "onnx_scope", "check_qat_recipe",
           "act_range", "weight_qmax"]

RELU6_SCALE = 6.0 / 255.0  # the relu6 of h-swish and of the SE gate: [0, 6] on 256 codes


# -- fake quantizers ---------------------------------------------------------------------------------------

def act_range(activation_type: str) -> tuple[torch.dtype, int, int]:
    return (torch.quint8, 0, 255) if activation_type == "uint8" else (torch.qint8, -128, 127)


def weight_qmax(q: QuantizeConfig, reduce_range: bool = False) -> int:
    """Largest weight code of the symmetric grid [-qmax, qmax], the one onnxruntime writes: 127 for int8, 64
    with ``reduce_range`` (onnxruntime's reduced int8 range is [-64, 64], scale absmax / 64), or
    ``2^(bits-1) - 1`` for the recipe's narrower grids."""
    qmax = 2 ** (q.weight_bits - 1) - 1
    return min(qmax, 64) if reduce_range else qmax


def _act_fq(q: QuantizeConfig, momentum: float) -> tq.FakeQuantize:
    dtype, lo, hi = act_range(q.activation_type)
    return tq.FakeQuantize(observer=tq.MovingAverageMinMaxObserver, averaging_constant=momentum, quant_min=lo,
                           quant_max=hi, dtype=dtype, qscheme=torch.per_tensor_affine)


def _relu6_fq(q: QuantizeConfig) -> tq.FixedQParamsFakeQuantize:
    """Fixed qparams for a relu6 output: [0, 6] exactly, the clamp of relu6 included."""
    dtype, lo, hi = act_range(q.activation_type)
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
    quantized product; the submodule names of :class:`~compress.models.mobilenetv3.SqueezeExcitation` are kept."""

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
    """A :class:`~compress.models.mobilenetv3.MobileNetV3` prepared for QAT (build it with :func:`prepare_qat`).

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
    weight_sites = _fuse_and_swap(m, _weight_qconfig(q, reduce_range))
    out = QATMobileNetV3(m)
    out.reduce_range = reduce_range
    out.weight_sites = weight_sites
    _place_activation_fake_quants(out, q, qat.observer_momentum)
    return out.to(next(model.parameters()).device).train()


def _fuse_and_swap(m: MobileNetV3, qconfig: tq.QConfig) -> list[_WeightSite]:
    """Fuse conv + BN (+ ReLU) and the SE's fc1 + ReLU, then swap in the QAT modules (weight fake quant);
    returns every quantized conv / linear with the ONNX node that will use its weight."""
    groups: list[list[str]] = []
    for name, mod in m.named_modules():
        if isinstance(mod, ConvBNAct):
            groups.append([f"{name}.0", f"{name}.1"] + ([f"{name}.2"] if len(mod) > 2
                                                          and isinstance(mod[2], nn.ReLU) else []))
        elif isinstance(mod, SqueezeExcitation):
            groups.append([f"{name}.fc1", f"{name}.activation"])
    tq.fuse_modules_qat(m, groups, inplace=True)

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
    return weight_sites


def _place_activation_fake_quants(out: QATMobileNetV3, q: QuantizeConfig, mom: float) -> None:
    """One activation fake quant per QuantizeLinear of the int8 graph, each recorded with its ONNX tensors."""
    sites: list[_Site] = [_Site("input_fq", ("input",))]
    out.input_fq = _act_fq(q, mom)

    def conv_act(seq: nn.Sequential, path: str) -> None:
        """ConvBNAct after fusion: [QAT conv, Identity, act?]; the conv output quantizer goes at [1]."""
        act = seq[2] if len(seq) > 2 else None
        seq[1] = _act_fq(q, mom)
        conv_out = f"{onnx_scope(path + '.0')}/Conv_output_0"
        if isinstance(act, nn.Hardswish):
            seq[2] = QuantHardswish(_relu6_fq(q), _act_fq(q, mom))
            hs = onnx_scope(path + ".2") + "/HardSwish"
            sites.extend([_Site(f"{path}.1", (conv_out,)),
                          _Site(f"{path}.2.gate", (f"{hs}/relu6_output", f"{hs}/add_output")),
                          _Site(f"{path}.2.out", (f"{hs}_output_0",))])
        elif len(seq) > 2:  # ReLU fused into the conv: the quantized tensor is the Relu's output
            sites.append(_Site(f"{path}.1", (f"{onnx_scope(path + '.2')}/Relu_output_0", conv_out)))
        else:
            sites.append(_Site(f"{path}.1", (conv_out,)))

    for i, layer in enumerate(out.features):
        path = f"features.{i}"
        if isinstance(layer, ConvBNAct):
            conv_act(layer, path)
            continue
        assert isinstance(layer, InvertedResidual)
        qblock = QuantInvertedResidual(layer, q, mom)
        for j, sub in enumerate(qblock.block):
            sp = f"{path}.block.{j}"
            if isinstance(sub, ConvBNAct):
                conv_act(sub, sp)
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
