"""Which channel step a target's kernels reward: one block's latency as its expansion shrinks 8 channels at a time.

NetAdapt cuts channels in steps; a cut that stays inside one kernel block saves nothing.  This times one
inverted-residual block of the embedded default's architecture at ``--input-size`` (its expansion swept from
``--high`` down to ``--low`` in 8s) on
each target and precision, as the latency table times units (:mod:`compress.prune.unit_timing`: the target's own
artifact, marginal time over its baseline, interleaved rounds), and splits the 8-channel cuts in two:

* *onto a multiple of 16* (136 -> 128): the cut that also saves a 16-channel block;
* *off a multiple of 16* (128 -> 120): the cut that only saves anything if the kernels work in 8s.

A ratio ``off / onto`` near 1 means 8-channel cuts pay; near 0, the kernels run in 16-channel blocks (ORT's x86
int8 depthwise: the int8 recipe pads to 16), so NetAdapt should cut in 16s there
(``compress.prune.unit_timing.Timing.channel_step``).

    python benchmarks/channel_step.py                           # ort-x86 fp32/int8, openvino fp32/int8 if installed
    python benchmarks/channel_step.py --timings ort-x86-int8 --block 6 --json runs/channel_step.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sweep(timing, unit: dict, channels: list[int], rounds: int, tmp: Path, size: int) -> dict[int, float]:
    """Marginal ms of ``unit`` at each expansion in ``channels`` (one fresh table, one interleaved batch)."""
    from compress.prune.latency_table import LatencyTable, unit_key

    table = LatencyTable(size, path=tmp / f"{timing.key}.json", rounds=rounds, round_time_s=0.05,
                         progress=False, timing=timing)
    units = [{**unit, "expanded": c, "se_channels": unit["se_channels"] and max(8, c // 4)} for c in channels]
    table.measure(units, chunk=len(units))
    return {c: table.entries[unit_key(u)]["ms"] for c, u in zip(channels, units)}


def summarize(ms: dict[int, float]) -> dict:
    onto, off = [], []
    for c in sorted(ms, reverse=True):
        if c - 8 in ms:
            (onto if (c - 8) % 16 == 0 else off).append(ms[c] - ms[c - 8])
    a, b = statistics.median(onto), statistics.median(off)
    return {"ms": {str(c): round(v, 5) for c, v in sorted(ms.items())},
            "saving_onto_16_ms": round(a, 5), "saving_off_16_ms": round(b, 5),
            "off_over_onto": round(b / a, 3) if a > 0 else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timings", default=None,
                   help="comma list of TARGET-PRECISION (default: ort-x86-fp32, ort-x86-int8, openvino-*)")
    p.add_argument("--block", type=int, default=None, help="block index of the default (default: the widest "
                   "depthwise block whose expansion is at least --high)")
    p.add_argument("--input-size", type=int, default=224,
                   help="input side (default 224: per-channel savings well above the timing noise)")
    p.add_argument("--high", type=int, default=128)
    p.add_argument("--low", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    import importlib.util

    from compress.models.default import shipped
    from compress.models.mobilenetv3 import arch_spec
    from compress.prune.latency_table import network_units
    from compress.prune.unit_timing import Timing

    s = shipped()
    spec = arch_spec(s.arch, num_classes=s.num_classes)
    units = network_units(spec, args.input_size)
    blocks = [u for u in units if u["kind"] == "block"]
    if args.block is None:
        block = max((u for u in blocks if u["expanded"] >= args.high), key=lambda u: u["hw"])
    else:
        block = blocks[args.block]
    names = args.timings.split(",") if args.timings else (
        ["ort-x86-fp32", "ort-x86-int8"]
        + (["openvino-fp32", "openvino-int8"] if importlib.util.find_spec("openvino") else []))
    channels = list(range(args.low, args.high + 1, 8))
    result = {"model": f"{s.arch} @{args.input_size}", "block": {k: v for k, v in block.items() if k != "expanded"},
              "channels": channels, "timings": {}}
    with tempfile.TemporaryDirectory(prefix="channel-step.") as tmp:
        for name in names:
            target, precision = name.rsplit("-", 1)
            timing = Timing(target, precision)
            result["timings"][name] = summarize(sweep(timing, block, channels, args.rounds, Path(tmp),
                                                      args.input_size))
            r = result["timings"][name]
            print(f"{name:<14} 8-channel cut onto a multiple of 16 saves {1000 * r['saving_onto_16_ms']:.2f} us, "
                  f"off one {1000 * r['saving_off_16_ms']:.2f} us (ratio {r['off_over_onto']}); "
                  f"step used: {timing.channel_step}", flush=True)
    if args.json:
        from compress.io import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
