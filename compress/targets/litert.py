"""``litert``: LiteRT (TensorFlow Lite) ``.tflite`` for Android, run with its XNNPACK delegate.

(Being written.)
"""
from __future__ import annotations

from compress.errors import UserError
from compress.targets.base import BuildInputs, Target

__all__ = ["LiteRT"]


class LiteRT(Target):
    name, runtime, suffix = "litert", "LiteRT (XNNPACK delegate)", ".tflite"
    extra, module = "litert", "ai_edge_litert"
    fixed_batch = 1

    def build(self, inputs: BuildInputs) -> bytes:
        raise UserError("the litert target is not available in this version")
