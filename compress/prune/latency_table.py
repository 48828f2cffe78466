"""Per-layer latency lookup table (NetAdapt §3.2): measured, not estimated from MACs.

Each *unit* of the network (:mod:`compress.prune.units`: the stem, each inverted-residual block, the last 1x1 conv,
the head) is built on its own at its input shape and timed on the deployment settings (threads, batch) in
interleaved rounds with a trivial graph on the same input; the table stores the unit's *marginal* time (its
median minus that baseline's).  A network is predicted as ``base`` (the fixed cost of one run, paid once) plus
its units' marginal times plus the cost of fetching its weights:

- *Drift.* Units are timed eight at a time, minutes apart, on a VM whose speed drifts (±20 % within a minute),
  so every batch also times the table's *anchor* (its first batch's heaviest unit, time stored) and is scaled by
  stored / now: every entry is at the first batch's speed, a cut never compared with its unit at another speed.
- *Weights.* A unit timed alone keeps its weights in cache; the network fetches all of them on each pass
  (MobileNetV3-Large: 5.4 M, more than a 2 MB L2 in int8).  That cost follows the weights, not the input (on a
  2-core Xeon the ORT int8 units missed 0.26 ms of the default's 0.56 ms at 48 px, 0.29 ms at 160 px), so
  :meth:`LatencyTable.calibrate` times one whole network beside the anchor and fits a cost per MB of weights to
  what its units miss (``weights``, stored with the table); NetAdapt calibrates on its seed.

What is timed, and where, is a :class:`compress.prune.unit_timing.Timing`: a deploy target's runtime and a
precision (``ort-x86`` fp32 by default; ``netadapt-int8`` times int8 units on its ``--target``).  The table is
cached as JSON under ``$MNV3_COMPRESS_HOME/latency/`` in a file keyed by target and precision, CPU model, runtime
version, threads, batch and input size; an entry is measured once and reused across runs.  How well the sum
agrees with whole-network measurements is checked by :func:`agreement` and reported by NetAdapt.

A target whose CPU is not this one (``ort-arm64``) reads a *device table*: the same JSON, measured on the device
by ``tools/device_latency.py`` (``device_table=``).  Its entries are used as measured; a unit it lacks (a cut
deeper than the device measured) is this machine's time for the same artifact scaled by the device-to-host ratio
of the units at the same place in the network, and the report counts how many were.

Under torchrun NetAdapt reads it through :class:`SharedTable`: rank 0 alone times units and writes the file,
every rank holds the same entries.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from compress.errors import UserError
from compress.io import home as default_home
from compress.io import write_json
from compress.models.mobilenetv3 import ArchSpec
from compress.prune.unit_timing import Timing, export_unit
from compress.prune.units import (network_units, trained_like, unit_artifact, unit_key,  # re-exported: the
                                  unit_module, unit_onnx, unit_weight_count)  # units the table times
from compress.training import distributed
from compress.training.distributed import DistContext

__all__ = ["LatencyTable", "SharedTable", "DeviceTable", "network_units", "unit_module", "unit_onnx", "unit_artifact",
           "export_unit", "trained_like", "table_path", "agreement"]

TABLE_VERSION = 3  # 2: the target and precision are part of the table; 3: OpenVINO's int8 keeps the stem's grid


def table_path(input_size: int, threads: int, batch: int, home: Path | None = None, timing: Timing = Timing()
               ) -> Path:
    """``$MNV3_COMPRESS_HOME/latency/<target>-<precision>_<cpu>_<runtime>_t<threads>_b<batch>_<size>.json``."""
    from eval.model_info import machine_info

    info = machine_info()
    cpu = str(info.get("cpu") or "cpu")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cpu).strip("-")[:40] or "cpu"
    digest = hashlib.sha1(f"{cpu}|{info.get('cores')}|{','.join(info.get('isa') or [])}".encode()).hexdigest()[:8]
    runtime = re.sub(r"[^A-Za-z0-9.]+", "", timing.runtime_version())
    name = f"{timing.key}_{slug}-{digest}_{runtime}_t{threads}_b{batch}_{input_size}.json"
    return (home or default_home()) / "latency" / name


def _build_pool(timing: Timing):
    """Worker processes for targets whose units take seconds to build (ExecuTorch: PT2E + lowering, ~4 s each):
    built side by side, one per core, while nothing is timed; None where building is cheap or there is one core.
    A table keeps its pool for its lifetime (:meth:`LatencyTable.close`): spawning one costs ~15 s of imports,
    and NetAdapt measures a few units several times per iteration."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from compress.prune.unit_timing import TORCH_TARGETS

    workers = os.cpu_count() or 1
    if timing.target not in TORCH_TARGETS or workers < 2:
        return None
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_one_thread)


