"""Which model and data a command works on: ``--weights``, or the embedded default, never hours of silent training.

* ``--weights PATH``: loaded as it is (:func:`compress.models.checkpoint.load_model` reads the architecture from
  the weights).  Its data: ``--dataset`` when given, else the dataset a ``train`` checkpoint records, else the
  default dataset - and a model whose classes do not fit that is a one-line error saying what to pass.
* no weights: the shipped embedded default (:mod:`compress.models.default`), also for latency work on synthetic
  data at any input size.  Any other (architecture, data, input size) is refused with one line naming
  ``--weights``, ``--random-init`` and ``--train-default``, with an estimate of that training on this machine.
* ``--train-default``: trains one with :data:`DEFAULT_TRAIN` by the project's ``train`` loop, cached under
  ``$MNV3_COMPRESS_HOME/models/`` keyed by architecture, the data's identity (name and fingerprint) and input
  size.  A cache records what makes it valid (``DEFAULT_TRAIN``, :data:`CACHE_FORMAT`, the data fingerprint);
  one that no longer matches is retrained, with a one-line notice.  One process trains at a time (file lock);
  an interrupted training resumes from its side file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

from calibration.datasets import DataSource, open_dataset
from compress.errors import UserError
from compress.io import home
from compress.models.checkpoint import LoadedModel, load_model, read_checkpoint
from compress.models.default import load_shipped, shipped
from compress.training.train import TrainConfig, train

__all__ = ["resolve_model", "trained_default", "default_checkpoint_path", "estimate_training_s", "DEFAULT_TRAIN",
           "DEFAULT_DATASET", "CACHE_FORMAT"]

DEFAULT_DATASET = "fashion-mnist"
CACHE_FORMAT = 2  # bump when what a cached default holds changes
# Measured (3 epochs on 15k images, 3k test images): no random crop and lr 5e-3 gave 86.0 % top-1 against
# 82.8 % with 2-pixel random crops and lr 3e-3 -- a 5-epoch budget underfits, so augmentation costs accuracy.
DEFAULT_TRAIN = TrainConfig(epochs=5, batch_size=128, lr=5e-3, pad_crop=0, hflip=True, schedule="onecycle", seed=0)
_TRAIN_KEYS_IGNORED = ("sync_bn",)


def _recipe(cfg: TrainConfig = None) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg or DEFAULT_TRAIN).items() if k not in _TRAIN_KEYS_IGNORED}


def default_checkpoint_path(arch: str, source: DataSource) -> Path:
    """``$MNV3_COMPRESS_HOME/models/<arch>_<dataset>-<fingerprint>_<size>.pt``: one cache per data identity."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", source.name).strip("-")[:40]
    digest = hashlib.sha1(f"{source.name}|{source.fingerprint}".encode()).hexdigest()[:10]
    return home() / "models" / f"{arch}_{slug}-{digest}_{source.preprocess.input_size[0]}.pt"


def _valid_cache(path: Path, source: DataSource) -> str | None:
    """None when the cached default at ``path`` is current; else why not (for the notice)."""
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        return "it is not a checkpoint"
    if state.get("cache_format") != CACHE_FORMAT:
        return f"it was written by another version (cache format {state.get('cache_format')}, now {CACHE_FORMAT})"
    if {k: v for k, v in (state.get("train_config") or {}).items() if k not in _TRAIN_KEYS_IGNORED} != _recipe():
        return "it was trained by another training recipe"
    if state.get("dataset_fingerprint") != source.fingerprint:
        return "the data it was trained on has changed"
    return None


def trained_default(arch: str, source: DataSource, progress: bool = True) -> LoadedModel:
    """The default for ``arch`` on ``source`` trained here (``--train-default``): cached, validated, retrained
    with a one-line notice when stale."""
    path = default_checkpoint_path(arch, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_name(path.stem + ".lock"), progress):
        if path.exists():
            stale = _valid_cache(path, source)
            if stale is None:
                return load_model(path)
            print(f"Notice: the cached default {path.name} is stale ({stale}): training it again", flush=True)
            path.unlink()
        _train_default(arch, source, path, progress)
    return load_model(path)


@contextlib.contextmanager
def _exclusive(lock_path: Path, progress: bool):
    """One process trains a given default model at a time; the others wait for it, then load it."""
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"Waiting for another process that is training the default model ({lock_path})", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train_default(arch: str, source: DataSource, path: Path, progress: bool) -> None:
    """Train into a side file: a half-trained model never sits at the cache path, and an interrupted
    run resumes from its last complete epoch next time."""
    partial = path.with_name(path.stem + ".partial.pt")
    resume = None
    if partial.exists():
        state = read_checkpoint(partial)
        same = {k: v for k, v in (state.get("train_config") or {}).items() if k not in _TRAIN_KEYS_IGNORED}
        if same == _recipe() and state.get("dataset_fingerprint") == source.fingerprint:
            resume = str(partial)  # same recipe and data: continue it
    if resume and int(read_checkpoint(partial).get("epoch", 0)) >= DEFAULT_TRAIN.epochs:
        os.replace(partial, path)  # finished, but stopped before the rename
        return
    side = source.preprocess.input_size[0]
    if progress:
        print(f"--train-default: {'resuming' if resume else 'training'} {arch} on {source.name} at {side}x{side} "
              f"({DEFAULT_TRAIN.epochs} epochs; cached at {path})", flush=True)
    train(arch=None if resume else arch, dataset=source.name, input_size=side, output=partial, resume=resume,
          config=DEFAULT_TRAIN, progress=progress, extra_meta={"cache_format": CACHE_FORMAT})
    os.replace(partial, path)


