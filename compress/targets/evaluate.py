"""Each target's artifact, built from the one quantization and measured in its own runtime from Python.

Per target: the artifact (``model_int8_<target><suffix>``), its size, its accuracy on the test split, how often
it predicts what the float model and the ``ort-x86`` int8 model predict, the scales it really carries against
the table, and its latency interleaved with that runtime's own fp32 (OpenVINO also bf16) in one measurement.
A target whose CPU is not this one gets accuracy and "not measured" for latency - never an estimate.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from compress.io import write_bytes
from compress.targets.base import BuildInputs, Target
from compress.targets.table import compare_scales
from eval.accuracy import agreement, topk_accuracy
from eval.latency import interleave

__all__ = ["evaluate_target", "evaluate_artifact", "test_logits", "render_targets"]


def test_logits(run: Callable[[np.ndarray], np.ndarray], source, limit: int | None, batch: int | None,
                batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of a runner on the first ``limit`` test images (``batch``: the artifact's static batch;
    the last batch is padded)."""
    logits, labels = [], []
    for x, y in source.loader("test", batch_size=batch or batch_size, limit=limit):
        xs = x.numpy()
        n = len(xs)
        if batch and n < batch:
            xs = np.concatenate([xs, np.zeros((batch - n, *xs.shape[1:]), xs.dtype)])
        logits.append(np.asarray(run(xs), np.float32).reshape(len(xs), -1)[:n])
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels).astype(np.int64)


def _feed(source, batch: int) -> np.ndarray:
    x, _ = next(iter(source.loader("test", batch_size=batch, limit=batch)))
    return x.numpy()


def evaluate_target(target: Target, inputs: BuildInputs, out: Path, source, reference: dict[str, np.ndarray],
                    eval_limit: int | None, threads: int, latency: bool = True) -> dict[str, Any]:
    """Build ``target``'s artifact into ``out`` and measure it (see the module docstring).  ``reference``: the
    logits of the float model (``fp32``) and of the ort-x86 int8 model (``int8``) on the same test images."""
    t0 = time.time()
    artifact = target.build(inputs)
    file = f"model_int8_{target.name.replace('-', '_')}{target.suffix}"
    write_bytes(out / file, artifact)
    built_s = time.time() - t0
    logits, labels = test_logits(target.runner(artifact, threads=threads), source, eval_limit, target.fixed_batch)
    acts, weights = target.scales(artifact)
    result: dict[str, Any] = {
        "target": target.name, "runtime": target.runtime, "file": file, "size_bytes": len(artifact),
        "notes": target.notes, "accuracy": topk_accuracy(logits, labels, ks=(1, 5)),
        "agreement_with_float": agreement(logits, reference["fp32"]),
        "agreement_with_ort_x86_int8": agreement(logits, reference["int8"]),
        "scales": compare_scales(inputs.table, acts, weights), "extras": target.extras(artifact, inputs.workdir),
        "build_s": round(built_s, 2)}
    if not (latency and target.measurable_here):
        result["latency_ms"] = None
        result["latency_note"] = ("not measured: this machine's CPU is not the target's" if not target.measurable_here
                                  else "not measured (latency off)")
        return result
    batch = target.fixed_batch or 1
    x = _feed(source, batch)
    calls = {"int8": target.runner(artifact, threads)}
    for variant, data in target.build_fp32(inputs).items():
        calls[variant] = target.runner(data, threads, variant=variant)
    lat = interleave({k: (lambda f: lambda: f(x))(f) for k, f in calls.items()}, threads=threads, batch=batch,
                     rounds=7, round_time_s=0.2)
    result["latency_ms"] = lat["int8"]
    result["runtime_fp32_ms"] = {k: v for k, v in lat.items() if k != "int8"}
    result["speedup_vs_runtime_fp32"] = round(lat["fp32"]["median"] / lat["int8"]["median"], 3)
    return result


