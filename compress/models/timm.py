"""timm's MobileNetV3 checkpoints mapped onto torchvision's layout (``mobilenetv3_large_100``, ``_small_100``,
``_075`` ...).

timm is detected by ``conv_stem.weight`` and mapped key by key.  timm's BatchNorm uses ``eps=1e-5`` where
torchvision uses ``1e-3``, and its head is a 1x1 ``conv_head`` with bias instead of a Linear; both are
reproduced so outputs match timm's.  At other widths timm rounds channel counts differently, so they are read
from the weights (:func:`compress.models.infer.infer_architecture`).  timm's ``tf_*`` ports (BN eps 1e-3, TF 'SAME' padding) have the same
keys and cannot be told apart from a state_dict: they load, but do not reproduce timm's outputs.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Mapping

import torch


__all__ = ["TIMM_BN_EPS", "is_timm_layout", "timm_to_torchvision"]

TIMM_BN_EPS = 1e-5


def is_timm_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return "conv_stem.weight" in sd


_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")


def timm_to_torchvision(sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Map a timm MobileNetV3 state_dict onto torchvision's keys."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    blocks: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _TIMM_BLOCK.match(k)
        if m:
            blocks.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = v
        elif k.startswith("conv_stem."):
            out["features.0.0." + k[len("conv_stem."):]] = v
        elif k.startswith("bn1."):
            out["features.0.1." + k[len("bn1."):]] = v
        elif k == "conv_head.weight":
            out["classifier.0.weight"] = v.flatten(1)
        elif k == "conv_head.bias":
            out["classifier.0.bias"] = v
        elif k.startswith("classifier."):
            out["classifier.3." + k[len("classifier."):]] = v
        else:
            out[k] = v  # unknown: reported as unexpected by the fit check
    for n, key in enumerate(sorted(blocks)):
        b = blocks[key]
        pre = f"features.{n + 1}"
        subs: list[tuple[str, str]] = []
        if any(s.startswith("conv_pwl.") for s in b):  # InvertedResidual
            has_se = any(s.startswith("se.") for s in b)
            proj = 3 if has_se else 2
            subs = [("conv_pw.", f"{pre}.block.0.0."), ("bn1.", f"{pre}.block.0.1."),
                    ("conv_dw.", f"{pre}.block.1.0."), ("bn2.", f"{pre}.block.1.1."),
                    ("se.conv_reduce.", f"{pre}.block.2.fc1."), ("se.conv_expand.", f"{pre}.block.2.fc2."),
                    ("conv_pwl.", f"{pre}.block.{proj}.0."), ("bn3.", f"{pre}.block.{proj}.1.")]
        elif any(s.startswith("conv_dw.") for s in b):  # DepthwiseSeparable (no expansion conv)
            has_se = any(s.startswith("se.") for s in b)
            proj = 2 if has_se else 1
            subs = [("conv_dw.", f"{pre}.block.0.0."), ("bn1.", f"{pre}.block.0.1."),
                    ("se.conv_reduce.", f"{pre}.block.1.fc1."), ("se.conv_expand.", f"{pre}.block.1.fc2."),
                    ("conv_pw.", f"{pre}.block.{proj}.0."), ("bn2.", f"{pre}.block.{proj}.1.")]
        else:  # ConvBnAct: the last 1x1 conv of the features
            subs = [("conv.", f"{pre}.0."), ("bn1.", f"{pre}.1.")]
        for s, v in b.items():
            for src, dst in subs:
                if s.startswith(src):
                    out[dst + s[len(src):]] = v
                    break
            else:
                out[f"blocks.{key[0]}.{key[1]}.{s}"] = v
    return out
