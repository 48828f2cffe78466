"""The deploy targets by name, and ``--target`` parsing."""
from __future__ import annotations

from compress.errors import UserError
from compress.targets.base import Target
from compress.targets.executorch import ExecuTorch
from compress.targets.litert import LiteRT
from compress.targets.openvino import OpenVINO
from compress.targets.ort import OrtArm64, OrtX86

__all__ = ["TARGETS", "parse_targets", "DEFAULT_TARGET"]

TARGETS: dict[str, Target] = {t.name: t for t in (OrtX86(), OrtArm64(), OpenVINO(), ExecuTorch(), LiteRT(),
                                                 LiteRT(int8_io=True))}
DEFAULT_TARGET = "ort-x86"


def parse_targets(spec: str | None) -> list[Target]:
    """``"ort-x86,openvino"`` -> the targets, ``ort-x86`` (the reference every other one is built from) first."""
    names = [n.strip() for n in (spec or DEFAULT_TARGET).split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise UserError(f"unknown target {unknown[0]!r}; choose from: {', '.join(TARGETS)} (comma-separated)")
    ordered = [DEFAULT_TARGET] + [n for n in dict.fromkeys(names) if n != DEFAULT_TARGET]
    targets = [TARGETS[n] for n in ordered]
    for t in targets:
        t.check_installed()
    return targets
