"""What every deploy target answers (ONNX Runtime's execution providers and ExecuTorch's partitioners answer the
same few questions): its name, what it needs installed, how it writes its artifact from the one quantization,
how the artifact is run and timed, and which scales it really carries.  Adding a runtime is adding one module
with one :class:`Target` subclass, listed in :data:`compress.targets.TARGETS`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from compress.errors import UserError
from compress.targets.table import ScaleTable

__all__ = ["Target", "BuildInputs", "Runner", "require"]

Runner = Callable[[np.ndarray], np.ndarray]  # a batch of preprocessed images -> logits


@dataclass
class BuildInputs:
    """Everything a target builds its int8 artifact from: the one quantization and the float network it applies to."""
    float_model: Any  # the float MobileNetV3 the table quantizes (QAT: its folded model, weights on their grids)
    fp32_onnx: onnx.ModelProto  # that network's fp32 export (dynamic batch, with the project's metadata)
    table: ScaleTable
    recipe: Any  # recipes.loader.Recipe
    input_size: tuple[int, int]
    workdir: Path
    calibration: list[np.ndarray] = field(default_factory=list)  # a few calibration batches (PT2E shapes the graph)
    channels: int = 3  # the input's channels (an image: 3; a NetAdapt latency unit: its block's input)


def require(module: str, extra: str) -> None:
    """A one-line error naming the pip command when an optional runtime is missing."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"this target needs {module}: pip install 'mnv3-compress[{extra}]'")


class Target:
    """One deploy target.  Subclasses set the class attributes and implement :meth:`build` and :meth:`runner`."""

    name: str = ""  # "ort-x86"
    runtime: str = ""  # what runs it ("onnxruntime", "openvino", ...)
    suffix: str = ".onnx"  # the artifact's file extension
    extra: str | None = None  # the pip extra that installs its runtime (None: a base dependency)
    module: str | None = None  # the module that extra provides (checked before anything is built)
    measurable_here: bool = True  # False: its CPU is not this one (latency is "not measured", never estimated)
    fixed_batch: int | None = None  # the artifact's batch when it is static
    notes: str = ""  # a line for the report: what shape its int8 graph takes and why

    def check_installed(self) -> None:
        if self.module is not None:
            require(self.module, self.extra or self.name)

    def build(self, inputs: BuildInputs) -> bytes:
        """The int8 artifact, every scale from ``inputs.table`` (an unmapped quantization point is an error)."""
        raise NotImplementedError

    def build_fp32(self, inputs: BuildInputs) -> dict[str, bytes]:
        """This runtime's own fp32 artifact(s) to time the int8 one against: ``{"fp32": ...}`` (OpenVINO also
        ``bf16``, its default precision on CPUs that have it)."""
        raise NotImplementedError

    def runner(self, artifact: bytes, threads: int, variant: str = "int8") -> Runner:
        """A callable that runs ``artifact`` in this runtime on ``threads`` threads."""
        raise NotImplementedError

    def scales(self, artifact: bytes) -> tuple[dict[str, tuple[float, int]], dict[str, np.ndarray]]:
        """The activation scales (uint8 convention, keyed as the table) and weight scales the artifact carries,
        read back from it."""
        raise NotImplementedError

    def extras(self, artifact: bytes, workdir: Path) -> dict[str, Any]:
        """Target-specific facts for the report (delegate partitions, mobile-usability check ...)."""
        return {}
