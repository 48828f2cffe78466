"""Training a QAT model (:func:`compress.quant.qat.prepare_qat`) through the project's training loop.

:func:`run_qat` fine-tunes with :func:`compress.training.train.fit` (progress bars, per-epoch test top-1, DDP
wrapping, an atomic checkpoint per epoch); :class:`FreezeSchedule` is its step hook, freezing BN statistics and
then the observers at the recipe's (fractional) epochs.  A checkpoint is resumed, or a finished one reused,
only when :func:`qat_fingerprint` matches: the start weights, the recipe keys that shape training and the data.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from compress.models.checkpoint import read_checkpoint
from compress.models.mobilenetv3 import MobileNetV3
from compress.quant.qat import QATMobileNetV3, freeze_bn_stats, freeze_observers, prepare_qat
from compress.training.train import TrainConfig, fit
from recipes.loader import QATConfig, QuantizeConfig

__all__ = ["QAT_CHECKPOINT", "qat_fingerprint", "FreezeSchedule", "QATResult", "run_qat"]

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

    def steps(self, steps_per_epoch: int) -> tuple[int, int]:
        """(BN freeze step, observer freeze step); observers see at least one step before they freeze."""
        return (math.ceil(self.freeze_bn_epochs * steps_per_epoch),
                max(1, math.ceil(self.freeze_observers_epochs * steps_per_epoch)))

    def __call__(self, model: nn.Module, step: int, steps_per_epoch: int) -> None:
        bn_step, obs_step = self.steps(steps_per_epoch)
        if not model.bn_frozen and step >= bn_step:
            freeze_bn_stats(model)
            self.events.append(f"BN statistics frozen at step {bn_step}"
                               + ("" if step == bn_step else f" (re-applied at step {step} on resume)"))
        if not model.observers_frozen and step >= obs_step:
            freeze_observers(model)
            self.events.append(f"observers frozen at step {obs_step}"
                               + ("" if step == obs_step else f" (re-applied at step {step} on resume)"))


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
            reduce_range: bool = False, progress: bool = True, dist=None) -> QATResult:
    """Prepare ``model`` for QAT and fine-tune it with ``qat`` on ``source``'s train split (progress bar, test
    top-1 after each epoch), freezing BN statistics and observers at the recipe's points.

    ``checkpoint`` is written after every epoch; when it exists with the same ``fingerprint`` (recipe and start
    model) the run resumes from it, and a finished one is reused without training.  Returns the frozen model
    in eval mode.
    """
    qm = prepare_qat(model, q, qat, reduce_range)
    resume_state = None
    resumed_from = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = read_checkpoint(checkpoint)
        if isinstance(state, dict) and state.get("qat_fingerprint") == fingerprint and "state_dict" in state:
            qm.load_state_dict(state["state_dict"])
            resume_state, resumed_from = state, int(state.get("epoch", 0))
            if progress:
                log.warning("QAT: resuming from %s (epoch %d/%d)", checkpoint, resumed_from, qat.epochs)
        elif progress:
            log.warning("QAT: %s belongs to another recipe or model; training from the start", checkpoint)
    cfg = _train_config(qat)
    schedule = FreezeSchedule(qat.freeze_bn_epochs, qat.freeze_observers_epochs)
    t0 = time.time()
    if resume_state is not None and resumed_from >= qat.epochs:
        history = list(resume_state.get("history", []))
    else:
        meta = {"dataset": source.name, "input_size": source.preprocess.input_size[0],
                "preprocess": source.preprocess.to_json(), "qat_fingerprint": fingerprint}
        history = fit(qm, source, cfg, checkpoint, resume_state, meta, progress, dist=dist,
                      step_hook=schedule)["history"]
    freeze_bn_stats(qm)
    freeze_observers(qm)
    qm.eval()
    report = {"epochs": qat.epochs, "resumed_from_epoch": resumed_from, "history": history,
              "freeze_events": schedule.events, "train_seconds": round(time.time() - t0, 1),
              "fake_quant_modules": sum(1 for _ in qm.fake_quants()), "activation_sites": len(qm.sites),
              "weight_sites": len(qm.weight_sites), "machinery": "torch.ao.quantization eager-mode QAT "
              "(fuse_modules_qat, QAT module swap, FakeQuantize / FixedQParamsFakeQuantize)"}
    return QATResult(qm, report)
