"""Training loop: augmentation, label smoothing, one-cycle or cosine schedule, per-epoch evaluation, resume.

A checkpoint is written atomically after every epoch; it holds the weights, the architecture, the data facts
(``dataset``, ``input_size``), ``epoch`` (completed epochs) and the optimizer/scheduler/RNG state resume needs.
Ctrl-C stops training and keeps the last complete checkpoint.

Launched by ``torchrun`` the same loop runs as DistributedDataParallel (see :mod:`compress.training.distributed`);
launched plainly it is one process, as before.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from calibration.datasets import DataSource, open_dataset
from compress.errors import UserError
from compress.io import ensure_dir
from compress.version import code_version
from compress.models.checkpoint import LoadedModel, load_model, read_checkpoint, save_checkpoint
from compress.training import distributed
from compress.training.distributed import DistContext

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
    sync_bn: bool = False  # under DDP: BatchNorm statistics over the global batch (CUDA only)

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
             progress: bool = False, dist: DistContext | None = None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of a torch model on the test split.

    With a process group (``dist``) each rank evaluates a disjoint shard and the counts are summed, so every
    rank returns the figures of the whole split.
    """
    model.eval()
    ctx = dist or DistContext()
    device = next(model.parameters()).device
    correct, total, loss_sum = 0, 0, 0.0
    sampler = distributed.shard(len(source.split("test", limit)), ctx) if ctx.distributed else None
    it = source.loader("test", batch_size=batch_size, limit=limit, sampler=sampler)
    for x, y in tqdm(it, desc="eval", leave=False, disable=not (progress and ctx.is_main)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    if ctx.distributed:
        correct, total, loss_sum = distributed.all_reduce_sum([correct, total, loss_sum], ctx)
        correct, total = int(correct), int(total)
    return {"top1": correct / max(total, 1), "loss": loss_sum / max(total, 1), "images": total}


def _make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                   pct_start=cfg.warmup_fraction, div_factor=25.0,
                                                   final_div_factor=1e3)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=cfg.lr * 1e-3)


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _restore_schedule(cfg: TrainConfig, opt: torch.optim.Optimizer, resume_state: dict[str, Any] | None,
                      start_epoch: int, steps_per_epoch: int):
    """The interrupted run's schedule when the plan is the same (epochs, steps per epoch), else a fresh one."""
    saved = resume_state or {}
    same_plan = (saved.get("train_config", {}).get("epochs") == cfg.epochs
                 and saved.get("steps_per_epoch", steps_per_epoch) == steps_per_epoch)
    if resume_state and same_plan:  # an interrupted run: continue its schedule exactly
        sched = _make_scheduler(cfg, opt, cfg.epochs * steps_per_epoch)
        sched.load_state_dict(resume_state["scheduler"])
        return sched
    # a new run, more epochs than first planned, or another world size: a fresh schedule over what is left
    for g in opt.param_groups:
        g.pop("initial_lr", None), g.pop("max_lr", None), g.pop("min_lr", None)
        g["lr"] = cfg.lr
    return _make_scheduler(cfg, opt, (cfg.epochs - start_epoch) * steps_per_epoch)


StepHook = Callable[[nn.Module, int, int], None]  # (module, global step about to run, steps per epoch)


def _train_epoch(net: nn.Module, bar: tqdm, opt: torch.optim.Optimizer, sched, criterion: nn.Module,
                 aug: Callable[[torch.Tensor], torch.Tensor], ctx: DistContext,
                 hook: Callable[[int], None] | None = None) -> tuple[float, float, float]:
    """One pass over the batches of ``bar``; returns (summed loss, correct, images), summed over all ranks."""
    loss_sum, seen, correct = 0.0, 0, 0
    for k, (x, y) in enumerate(bar):
        if hook is not None:
            hook(k)
        x = aug(x)  # on the CPU, with the CPU generator
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        out = net(x)
        loss = criterion(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
    if ctx.distributed:
        loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], ctx)
    return loss_sum, correct, seen


