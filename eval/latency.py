"""Latency as a deployer would measure it: a fresh onnxruntime session with explicit threads, warm-up, then
enough timed runs for a stable median, reported with its spread (p90, std, min) rather than a best case.

:func:`measure_latency` times one model.  :func:`measure_interleaved` builds every session first and then
alternates rounds between the models (in a rotating order), so slow drift of the machine (thermal state, a
neighbour's job) hits every model alike; benchmarks and NetAdapt compare candidates with it.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Mapping

import numpy as np
import onnx

from compress.errors import UserError
from eval.model_info import ModelLike, input_shape, load_model, model_bytes

MIN_RUNS = 10  # never report a median of fewer timed runs when runs is chosen automatically


def make_session(model: ModelLike, threads: int | None = 1):
    """A fresh CPU ``InferenceSession``: ``intra_op_num_threads=threads`` (None: onnxruntime's default, all
    cores), one inter-op thread, sequential execution, all graph optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes(model), so, providers=["CPUExecutionProvider"])
    except UserError:
        raise
    except Exception as e:
        text = str(e).strip().splitlines()
        raise UserError(f"onnxruntime cannot load the model: {text[0] if text else type(e).__name__}") from None


def random_input(model: ModelLike | onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A feed of the model's input shape (metadata input size, else the graph's static dims); the values do
    not change the latency of these networks, so a fixed-seed normal sample stands in for images."""
    proto = load_model(model)
    shape = input_shape(proto, batch=batch)
    inp = next(i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer})
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        x = rng.integers(max(info.min, 0), min(info.max, 255) + 1, size=shape).astype(dtype)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    return {inp.name: x}


def _run_once(sess, feed: Mapping[str, np.ndarray]) -> float:
    t0 = time.perf_counter_ns()
    sess.run(None, feed)
    return (time.perf_counter_ns() - t0) / 1e6


def time_runs(sess, feed: Mapping[str, np.ndarray], runs: int | None = None, min_time_s: float = 1.0,
              max_runs: int = 2000) -> np.ndarray:
    """Per-run wall times in ms: exactly ``runs`` runs, or (runs=None) until ``min_time_s`` has passed and at
    least MIN_RUNS runs were made, at most ``max_runs``."""
    times: list[float] = []
    if runs is not None:
        if runs < 1:
            raise UserError(f"runs must be >= 1, got {runs}")
        for _ in range(runs):
            times.append(_run_once(sess, feed))
        return np.asarray(times)
    deadline = time.perf_counter() + min_time_s
    while len(times) < max_runs and (len(times) < MIN_RUNS or time.perf_counter() < deadline):
        times.append(_run_once(sess, feed))
    return np.asarray(times)


def summarize(times_ms: np.ndarray, threads: int | None, batch: int) -> dict[str, Any]:
    """``median, p90, mean, std, min`` (ms) of per-run times, plus the settings and the run count."""
    t = np.asarray(times_ms, dtype=np.float64)
    return {"median": round(float(np.median(t)), 4), "p90": round(float(np.percentile(t, 90)), 4),
            "mean": round(float(t.mean()), 4), "std": round(float(t.std(ddof=1)) if len(t) > 1 else 0.0, 4),
            "min": round(float(t.min()), 4), "threads": threads, "batch": int(batch), "runs": int(len(t))}


def measure_latency(model: ModelLike, threads: int = 1, batch: int = 1, warmup: int = 10, runs: int | None = None,
                    min_time_s: float = 1.0, max_runs: int = 2000) -> dict[str, Any]:
    """Latency of one forward pass of ``batch`` images, in ms, on a fresh session with ``threads`` intra-op
    threads.  ``runs=None`` keeps running for ``min_time_s`` (at least MIN_RUNS runs, at most ``max_runs``).

    Returns ``{median, p90, mean, std, min, threads, batch, runs}``.
    """
    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    proto = load_model(model)
    feed = random_input(proto, batch)
    sess = make_session(proto, threads)
    for _ in range(max(0, warmup)):
        sess.run(None, feed)
    return summarize(time_runs(sess, feed, runs, min_time_s, max_runs), threads, batch)


def measure_interleaved(models: Mapping[str, ModelLike], threads: int = 1, batch: int = 1, rounds: int = 5,
                        runs_per_round: int | None = None, warmup: int = 10, round_time_s: float = 0.2
                        ) -> dict[str, dict[str, Any]]:
    """Latency of several ONNX models measured in alternating rounds on onnxruntime sessions built up front
    (:func:`interleave` over one ``session.run`` each)."""
    if not models:
        raise UserError("measure_interleaved needs at least one model")
    calls = {}
    for name, model in models.items():
        proto = load_model(model)
        feed = random_input(proto, batch)
        sess = make_session(proto, threads)
        calls[name] = (lambda s, f: lambda: s.run(None, f))(sess, feed)
    return interleave(calls, threads=threads, batch=batch, rounds=rounds, runs_per_round=runs_per_round,
                      warmup=warmup, round_time_s=round_time_s)


def interleave(calls: Mapping[str, Callable[[], Any]], threads: int | None = 1, batch: int = 1, rounds: int = 5,
               runs_per_round: int | None = None, warmup: int = 10, round_time_s: float = 0.2
               ) -> dict[str, dict[str, Any]]:
    """Latency of several ready-to-run calls (one forward pass each, any runtime) in alternating rounds.

    Every round times each call ``runs_per_round`` times, visiting them in an order rotated by one each round.
    ``runs_per_round=None`` sizes it from the warm-up so one call's round takes about ``round_time_s`` (5..500
    runs).  Per call: the :func:`measure_latency` keys over all its runs, plus ``round_medians`` (ms),
    ``spread`` (max/min of the round medians) and ``cv`` (their coefficient of variation) — the machine noise,
    reported rather than hidden — and ``measurement``, one id shared by every call of this run: latencies with
    the same id were timed together and compare; latencies of different ids were not.  ``threads`` and
    ``batch`` are recorded as the settings the calls were made with.
    """
    if not calls:
        raise UserError("interleave needs at least one call")
    if rounds < 1:
        raise UserError(f"rounds must be >= 1, got {rounds}")
    names = list(calls)
    per_round = {}
    for name in names:
        warm = [_timed(calls[name]) for _ in range(max(1, warmup))]
        per_round[name] = (int(runs_per_round) if runs_per_round is not None else
                           int(np.clip(round_time_s * 1e3 / max(float(np.median(warm)), 1e-3), 5, 500)))
    times: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(np.asarray([_timed(calls[name]) for _ in range(per_round[name])]))
    measurement = uuid.uuid4().hex[:12]
    return {name: {**summarize_rounds(times[name], threads, batch), "measurement": measurement} for name in names}


def _timed(call: Callable[[], Any]) -> float:
    t0 = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - t0) / 1e6


def summarize_rounds(round_times_ms: list[np.ndarray], threads: int | None, batch: int) -> dict[str, Any]:
    """:func:`summarize` over all rounds, plus each round's median and their spread (max/min) and CV."""
    medians = np.array([np.median(t) for t in round_times_ms])
    stats = summarize(np.concatenate(round_times_ms), threads, batch)
    stats["round_medians"] = [round(float(m), 6) for m in medians]
    stats["spread"] = round(float(medians.max() / medians.min()), 4)
    stats["cv"] = round(float(medians.std(ddof=1) / medians.mean()) if len(medians) > 1 else 0.0, 4)
    stats["rounds"] = len(round_times_ms)
    return stats
