"""ONNX Runtime targets: ``ort-x86`` (the reference int8 graph) and ``ort-arm64`` (ORT Mobile / QNN on Arm).

* ``ort-x86``: the QDQ graph the recipe's strategy made, shaped for ORT's x86 kernels (depthwise channels
  padded to 16, the stem to 4; 7-bit weights on CPUs without VNNI).  Every other target's scales come from it.
* ``ort-arm64``: the same forms (``x * relu6(x + 3) / 6``, relu6 SE gate) without the x86-only padding (wasted
  MACs on Arm), the table's weight grid, uint8 activations (what NNAPI and QNN take), batch fixed to 1 (NNAPI
  takes static shapes only).  Checked with onnxruntime's mobile tools: the NNAPI partitioning of
  ``check_onnx_model_mobile_usability`` and a ``convert_onnx_models_to_ort`` conversion.  Its accuracy is measured
  here (ORT runs the graph on x86); its latency is not: this CPU is not an Arm one.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.onnx.graph import fix_batch
from compress.targets.base import BuildInputs, Runner, Target
from compress.targets.table import ScaleTable, table_qat_params

__all__ = ["OrtX86", "OrtArm64"]


def ort_runner(model: bytes, threads: int) -> Runner:
    from eval.latency import make_session

    sess = make_session(model, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


class OrtX86(Target):
    name, runtime, suffix = "ort-x86", "onnxruntime", ".onnx"
    notes = "the reference: depthwise padded to 16 channels, stem to 4 (ORT's x86 int8 kernels)"

    def build(self, inputs: BuildInputs) -> bytes:
        raise RuntimeError("ort-x86 is the reference graph the pipeline makes; it is not rebuilt from the table")

    def build_fp32(self, inputs: BuildInputs) -> dict[str, bytes]:
        return {"fp32": inputs.fp32_onnx.SerializeToString()}

    def runner(self, artifact: bytes, threads: int, variant: str = "int8") -> Runner:
        return ort_runner(artifact, threads)

    def scales(self, artifact: bytes):
        return _qdq_scales(onnx.load_from_string(artifact))


def _qdq_scales(model: onnx.ModelProto) -> tuple[dict[str, tuple[float, int]], dict[str, np.ndarray]]:
    t = ScaleTable.from_int8(model, None)
    return t.activations, t.weights


class OrtArm64(Target):
    name, runtime, suffix = "ort-arm64", "onnxruntime (Arm: ORT Mobile NNAPI / QNN)", ".onnx"
    measurable_here = False
    fixed_batch = 1
    notes = "no x86 padding, uint8 activations, batch 1 (NNAPI); latency needs an Arm device"

    def build(self, inputs: BuildInputs) -> bytes:
        from compress.quant.core import prepare_float, quantize_prepared

        rec = inputs.recipe.with_overrides("quantize", depthwise_channel_multiple=0, pad_input_channels=False,
                                           activation_type="uint8")
        work = inputs.workdir / "ort-arm64"
        work.mkdir(parents=True, exist_ok=True)
        prepared_path = prepare_float(inputs.fp32_onnx, rec.quantize, work)
        params = table_qat_params(inputs.table, onnx.load(str(prepared_path)))
        graph = quantize_prepared(prepared_path, None, rec, work, extra_excluded=inputs.table.excluded,
                                  qat_params=params)
        model = fix_batch(graph.model, self.fixed_batch)
        model.metadata_props.extend(inputs.fp32_onnx.metadata_props)
        return model.SerializeToString()

    def build_fp32(self, inputs: BuildInputs) -> dict[str, bytes]:
        return {"fp32": fix_batch(inputs.fp32_onnx, self.fixed_batch).SerializeToString()}

    def runner(self, artifact: bytes, threads: int, variant: str = "int8") -> Runner:
        return ort_runner(artifact, threads)

    def scales(self, artifact: bytes):
        return _qdq_scales(onnx.load_from_string(artifact))

    def extras(self, artifact: bytes, workdir: Path) -> dict[str, Any]:
        """onnxruntime's own mobile checks: NNAPI partitions and nodes covered, and the .ort conversion."""
        work = workdir / "ort-arm64-check"
        work.mkdir(parents=True, exist_ok=True)
        path = work / "model_int8_arm64.onnx"
        path.write_bytes(artifact)
        usability = subprocess.run([sys.executable, "-m", "onnxruntime.tools.check_onnx_model_mobile_usability",
                                    str(path)], capture_output=True, text=True, timeout=300)
        text = usability.stdout + usability.stderr
        nnapi = text.split("Checking NNAPI")[-1].split("Checking CoreML")[0] if "Checking NNAPI" in text else text
        parts = re.search(r"(\d+) partitions? with a total of (\d+)/(\d+) nodes", nnapi)
        convert = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(path),
                                  "--output_dir", str(work / "ort")], capture_output=True, text=True, timeout=300)
        ort_files = sorted(p.name for p in (work / "ort").glob("*.ort")) if convert.returncode == 0 else []
        return {"nnapi_partitions": int(parts.group(1)) if parts else None,
                "nnapi_nodes": f"{parts.group(2)}/{parts.group(3)}" if parts else None,
                "mobile_usability_rc": usability.returncode, "ort_format_conversion": convert.returncode == 0,
                "ort_files": ort_files}
