"""Is the latency measurement stable?  One model, two independent sessions (A and B), timed in interleaved rounds.

Prints each round's median for both sessions, the overall medians, the spread of the round medians (max/min)
and their coefficient of variation, and the A/B ratio: the same model on the same machine should measure the
same, so A/B - 1 is the error the measurement itself makes (an A/A test).

    python benchmarks/latency_stability.py                      # MobileNetV3-Small @224, random weights
    python benchmarks/latency_stability.py --model m.onnx --threads 2 --rounds 9
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _default_model(tmp: Path, arch: str, size: int) -> Path:
    import torch

    from calibration.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
    from compress.models.mobilenetv3 import mobilenet_v3_large, mobilenet_v3_small
    from compress.onnx.export import export_onnx

    torch.manual_seed(0)
    model = (mobilenet_v3_small if arch == "small" else mobilenet_v3_large)().eval()
    return export_onnx(model, tmp / f"mobilenet_v3_{arch}_{size}.onnx",
                       Preprocess((size, size), IMAGENET_MEAN, IMAGENET_STD))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="ONNX model (default: MobileNetV3 with random weights)")
    p.add_argument("--arch", choices=("small", "large"), default="small", help="default model (default: small)")
    p.add_argument("--input-size", type=int, default=224, help="default model input side (default: 224)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default: 7)")
    p.add_argument("--runs-per-round", type=int, default=None,
                   help="timed runs per session and round (default: about 0.3 s worth)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    from eval.latency import measure_interleaved
    from eval.model_info import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or _default_model(Path(tmp), args.arch, args.input_size)
        data = Path(model).read_bytes()
        res = measure_interleaved({"A": data, "B": data}, threads=args.threads, batch=args.batch,
                                  rounds=args.rounds, runs_per_round=args.runs_per_round, warmup=args.warmup,
                                  round_time_s=0.3)
    a, b = res["A"], res["B"]
    print(f"model: {args.model or f'mobilenet_v3_{args.arch} @{args.input_size} (random weights)'}; "
          f"threads {args.threads}, batch {args.batch}, {args.rounds} rounds x {a['runs'] // args.rounds} runs")
    print(f"machine: {json.dumps(machine_info())}")
    print(f"{'round':>5}  {'A median ms':>11}  {'B median ms':>11}")
    for i, (ma, mb) in enumerate(zip(a["round_medians"], b["round_medians"])):
        print(f"{i:>5}  {ma:>11.4f}  {mb:>11.4f}")
    for name, s in res.items():
        print(f"{name}: median {s['median']:.4f} ms, p90 {s['p90']:.4f}, mean {s['mean']:.4f}, std {s['std']:.4f}, "
              f"min {s['min']:.4f}; round medians spread (max/min) {s['spread']:.4f}, CV {100 * s['cv']:.2f} %")
    ratio = a["median"] / b["median"]
    print(f"A/B median ratio {ratio:.4f} (same model: the measurement's own error is {100 * abs(ratio - 1):.2f} %)")
    result = {"sessions": res, "ab_ratio": round(ratio, 4), "machine": machine_info()}
    if args.json:
        from compress.io import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
