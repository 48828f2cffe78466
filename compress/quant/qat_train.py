"""Training a QAT model (:func:`compress.quant.qat.prepare_qat`) through the project's training loop.

:func:`run_qat` fine-tunes with :func:`compress.training.train.fit` (progress bars, per-epoch test top-1, DDP
wrapping, an atomic checkpoint per epoch); :class:`FreezeSchedule` is its step hook, freezing BN statistics and
then the observers at the recipe's (fractional) epochs.  A checkpoint is resumed, or a finished one reused,
only when :func:`qat_fingerprint` matches: the start weights, the recipe keys that shape training and the data.

Under torchrun (DDP, ``[qat] batch_size`` images per process) every rank must hold the same quantization state,
or the ranks would train different grids and rank 0's export would not be what was trained:

* activation observers: :func:`global_observers` all-reduces every range right after its update (min of the
  minima, max of the maxima), before the fake quant computes its scale.  A moving-average update is monotonic
  in the batch minimum (maximum), so this is bit for bit the update a single process makes on the whole global
  batch, and every rank fake-quantizes with the same scale at every step.
* weight fake quants see the same weights on every rank (DDP), folded with the same BN statistics (DDP
  broadcasts rank 0's before every forward): nothing to exchange.
* BN running statistics: each rank updates its copy from its own batch (no SyncBatchNorm on CPU, nor in
  torchvision's documented 8-GPU QAT command); DDP replaces them with rank 0's before every forward, and at each
  freeze point :class:`FreezeSchedule` broadcasts rank 0's buffers before freezing, so the frozen statistics are
  rank 0's on every rank.

The checkpoint is read (and the resume decided) on rank 0 and handed to the others, so all ranks resume the same
epoch even where they do not share rank 0's file system.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist
from torch import nn
from torch.ao import quantization as tq

from compress.models.checkpoint import read_checkpoint
from compress.models.mobilenetv3 import MobileNetV3
from compress.quant.qat import QATMobileNetV3, freeze_bn_stats, freeze_observers, prepare_qat
from compress.training import distributed
from compress.training.distributed import DistContext
from compress.training.train import TrainConfig, fit
from recipes.loader import QATConfig, QuantizeConfig

__all__ = ["QAT_CHECKPOINT", "qat_fingerprint", "FreezeSchedule", "QATResult", "run_qat", "global_observers"]

log = logging.getLogger(__name__)
QAT_CHECKPOINT = "qat_checkpoint.pt"  # in the output directory: written every QAT epoch, resumed from


# what changes the trained model (a QAT checkpoint is reused only when these match); export-only settings such
# as min_onnx_agreement, compare_ptq or the graph shaping passes may change between runs
_TRAINING_QUANTIZE_KEYS = ("activation_type", "per_channel", "weight_bits", "hswish", "hard_sigmoid")
_EXPORT_ONLY_QAT_KEYS = ("compare_ptq", "min_onnx_agreement", "limit_test")


def qat_fingerprint(model: nn.Module, q: QuantizeConfig, qat: QATConfig, reduce_range: bool, data: str = "") -> str:
    """What a QAT checkpoint must match to be resumed or reused: the start model's weights, the [quantize] keys
    that shape the fake quantization, the [qat] training keys, the weight range and the data (``data``: the
    dataset's name and input size)."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    doc = {"quantize": {k: getattr(q, k) for k in _TRAINING_QUANTIZE_KEYS},
           "qat": {k: v for k, v in qat.__dict__.items() if k not in _EXPORT_ONLY_QAT_KEYS},
           "reduce_range": reduce_range, "data": data}
    h.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class FreezeSchedule:
    """The recipe's freeze points (in epochs) as a step hook for :func:`compress.training.train.fit`."""
    freeze_bn_epochs: float
    freeze_observers_epochs: float
    events: list[str] = field(default_factory=list)
    sync: Callable[[nn.Module], None] | None = None  # under DDP: every rank takes rank 0's buffers before a freeze

    def steps(self, steps_per_epoch: int) -> tuple[int, int]:
        """(BN freeze step, observer freeze step); observers see at least one step before they freeze."""
        return (math.ceil(self.freeze_bn_epochs * steps_per_epoch),
                max(1, math.ceil(self.freeze_observers_epochs * steps_per_epoch)))

    def __call__(self, model: nn.Module, step: int, steps_per_epoch: int) -> None:
        bn_step, obs_step = self.steps(steps_per_epoch)
        due = (not model.bn_frozen and step >= bn_step) or (not model.observers_frozen and step >= obs_step)
        if due and self.sync is not None:
            self.sync(model)  # on every rank at the same step: the freeze points are the same everywhere
        if not model.bn_frozen and step >= bn_step:
            freeze_bn_stats(model)
            self.events.append(f"BN statistics frozen at step {bn_step}"
                               + ("" if step == bn_step else f" (re-applied at step {step} on resume)"))
        if not model.observers_frozen and step >= obs_step:
            freeze_observers(model)
            self.events.append(f"observers frozen at step {obs_step}"
                               + ("" if step == obs_step else f" (re-applied at step {step} on resume)"))


@torch.no_grad()
def _reduce_range(observer: nn.Module) -> None:
    """One all-reduce: the minimum of every rank's ``min_val`` and the maximum of every rank's ``max_val``."""
    t = torch.stack([observer.min_val, -observer.max_val])
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    observer.min_val.copy_(t[0])
    observer.max_val.copy_(-t[1])


