"""Every variant of one runtime timed in ONE interleaved run, and every variant's accuracy on ONE test split.

* :func:`collect`: one row per distinct artifact and runtime.  The float model every sub-run starts from is one
  row (``fp32``), and an artifact two recipes made alike (QAT's calibrated baseline and ``int8``, when their
  graphs are equal) is one row that names both.  Each runtime that runs here besides ``ort-x86`` also gets the
  float networks in its own form (:meth:`compress.targets.base.Target.build_fp32`, written to
  ``OUT/artifacts/<runtime>/``): its speedups are against its own float, as in ``quantize --target``.
* :func:`measure_latencies`: per runtime that runs on this CPU, one :func:`eval.latency.interleave` over all its
  rows (:data:`ROUNDS` rounds, rotating order), so the machine's drift hits them alike; every row of that runtime
  carries the same ``measurement`` id.  A runtime whose CPU is not this one gets "not measured", never an
  estimate.  A measurement is kept in ``OUT/measurements.json``, keyed by the artifacts' digests, the settings
  and the CPU, and reused until one of those changes (``remeasure=True`` times again).
* :func:`check_accuracy`: a row's top-1 from its sub-run is kept when that run evaluated the same test images of
  the same data (name, fingerprint, count); any other row is evaluated here, in its own runtime.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from compress.io import write_bytes, write_json
from compress.targets.base import BuildInputs, Target
from compress.targets.evaluate import test_logits
from eval.accuracy import agreement, topk_accuracy
from eval.latency import interleave
from eval.model_info import count_macs, machine_info, model_params, network_macs

__all__ = ["collect", "measure_latencies", "latency_key", "expected_latency_s", "check_accuracy", "test_split", "Cache",
           "ROUNDS", "ROUND_TIME_S"]

ROUNDS = 10  # interleaved rounds of each runtime's measurement
ROUND_TIME_S = 0.2  # about this long per variant and round
CACHE_FILE = "measurements.json"
ARTIFACTS_INDEX = "artifacts/index.json"  # other runtimes' float artifacts: what each was built from
CACHE_FORMAT = 1


class Cache:
    """``OUT/measurements.json``: latency measurements per runtime and accuracies evaluated here."""

    def __init__(self, out: Path) -> None:
        self.path = out / CACHE_FILE
        try:
            doc = json.loads(self.path.read_text())
            ok = doc.get("format") == CACHE_FORMAT
        except (OSError, ValueError, AttributeError):
            doc, ok = {}, False
        self.latency: dict[str, Any] = dict(doc.get("latency") or {}) if ok else {}
        self.accuracy: dict[str, Any] = dict(doc.get("accuracy") or {}) if ok else {}

    def save(self) -> None:
        write_json(self.path, {"format": CACHE_FORMAT, "latency": self.latency, "accuracy": self.accuracy})


def _digest(data: bytes, file: str) -> str:
    """What makes two artifacts the same model: an ONNX file's graph (its metadata aside), else its bytes."""
    if file.endswith(".onnx"):
        data = onnx.load_from_string(data).graph.SerializeToString()
    return hashlib.sha256(data).hexdigest()


