"""Training speed alone vs beside one busy neighbour, with OpenMP's default waiting and with sleeping waiters.

Each measurement is a fresh process that trains the embedded default's architecture (random weights: speed
only) for ``--steps`` SGD steps at batch ``--batch`` with torch's default thread count, and reports the median
seconds per step after ``--warmup`` steps.  The neighbour is one other process spinning on one core (what a
second training job, a compile or a browser tab does to a 2-core machine).  Rounds alternate the settings, so
a drift of the machine falls on all of them alike.

    OMP_WAIT_POLICY unset   -- what torch does out of the box: waiting threads spin, and a thread that has lost
                               its core holds every other thread of the team at each parallel region's barrier
    OMP_WAIT_POLICY=PASSIVE -- what cli.py and compress/__init__.py set unless the user set it: waiters sleep

The figure that matters is ``busy / alone`` per setting: with one neighbour on 2 cores a fair share is half the
CPU, i.e. about 2x; the bar is <= 2.2x.

    python benchmarks/training_threads.py                   # 2 rounds, 8 steps, batch 128, shipped default size
    python benchmarks/training_threads.py --rounds 3 --json runs/training_threads.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("unset", "PASSIVE")


def worker(policy: str, steps: int, warmup: int, batch: int) -> None:
    """One measurement, in this (fresh) process; prints the median seconds per step."""
    import time

    if policy == "unset":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = policy
    import torch  # OpenMP reads OMP_WAIT_POLICY when torch loads it, before compress/ could set its default

    sys.path.insert(0, str(ROOT))
    from compress.models.checkpoint import load_model
    from compress.models.default import shipped

    s = shipped()
    torch.manual_seed(0)
    model = load_model(None, s.arch, num_classes=s.num_classes).model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, s.input_size, s.input_size)
    y = torch.randint(0, s.num_classes, (batch,))
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    print(json.dumps({"s_per_step": statistics.median(times), "threads": torch.get_num_threads()}))


def measure(policy: str, busy: bool, args) -> dict:
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", policy, "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--batch", str(args.batch)],
                             check=True, capture_output=True, text=True).stdout
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--worker", choices=POLICIES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.batch)
        return {}

    settings = [(policy, busy) for policy in POLICIES for busy in (False, True)]
    samples: dict[tuple[str, bool], list[float]] = {k: [] for k in settings}
    threads = None
    for r in range(args.rounds):
        for policy, busy in (settings if r % 2 == 0 else settings[::-1]):
            m = measure(policy, busy, args)
            samples[(policy, busy)].append(m["s_per_step"])
            threads = m["threads"]
            print(f"round {r + 1}: OMP_WAIT_POLICY={policy:<7} {'busy ' if busy else 'alone'} "
                  f"{m['s_per_step']:.3f} s/step", flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {"cpu_count": os.cpu_count(), "torch_threads": threads, "batch": args.batch, "steps": args.steps,
              "rounds": args.rounds,
              "policies": {policy: {"alone_s_per_step": round(med[(policy, False)], 4),
                                    "busy_s_per_step": round(med[(policy, True)], 4),
                                    "busy_over_alone": round(med[(policy, True)] / med[(policy, False)], 2)}
                           for policy in POLICIES}}
    result["passive_alone_over_unset_alone"] = round(med[("PASSIVE", False)] / med[("unset", False)], 2)
    print(json.dumps(result, indent=1))
    if args.json:
        from compress.io import write_json

        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
