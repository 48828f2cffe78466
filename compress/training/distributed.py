"""Data-parallel training on torch's own engine: ``torchrun`` + DistributedDataParallel.

A command launched by ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``) joins a process
group (gloo on CPU, nccl on CUDA); launched plainly it runs as one process and nothing here changes it.
:class:`DistContext` says which process this is; the helpers below are no-ops in a single process.

QAT hook: :func:`wrap_model` is where a model becomes a DDP model.  Its ``convert`` steps run on the plain
module first (after the optional SyncBatchNorm conversion), so a QAT prepare step can swap or configure
fake-quant observers there.  Observer and BN buffers stay consistent across ranks the way torchvision's QAT
reference keeps them: DDP broadcasts rank 0's buffers before every forward (``broadcast_buffers=True``) and
:func:`broadcast_buffers` copies them once more at the end of each epoch, before evaluation and checkpoints.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from compress.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")

Converter = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class DistContext:
    """This process's place in a run: ``backend`` is None in a single process."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # "gloo" | "nccl" while a process group is up

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def choose_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (this process's GPU: ``cuda:LOCAL_RANK``) or ``auto`` (CUDA when there is one)."""
    if name not in DEVICES:
        raise UserError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"process LOCAL_RANK={local_rank} needs GPU {local_rank} but only "
                        f"{torch.cuda.device_count()} are visible; lower --nproc_per_node")
    return torch.device("cuda", local_rank)


def current(device: torch.device | str = "cpu") -> DistContext:
    """The context of a process group that is already up (else a single process) on ``device``."""
    device = torch.device(device)
    if not (tdist.is_available() and tdist.is_initialized()):
        return DistContext(device=device)
    return DistContext(tdist.get_world_size(), tdist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), device,
                       tdist.get_backend())


@contextmanager
def session(device: str = "auto") -> Iterator[DistContext]:
    """Join the process group torchrun describes (and leave it after), or run as a single process.

    Reentrant: inside a group that is already up (a command that trains several times) it reuses it.
    """
    if not launched_by_torchrun():
        yield DistContext(device=choose_device(device))
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = choose_device(device, local_rank)
    if tdist.is_initialized():
        yield current(dev)
        return
    if not tdist.is_available():
        raise UserError("launched by torchrun but this torch build has no torch.distributed")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tdist.init_process_group(backend, init_method="env://", **({"device_id": dev} if dev.type == "cuda" else {}))
    try:
        yield current(dev)
    finally:
        tdist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext, sync_bn: bool = False,
               convert: Sequence[Converter] = ()) -> nn.Module:
    """Move ``model`` to the context's device and wrap it for training (:func:`inner` gives the module back).

    In a process group: BatchNorm becomes SyncBatchNorm when ``sync_bn`` (CUDA only: torch's SyncBatchNorm
    does not run on CPU), then each ``convert`` step runs (the QAT hook), then DDP wraps it.  In a single
    process ``sync_bn`` has nothing to synchronise and the ``convert`` steps still run.  Undo with
    :func:`unwrap_model`.
    """
    model.to(ctx.device)
    if ctx.distributed and sync_bn:
        if ctx.device.type != "cuda":
            raise UserError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on CPU (gloo)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for step in convert:
        model = step(model)
    if not ctx.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def inner(net: nn.Module) -> nn.Module:
    """The module a DDP wrapper holds (``net`` itself otherwise): what checkpoints and evaluation use."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def unwrap_model(net: nn.Module) -> nn.Module:
    """The plain module inside ``net``, with SyncBatchNorm turned back into BatchNorm2d (same tensors)."""
    module = inner(net)
    _revert_sync_batchnorm(module)
    return module


def _revert_sync_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats)
            if child.affine:
                bn.weight, bn.bias = child.weight, child.bias
            bn.running_mean, bn.running_var = child.running_mean, child.running_var
            bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            _revert_sync_batchnorm(child)


def train_sampler(dataset: Dataset, ctx: DistContext, seed: int) -> DistributedSampler | None:
    """This rank's share of the train split, reshuffled per epoch by ``set_epoch``; None in a single process.

    ``drop_last=True``: every rank gets the same number of images, so every rank takes the same steps.
    """
    if not ctx.distributed:
        return None
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                              drop_last=True)


def shard(n: int, ctx: DistContext) -> range | None:
    """Every ``world_size``-th index from this rank's: disjoint shards covering all ``n`` (None: no sharding)."""
    return range(ctx.rank, n, ctx.world_size) if ctx.distributed else None


def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Sum each value over all ranks (float64); returned unchanged in a single process."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def broadcast_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BN running statistics, observer ranges) to every rank."""
    if not ctx.distributed:
        return
    for b in module.buffers():
        tdist.broadcast(b, src=0)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        tdist.barrier()