@contextmanager
def global_observers(model: QATMobileNetV3, ctx: DistContext) -> Iterator[int]:
    """While training under DDP, every activation observer's range covers the global batch: it is all-reduced
    right after each update (a forward hook on the observer, before its fake quant computes the scale).  Yields
    the number of observers synchronised (0 in a single process, where nothing changes).  The hooks run only
    while the observers are enabled: from the observer freeze point on there is nothing to exchange."""
    if not ctx.distributed:
        yield 0
        return
    mods = dict(model.named_modules())
    observers = [mods[s.module].activation_post_process for s in model.sites
                 if not isinstance(mods[s.module], tq.FixedQParamsFakeQuantize)]
    handles = [obs.register_forward_hook(lambda m, _inputs, _output: _reduce_range(m)) for obs in observers]
    try:
        yield len(observers)
    finally:
        for h in handles:
            h.remove()


def _resumable(checkpoint, fingerprint: str) -> tuple[dict[str, Any] | None, bool]:
    """(the checkpoint's state when it belongs to this run, else None; whether a checkpoint of another run is
    there)."""
    if checkpoint is None or not Path(checkpoint).exists():
        return None, False
    state = read_checkpoint(checkpoint)
    if isinstance(state, dict) and state.get("qat_fingerprint") == fingerprint and "state_dict" in state:
        return state, False
    return None, True


@dataclass
class QATResult:
    model: QATMobileNetV3  # frozen, in eval mode
    report: dict[str, Any]


def _train_config(qat: QATConfig) -> TrainConfig:
    return TrainConfig(epochs=qat.epochs, batch_size=qat.batch_size, lr=qat.lr, weight_decay=qat.weight_decay,
                       label_smoothing=qat.label_smoothing, schedule=qat.schedule, pad_crop=qat.pad_crop,
                       hflip=qat.hflip, limit_train=qat.limit_train or None, limit_test=qat.limit_test or None,
                       seed=qat.seed)


def run_qat(model: MobileNetV3, source, q: QuantizeConfig, qat: QATConfig, checkpoint, fingerprint: str,
            reduce_range: bool = False, progress: bool = True, dist: DistContext | None = None) -> QATResult:
    """Prepare ``model`` for QAT and fine-tune it with ``qat`` on ``source``'s train split (progress bar, test
    top-1 after each epoch), freezing BN statistics and observers at the recipe's points.

    ``checkpoint`` is written after every epoch (by rank 0); when it exists with the same ``fingerprint``
    (recipe and start model) the run resumes from it, and a finished one is reused without training.  ``dist``
    (default: the process group already up, else one process on the model's device) trains it as DDP, every
    rank calling this with the same arguments.  Returns the frozen model in eval mode, on every rank.
    """
    ctx = dist or distributed.current(next(model.parameters()).device)
    qm = prepare_qat(model, q, qat, reduce_range)
    resume_state, foreign = distributed.from_main(ctx, _resumable, checkpoint, fingerprint)
    resumed_from = 0
    progress = progress and ctx.is_main
    if resume_state is not None:
        qm.load_state_dict(resume_state["state_dict"])
        resumed_from = int(resume_state.get("epoch", 0))
        if progress:
            log.warning("QAT: resuming from %s (epoch %d/%d)", checkpoint, resumed_from, qat.epochs)
    elif foreign and progress:
        log.warning("QAT: %s belongs to another recipe or model; training from the start", checkpoint)
    cfg = _train_config(qat)
    schedule = FreezeSchedule(qat.freeze_bn_epochs, qat.freeze_observers_epochs,
                              sync=(lambda m: distributed.broadcast_buffers(m, ctx)) if ctx.distributed else None)
    t0 = time.time()
    synced = 0
    if resume_state is not None and resumed_from >= qat.epochs:
        history = list(resume_state.get("history", []))
    else:
        meta = {"dataset": source.name, "input_size": source.preprocess.input_size[0],
                "preprocess": source.preprocess.to_json(), "qat_fingerprint": fingerprint}
        with global_observers(qm, ctx) as synced:
            history = fit(qm, source, cfg, checkpoint, resume_state, meta, progress, dist=ctx,
                          step_hook=schedule)["history"]
    freeze_bn_stats(qm)
    freeze_observers(qm)
    qm.eval()
    report = {"epochs": qat.epochs, "resumed_from_epoch": resumed_from, "history": history,
              "freeze_events": schedule.events, "train_seconds": round(time.time() - t0, 1),
              "fake_quant_modules": sum(1 for _ in qm.fake_quants()), "activation_sites": len(qm.sites),
              "weight_sites": len(qm.weight_sites), "machinery": "torch.ao.quantization eager-mode QAT "
              "(fuse_modules_qat, QAT module swap, FakeQuantize / FixedQParamsFakeQuantize)",
              "data_parallel": _data_parallel(ctx, qat.batch_size, synced)}
    return QATResult(qm, report)


def _data_parallel(ctx: DistContext, batch_size: int, synced: int) -> dict[str, Any]:
    """How the QAT run was spread over processes (the report's ``qat.data_parallel``)."""
    out: dict[str, Any] = {"world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
                           "batch_per_process": batch_size, "global_batch": batch_size * ctx.world_size}
    if ctx.distributed:
        out["observers"] = (f"{synced} activation observer ranges all-reduced (min/max) after every update: "
                            "the global batch's range on every rank")
        out["bn_statistics"] = "rank 0's (DDP broadcast_buffers), broadcast again at each freeze point"
    return out