def _shutdown(holder: dict) -> None:
    pool = holder.pop("pool", None)
    if pool is not None:
        pool.shutdown(cancel_futures=True)


def _one_thread() -> None:
    torch.set_num_threads(1)


class LatencyTable:
    """Measured marginal latency (ms) of network units at ``threads`` x ``batch``, timed as ``timing`` says (on
    this machine, or read from a ``device_table`` measured on the device)."""

    def __init__(self, input_size: int, threads: int = 1, batch: int = 1, path: str | Path | None = None,
                 rounds: int = 3, round_time_s: float = 0.04, progress: bool = True, timing: Timing | None = None,
                 device_table: str | Path | None = None) -> None:
        from eval.model_info import machine_info

        self.input_size, self.threads, self.batch = int(input_size), int(threads), int(batch)
        self.timing = timing or Timing()
        self.path = Path(path) if path is not None else table_path(self.input_size, self.threads, self.batch,
                                                                   timing=self.timing)
        self.rounds, self.round_time_s, self.progress = rounds, round_time_s, progress
        self.machine = machine_info()
        self.entries: dict[str, dict[str, float]] = {}
        self.base_ms: list[float] = []  # the baseline of every measurement batch
        self.measured_here = 0
        self._baselines: dict[tuple[int, ...], bytes] = {}  # the baseline artifact of each input shape
        self.anchor: dict[str, Any] | None = None  # {"unit": key, "ms": its raw time in the table's first batch}
        self.weights: dict[str, Any] = {"ms_per_mb": 0.0}  # the per-MB cost of fetching weights (calibrate)
        self._anchor_bytes: bytes | None = None
        self._pool: dict[str, Any] = {}  # {"pool": the build workers}, once a batch of units needed them
        weakref.finalize(self, _shutdown, self._pool)
        self.device: DeviceTable | None = None
        if device_table is not None:
            self.device = DeviceTable.read(device_table, self)
        elif not self.timing.measurable_here:
            self.timing.check()  # the one-line error: measure it on the device
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        stale = self.stale_reason(data)
        if stale:
            if self.progress:
                tqdm.write(f"Notice: the latency table {self.path.name} was measured {stale}: measuring it again")
            return
        self.entries = dict(data.get("units", {}))
        self.base_ms = list(data.get("base_ms", []))
        self.anchor = data.get("anchor")
        self.weights = dict(data.get("weights") or {"ms_per_mb": 0.0})

    def stale_reason(self, data: dict[str, Any]) -> str | None:
        """Why a stored table does not describe this deployment (None: it does): another format, thread
        count, batch or input size, another CPU (model or int8-relevant ISA flags) or onnxruntime version."""
        machine = data.get("machine") or {}
        checks = [("format version", data.get("version"), TABLE_VERSION),
                  ("target and precision", data.get("timing"), self.timing.key),
                  ("runtime", data.get("runtime"), self.timing.runtime_version()),
                  ("thread count", data.get("threads"), self.threads), ("batch", data.get("batch"), self.batch),
                  ("input size", data.get("input_size"), self.input_size),
                  ("CPU", machine.get("cpu"), self.machine.get("cpu")),
                  ("ISA flags", machine.get("isa"), self.machine.get("isa")),
                  ("onnxruntime version", machine.get("onnxruntime"), self.machine.get("onnxruntime")),
                  ("drift anchor", "yes" if data.get("anchor") else "none", "yes")]
        for what, stored, now in checks:
            if stored != now:
                return f"with another {what} ({stored}; this run: {now})"
        return None

    def save(self) -> Path:
        return write_json(self.path, {
            "version": TABLE_VERSION, "timing": self.timing.key, "runtime": self.timing.runtime_version(),
            "input_size": self.input_size, "threads": self.threads, "batch": self.batch,
            "machine": self.machine, "anchor": self.anchor, "weights": self.weights, "base_ms": self.base_ms,
            "units": self.entries})

    @property
    def base(self) -> float:
        """Fixed per-run cost (ms): the median of the baselines measured so far (the device's, for a device
        table)."""
        if self.device is not None:
            return self.device.base
        return float(np.median(self.base_ms)) if self.base_ms else 0.0

    def missing(self, specs: Iterable[ArchSpec]) -> list[dict[str, Any]]:
        seen, out = set(self.entries) | set(self.device.units if self.device is not None else ()), []
        for spec in specs:
            for u in network_units(spec, self.input_size):
                k = unit_key(u)
                if k not in seen:
                    seen.add(k)
                    out.append(u)
        return out

    def measure(self, units: Sequence[dict[str, Any]], chunk: int = 8) -> None:
        """Time ``units`` (a few at a time, interleaved with their baselines) and store them."""
        units = [u for u in units if unit_key(u) not in self.entries]
        if units:
            self.timing.check(proxy=self.device is not None)
        bar = tqdm(total=len(units), desc=f"latency table ({self.timing.key})", leave=False,
                   disable=not (self.progress and units))
        try:
            self._measure_chunks(units, chunk, bar, self._workers(len(units)))
        except BaseException:
            self.close()  # a broken or interrupted pool is not reused
            raise
        bar.close()
        if units:
            self.save()

    def _workers(self, n: int):
        """The table's build pool (started by the first batch of two or more units that need one), else None."""
        if "pool" not in self._pool and n >= 2:
            pool = _build_pool(self.timing)
            if pool is not None:
                self._pool["pool"] = pool
        return self._pool.get("pool")

    def anchor_call(self):
        """(a call running the table's anchor unit, its stored ms); None before the first batch or for a device
        table."""
        if self.anchor is None or self.device is not None:
            return None
        unit = json.loads(self.anchor["unit"])
        if self._anchor_bytes is None:
            self._anchor_bytes = unit_artifact(unit, self.timing, self.batch)
        return self.timing.call(self._anchor_bytes, unit_module(unit)[1], self.batch, self.threads), self.anchor["ms"]

    def close(self) -> None:
        """Stop the build workers (also done when the table is garbage-collected or at exit)."""
        _shutdown(self._pool)

    def _measure_chunks(self, units, chunk: int, bar, pool) -> None:
        from eval.latency import interleave

        t, b = self.timing, self.batch
        for start in range(0, len(units), chunk):
            part = units[start:start + chunk]
            built = (list(pool.map(unit_artifact, part, [t] * len(part), [b] * len(part))) if pool is not None
                     else [unit_artifact(u, t, b) for u in part])
            calls = {}
            if self.anchor is not None:
                calls["anchor"] = self.anchor_call()[0]
            for i, u in enumerate(part):
                _, chw = unit_module(u)
                calls[f"u{i}"] = t.call(built[i], chw, b, self.threads)
                if f"base{chw}" not in calls:
                    if tuple(chw) not in self._baselines:
                        self._baselines[tuple(chw)] = t.baseline(chw, b)
                    calls[f"base{chw}"] = t.call(self._baselines[tuple(chw)], chw, b, self.threads)
            r = interleave(calls, threads=self.threads, batch=b, rounds=self.rounds, warmup=5,
                           round_time_s=self.round_time_s)
            if self.anchor is None:  # a new table: its first batch's heaviest unit anchors every later batch
                i = max(range(len(part)), key=lambda j: r[f"u{j}"]["median"])
                self.anchor = {"unit": unit_key(part[i]), "ms": r[f"u{i}"]["median"]}
                self._anchor_bytes = built[i]
                scale = 1.0
            else:
                scale = self.anchor["ms"] / max(r["anchor"]["median"], 1e-9)
            bases = {k: scale * v["median"] for k, v in r.items() if k.startswith("base")}
            self.base_ms.append(float(np.median(list(bases.values()))))
            for i, u in enumerate(part):
                _, chw = unit_module(u)
                marginal = max(0.0, scale * r[f"u{i}"]["median"] - bases[f"base{chw}"])
                self.entries[unit_key(u)] = {"ms": round(marginal, 5), "raw_ms": r[f"u{i}"]["median"],
                                             "cv": r[f"u{i}"]["cv"], "scale": round(scale, 4)}
            self.measured_here += len(part)
            bar.update(len(part))

    def unit_ms(self, unit: dict[str, Any], position: int | None = None) -> float:
        """A unit's marginal ms (``position``: its index in the network, which a device table's scaling needs)."""
        k = unit_key(unit)
        if self.device is not None and k in self.device.units:
            self.device.used.add(k)
            return self.device.units[k]
        if k not in self.entries:
            self.measure([unit])
        host = float(self.entries[k]["ms"])
        if self.device is None:
            return host
        self.device.scaled.add(k)
        return host * self.device.ratio(position, self)

    def breakdown(self, spec: ArchSpec) -> list[tuple[str, float]]:
        """(unit name, marginal ms) for every unit of ``spec``."""
        self.measure(self.missing([spec]))
        names = ["stem"] + [f"block{i}" for i in range(len(spec.blocks))] + ["last_conv", "head"]
        out = [(n, self.unit_ms(u, i)) for i, (n, u) in enumerate(zip(names, network_units(spec, self.input_size)))]
        weights = self.weight_ms(spec)
        return out + ([("weights", weights)] if weights > 0 else [])

    def predict(self, spec: ArchSpec) -> float:
        """Predicted whole-network latency (ms): the per-run baseline plus every unit's marginal time plus the
        calibrated cost of fetching the network's weights (0 until :meth:`calibrate`)."""
        self.measure(self.missing([spec]))
        return self.units_ms(spec) + self.weight_ms(spec)

    def units_ms(self, spec: ArchSpec) -> float:
        """The baseline plus every unit's marginal time: the prediction before the weights' cost."""
        return self.base + sum(self.unit_ms(u, i) for i, u in enumerate(network_units(spec, self.input_size)))

    def weight_mb(self, spec: ArchSpec) -> float:
        """MB of conv and linear weights ``spec`` fetches per pass in the table's precision."""
        per = 1 if self.timing.precision == "int8" else 4
        return per * sum(unit_weight_count(unit_key(u)) for u in network_units(spec, self.input_size)) / 1e6

    def weight_ms(self, spec: ArchSpec) -> float:  # a device table: the device's own times, nothing to add
        return 0.0 if self.device is not None else float(self.weights.get("ms_per_mb", 0.0)) * self.weight_mb(spec)

    def time_networks(self, artifacts: dict[str, bytes], rounds: int) -> tuple[dict[str, dict[str, Any]], float]:
        """Whole networks timed interleaved beside the anchor: their measurements, and ``speed`` (the anchor's
        table ms over its ms now: measured x speed is at the table's speed)."""
        from eval.latency import interleave

        chw = (3, self.input_size, self.input_size)
        calls = {k: self.timing.call(a, chw, self.batch, self.threads) for k, a in artifacts.items()}
        r = interleave({**calls, "anchor": self.anchor_call()[0]}, threads=self.threads, batch=self.batch,
                       rounds=rounds, round_time_s=0.1)
        return r, self.anchor["ms"] / max(r["anchor"]["median"], 1e-9)

    def calibrate(self, spec: ArchSpec, artifact: bytes, rounds: int = 10) -> dict[str, Any]:
        """Fit the cost per MB of weights to what ``spec``'s units miss of its whole network ``artifact``, timed
        at the table's speed (0 when they miss nothing); stored in the table file.  Returns the fit."""
        if self.device is not None:
            return dict(self.weights)
        self.measure(self.missing([spec]))
        r, speed = self.time_networks({"net": artifact}, rounds)
        measured = r["net"]["median"] * speed
        units, mb = self.units_ms(spec), self.weight_mb(spec)
        self.weights = {"ms_per_mb": round(max(0.0, measured - units) / mb, 6) if mb > 0 else 0.0,
                        "network_ms": round(measured, 5), "units_ms": round(units, 5), "network_mb": round(mb, 4)}
        self.save()
        return dict(self.weights)


