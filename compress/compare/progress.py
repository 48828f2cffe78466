"""One line per stage of a comparison, with the time it took, the time since the start and an estimate of what
remains; and the estimates themselves.

A sub-run that ran before (in this ``OUT``, for any request) is expected to take what it took then.  Otherwise a
simple model: the time of one training step and one forward pass of the start model, timed here on a small batch
(:func:`probe`), times the images each recipe trains on and evaluates.  The estimate is a guide, marked ``≈``;
the stage lines report what was measured.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Progress", "Costs", "probe", "estimate_subrun_s", "duration"]

# calibrated on the embedded default (MobileNetV3-Large @32, 2 shared cores): the probe's few steps run about twice
# as slow per image as a long float fine-tune, and a QAT step costs about what the probe's float step costs
FLOAT_STEP_FACTOR = 0.5
QAT_OVERHEAD = 1.0
FIXED_S = {"quantize": 15.0, "prune": 30.0, "int8-of": 15.0}  # export, calibration, checks, reports
TARGET_S = 10.0  # per other deploy target: build, mobile checks, evaluation


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class Costs:
    """Seconds per image of one training step and of one forward pass of the start model, here."""
    train_s: float
    infer_s: float


def probe(model, input_size: tuple[int, int], batch: int = 64) -> Costs:
    """Time two training steps and two forward passes of ``batch`` images (after a warm-up) on a copy of
    ``model``."""
    import torch

    m = copy.deepcopy(model).train()
    x = torch.randn(batch, 3, *input_size)
    y = torch.zeros(batch, dtype=torch.long)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        times.append(time.perf_counter() - t)
    m.eval()
    fwd = []
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            m(x)
            fwd.append(time.perf_counter() - t)
    return Costs(min(times[1:]) / batch, min(fwd[1:]) / batch)


def estimate_subrun_s(sub, costs: Costs, n_train: int, n_test: int, groups: int) -> float:
    """The simple model's seconds for one sub-run (``groups``: channel groups NetAdapt proposes cuts of)."""
    rec, req = sub.recipe, sub.request
    limit_train = req.get("limit_train") or n_train
    targets = max(0, len(req.get("targets") or []) - 1)
    seconds = FIXED_S[sub.kind] + TARGET_S * targets + 3 * n_test * costs.infer_s
    if sub.kind in ("quantize", "int8-of"):
        seconds += rec.calibration.size * costs.infer_s
        if rec.qat.enabled:
            seen = (rec.qat.limit_train or limit_train) * rec.qat.epochs
            seconds += seen * costs.train_s * QAT_OVERHEAD + rec.qat.epochs * n_test * costs.infer_s
        return seconds
    p = rec.prune
    train = min(p.limit_train or limit_train, limit_train)
    iterations = min(p.max_iterations, math.ceil((1 - p.target_latency_ratio) / p.delta_ratio))
    step = costs.train_s * FLOAT_STEP_FACTOR
    proposals = max(1, groups // 2)  # the groups whose smallest cut saves delta (about half on MobileNetV3)
    per_iteration = proposals * (p.finetune_steps * p.batch_size * step + p.eval_images * costs.infer_s / 2) + 5.0
    seconds += iterations * per_iteration + p.final_finetune_epochs * max(0, train - p.eval_images) * step
    if p.quantize_after:
        seconds += FIXED_S["int8-of"] + rec.calibration.size * costs.infer_s
    return seconds


@dataclass
class Progress:
    """Stage lines: ``compare [3/8] int8-qat: ran in 5m31s | elapsed 6m02s, ≈ 40m10s left``."""
    estimates: dict[str, float]  # stage -> expected seconds, in stage order
    enabled: bool = True
    log: Callable[[str], Any] = print
    t0: float = field(default_factory=time.time)
    stages: list[dict[str, Any]] = field(default_factory=list)

    def done(self, stage: str, what: str, started: float, status: str = "done") -> dict[str, Any]:
        """Record and print the end of ``stage`` (a key of ``estimates``), begun at ``started``."""
        seconds = time.time() - started
        self.stages.append({"stage": stage, "status": status, "seconds": round(seconds, 2), "what": what})
        names = list(self.estimates)
        i = names.index(stage)
        if self.enabled:
            left = sum(self.estimates[n] for n in names[i + 1:])
            tail = "done" if i + 1 == len(names) else f"≈ {duration(left)} left"
            self.log(f"compare [{i + 1}/{len(names)}] {stage}: {what} in {duration(seconds)} | elapsed "
                     f"{duration(self.elapsed())}, {tail}")
        return self.stages[-1]

    def elapsed(self) -> float:
        return time.time() - self.t0
