"""The embedded default: a float MobileNetV3 trained on Fashion-MNIST on first use and cached.

Cache: ``$MNV3_COMPRESS_HOME/models/<arch>_<dataset>_<size>.pt`` (default home ``~/.cache/mnv3-compress``).
No weights can be downloaded on the machines this tool targets, so the default is trained here: about
8 minutes on 2 CPU cores for MobileNetV3-Small at 32x32, >= 90 % top-1 on the Fashion-MNIST test set.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
from pathlib import Path

from calibration.datasets import DataSource, open_dataset
from compress.errors import UserError
from compress.io import home
from compress.models.checkpoint import LoadedModel, load_model, read_checkpoint
from compress.training.train import TrainConfig, train

DEFAULT_ARCH = "mobilenet_v3_small"
DEFAULT_DATASET = "fashion-mnist"
# Measured (3 epochs on 15k images, 3k test images): no random crop and lr 5e-3 gave 86.0 % top-1 against
# 82.8 % with 2-pixel random crops and lr 3e-3 -- a 5-epoch budget underfits, so augmentation costs accuracy.
DEFAULT_TRAIN = TrainConfig(epochs=5, batch_size=128, lr=5e-3, pad_crop=0, hflip=True, schedule="onecycle", seed=0)


def default_checkpoint_path(arch: str, source: DataSource) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", source.kind).strip("-")
    if source.kind == "imagefolder":
        slug += "-" + hashlib.sha1(source.name.encode()).hexdigest()[:8]
    return home() / "models" / f"{arch}_{slug}_{source.preprocess.input_size[0]}.pt"


def default_model(arch: str | None = None, dataset: str = DEFAULT_DATASET, input_size: int | None = None,
                  progress: bool = True, train: bool = True) -> LoadedModel:
    """The cached float model for (arch, dataset, input size); trained with a progress bar on first use
    (``train=False``: a one-line error instead, for processes launched together by torchrun)."""
    arch = arch or DEFAULT_ARCH
    source = open_dataset(dataset, input_size)
    if not source.has_labels:  # synthetic data: latency work only, accuracy is reported as null
        return load_model(None, arch, num_classes=1000)
    path = default_checkpoint_path(arch, source)
    if not path.exists() and not train:
        raise UserError(f"the embedded default model is not trained yet ({path}); under torchrun pass --weights, "
                        f"or run the command once without torchrun to train it")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(path.with_name(path.stem + ".lock"), progress):
            if not path.exists():  # another process may have trained it while we waited
                _train_default(arch, dataset, source, path, progress)
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


def _train_default(arch: str, dataset: str, source: DataSource, path: Path, progress: bool) -> None:
    """Train into a side file: a half-trained model never sits at the cache path, and an interrupted
    run resumes from its last complete epoch next time."""
    partial = path.with_name(path.stem + ".partial.pt")
    resume = None
    if partial.exists():
        state = read_checkpoint(partial)
        plan = {k: v for k, v in dataclasses.asdict(DEFAULT_TRAIN).items() if k != "sync_bn"}
        if all(state.get("train_config", {}).get(k) == v for k, v in plan.items()):
            resume = str(partial)  # same recipe: continue it
    if resume and int(read_checkpoint(partial).get("epoch", 0)) >= DEFAULT_TRAIN.epochs:
        os.replace(partial, path)  # finished, but stopped before the rename
        return
    if progress:
        side = source.preprocess.input_size[0]
        print(f"No weights given: {'resuming' if resume else 'training'} the default {arch} on "
              f"{source.name} at {side}x{side} ({DEFAULT_TRAIN.epochs} epochs; cached at {path})", flush=True)
    train(arch=None if resume else arch, dataset=dataset, input_size=source.preprocess.input_size[0],
          output=partial, resume=resume, config=DEFAULT_TRAIN, progress=progress)
    os.replace(partial, path)


def resolve_model(weights: str | None = None, arch: str | None = None, width_mult: float | None = None,
                  minimalistic: bool | None = None, num_classes: int | None = None,
                  dataset: str = DEFAULT_DATASET, input_size: int | None = None,
                  progress: bool = True, train_default: bool = True) -> tuple[LoadedModel, DataSource]:
    """The model a command works on and the dataset it is fed with.

    Given weights load as they are (architecture from the arguments or the checkpoint); without weights the
    embedded default is used (trained on first use unless ``train_default`` is False: processes launched together
    by torchrun cannot train it one at a time).  The input size comes from the argument, else the checkpoint,
    else the dataset.
    """
    if weights is None:
        if width_mult not in (None, 1.0) or minimalistic:
            raise UserError("the embedded default exists only for width 1.0, not minimalistic; pass --weights")
        loaded = default_model(arch, dataset, input_size, progress, train=train_default)
    else:
        loaded = load_model(weights, arch, width_mult, minimalistic, num_classes)
    size = input_size or loaded.meta.get("input_size")
    source = open_dataset(dataset, int(size) if size else None)
    if source.num_classes is not None and loaded.spec.num_classes != source.num_classes:
        raise UserError(f"the model has {loaded.spec.num_classes} classes but {source.name} has "
                        f"{source.num_classes}")
    return loaded, source