class DeviceTable:
    """A table measured on the device (``tools/device_latency.py measure``): the file :meth:`LatencyTable.save`
    writes, whose units also record their ``position`` in the network they were taken from."""

    def __init__(self, path: Path, units: dict[str, float], positions: dict[str, int], base: float,
                 machine: dict[str, Any]) -> None:
        self.path, self.units, self.positions, self.base, self.machine = path, units, positions, base, machine
        self._ratios: dict[int | None, float] = {}
        self.used: set[str] = set()  # units read from the device's measurement
        self.scaled: set[str] = set()  # units timed here and scaled to the device

    @classmethod
    def read(cls, path: str | Path, table: "LatencyTable") -> "DeviceTable":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
            units = {k: float(v["ms"]) for k, v in doc["units"].items()}
            positions = {k: int(v["position"]) for k, v in doc["units"].items() if "position" in v}
            base = float(np.median(doc["base_ms"])) if doc.get("base_ms") else 0.0
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a latency table ({e}); write one with tools/device_latency.py") from None
        want = {"version": TABLE_VERSION, "timing": table.timing.key, "threads": table.threads,
                "batch": table.batch, "input_size": table.input_size}
        for k, v in want.items():
            if doc.get(k) != v:
                raise UserError(f"{path} was measured with {k} {doc.get(k)!r}; this run needs {v!r}")
        if not units:
            raise UserError(f"{path} holds no units")
        return cls(path, units, positions, base, dict(doc.get("machine") or {}))

    def ratio(self, position: int | None, table: "LatencyTable") -> float:
        """Device ms / this machine's ms for the same artifacts: the median over the device's units at
        ``position`` (all its units when none is there)."""
        if position not in self._ratios:
            keys = [k for k, p in self.positions.items() if p == position] or list(self.units)
            table.measure([json.loads(k) for k in keys])
            pairs = [self.units[k] / table.entries[k]["ms"] for k in keys if table.entries[k]["ms"] > 0]
            self._ratios[position] = float(np.median(pairs)) if pairs else 1.0
        return self._ratios[position]

    def summary(self) -> dict[str, Any]:
        return {"file": str(self.path), "machine": self.machine, "units_in_file": len(self.units),
                "units_used": len(self.used), "units_scaled_from_this_machine": len(self.scaled),
                "ratios_device_over_host": {str(k): round(v, 4) for k, v in self._ratios.items()}}


