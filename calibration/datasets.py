"""Datasets by name: ``fashion-mnist`` (default), ``fashion-mnist:DIR``, ``imagefolder:PATH``, ``synthetic``.

A dataset yields raw uint8 pixels and labels; its :class:`~calibration.preprocess.Preprocess` turns a batch of
pixels into model input.  Training, calibration (train split only) and evaluation (test split) share it.

A dataset's identity is what it is, not its kind: ``name`` is the spec that reopens it (``fashion-mnist`` for the
installed default, ``fashion-mnist:/resolved/dir`` or ``imagefolder:/resolved/path`` otherwise), and
``fingerprint`` a cheap digest of its files (the idx files' sizes, mtimes and headers; an image folder's file
list with sizes and mtimes).  Caches, checkpoints and reports are keyed by both.
"""
from __future__ import annotations

import gzip
import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from calibration.imagefolder import open_imagefolder
from calibration.preprocess import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess
from calibration.source import SPLITS, DataSource, file_fingerprint
from compress.errors import UserError

__all__ = ["open_dataset", "DataSource", "SPLITS", "load_fashion_mnist", "FASHION_MNIST_DIR", "FASHION_MNIST_ENV",
           "FASHION_MNIST_CLASSES", "DEFAULT_INPUT_SIZE"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "MNV3_COMPRESS_FASHION_MNIST"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
DEFAULT_INPUT_SIZE = {"fashion-mnist": 32, "imagefolder": 224, "synthetic": 224}
SYNTHETIC_SIZE = {"train": 256, "test": 256}


# -- Fashion-MNIST ------------------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an idx uint8 file")
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise UserError(f"cannot read Fashion-MNIST file {path}: {e}") from None


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(f"Fashion-MNIST file {stem}[.gz] not found in {root} (install it with "
                    f"'apt-get install -y dataset-fashion-mnist' or set {FASHION_MNIST_ENV})")


@lru_cache(maxsize=4)
def load_fashion_mnist(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    r = Path(root)
    images = _read_idx(_find_idx(r, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(r, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise UserError(f"Fashion-MNIST files in {root} are inconsistent")
    return images, labels


class ArrayDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


# -- synthetic ----------------------------------------------------------------------------------------

def _synthetic(input_size: int) -> DataSource:
    def make(split: str) -> ArrayDataset:
        rng = np.random.default_rng(0 if split == "train" else 1)
        n = SYNTHETIC_SIZE[split]
        return ArrayDataset(rng.integers(0, 256, size=(n, input_size, input_size, 3), dtype=np.uint8),
                            np.full(n, -1, dtype=np.int64))

    pre = Preprocess((input_size, input_size), IMAGENET_MEAN, IMAGENET_STD)
    return DataSource("synthetic", "synthetic", pre, None, None,
                      {"train": lambda: make("train"), "test": lambda: make("test")}, lambda: "synthetic-seed0-1")


def open_dataset(name: str = "fashion-mnist", input_size: int | None = None, workers: int | None = None
                 ) -> DataSource:
    """Open a dataset by its CLI name.  ``fashion-mnist:PATH`` reads the idx files from PATH.  ``workers``:
    DataLoader processes that decode and preprocess (default: 0 for the in-memory datasets; for image folders
    one per core, at most 8)."""
    return _open(name, input_size).with_workers(workers)


def _open(name: str, input_size: int | None) -> DataSource:
    kind, _, arg = name.partition(":")
    if kind not in DEFAULT_INPUT_SIZE:
        raise UserError(f"unknown dataset {name!r}; use fashion-mnist, imagefolder:PATH or synthetic")
    size = int(input_size or DEFAULT_INPUT_SIZE[kind])
    if size < 8:
        raise UserError(f"input size must be at least 8, got {size}")
    if kind == "imagefolder":
        if not arg:
            raise UserError("imagefolder needs a path: --dataset imagefolder:PATH")
        return open_imagefolder(arg, size)
    if kind == "synthetic":
        return _synthetic(size)
    return _fashion_mnist(arg or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR, size)


def _fashion_mnist(root: str, size: int) -> DataSource:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"Fashion-MNIST not found at {path} (install it with 'apt-get install -y "
                        f"dataset-fashion-mnist' or set {FASHION_MNIST_ENV})")
    path = path.resolve()
    default = path == Path(FASHION_MNIST_DIR).resolve()
    pre = Preprocess((size, size), FASHION_MNIST_MEAN, FASHION_MNIST_STD, grayscale_to_rgb=True,
                     interpolation="bilinear", resize=None)

    def split(s: str) -> ArrayDataset:
        return ArrayDataset(*load_fashion_mnist(str(path), s))

    def fingerprint() -> str:
        stems = [f"{p}-{k}-idx{d}-ubyte" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
        return file_fingerprint([_find_idx(path, s) for s in stems], head_bytes=32)

    return DataSource("fashion-mnist" if default else f"fashion-mnist:{path}", "fashion-mnist", pre, 10,
                      FASHION_MNIST_CLASSES, {"train": lambda: split("train"), "test": lambda: split("test")},
                      fingerprint)
