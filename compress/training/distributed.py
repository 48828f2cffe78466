"""Data-parallel training on torch's own engine: ``torchrun`` + DistributedDataParallel.

A command launched by ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``) joins a process
group (gloo on CPU, nccl on CUDA); launched plainly it runs as one process and nothing here changes it.
:class:`DistContext` says which process this is; the helpers below are no-ops in a single process.

What runs where: every rank trains (``train``, the QAT of ``quantize``, NetAdapt's fine-tunes); what is done
once - reading a checkpoint to resume, timing a model, writing a file - runs on rank 0, and :func:`from_main`
hands its result to the others, so every rank takes the same decisions and reaches the same collectives.

Buffers: DDP broadcasts rank 0's buffers (BN running statistics, observer state) before every training forward
(``broadcast_buffers=True``) and :func:`broadcast_buffers` copies them once more at the end of each epoch,
before evaluation and checkpoints.  QAT adds its own step on top (:mod:`compress.quant.qat_train`): activation
observer ranges are all-reduced (min of the minima, max of the maxima) after every update, so they cover the
global batch, and rank 0's buffers are broadcast at each freeze point.

The process group uses torch's default timeout; ``$MNV3_COMPRESS_DIST_TIMEOUT_S`` sets another (the tests use a
short one).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from compress.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
TIMEOUT_ENV = "MNV3_COMPRESS_DIST_TIMEOUT_S"
T = TypeVar("T")

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


def launch_rank() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun set them, before any process group is up; (0, 1, 0) otherwise."""
    if not launched_by_torchrun():
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def _timeout() -> dict[str, timedelta]:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return {}  # torch's default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {value!r}")
    return {"timeout": timedelta(seconds=seconds)}


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
    tdist.init_process_group(backend, init_method="env://", **({"device_id": dev} if dev.type == "cuda" else {}),
                             **_timeout())
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


def from_main(ctx: DistContext, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on rank 0 alone, its (picklable) result handed to every rank; a single process just
    calls it.  Every rank must call this at the same point.

    For what is done once and must be the same everywhere: reading a checkpoint, timing a model on the CPU
    (N copies timed at once would slow each other down), the CPU facts that decide the export.  An exception on
    rank 0 is re-raised there and reaches the other ranks as a one-line UserError, so none of them waits for a
    result that will never come.
    """
    if not ctx.distributed:
        return fn(*args, **kwargs)
    box: list[Any] = [None]
    error: Exception | None = None
    if ctx.is_main:
        try:
            box = [(True, fn(*args, **kwargs))]
        except Exception as e:  # noqa: BLE001 - handed on, then re-raised
            error = e
            box = [(False, (str(e).strip().splitlines() or [type(e).__name__])[0])]
    tdist.broadcast_object_list(box, src=0, device=ctx.device if ctx.device.type == "cuda" else None)
    if error is not None:
        raise error
    ok, value = box[0]
    if not ok:
        raise UserError(f"rank 0 failed: {value}")
    return value


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