def fit(model: nn.Module, source: DataSource, cfg: TrainConfig, output: str | os.PathLike | None = None,
        resume_state: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
        progress: bool = True, dist: DistContext | None = None,
        convert: Sequence[distributed.Converter] = (), step_hook: StepHook | None = None,
        eval_name: str = "test") -> dict[str, Any]:
    """Train ``model`` on ``source``'s train split; evaluate on its test split after every epoch.

    Returns ``{"epoch", "history": [...], "final": {...}}``; writes ``output`` after every epoch if given.
    ``dist`` (default: the process group already up, else one process on the model's device) runs it as
    DDP: ``cfg.batch_size`` images per process and step, a DistributedSampler share of the train split per
    rank, metrics summed over ranks, rank 0 alone writing ``output``.  ``convert`` steps prepare the module
    before DDP wraps it (the QAT hook, see :func:`compress.training.distributed.wrap_model`).  ``step_hook(module,
    step, steps_per_epoch)`` runs on every rank before every training step (``step`` counts from the start of
    the run, resumed runs included): QAT freezes BN statistics and observers there.  ``eval_name`` labels the
    per-epoch evaluation in the progress lines (NetAdapt evaluates on a train-split holdout).  ``model`` is trained in
    place and handed back on the device it came on, with plain BatchNorm.
    """
    if not source.has_labels:
        raise UserError("training needs labels: use fashion-mnist or imagefolder:PATH, not synthetic")
    home = next(model.parameters()).device
    ctx = dist or distributed.current(home)
    progress = progress and ctx.is_main
    torch.manual_seed(cfg.seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = cfg.bn_momentum
    train_set = source.split("train", cfg.limit_train)
    sampler = distributed.train_sampler(train_set, ctx, cfg.seed)
    per_rank = len(sampler) if sampler is not None else len(train_set)
    if per_rank == 0:
        raise UserError(f"{len(train_set)} training images cannot be shared by {ctx.world_size} processes")
    steps_per_epoch = max(1, per_rank // cfg.batch_size)  # the loader below yields exactly this many batches
    if ctx.distributed and progress:
        tqdm.write(f"world_size={ctx.world_size} backend={ctx.backend} device={ctx.device} "
                   f"batch {cfg.batch_size}/process ({cfg.batch_size * ctx.world_size} per step), "
                   f"{steps_per_epoch} steps/epoch")
    net = distributed.wrap_model(model, ctx, cfg.sync_bn, convert)
    module = distributed.inner(net)
    try:
        opt = _make_optimizer(module, cfg)
        start_epoch, history = 0, []
        if resume_state:
            opt.load_state_dict(resume_state["optimizer"])
            start_epoch = int(resume_state["epoch"])
            history = list(resume_state.get("history", []))
        sched = _restore_schedule(cfg, opt, resume_state, start_epoch, steps_per_epoch)
        scale = source.preprocess.input_size[0] / 32.0
        pad = int(round(cfg.pad_crop * scale))
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        for epoch in range(start_epoch, cfg.epochs):
            net.train()
            # one augmentation stream per rank; world_size 1, rank 0 gives the single-process stream unchanged
            gen = torch.Generator().manual_seed((cfg.seed * 1000 + epoch) * ctx.world_size + ctx.rank)
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader = source.loader("train", batch_size=cfg.batch_size, shuffle=True, limit=cfg.limit_train,
                                   seed=cfg.seed * 1000 + epoch, drop_last=per_rank >= cfg.batch_size,
                                   sampler=sampler)
            t0 = time.time()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
            hook = None if step_hook is None else (
                lambda k: step_hook(module, epoch * steps_per_epoch + k, steps_per_epoch))
            loss_sum, correct, seen = _train_epoch(net, bar, opt, sched, criterion,
                                                   lambda x: augment(x, pad, cfg.hflip, gen), ctx, hook)
            if not math.isfinite(loss_sum):  # the same verdict on every rank: the sum is reduced
                raise UserError(f"training diverged at epoch {epoch + 1} (loss is not finite); lower --lr")
            distributed.broadcast_buffers(module, ctx)  # every rank evaluates and holds rank 0's BN statistics
            test = evaluate(module, source, cfg.limit_test, cfg.eval_batch_size, dist=ctx)
            record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                      "train_top1": correct / max(seen, 1), "test_top1": test["top1"], "test_loss": test["loss"],
                      "seconds": round(time.time() - t0, 1)}
            history.append(record)
            if progress:
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f} "
                           f"{eval_name} top-1 {100 * record['test_top1']:.2f}% ({record['seconds']:.0f}s)")
            if output is not None:
                if ctx.is_main:
                    save_checkpoint(output, module, **(meta or {}), epoch=epoch + 1, history=history,
                                    optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                    train_config=asdict(cfg), steps_per_epoch=steps_per_epoch,
                                    world_size=ctx.world_size)
                distributed.barrier(ctx)  # no rank runs ahead of a checkpoint still being written
    finally:
        distributed.unwrap_model(net).to(home)
    final = history[-1] if history else {}
    return {"epoch": cfg.epochs, "history": history, "final": final}


