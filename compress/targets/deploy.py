"""``quantize --target ...``: the reference int8 graph's scales, as one table, carried into every other target.

The pipeline (:mod:`compress.quant.pipeline`) makes the ``ort-x86`` graph with the recipe's strategy; this
reads its table (:class:`compress.targets.table.ScaleTable`, written as ``scales.json``), builds each other
target's artifact from it and the float network it quantizes, and measures each in its own runtime
(:func:`compress.targets.evaluate.evaluate_target`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compress.targets.base import BuildInputs, Target
from compress.targets.evaluate import evaluate_target, render_targets
from compress.targets.table import ScaleTable, compare_scales
from eval.accuracy import predict

__all__ = ["Deployment", "deploy", "TABLE_FILE"]

TABLE_FILE = "scales.json"


@dataclass
class Deployment:
    """What :func:`deploy` needs from the pipeline's run."""
    recipe: Any
    graph: Any  # the reference QuantizedGraph (ort-x86)
    int8: bytes  # its serialized model (with metadata)
    fp32: bytes  # the original float model's export (what "agreement with float" compares against)
    float_model: Any  # the float network the int8 graph quantizes (QAT: its folded model)
    float_onnx: onnx.ModelProto  # that network's fp32 export
    ranges: dict[str, tuple[float, float]]  # calibrated ranges (derived scales for tensors x86 leaves float)
    source: Any
    calibration: list[np.ndarray]
    workdir: Path
    out: Path
    eval_limit: int | None
    threads: int
    latency: bool
    progress: bool
    source_kind: str  # "calibration" | "qat"


def deploy(targets: list[Target], d: Deployment, reference_eval: dict[str, dict]) -> dict[str, Any]:
    """The table (written to ``scales.json``), then every target in ``targets`` (ort-x86 first: the reference,
    measured by the pipeline; ``reference_eval``: its evaluation and the float model's)."""
    g = d.graph
    table = ScaleTable.from_int8(onnx.load_from_string(d.int8), d.float_onnx, d.ranges, g.excluded, d.source_kind,
                                 d.recipe.quantize.weight_bits, g.reduce_range)
    table.save(d.out / TABLE_FILE)
    inputs = BuildInputs(d.float_model, d.float_onnx, table, d.recipe, d.source.preprocess.input_size, d.workdir,
                         d.calibration)
    float_logits, _ = predict(d.fp32, d.source, limit=d.eval_limit)
    int8_logits, _ = predict(d.int8, d.source, limit=d.eval_limit)
    results = [_reference_row(targets[0], table, d, reference_eval)]
    for target in targets[1:]:
        t = time.time()
        if d.progress:
            print(f"target {target.name}: building its int8 artifact from {TABLE_FILE}, then measuring it", flush=True)
        r = evaluate_target(target, inputs, d.out, d.source, {"fp32": float_logits, "int8": int8_logits},
                            d.eval_limit, d.threads, d.latency)
        r["seconds"] = round(time.time() - t, 1)
        results.append(r)
    return {"table": {"file": TABLE_FILE, "source": table.source, "activations": len(table.activations),
                      "weights": len(table.weights), "derived_ranges": len(table.ranges)},
            "results": results,
            "notes": render_targets(results, reference_eval["fp32"]["accuracy"]["top1"])}


def _reference_row(target: Target, table: ScaleTable, d: Deployment, ev: dict[str, dict]) -> dict[str, Any]:
    """ort-x86: the pipeline's own int8 model and its measurement (interleaved with ORT's fp32)."""
    acts, weights = target.scales(d.int8)
    int8, fp32 = ev["int8"], ev["fp32"]
    lat, ref = int8.get("latency_ms"), fp32.get("latency_ms")
    row = {"target": target.name, "runtime": target.runtime, "file": "model_int8.onnx", "size_bytes": len(d.int8),
           "notes": target.notes, "accuracy": int8["accuracy"], "agreement_with_float": int8["agreement"],
           "agreement_with_ort_x86_int8": 1.0, "scales": compare_scales(table, acts, weights), "extras": {},
           "latency_ms": lat, "runtime_fp32_ms": {"fp32": ref} if ref else {}}
    if lat and ref:
        row["speedup_vs_runtime_fp32"] = round(ref["median"] / lat["median"], 3)
    else:
        row["latency_note"] = "not measured (latency off)"
    return row