def _dedupe(rows: list[dict[str, Any]], out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    kept: dict[tuple, dict[str, Any]] = {}
    notes = []
    for r in rows:
        data = (out / r["file"]).read_bytes()
        r["sha256"] = hashlib.sha256(data).hexdigest()
        key = (r["runtime"], r["runner_variant"], _digest(data, r["file"]))
        first = kept.get(key)
        if first is None:
            if any(k[0] == r["runtime"] and v["name"] == r["name"] for k, v in kept.items()):
                r = {**r, "name": f"{r['name']} ({Path(r['source']['report']).parent.name})"}  # another graph
            kept[key] = {**r, "same_as": []}
        elif r["name"] != first["name"]:
            first["same_as"].append(r["name"])
            notes.append(f"`{r['name']}` ({r['runtime']}) is the same graph as `{first['name']}`: one row.")
    return list(kept.values()), sorted(set(notes))


def _torch_float(row: dict[str, Any], out: Path, start_model):
    """The torch network of a float row: the start model, or the pruned checkpoint beside its sub-run's report
    (ExecuTorch and LiteRT build from torch, OpenVINO from the ONNX file)."""
    if row["is_float_reference"]:
        return start_model
    from compress.models.checkpoint import load_model

    checkpoint = out / Path(row["source"]["report"]).parent / "model.pt"
    return load_model(checkpoint).model.eval() if checkpoint.is_file() else None


def _other_runtime_floats(rows: list[dict[str, Any]], targets: Sequence[Target], out: Path, size: tuple[int, int],
                          start_model=None) -> list[dict[str, Any]]:
    """The float networks in the form of each other runtime that has variants here and runs on this CPU."""
    floats = [r for r in rows if r["runtime"] == "ort-x86" and r["precision"] == "fp32"]
    models: dict[str, Any] = {}
    index_path = out / ARTIFACTS_INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    made = []
    for t in targets:
        if t.name == "ort-x86" or not t.measurable_here or not any(r["runtime"] == t.name for r in rows):
            continue
        for f in floats:
            key = f"{t.name}/{f['name']}"
            source = _float_source_digest(f, out)
            built = _reuse_built(index.get(key), source, out)
            if built is None:
                if f["name"] not in models:
                    models[f["name"]] = _torch_float(f, out, start_model)
                inputs = BuildInputs(models[f["name"]], onnx.load(str(out / f["file"])), None, None, size,
                                     out / "artifacts")
                built = t.build_fp32(inputs)
                index[key] = {"source": source, "files": {
                    v: {"file": str(Path("artifacts") / t.name / _float_file(f, v, t)),
                        "sha256": hashlib.sha256(d).hexdigest()} for v, d in built.items()}}
            for variant, data in built.items():
                if variant != "fp32" and not f["is_float_reference"]:
                    continue  # another precision of the float start model only (OpenVINO: bf16, its default)
                file = Path("artifacts") / t.name / _float_file(f, variant, t)
                if not (out / file).is_file() or (out / file).read_bytes() != data:
                    write_bytes(out / file, data)
                made.append({**f, "name": f["name"] if variant == "fp32" else f"{f['name']} ({variant})",
                             "runtime": t.name, "precision": variant, "runner_variant": variant, "file": str(file),
                             "accuracy": None, "agreement": None, "evaluated_on": None, "size_bytes": len(data),
                             "sha256": hashlib.sha256(data).hexdigest(), "same_as": [],
                             "source": {"built_from": f["file"], "by": f"{t.name} build_fp32 ({variant})"}})
    if made:
        write_json(index_path, index)
    return made


def _float_file(row: dict[str, Any], variant: str, t: Target) -> str:
    """One file per float network and runtime (OpenVINO's bf16 is the same file run with another hint)."""
    return f"{row['name']}{t.suffix}"


def _float_source_digest(row: dict[str, Any], out: Path) -> str:
    """What another runtime's float artifact is built from: the float ONNX file and, for a pruned network, its
    checkpoint (the start model is fixed by the comparison's request)."""
    h = hashlib.sha256((out / row["file"]).read_bytes())
    checkpoint = out / Path(row["source"]["report"]).parent / "model.pt"
    if not row["is_float_reference"] and checkpoint.is_file():
        h.update(checkpoint.read_bytes())
    return h.hexdigest()


def _reuse_built(entry: dict[str, Any] | None, source: str, out: Path) -> dict[str, bytes] | None:
    """The artifacts an earlier compare built from the same source, if every file is still as it wrote it."""
    if not entry or entry.get("source") != source:
        return None
    built = {}
    for variant, f in entry.get("files", {}).items():
        p = out / f["file"]
        if not p.is_file():
            return None
        data = p.read_bytes()
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            return None
        built[variant] = data
    return built or None


def _model_facts(row: dict[str, Any], out: Path) -> None:
    """Params and MACs where the sub-run's report had none (other targets' artifacts), for ONNX files."""
    if row.get("params") is None and row["file"].endswith(".onnx"):
        proto = onnx.load(str(out / row["file"]))
        row.update(params=model_params(proto), macs=network_macs(proto), macs_executed=count_macs(proto))
    if row.get("size_bytes") is None:
        row["size_bytes"] = (out / row["file"]).stat().st_size


def collect(rows: list[dict[str, Any]], targets: Sequence[Target], out: Path, size: tuple[int, int],
            start_model=None) -> tuple[list[dict[str, Any]], list[str]]:
    """Distinct rows (see the module docstring) in table order: by runtime (the targets' order), float first.
    ``start_model``: the float torch model every recipe started from (other runtimes' floats are built from it)."""
    rows, notes = _dedupe(rows, out)
    rows += _other_runtime_floats(rows, targets, out, size, start_model)
    for r in rows:
        _model_facts(r, out)
        r.setdefault("sha256", hashlib.sha256((out / r["file"]).read_bytes()).hexdigest())
    order = {t.name: i for i, t in enumerate(targets)}
    rows.sort(key=lambda r: (order.get(r["runtime"], len(order)), not r["is_float_reference"],
                             r["precision"] == "int8"))
    return rows, notes


def _feed(source, batch: int) -> np.ndarray:
    x, _ = next(iter(source.loader("test", batch_size=batch, limit=batch)))
    return x.numpy()


def _runner(t: Target, row: dict[str, Any], out: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    return t.runner((out / row["file"]).read_bytes(), threads, variant=row["runner_variant"])


def latency_key(group: Sequence[dict[str, Any]], t: Target, threads: int, cpu: dict[str, Any] | None = None) -> str:
    """What a runtime's measurement depends on: its artifacts, the settings and the CPU."""
    cpu = cpu if cpu is not None else {k: machine_info().get(k) for k in ("cpu", "cores", "isa", "onnxruntime")}
    return hashlib.sha256(json.dumps([[r["name"], r["runner_variant"], r["sha256"]] for r in group]
                                     + [threads, t.fixed_batch or 1, ROUNDS, ROUND_TIME_S, cpu]).encode()).hexdigest()


def expected_latency_s(rows: Sequence[dict[str, Any]], t: Target, threads: int, cache: Cache, remeasure: bool
                       ) -> float:
    """About how long :func:`measure_latencies` takes for ``t`` (0 when its cached measurement still holds)."""
    group = [r for r in rows if r["runtime"] == t.name]
    entry = cache.latency.get(t.name) or {}
    if not group or not t.measurable_here or (not remeasure and entry.get("key") == latency_key(group, t, threads)):
        return 0.2
    return len(group) * (ROUNDS * ROUND_TIME_S * 1.1 + 0.5)


def measure_latencies(rows: list[dict[str, Any]], targets: Sequence[Target], out: Path, source, threads: int,
                      cache: Cache, remeasure: bool = False) -> dict[str, dict[str, Any]]:
    """Each runtime's rows timed in one interleaved run (or that run's cached result); returns per runtime what
    was measured: ``id``, ``variants``, ``rounds``, ``threads``, ``batch``, ``measured_at``, ``seconds``,
    ``reused``."""
    cpu = {k: machine_info().get(k) for k in ("cpu", "cores", "isa", "onnxruntime")}
    done = {}
    for t in targets:
        group = [r for r in rows if r["runtime"] == t.name]
        if not group:
            continue
        if not t.measurable_here:
            for r in group:
                r["latency_ms"], r["latency_note"] = None, "not measured: this machine's CPU is not the target's"
            continue
        batch = t.fixed_batch or 1
        key = latency_key(group, t, threads, cpu)
        entry = cache.latency.get(t.name)
        t0 = time.time()
        if remeasure or not entry or entry.get("key") != key:
            x = _feed(source, batch)
            calls = {r["name"]: (lambda f: lambda: f(x))(_runner(t, r, out, threads)) for r in group}
            result = interleave(calls, threads=threads, batch=batch, rounds=ROUNDS, round_time_s=ROUND_TIME_S)
            meta = {"runtime": t.name, "id": next(iter(result.values()))["measurement"], "variants": list(result),
                    "rounds": ROUNDS, "round_time_s": ROUND_TIME_S, "threads": threads, "batch": batch,
                    "feed": f"the first {batch} test image(s)", "machine": cpu,
                    "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %z"), "seconds": round(time.time() - t0, 1)}
            entry = cache.latency[t.name] = {"key": key, "meta": meta, "result": result}
            cache.save()
            reused = False
        else:
            reused = True
        for r in group:
            r["latency_ms"] = entry["result"][r["name"]]
        done[t.name] = {**entry["meta"], "reused": reused}
    return done


def test_split(source, limit: int | None) -> dict[str, Any]:
    """The test images every accuracy of a comparison is measured on."""
    return {"split": "test", "images": limit or len(source.split("test")),  # as the sub-runs record it
            "dataset": source.name, "fingerprint": source.fingerprint}


def check_accuracy(rows: list[dict[str, Any]], targets: Sequence[Target], out: Path, source, limit: int | None,
                   cache: Cache) -> tuple[list[str], list[str]]:
    """Every row's accuracy on :func:`test_split` (see the module docstring); returns the rows evaluated now and
    those an earlier compare of this OUT evaluated (the same artifact on the same images)."""
    split = test_split(source, limit)
    by_name = {t.name: t for t in targets}
    workers = max(1, os.cpu_count() or 1)
    reference: list[np.ndarray] = []
    evaluated, cached = [], []
    for r in rows:
        if r.get("evaluated_on") == split and (r.get("accuracy") or {}).get("top1") is not None:
            r["accuracy_from"] = r["source"].get("report")
            continue
        key = hashlib.sha256(json.dumps([r["runtime"], r["runner_variant"], r["sha256"], split]).encode()).hexdigest()
        if key in cache.accuracy:
            cached.append(f"{r['name']} ({r['runtime']})")
        else:
            t = by_name[r["runtime"]]
            logits, labels = test_logits(_runner(t, r, out, workers), source, limit, t.fixed_batch)
            if not reference:
                ref = next(x for x in rows if x["is_float_reference"] and x["runtime"] == "ort-x86")
                reference.append(logits if ref is r else test_logits(_runner(by_name["ort-x86"], ref, out, workers),
                                                                     source, limit, None)[0])
            cache.accuracy[key] = {"accuracy": topk_accuracy(logits, labels, ks=(1, 5)),
                                   "agreement": None if r["is_float_reference"] and r["runtime"] == "ort-x86"
                                   else agreement(logits, reference[0])}
            cache.save()
            evaluated.append(f"{r['name']} ({r['runtime']})")
        r.update(cache.accuracy[key], evaluated_on=split, accuracy_from="evaluated by compare", agreement_vs="fp32")
    return evaluated, cached
