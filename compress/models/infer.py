"""What a state_dict in torchvision's layout is: architecture, width multiplier, minimalistic or not, classes.

Read from the keys and shapes alone, so any torchvision-layout checkpoint (torchvision's own, timm's after
:func:`compress.models.timm.timm_to_torchvision`, ours) loads without architecture options:

* the architecture from the number of inverted-residual blocks (``features.N.block``): 15 for Large, 11 for Small;
* minimalistic (paper §6.1, timm's ``*_minimal_*``) when there is no SE module anywhere and every depthwise
  kernel is 3x3 (the full networks have SE modules and 5x5 kernels);
* the classes from the classifier's last Linear;
* the width multiplier as the one (common values first, then a 0.05 grid) whose table reproduces every channel
  count of the weights.  When none does (timm rounds its expansions differently at width 0.75; a pruned
  network) the channel counts are read from the weights themselves and the width is the multiplier whose
  table reproduces the blocks' output channels.

:func:`check_requested` turns an explicit ``--arch`` / ``--width-mult`` / ``--minimalistic`` / ``--num-classes``
that contradicts the weights into one line saying what the weights are.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from compress.errors import UserError
from compress.models.mobilenetv3 import ArchSpec, arch_spec

__all__ = ["InferredArch", "infer_architecture", "check_requested", "widths_from_weights", "COMMON_WIDTHS"]

BLOCKS = {15: "mobilenet_v3_large", 11: "mobilenet_v3_small"}
COMMON_WIDTHS = (1.0, 0.75, 0.5, 1.25, 0.35, 1.5, 2.0, 0.25)
_GRID = tuple(round(0.1 + 0.05 * i, 2) for i in range(59))  # 0.1 ... 3.0
_BLOCK = re.compile(r"^features\.(\d+)\.block\.")


@dataclass(frozen=True)
class InferredArch:
    arch: str
    width_mult: float
    minimalistic: bool
    num_classes: int
    spec: ArchSpec  # what the model is built from (channel counts exactly those of the weights)

    def describe(self) -> str:
        return (f"{self.arch} width {self.width_mult:g}{', minimalistic' if self.minimalistic else ''}, "
                f"{self.num_classes} classes")


def _shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    from compress.models.mobilenetv3 import MobileNetV3

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = MobileNetV3(spec)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_architecture(sd: Mapping[str, torch.Tensor], bn_eps: float = 0.001) -> InferredArch:
    """The architecture of a torchvision-layout state_dict (see the module docstring); UserError when it is not
    a MobileNetV3."""
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    arch = BLOCKS.get(len(blocks))
    if arch is None or "classifier.3.weight" not in sd or sd["classifier.3.weight"].ndim != 2:
        raise UserError(f"the weights are not a MobileNetV3 in torchvision's layout: {len(blocks)} inverted-residual "
                        f"blocks (Large has 15, Small 11) and "
                        f"{'a' if 'classifier.3.weight' in sd else 'no'} classifier.3 Linear")
    num_classes = int(sd["classifier.3.weight"].shape[0])
    depthwise = [v for k, v in sd.items() if k.endswith(".weight") and v.ndim == 4 and v.shape[1] == 1
                 and v.shape[0] > 1]
    has_se = any(".fc1." in k for k in sd)
    minimalistic = not has_se and all(v.shape[-1] == 3 for v in depthwise)
    want = {k: tuple(v.shape) for k, v in sd.items()}
    for w in COMMON_WIDTHS + _GRID:
        spec = arch_spec(arch, w, minimalistic, num_classes, bn_eps=bn_eps)
        if _shapes(spec) == want:
            return InferredArch(arch, w, minimalistic, num_classes, spec)
    base = arch_spec(arch, 1.0, minimalistic, num_classes, bn_eps=bn_eps)
    spec = widths_from_weights(base, sd)
    if _shapes(spec) != want:
        raise UserError(f"the weights have {arch}'s {len(blocks)} blocks but channel counts no width multiplier "
                        f"or per-block reading reproduces (a pruned network needs its arch.json / our checkpoint)")
    outs = [b.out_ch for b in spec.blocks]
    width = next((w for w in COMMON_WIDTHS + _GRID
                  if [b.out_ch for b in arch_spec(arch, w, minimalistic, num_classes).blocks] == outs), 1.0)
    return InferredArch(arch, width, minimalistic, num_classes, dataclasses.replace(spec, width_mult=width))


def widths_from_weights(spec: ArchSpec, sd: Mapping[str, torch.Tensor]) -> ArchSpec:
    """``spec`` with every channel count read from a torchvision-layout state_dict (kernels, strides and
    activations stay the table's); ``spec`` unchanged when the weights do not have its block structure."""
    n = len(spec.blocks)
    keys = {"stem": "features.0.0.weight", "last": f"features.{n + 1}.0.weight", "hidden": "classifier.0.weight"}
    if any(k not in sd for k in keys.values()) or f"features.{n + 2}.0.weight" in sd:
        return spec
    blocks, in_ch = [], int(sd[keys["stem"]].shape[0])
    for i, b in enumerate(spec.blocks):
        pre = f"features.{i + 1}.block"
        convs = sorted((int(k.split(".")[3]), v) for k, v in sd.items()
                       if re.fullmatch(rf"{re.escape(pre)}\.\d+\.0\.weight", k))
        dw = [v for _, v in convs if v.ndim == 4 and v.shape[1] == 1 and v.shape[0] > 1]
        fc1 = [v for k, v in sd.items() if re.fullmatch(rf"{re.escape(pre)}\.\d+\.fc1\.weight", k)]
        if len(dw) != 1 or len(convs) < 2 or len(fc1) > 1:
            return spec
        se = int(fc1[0].shape[0]) if fc1 else 0
        blocks.append(dataclasses.replace(b, in_ch=in_ch, expanded=int(dw[0].shape[0]),
                                          out_ch=int(convs[-1][1].shape[0]), se_channels=se))
        in_ch = blocks[-1].out_ch
    try:
        return spec.replace(blocks=tuple(blocks), last_conv=int(sd[keys["last"]].shape[0]),
                            last_channel=int(sd[keys["hidden"]].shape[0]))
    except ValueError:
        return spec


def check_requested(found: InferredArch, weights, arch: str | None = None, width_mult: float | None = None,
                    minimalistic: bool | None = None, num_classes: int | None = None) -> None:
    """One line saying what the weights are, when an explicit option contradicts them."""
    wrong = []
    if arch is not None and arch != found.arch:
        wrong.append(f"--arch {arch}")
    if width_mult is not None and abs(width_mult - found.width_mult) > 1e-9:
        same = _shapes(arch_spec(found.arch, width_mult, found.minimalistic, found.num_classes)) == _shapes(found.spec)
        if not same:
            wrong.append(f"--width-mult {width_mult:g}")
    if minimalistic is not None and bool(minimalistic) != found.minimalistic:
        wrong.append("--minimalistic" if minimalistic else "a full (not minimalistic) network")
    if num_classes is not None and num_classes != found.num_classes:
        wrong.append(f"--num-classes {num_classes}")
    if wrong:
        raise UserError(f"weights {weights} are {found.describe()}; {', '.join(wrong)} contradicts them (drop the "
                        f"option: the architecture is read from the weights)")
