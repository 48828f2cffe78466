"""NetAdapt's latency table measured on the device itself (a phone, an Arm board), for ``prune --latency-table``.

Two steps.  Here, with the project installed, write the units the search will ask for first - every unit of the
network and the first ``--depth`` cuts of every channel group (what NetAdapt's first iteration predicts), each as
the target's own int8 (or fp32) ONNX, with the baseline graph it is timed against:

    python tools/device_latency.py bundle --target ort-arm64 -o units/            # the embedded default
    python tools/device_latency.py bundle --weights model.pt --input-size 224 --target ort-arm64 -o units/

On the device, with only ``onnxruntime`` and ``numpy`` (this file imports nothing else for ``measure``), time them
and write the table:

    python device_latency.py measure units/ -o table.json --threads 1

Back here, prune on the device's times:

    mnv3-compress prune --recipe netadapt-int8 --target ort-arm64 --latency-table table.json

The table is the JSON the project's own tables are (``compress/prune/latency_table.py``): ``version``,
``timing`` (``<target>-<precision>``), ``runtime``, ``input_size``, ``threads``, ``batch``, ``machine``,
``base_ms`` (the baseline's median per measurement batch) and ``units``: ``{unit key: {"ms": marginal ms over the
baseline, "raw_ms", "cv", "position": the unit's index in the network}}``.  A unit key is the unit's JSON
(kind, channels, kernel, stride, activation, input side).  Units the search needs later and the device did not
measure are timed here and scaled by the device-to-host ratio at their position (see the report's
``latency_table.device_table``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_FORMAT = "mnv3-compress-latency-units"


# -- here: the units ------------------------------------------------------------------------------------------

def bundle(spec, input_size: int, timing, batch: int, depth: int, step: int | None, out: Path) -> dict:
    """Write ``out/units.json`` and one ONNX file per unit and per baseline; returns the index."""

    from compress.io import write_bytes, write_json
    from compress.prune.latency_table import TABLE_VERSION, network_units, unit_artifact, unit_key, unit_module
    from compress.prune.netadapt import candidate_specs

    specs = [spec] + candidate_specs(spec, step or timing.channel_step, depth)
    units: dict[str, dict] = {}
    for s in specs:
        for position, u in enumerate(network_units(s, input_size)):
            units.setdefault(unit_key(u), {"unit": u, "position": position})
    index = {"format": BUNDLE_FORMAT, "table_version": TABLE_VERSION, "timing": timing.key,
             "input_size": input_size, "batch": batch, "units": []}
    baselines: dict[tuple, str] = {}
    for i, (key, entry) in enumerate(units.items()):
        _, chw = unit_module(entry["unit"])
        file = f"unit_{i:04d}.onnx"
        write_bytes(out / file, unit_artifact(entry["unit"], timing, batch))
        if tuple(chw) not in baselines:
            baselines[tuple(chw)] = f"baseline_{len(baselines):03d}.onnx"
            write_bytes(out / baselines[tuple(chw)], timing.baseline(chw, batch))
        index["units"].append({"key": key, "position": entry["position"], "file": file,
                               "baseline": baselines[tuple(chw)], "input": [batch, *chw]})
    write_json(out / "units.json", index)
    return index


# -- on the device: onnxruntime and numpy only ----------------------------------------------------------------

def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _median_ms(run, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        run()
        times.append((time.perf_counter_ns() - t) / 1e6)
    return statistics.median(times)


def measure(folder: Path, threads: int = 1, rounds: int = 5, round_time_s: float = 0.05) -> dict:
    """Time every unit of the bundle in ``folder`` against its baseline in alternating rounds."""
    import numpy as np
    import onnxruntime as ort

    index = json.loads((folder / "units.json").read_text())
    if index.get("format") != BUNDLE_FORMAT:
        raise SystemExit(f"{folder / 'units.json'} is not a unit bundle written by 'device_latency.py bundle'")
    rng = np.random.default_rng(0)
    entries, base_ms = {}, []
    for n, u in enumerate(index["units"]):
        x = rng.standard_normal(u["input"]).astype(np.float32)
        runs = {}
        for name in ("file", "baseline"):
            sess = _session(folder / u[name], threads)
            feed = {sess.get_inputs()[0].name: x}
            runs[name] = (lambda s, f: lambda: s.run(None, f))(sess, feed)
        warm = {k: _median_ms(r, 5) for k, r in runs.items()}
        per_round = {k: int(min(500, max(5, round_time_s * 1e3 / max(w, 1e-3)))) for k, w in warm.items()}
        medians = {k: [] for k in runs}
        for r in range(rounds):
            for k in (("file", "baseline") if r % 2 == 0 else ("baseline", "file")):
                medians[k].append(_median_ms(runs[k], per_round[k]))
        unit, base = statistics.median(medians["file"]), statistics.median(medians["baseline"])
        mean = statistics.mean(medians["file"])
        entries[u["key"]] = {"ms": round(max(0.0, unit - base), 5), "raw_ms": round(unit, 5),
                             "cv": round(statistics.pstdev(medians["file"]) / mean, 4) if mean else 0.0,
                             "position": u["position"]}
        base_ms.append(base)
        print(f"\r{n + 1}/{len(index['units'])} units", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    machine = {"cpu": platform.processor() or platform.machine(), "machine": platform.machine(),
               "system": platform.system(), "onnxruntime": ort.__version__, "isa": []}
    return {"version": index["table_version"], "timing": index["timing"], "runtime": f"onnxruntime {ort.__version__}",
            "input_size": index["input_size"], "threads": threads, "batch": index["batch"], "machine": machine,
            "measured_on": "device", "base_ms": base_ms, "units": entries}


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)  # atomic: an interrupted run leaves no half-written table


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="write the units to time (here, with the project installed)")
    b.add_argument("--weights", default=None, help="the network to prune (default: the embedded default)")
    b.add_argument("--input-size", type=int, default=None, help="default: the checkpoint's")
    b.add_argument("--target", default="ort-arm64")
    b.add_argument("--precision", default="int8", choices=("int8", "fp32"))
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--depth", type=int, default=6, help="cuts per channel group (default 6, as the search)")
    b.add_argument("--step", type=int, default=None, help="channels per cut (default: the target's)")
    b.add_argument("-o", "--output", type=Path, required=True, help="bundle folder")
    m = sub.add_parser("measure", help="time a bundle's units (on the device: onnxruntime + numpy only)")
    m.add_argument("bundle", type=Path)
    m.add_argument("-o", "--output", type=Path, required=True, help="the table (JSON)")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if args.command == "measure":
        doc = measure(args.bundle, args.threads, args.rounds)
        _write(args.output, doc)
        print(f"{len(doc['units'])} units -> {args.output}")
        return doc
    sys.path.insert(0, str(ROOT))
    from compress.models.checkpoint import load_model
    from compress.models.default import load_shipped
    from compress.prune.unit_timing import Timing

    loaded = load_model(args.weights) if args.weights else load_shipped()
    size = args.input_size or int(loaded.meta.get("input_size") or 224)
    index = bundle(loaded.spec, size, Timing(args.target, args.precision), args.batch, args.depth, args.step,
                   args.output)
    print(f"{len(index['units'])} units ({index['timing']}, input {size}) -> {args.output}")
    return index


if __name__ == "__main__":
    main()
