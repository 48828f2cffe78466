"""``executorch``: PyTorch's on-device runtime, the network lowered to one XNNPACK delegate (``.pte``).

(Being written: the PT2E program with XNNPACKQuantizer's placement and every observer replaced by the table's
scales.)
"""
from __future__ import annotations

from compress.errors import UserError
from compress.targets.base import BuildInputs, Target

__all__ = ["ExecuTorch"]


class ExecuTorch(Target):
    name, runtime, suffix = "executorch", "ExecuTorch (XNNPACK)", ".pte"
    extra, module = "executorch", "executorch"
    fixed_batch = 1

    def build(self, inputs: BuildInputs) -> bytes:
        raise UserError("the executorch target is not available in this version")
