"""How well NetAdapt's per-block latency table predicts whole networks: predicted vs measured latency.

Builds ``--networks`` pruned variants of one architecture (random channel cuts of random groups, in the
target's channel step, seeded), predicts each with the latency table of ``--target`` / ``--precision`` and
measures each whole network as that target runs it (the same artifacts NetAdapt measures:
``compress.prune.unit_timing``), all networks interleaved in one measurement, and reports the table's errors
(``compress.prune.latency_table.agreement``): mean / max absolute relative error, and the same after one scale
calibrated on the unpruned network (how NetAdapt uses the table: relative to its seed).  The table's entries are
at the speed of its first batch of units (its anchor unit, timed with every batch, scales the others to it); the
anchor is timed with the networks too, and the headline errors compare the table with the networks at that same
speed (``measured_at_table_speed_ms``: measured x anchor's table ms / anchor's ms now), so minutes of machine drift
between building the table and timing the networks are not counted as table error; the errors against the raw
measurement are reported beside them (``agreement_raw``).

    python benchmarks/latency_table.py                            # the embedded default's network, ort-x86 fp32
    python benchmarks/latency_table.py --target ort-x86 --precision int8 --networks 12
    python benchmarks/latency_table.py --target openvino --precision int8 --arch mobilenet_v3_small --input-size 64
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pruned_specs(arch: str, n: int, seed: int = 0, num_classes: int = 10, step: int = 8) -> list:
    """The unpruned spec and ``n - 1`` random prunings of it (each cuts 1-4 groups by 8-50 %, to multiples of
    ``step``)."""
    import numpy as np

    from compress.models.mobilenetv3 import arch_spec
    from compress.prune.channels import channel_groups, pruned_spec, structure_problems

    rng = np.random.default_rng(seed)
    base = arch_spec(arch, num_classes=num_classes)
    specs = [base]
    while len(specs) < n:
        groups = channel_groups(base)
        sizes = {}
        for g in rng.choice(groups, size=int(rng.integers(1, 5)), replace=False):
            keep = max(step, int(g.channels * rng.uniform(0.5, 0.92)) // step * step)
            sizes[g.name] = keep
        spec = pruned_spec(base, sizes)
        if not structure_problems(base, spec) and spec not in specs:
            specs.append(spec)
    return specs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=None, choices=("mobilenet_v3_small", "mobilenet_v3_large"),
                   help="default: the embedded default's")
    p.add_argument("--input-size", type=int, default=None, help="default: the embedded default's")
    p.add_argument("--target", default="ort-x86", help="ort-x86 or openvino (the targets timed on this machine)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    p.add_argument("--networks", type=int, default=12, help="networks compared (default: 12, at least 10)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="skip fitting the weights' cost on network 0 (the unpruned one, as NetAdapt fits its seed)")
    args = p.parse_args(argv)

    from compress.models.default import shipped
    from compress.models.mobilenetv3 import MobileNetV3
    from compress.prune.latency_table import LatencyTable, agreement
    from compress.prune.unit_timing import Timing, network_artifact
    from eval.model_info import machine_info

    timing = Timing(args.target, args.precision)
    timing.check()
    arch, size = args.arch or shipped().arch, args.input_size or shipped().input_size
    specs = pruned_specs(arch, args.networks, step=timing.channel_step)
    with tempfile.TemporaryDirectory() as tmp:
        table = LatencyTable(size, args.threads, 1, path=Path(tmp) / "table.json", progress=True, timing=timing)
        arts = [network_artifact(MobileNetV3(s).eval(), (size, size), timing, 1) for s in specs]
        units_only = [table.predict(s) for s in specs]
        fit = table.calibrate(specs[0], arts[0]) if args.calibrate else dict(table.weights)
        predicted = [table.predict(s) for s in specs]
        # speed < 1: the machine is slower now than when the table was built
        measured, speed = table.time_networks({str(i): a for i, a in enumerate(arts)}, args.rounds)
        anchor_ms = table.anchor["ms"]
        table.close()
    meas = [measured[str(i)]["median"] for i in range(len(specs))]
    at_table = [round(m * speed, 5) for m in meas]
    result = {"arch": arch, "input_size": size, "timing": timing.key, "runtime": timing.runtime_version(),
              "channel_step": timing.channel_step, "threads": args.threads, "networks": len(specs),
              "predicted_ms": [round(x, 5) for x in predicted], "measured_ms": meas,
              "anchor": {"table_ms": anchor_ms, "now_ms": measured["anchor"]["median"], "scale": round(speed, 4)},
              "measured_at_table_speed_ms": at_table, "weights": fit,
              "units_only_ms": [round(x, 5) for x in units_only],
              "agreement": agreement(predicted, at_table), "agreement_raw": agreement(predicted, meas),
              "agreement_units_only": agreement(units_only, at_table), "machine": machine_info()}
    if args.calibrate:  # network 0 fitted the weights' cost: the others are the out-of-sample test
        result["agreement_out_of_sample"] = agreement(predicted[1:], at_table[1:])
    for i, (a, b, r) in enumerate(zip(predicted, at_table, meas)):
        print(f"network {i:2d}: predicted {a:.4f} ms, measured {b:.4f} ms at the table's speed "
              f"({100 * (a - b) / b:+.1f} %; raw {r:.4f} ms, {100 * (a - r) / r:+.1f} %)")
    print(f"anchor: {anchor_ms:.4f} ms in the table, {measured['anchor']['median']:.4f} ms now")
    print(f"weights: {fit}")
    print("at the table's speed:", json.dumps(result["agreement"]))
    if args.calibrate:
        print(f"networks 1-{len(specs) - 1} (not the one fitted):", json.dumps(result["agreement_out_of_sample"]))
    print("units alone (no weights' cost):", json.dumps(result["agreement_units_only"]))
    print("raw:", json.dumps(result["agreement_raw"]))
    if args.json:
        from compress.io import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
