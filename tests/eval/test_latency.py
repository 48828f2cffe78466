"""Latency measurement: settings honoured, statistics consistent, interleaving bookkeeping."""
from __future__ import annotations

import onnx
import pytest

from eval.latency import MIN_RUNS, make_session, measure_interleaved, measure_latency, random_input

KEYS = {"median", "p90", "mean", "std", "min", "threads", "batch", "runs"}


def _consistent(stats):
    assert 0 < stats["min"] <= stats["median"] <= stats["p90"]
    assert stats["mean"] >= stats["min"] and stats["std"] >= 0


def test_fixed_runs_and_all_model_forms(tiny):
    path = tiny[1]
    for model in (path, str(path), path.read_bytes(), onnx.load(str(path))):
        stats = measure_latency(model, threads=1, batch=2, warmup=1, runs=7)
        assert set(stats) == KEYS
        assert (stats["runs"], stats["threads"], stats["batch"]) == (7, 1, 2)
        _consistent(stats)


def test_timed_runs_respect_min_runs_and_max_runs(tiny):
    stats = measure_latency(tiny[1], warmup=0, min_time_s=0.0)
    assert stats["runs"] == MIN_RUNS
    stats = measure_latency(tiny[1], warmup=0, min_time_s=60.0, max_runs=25)
    assert stats["runs"] == 25


def test_session_settings(tiny):
    sess = make_session(tiny[1], threads=2)
    opts = sess.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (2, 1)
    assert str(opts.execution_mode).endswith("ORT_SEQUENTIAL")
    assert str(opts.graph_optimization_level).endswith("ORT_ENABLE_ALL")
    feed = random_input(tiny[1], batch=3)
    assert feed["input"].shape == (3, 3, 32, 32)
    assert sess.run(None, feed)[0].shape == (3, 10)


def test_interleaved_rounds(tiny):
    data = tiny[1].read_bytes()
    res = measure_interleaved({"a": tiny[1], "b": data}, rounds=3, runs_per_round=4, warmup=1)
    assert list(res) == ["a", "b"]
    for stats in res.values():
        assert KEYS <= set(stats)
        assert stats["runs"] == 12 and len(stats["round_medians"]) == 3 and stats["rounds"] == 3
        assert stats["spread"] == pytest.approx(max(stats["round_medians"]) / min(stats["round_medians"]),
                                                rel=1e-3)
        assert stats["spread"] >= 1.0 and stats["cv"] >= 0
        _consistent(stats)
    auto = measure_interleaved({"a": data}, rounds=2, warmup=2, round_time_s=0.01)
    assert 5 <= auto["a"]["runs"] // 2 <= 500
    # one id per measurement: the calls timed together share it, another measurement has another
    assert res["a"]["measurement"] == res["b"]["measurement"] != auto["a"]["measurement"]