class SharedTable:
    """A :class:`LatencyTable` one process measures for all (NetAdapt under torchrun; in a single process it is
    the table itself).

    Rank 0 times the missing units (the other ranks wait idle, so nothing else runs on the CPU while it times)
    and writes the cache file; its entries go to every rank, so every rank predicts the same latencies and takes
    the same decisions.  Which units are missing is decided from those shared entries, so every rank reaches the
    same broadcasts, and a prediction whose units are all known needs none.
    """

    def __init__(self, table: LatencyTable, ctx: DistContext) -> None:
        self.table, self.ctx = table, ctx
        self._take(distributed.from_main(ctx, lambda: (table.entries, table.base_ms, table.weights)))  # rank 0's
        if table.device is not None and ctx.distributed:  # the host side of the device's units, on rank 0 only
            self.measure([json.loads(k) for k in table.device.units])

    def _take(self, state: tuple[dict[str, dict[str, float]], list[float], dict[str, Any]]) -> None:
        self.table.entries, self.table.base_ms, self.table.weights = dict(state[0]), list(state[1]), dict(state[2])

    def missing(self, specs: Iterable[ArchSpec]) -> list[dict[str, Any]]:
        return self.table.missing(specs)

    def measure(self, units: Sequence[dict[str, Any]]) -> None:
        units = [u for u in units if unit_key(u) not in self.table.entries]
        if not units:
            return

        def on_main() -> tuple[dict[str, dict[str, float]], list[float], dict[str, Any]]:
            self.table.measure(units)
            return self.table.entries, self.table.base_ms, self.table.weights

        self._take(distributed.from_main(self.ctx, on_main))

    def calibrate(self, spec: ArchSpec, artifact: bytes) -> dict[str, Any]:
        """:meth:`LatencyTable.calibrate` on rank 0; every rank gets the fit."""
        def on_main() -> tuple[dict[str, dict[str, float]], list[float], dict[str, Any]]:
            self.table.calibrate(spec, artifact)
            return self.table.entries, self.table.base_ms, self.table.weights

        self._take(distributed.from_main(self.ctx, on_main))
        return dict(self.table.weights)

    def predict(self, spec: ArchSpec) -> float:
        self.measure(self.missing([spec]))
        return self.table.predict(spec)