def estimate_training_s(arch: str, source: DataSource, cfg: TrainConfig = DEFAULT_TRAIN, probe_batch: int = 8
                        ) -> float:
    """Seconds ``cfg`` would take to train ``arch`` on ``source`` here: two timed forward + backward steps of
    ``probe_batch`` images (after one warm-up step), scaled to the epochs and the train split."""
    import torch

    model = load_model(None, arch, num_classes=source.num_classes or 1000).model.train()
    x = torch.randn(probe_batch, 3, *source.preprocess.input_size)
    y = torch.zeros(probe_batch, dtype=torch.long)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t)
    per_image = min(times[1:]) / probe_batch
    n = len(source.split("train", cfg.limit_train))
    return per_image * n * cfg.epochs * 1.15  # + the per-epoch evaluation on the test split


def _duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{max(1, minutes)} min"


def _shipped_fits(arch, width_mult, minimalistic, num_classes, source: DataSource, input_size) -> bool:
    s = shipped()
    if arch not in (None, s.arch) or width_mult not in (None, s.width_mult) or bool(minimalistic) != s.minimalistic:
        return False
    if source.kind == "synthetic":  # latency work: the shipped weights at any input size
        return num_classes in (None, s.num_classes, 1000)
    return source.name == s.dataset and input_size in (None, s.input_size) and num_classes in (None, s.num_classes)


def _default(arch, width_mult, minimalistic, num_classes, dataset, input_size, train_default, progress, workers):
    """(model, data) when no weights are given: the shipped default, or the opt-in trained one."""
    s = shipped()
    data = open_dataset(dataset or s.dataset, input_size or (s.input_size if dataset in (None, s.dataset) else None),
                        workers)
    if _shipped_fits(arch, width_mult, minimalistic, num_classes, data, input_size):
        return load_shipped(), data
    a = arch or s.arch
    if width_mult not in (None, 1.0) or minimalistic:
        raise UserError("--train-default trains width 1.0, full (not minimalistic) networks; pass --weights")
    if train_default:
        if not data.has_labels:
            raise UserError(f"--train-default needs labelled data, not {data.name}; pass --dataset")
        return trained_default(a, data, progress), data
    what = f"{a} @{data.preprocess.input_size[0]} on {data.name}"
    estimate = (f"about {_duration(estimate_training_s(a, data))} on this machine" if data.has_labels
                else "it needs labelled data")
    raise UserError(f"no weights given, and the embedded default is {s.describe()}, not {what}: pass --weights PATH, "
                    f"--random-init (latency only), or --train-default to train one here ({estimate})")


def resolve_model(weights: str | os.PathLike | None = None, arch: str | None = None, width_mult: float | None = None,
                  minimalistic: bool | None = None, num_classes: int | None = None, dataset: str | None = None,
                  input_size: int | None = None, progress: bool = True, train_default: bool = False,
                  workers: int | None = None, random_init: bool = False) -> tuple[LoadedModel, DataSource]:
    """The model a command works on and the dataset it is fed with (see the module docstring).

    The input size comes from the argument, else the checkpoint, else the dataset's default.  ``random_init``:
    freshly initialised weights for latency work (on synthetic data unless a dataset is given).
    """
    if random_init:
        if weights is not None:
            raise UserError("use either --weights or --random-init, not both")
        data = open_dataset(dataset or "synthetic", input_size, workers)
        return load_model(None, arch, width_mult, minimalistic, num_classes or data.num_classes or 1000), data
    if weights is None:
        return _default(arch, width_mult, minimalistic, num_classes, dataset, input_size, train_default, progress,
                        workers)
    loaded = load_model(weights, arch, width_mult, minimalistic, num_classes)
    size = input_size or loaded.meta.get("input_size")
    recorded = loaded.meta.get("dataset") if isinstance(loaded.meta.get("dataset"), str) else None
    name = dataset or recorded or DEFAULT_DATASET
    try:
        source = open_dataset(name, int(size) if size else None, workers)
    except UserError as e:
        if dataset is None and recorded:
            raise UserError(f"{weights} was trained on {recorded}, which cannot be opened here ({e}); pass "
                            f"--dataset") from None
        raise
    n = loaded.spec.num_classes
    if source.num_classes is not None and n != source.num_classes:
        if dataset is None and recorded is None:
            raise UserError(f"the model has {n} classes but {source.name}, the default dataset, has "
                            f"{source.num_classes}: pass --dataset imagefolder:PATH (your images) or --dataset "
                            f"synthetic (latency only, no accuracy)")
        raise UserError(f"the model has {n} classes but {source.name} has {source.num_classes}")
    return loaded, source