def _origin(weights, loaded: LoadedModel) -> dict[str, Any]:
    import hashlib

    recorded = {k: loaded.meta[k] for k in ("train_config", "history", "dataset", "dataset_fingerprint",
                                            "input_size", "code_version", "started_from") if k in loaded.meta}
    return {"file": Path(weights).name, "sha256": hashlib.sha256(Path(weights).read_bytes()).hexdigest(),
            "source": loaded.source, **recorded}


def train(arch: str | None = None, width_mult: float | None = None, minimalistic: bool | None = None,
          num_classes: int | None = None, dataset: str = "fashion-mnist", input_size: int | None = None,
          weights: str | None = None, resume: str | None = None, output: str | os.PathLike | None = None,
          config: TrainConfig = TrainConfig(), progress: bool = True, device: str = "cpu", workers: int | None = None,
          extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build (or load) a model, train it with ``config`` and write the checkpoint ``output``.

    ``resume`` continues a checkpoint written here: same architecture and data, the epoch count goes on to
    ``config.epochs`` (the total), with optimizer and scheduler state restored.  The checkpoint records the
    training recipe (``train_config``), the per-epoch history, the data's identity (``dataset`` and
    ``dataset_fingerprint``), its preprocessing and the code version.  ``device``: cpu, cuda or auto.  Under ``torchrun`` every process runs this and joins the process group (rank 0 writes ``output``);
    the result's ``rank`` and ``world_size`` say which process returned it.
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
    source = open_dataset(dataset, input_size, workers)
    torch.manual_seed(config.seed)  # the initial weights depend on the seed too (the same on every rank)
    loaded: LoadedModel = load_model(weights, arch, width_mult, minimalistic,
                                     num_classes or (None if weights else source.num_classes))
    if source.num_classes is not None and loaded.spec.num_classes != source.num_classes:
        raise UserError(f"the model has {loaded.spec.num_classes} classes but {source.name} has "
                        f"{source.num_classes}; pass --num-classes or other weights")
    meta = {"dataset": source.name, "dataset_fingerprint": source.fingerprint,
            "input_size": source.preprocess.input_size[0], "seed": config.seed,
            "preprocess": source.preprocess.to_json(), "code_version": code_version(), **(extra_meta or {})}
    if resume_state is not None and "started_from" in resume_state:
        meta["started_from"] = resume_state["started_from"]
    elif weights is not None and resume is None:  # a fine-tune: where its weights came from, and how they were made
        meta["started_from"] = _origin(weights, loaded)
    if output is not None:
        ensure_dir(Path(output).parent)  # fail now (one line), not after the first epoch
    with distributed.session(device) as ctx:
        result = fit(loaded.model, source, config, output, resume_state, meta, progress, dist=ctx)
    result.update({"output": str(output) if output else None, "arch": loaded.spec.arch, "dataset": source.name,
                   "input_size": meta["input_size"], "device": str(ctx.device), "rank": ctx.rank,
                   "world_size": ctx.world_size})
    return result