def render_targets(results: list[dict[str, Any]], float_top1: float | None) -> list[str]:
    """report.md's section: one row per target."""
    lines = ["", "## Deploy targets", "",
             "Every artifact carries the scales of one quantization (`scales.json`); each is run in its own runtime "
             "(latency: 1 forward pass, interleaved with that runtime's own fp32).", "",
             "| target | file | size | top-1 | Δ vs float (pt) | same top-1 as ort-x86 int8 | int8 ms | runtime fp32 ms "
             "| speedup | max scale deviation | notes |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        top1 = r["accuracy"]["top1"]
        delta = "–" if top1 is None or float_top1 is None else f"{100 * (top1 - float_top1):+.2f}"
        lat = r.get("latency_ms")
        fp32 = (r.get("runtime_fp32_ms") or {}).get("fp32")
        bf16 = (r.get("runtime_fp32_ms") or {}).get("bf16")
        fp32_text = "–" if not fp32 else f"{fp32['median']:.3f}" + (f" (bf16 {bf16['median']:.3f})" if bf16 else "")
        dev = r["scales"].get("max_rel_scale_deviation")
        top1_text = "–" if top1 is None else f"{100 * top1:.2f} %"
        lat_text = r.get("latency_note", "–") if not lat else f"{lat['median']:.3f}"
        speed = "–" if not lat else f"{r['speedup_vs_runtime_fp32']:.2f}×"
        dev_text = "–" if dev is None else f"{dev:.1e} rel"
        notes = r["notes"] + (f"; {r['extras']['summary']}" if (r.get("extras") or {}).get("summary") else "")
        lines.append(f"| {r['target']} | `{r['file']}` | {r['size_bytes'] / 2**20:.2f} MiB | {top1_text} | {delta} | "
                     f"{100 * r['agreement_with_ort_x86_int8']:.2f} % | {lat_text} | {fp32_text} | {speed} | "
                     f"{dev_text} | {notes} |")
    return lines


def evaluate_artifact(model: str, target: str = "ort-x86", dataset: str | None = None, limit: int | None = None,
                      threads: int = 1, batch: int = 1, reference: str | None = None, workers: int | None = None,
                      input_size: int | None = None) -> dict[str, Any]:
    """``mnv3-compress eval MODEL --target T``: a deploy artifact measured in its own runtime - accuracy on the
    test split, agreement with a float ``reference`` (ONNX), latency, size, machine.  ONNX artifacts say how to
    feed them (their metadata); a ``.pte`` / ``.tflite`` needs ``dataset`` (and ``input_size`` when it is not the
    dataset's default)."""
    from compress.errors import UserError
    from compress.targets.registry import parse_targets
    from eval.evaluate import dataset_for, evaluate_onnx
    from eval.model_info import machine_info

    if target == "ort-x86":
        return evaluate_onnx(model, dataset=dataset, limit=limit, threads=threads, batch=batch, reference=reference,
                             workers=workers)
    t = parse_targets(target)[-1]  # ort-x86 first, then this one; a missing runtime is a one-line error
    path = Path(model)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    data = path.read_bytes()
    if t.suffix == ".onnx":
        source = dataset_for(data, dataset, workers)
    else:
        if dataset is None:
            raise UserError(f"a {t.suffix} file records no preprocessing: pass --dataset (and --input-size)")
        from calibration.datasets import open_dataset

        source = open_dataset(dataset, input_size, workers)
    run = t.runner(data, threads=threads)
    logits, labels = test_logits(run, source, limit, t.fixed_batch)
    agree = None
    if reference is not None:
        from eval.accuracy import predict

        agree = agreement(logits, predict(reference, source, limit=limit)[0])
    lat = None
    if t.measurable_here:
        x = _feed(source, t.fixed_batch or batch)
        lat = interleave({"int8": lambda: run(x)}, threads=threads, batch=t.fixed_batch or batch, rounds=5)["int8"]
    return {"target": t.name, "runtime": t.runtime, "accuracy": topk_accuracy(logits, labels, ks=(1, 5)),
            "agreement": agree, "latency_ms": lat,
            "latency_note": None if t.measurable_here else "not measured: this machine's CPU is not the target's",
            "size_bytes": len(data), "machine": machine_info()}
