"""Training loop: augmentation, label smoothing, one-cycle or cosine schedule, per-epoch evaluation, resume.

A checkpoint is written atomically after every epoch; it holds the weights, the architecture, the data facts
(``dataset``, ``input_size``), ``epoch`` (completed epochs) and the optimizer/scheduler/RNG state resume needs.
Ctrl-C stops training and keeps the last complete checkpoint.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from calibration.datasets import DataSource, open_dataset
from compress.checkpoint import LoadedModel, load_model, read_checkpoint, save_checkpoint
from compress.errors import UserError

SCHEDULES = ("onecycle", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3  # peak LR of AdamW
    weight_decay: float = 0.02
    label_smoothing: float = 0.1
    schedule: str = "onecycle"
    warmup_fraction: float = 0.15  # onecycle: share of steps rising to the peak
    pad_crop: int = 2  # random-crop padding in pixels at 32x32 (scaled with the input size)
    hflip: bool = True
    limit_train: int | None = None
    limit_test: int | None = None
    seed: int = 0
    eval_batch_size: int = 500
    bn_momentum: float = 0.1  # torchvision's 0.01 suits 600-epoch ImageNet runs, not a few epochs

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise UserError("epochs and batch size must be >= 1 and the learning rate > 0")


def augment(x: torch.Tensor, pad: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with reflection padding and random horizontal flip, on a preprocessed batch."""
    n, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # [n, h]
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # [n, w]
        idx_r = rows.view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
        xp = torch.gather(xp, 2, idx_r)
        idx_c = cols.view(n, 1, 1, w).expand(n, x.shape[1], h, w)
        x = torch.gather(xp, 3, idx_c)
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, source: DataSource, limit: int | None = None, batch_size: int = 500,
             progress: bool = False) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of a torch model on the test split."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    it = source.loader("test", batch_size=batch_size, limit=limit)
    for x, y in tqdm(it, desc="eval", leave=False, disable=not progress):
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    return {"top1": correct / max(total, 1), "loss": loss_sum / max(total, 1), "images": total}


def _make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                   pct_start=cfg.warmup_fraction, div_factor=25.0,
                                                   final_div_factor=1e3)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=cfg.lr * 1e-3)


def fit(model: nn.Module, source: DataSource, cfg: TrainConfig, output: str | os.PathLike | None = None,
        resume_state: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Train ``model`` on ``source``'s train split; evaluate on its test split after every epoch.

    Returns ``{"epoch", "history": [...], "final": {...}}``; writes ``output`` after every epoch if given.
    """
    if not source.has_labels:
        raise UserError("training needs labels: use fashion-mnist or imagefolder:PATH, not synthetic")
    torch.manual_seed(cfg.seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = cfg.bn_momentum
    train_set = source.split("train", cfg.limit_train)
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    start_epoch, history = 0, []
    if resume_state:
        opt.load_state_dict(resume_state["optimizer"])
        start_epoch = int(resume_state["epoch"])
        history = list(resume_state.get("history", []))
    saved_epochs = (resume_state or {}).get("train_config", {}).get("epochs")
    if resume_state and saved_epochs == cfg.epochs:  # an interrupted run: continue its schedule exactly
        sched = _make_scheduler(cfg, opt, cfg.epochs * steps_per_epoch)
        sched.load_state_dict(resume_state["scheduler"])
    else:  # a new run, or more epochs than first planned: a fresh schedule over the remaining epochs
        for g in opt.param_groups:
            g.pop("initial_lr", None), g.pop("max_lr", None), g.pop("min_lr", None)
            g["lr"] = cfg.lr
        sched = _make_scheduler(cfg, opt, (cfg.epochs - start_epoch) * steps_per_epoch)
    scale = source.preprocess.input_size[0] / 32.0
    pad = int(round(cfg.pad_crop * scale))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        loader = source.loader("train", batch_size=cfg.batch_size, shuffle=True, limit=cfg.limit_train,
                               seed=cfg.seed * 1000 + epoch, drop_last=len(train_set) >= cfg.batch_size)
        t0, loss_sum, seen, correct = time.time(), 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for x, y in bar:
            x = augment(x, pad, cfg.hflip, gen)
            out = model(x)
            loss = criterion(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if not math.isfinite(loss_sum):
            raise UserError(f"training diverged at epoch {epoch + 1} (loss is not finite); lower --lr")
        test = evaluate(model, source, cfg.limit_test, cfg.eval_batch_size)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1),
                  "test_top1": test["top1"], "test_loss": test["loss"], "seconds": round(time.time() - t0, 1)}
        history.append(record)
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f} "
                       f"test top-1 {100 * record['test_top1']:.2f}% ({record['seconds']:.0f}s)")
        if output is not None:
            save_checkpoint(output, model, **(meta or {}), epoch=epoch + 1, history=history,
                            optimizer=opt.state_dict(), scheduler=sched.state_dict(), train_config=asdict(cfg))
    final = history[-1] if history else {}
    return {"epoch": cfg.epochs, "history": history, "final": final}


def train(arch: str | None = None, width_mult: float | None = None, minimalistic: bool | None = None,
          num_classes: int | None = None, dataset: str = "fashion-mnist", input_size: int | None = None,
          weights: str | None = None, resume: str | None = None, output: str | os.PathLike | None = None,
          config: TrainConfig = TrainConfig(), progress: bool = True) -> dict[str, Any]:
    """Build (or load) a model, train it with ``config`` and write the checkpoint ``output``.

    ``resume`` continues a checkpoint written here: same architecture and data, the epoch count goes on to
    ``config.epochs`` (the total), with optimizer and scheduler state restored.
    """
    resume_state = None
    if resume is not None:
        if weights is not None:
            raise UserError("use either --weights (fine-tune) or --resume (continue), not both")
        resume_state = read_checkpoint(resume)
        if not isinstance(resume_state, dict) or "optimizer" not in resume_state or "epoch" not in resume_state:
            raise UserError(f"{resume} is not a training checkpoint written by 'mnv3-compress train' (no optimizer state)")
        dataset = resume_state.get("dataset", dataset)
        input_size = resume_state.get("input_size", input_size)
        weights = resume
        if int(resume_state["epoch"]) >= config.epochs:
            raise UserError(f"{resume} already has {resume_state['epoch']} epochs; ask for more with --epochs")
    source = open_dataset(dataset, input_size)
    torch.manual_seed(config.seed)  # the initial weights depend on the seed too
    loaded: LoadedModel = load_model(weights, arch, width_mult, minimalistic,
                                     num_classes or (None if weights else source.num_classes))
    if source.num_classes is not None and loaded.spec.num_classes != source.num_classes:
        raise UserError(f"the model has {loaded.spec.num_classes} classes but {source.name} has "
                        f"{source.num_classes}; pass --num-classes or other weights")
    meta = {"dataset": source.name, "input_size": source.preprocess.input_size[0], "seed": config.seed,
            "preprocess": source.preprocess.to_json()}
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    result = fit(loaded.model, source, config, output, resume_state, meta, progress)
    result.update({"output": str(output) if output else None, "arch": loaded.spec.arch, "dataset": source.name,
                   "input_size": meta["input_size"]})
    return result
