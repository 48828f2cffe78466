"""MobileNetV3 (Howard et al., 2019) with torchvision's exact state_dict layout.

The architecture is data: each inverted-residual block is one :class:`BlockConfig` row, and a whole
network is an :class:`ArchSpec` (stem, blocks, last conv, classifier) that serializes to JSON.  The
builders :func:`mobilenet_v3_large` / :func:`mobilenet_v3_small` resolve the paper's tables for a width
multiplier; a pruned network is just another ``ArchSpec`` with smaller channel counts.

Module names follow torchvision (``features.N.block.M.K``, ``classifier.0`` ...), so a torchvision
checkpoint loads unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "ARCHS", "ArchSpec", "BlockConfig", "MobileNetV3", "build_model", "make_divisible", "arch_spec",
    "mobilenet_v3_large", "mobilenet_v3_small", "count_params", "block_names",
]

ACTIVATIONS = ("RE", "HS")


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going more than 10 % below it (MobileNet rule)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual bottleneck with resolved channel counts.

    ``se_channels`` is the squeeze width of the SE module (0: no SE).  A block whose ``expanded``
    equals ``in_ch`` has no expansion conv (torchvision's rule), which fixes its state_dict layout.
    """

    in_ch: int
    kernel: int
    expanded: int
    out_ch: int
    se_channels: int
    act: str  # "RE" (ReLU) or "HS" (h-swish)
    stride: int
    dilation: int = 1

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        if min(self.in_ch, self.expanded, self.out_ch) < 1 or self.se_channels < 0:
            raise ValueError(f"channel counts must be positive: {self}")

    @property
    def use_res_connect(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch

    @property
    def has_expand(self) -> bool:
        return self.expanded != self.in_ch


@dataclass(frozen=True)
class _Row:
    """A row of the paper's table before the width multiplier: (in, kernel, exp, out, SE, act, stride)."""

    in_ch: int
    kernel: int
    expanded: int
    out_ch: int
    use_se: bool
    act: str
    stride: int


# Table 1 of the paper (== torchvision's _mobilenet_v3_conf); resolution in the comments is for 224x224.
_LARGE = (
    _Row(16, 3, 16, 16, False, "RE", 1),  # 112x112
    _Row(16, 3, 64, 24, False, "RE", 2),  # C1 -> 56x56
    _Row(24, 3, 72, 24, False, "RE", 1),
    _Row(24, 5, 72, 40, True, "RE", 2),  # C2 -> 28x28
    _Row(40, 5, 120, 40, True, "RE", 1),
    _Row(40, 5, 120, 40, True, "RE", 1),
    _Row(40, 3, 240, 80, False, "HS", 2),  # C3 -> 14x14
    _Row(80, 3, 200, 80, False, "HS", 1),
    _Row(80, 3, 184, 80, False, "HS", 1),
    _Row(80, 3, 184, 80, False, "HS", 1),
    _Row(80, 3, 480, 112, True, "HS", 1),
    _Row(112, 3, 672, 112, True, "HS", 1),
    _Row(112, 5, 672, 160, True, "HS", 2),  # C4 -> 7x7
    _Row(160, 5, 960, 160, True, "HS", 1),
    _Row(160, 5, 960, 160, True, "HS", 1),
)
# Table 2 of the paper (== torchvision's small config).
_SMALL = (
    _Row(16, 3, 16, 16, True, "RE", 2),  # C1 -> 56x56
    _Row(16, 3, 72, 24, False, "RE", 2),  # C2 -> 28x28
    _Row(24, 3, 88, 24, False, "RE", 1),
    _Row(24, 5, 96, 40, True, "HS", 2),  # C3 -> 14x14
    _Row(40, 5, 240, 40, True, "HS", 1),
    _Row(40, 5, 240, 40, True, "HS", 1),
    _Row(40, 5, 120, 48, True, "HS", 1),
    _Row(48, 5, 144, 48, True, "HS", 1),
    _Row(48, 5, 288, 96, True, "HS", 2),  # C4 -> 7x7
    _Row(96, 5, 576, 96, True, "HS", 1),
    _Row(96, 5, 576, 96, True, "HS", 1),
)
_TABLES = {"mobilenet_v3_large": (_LARGE, 1280), "mobilenet_v3_small": (_SMALL, 1024)}
ARCHS = tuple(_TABLES)


@dataclass(frozen=True)
class ArchSpec:
    """A whole network as data: what :class:`MobileNetV3` is built from and what a pruned model saves."""

    arch: str
    blocks: tuple[BlockConfig, ...]
    last_conv: int  # channels of the 1x1 conv after the last block (6x the last block's output)
    last_channel: int  # hidden width of the classifier
    num_classes: int = 1000
    stem_act: str = "HS"
    head_act: str = "HS"
    width_mult: float = 1.0
    minimalistic: bool = False
    dropout: float = 0.2
    bn_eps: float = 0.001
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ValueError("an ArchSpec needs at least one block")
        for prev, nxt in zip(self.blocks, self.blocks[1:]):
            if prev.out_ch != nxt.in_ch:
                raise ValueError(f"block channels do not chain: {prev.out_ch} -> {nxt.in_ch}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    @property
    def stem_channels(self) -> int:
        return self.blocks[0].in_ch

    def replace(self, **changes: Any) -> "ArchSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["blocks"] = [dataclasses.asdict(b) for b in self.blocks]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchSpec":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ArchSpec fields {sorted(unknown)}; allowed: {sorted(known)}")
        d = dict(d)
        d["blocks"] = tuple(BlockConfig(**b) for b in d["blocks"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "ArchSpec":
        return cls.from_dict(json.loads(text))


def arch_spec(arch: str = "mobilenet_v3_small", width_mult: float = 1.0, minimalistic: bool = False,
              num_classes: int = 1000, dropout: float = 0.2, bn_eps: float = 0.001) -> ArchSpec:
    """Resolve the paper's table for ``arch`` at ``width_mult``.

    Minimalistic models (paper §6.1, timm's ``*_minimal_*``) drop SE and h-swish and use only 3x3 kernels.
    """
    if arch not in _TABLES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    rows, last_channel = _TABLES[arch]

    def adj(c: int) -> int:
        return make_divisible(c * width_mult, 8)

    blocks = []
    for r in rows:
        expanded = adj(r.expanded)
        use_se = r.use_se and not minimalistic
        blocks.append(BlockConfig(
            in_ch=adj(r.in_ch), kernel=3 if minimalistic else r.kernel, expanded=expanded,
            out_ch=adj(r.out_ch), se_channels=make_divisible(expanded // 4, 8) if use_se else 0,
            act="RE" if minimalistic else r.act, stride=r.stride))
    act = "RE" if minimalistic else "HS"
    return ArchSpec(arch=arch, blocks=tuple(blocks), last_conv=6 * blocks[-1].out_ch,
                    last_channel=adj(last_channel), num_classes=num_classes, stem_act=act, head_act=act,
                    width_mult=width_mult, minimalistic=minimalistic, dropout=dropout, bn_eps=bn_eps)


def _act(name: str) -> nn.Module:
    return nn.Hardswish() if name == "HS" else nn.ReLU()


class ConvBNAct(nn.Sequential):
    """conv (no bias) -> BN -> optional activation; keys ``0.weight``, ``1.*`` as torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, dilation: int = 1,
                 act: str | None = None, bn_eps: float = 0.001) -> None:
        padding = (kernel - 1) // 2 * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=bn_eps, momentum=0.01),
        ]
        if act is not None:
            layers.append(_act(act))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """SE with a hard-sigmoid gate (paper §5.3); keys ``fc1``/``fc2`` as torchvision's."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class InvertedResidual(nn.Module):
    """expand 1x1 -> depthwise kxk -> [SE] -> project 1x1, with a residual add when shapes allow."""

    def __init__(self, cfg: BlockConfig, bn_eps: float = 0.001) -> None:
        super().__init__()
        self.cfg = cfg
        self.use_res_connect = cfg.use_res_connect
        layers: list[nn.Module] = []
        if cfg.has_expand:
            layers.append(ConvBNAct(cfg.in_ch, cfg.expanded, 1, act=cfg.act, bn_eps=bn_eps))
        stride = 1 if cfg.dilation > 1 else cfg.stride
        layers.append(ConvBNAct(cfg.expanded, cfg.expanded, cfg.kernel, stride, groups=cfg.expanded,
                                dilation=cfg.dilation, act=cfg.act, bn_eps=bn_eps))
        if cfg.se_channels:
            layers.append(SqueezeExcitation(cfg.expanded, cfg.se_channels))
        layers.append(ConvBNAct(cfg.expanded, cfg.out_ch, 1, act=None, bn_eps=bn_eps))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


class MobileNetV3(nn.Module):
    """MobileNetV3 built from an :class:`ArchSpec`; state_dict keys are torchvision's."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        self.spec = spec
        eps = spec.bn_eps
        layers: list[nn.Module] = [ConvBNAct(3, spec.stem_channels, 3, stride=2, act=spec.stem_act, bn_eps=eps)]
        layers += [InvertedResidual(b, bn_eps=eps) for b in spec.blocks]
        layers.append(ConvBNAct(spec.blocks[-1].out_ch, spec.last_conv, 1, act=spec.head_act, bn_eps=eps))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(spec.last_conv, spec.last_channel),
            _act(spec.head_act),
            nn.Dropout(p=spec.dropout),
            nn.Linear(spec.last_channel, spec.num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


def build_model(spec: ArchSpec) -> MobileNetV3:
    return MobileNetV3(spec)


def mobilenet_v3_large(width_mult: float = 1.0, minimalistic: bool = False, num_classes: int = 1000,
                       **kw: Any) -> MobileNetV3:
    return MobileNetV3(arch_spec("mobilenet_v3_large", width_mult, minimalistic, num_classes, **kw))


def mobilenet_v3_small(width_mult: float = 1.0, minimalistic: bool = False, num_classes: int = 1000,
                       **kw: Any) -> MobileNetV3:
    return MobileNetV3(arch_spec("mobilenet_v3_small", width_mult, minimalistic, num_classes, **kw))


def count_params(model: nn.Module) -> int:
    """Parameters as torchvision counts them (``sum(p.numel())``; BN buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def block_names(spec: ArchSpec) -> Sequence[str]:
    """Module prefixes of the inverted-residual blocks (``features.1`` ...), in order."""
    return [f"features.{i + 1}" for i in range(len(spec.blocks))]