def agreement(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """How well table predictions match whole-network measurements: mean / max absolute relative error, the
    mean signed error (bias), and - for two or more networks - the Pearson correlation and the error after one
    scale calibrated on the first network (how NetAdapt uses the table: relative to the seed model)."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if len(p) == 0 or len(p) != len(m):
        return {"networks": 0}
    rel = (p - m) / m
    out: dict[str, Any] = {"networks": int(len(p)), "mean_abs_rel_error": round(float(np.abs(rel).mean()), 4),
                           "max_abs_rel_error": round(float(np.abs(rel).max()), 4),
                           "mean_rel_error": round(float(rel.mean()), 4)}
    if len(p) > 1:
        scaled = p * (m[0] / p[0])
        out["mean_abs_rel_error_seed_calibrated"] = round(float(np.abs((scaled - m) / m).mean()), 4)
        out["pearson_r"] = round(float(np.corrcoef(p, m)[0, 1]), 4) if np.std(p) > 0 and np.std(m) > 0 else None
        dp, dm = p[0] - p, m[0] - m  # latency saved relative to the seed: predicted vs measured
        mask = np.abs(dm) > 0
        out["saved_ratio_pred_over_measured"] = (round(float(np.median(dp[mask] / dm[mask])), 4)
                                                 if mask.any() else None)
    return out
