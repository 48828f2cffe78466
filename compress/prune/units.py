"""The units NetAdapt's latency table times (NetAdapt §3.2): the stem conv, each inverted-residual block, the last
1x1 conv and the head (pool + classifier), each as data (a dict: its kind and channels at its input side), as a
torch module, as an ONNX graph and as the artifact a deploy target runs; and the weights each one holds."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import onnx
import torch
from torch import nn

from compress.models.mobilenetv3 import ArchSpec, ConvBNAct, InvertedResidual, _act
from compress.prune.unit_timing import Timing, export_unit

__all__ = ["network_units", "unit_key", "unit_module", "unit_onnx", "unit_artifact", "unit_weight_count",
           "trained_like", "export_unit"]


def _out_size(h: int, kernel: int, stride: int, dilation: int = 1) -> int:
    pad = (kernel - 1) // 2 * dilation
    return (h + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def network_units(spec: ArchSpec, input_size: int) -> list[dict[str, Any]]:
    """The units of ``spec`` in forward order, each a dict (kind, configuration, input side ``hw``)."""
    h = input_size
    units: list[dict[str, Any]] = [{"kind": "stem", "out": spec.stem_channels, "act": spec.stem_act, "hw": h}]
    h = _out_size(h, 3, 2)
    for b in spec.blocks:
        units.append({"kind": "block", **dataclasses.asdict(b), "hw": h})
        h = _out_size(h, b.kernel, 1 if b.dilation > 1 else b.stride, b.dilation)
    units.append({"kind": "last", "in": spec.blocks[-1].out_ch, "out": spec.last_conv, "act": spec.head_act, "hw": h})
    units.append({"kind": "head", "in": spec.last_conv, "hidden": spec.last_channel, "classes": spec.num_classes,
                  "act": spec.head_act, "hw": h})
    return units


def unit_key(unit: dict[str, Any]) -> str:
    return json.dumps(unit, sort_keys=True, separators=(",", ":"))


class _Head(nn.Module):
    """Pool + classifier exactly as :class:`MobileNetV3` runs them."""

    def __init__(self, cin: int, hidden: int, classes: int, act: str) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(cin, hidden), _act(act), nn.Dropout(0.2), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def unit_module(unit: dict[str, Any]) -> tuple[nn.Module, tuple[int, int, int]]:
    """The torch module of a unit (random weights: they do not change the latency) and its input [C, H, W]."""
    kind, h = unit["kind"], unit["hw"]
    if kind == "stem":
        return ConvBNAct(3, unit["out"], 3, stride=2, act=unit["act"]), (3, h, h)
    if kind == "block":
        from compress.models.mobilenetv3 import BlockConfig

        cfg = BlockConfig(**{k: v for k, v in unit.items() if k not in ("kind", "hw")})
        return InvertedResidual(cfg), (cfg.in_ch, h, h)
    if kind == "last":
        return ConvBNAct(unit["in"], unit["out"], 1, act=unit["act"]), (unit["in"], h, h)
    if kind == "head":
        return _Head(unit["in"], unit["hidden"], unit["classes"], unit["act"]), (unit["in"], h, h)
    raise ValueError(f"unknown unit kind {kind!r}")


_WEIGHTS: dict[str, int] = {}


def unit_weight_count(key: str) -> int:
    """Conv and linear weights of the unit ``key`` (BN folds into them; biases are negligible)."""
    if key not in _WEIGHTS:
        module, _ = unit_module(json.loads(key))
        _WEIGHTS[key] = sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight") and p.ndim > 1)
    return _WEIGHTS[key]


def trained_like(module: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, as in a trained network (random weights: they do not change the latency)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    return module.eval()


def unit_onnx(unit: dict[str, Any], batch: int) -> bytes:
    """The unit exported as it would be inside the whole network (BN folded, opset 17), static shape."""
    module, chw = unit_module(unit)
    return export_unit(trained_like(module), chw, batch)


def unit_artifact(unit: dict[str, Any], timing: Timing, batch: int) -> bytes:
    """What ``timing`` runs for ``unit``: its ONNX export, or the target's build from it and its torch module."""
    module, chw = unit_module(unit)
    module = trained_like(module)
    return timing.artifact(onnx.load_from_string(export_unit(module, chw, batch)), chw, batch, module=module)
