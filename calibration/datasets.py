"""Datasets by name: ``fashion-mnist`` (default), ``imagefolder:PATH``, ``synthetic``.

A dataset yields raw uint8 pixels and labels; its :class:`~calibration.preprocess.Preprocess` turns a batch of
pixels into model input.  Training, calibration (train split only) and evaluation (test split) share it.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from calibration.preprocess import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess
from compress.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "MNV3_COMPRESS_FASHION_MNIST"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_INPUT_SIZE = {"fashion-mnist": 32, "imagefolder": 224, "synthetic": 224}
SYNTHETIC_SIZE = {"train": 256, "test": 256}
SPLITS = ("train", "test")


@dataclass
class DataSource:
    """A named dataset at one input size: splits of raw pixels plus the one preprocessing that feeds the model."""

    name: str
    kind: str  # "fashion-mnist" | "imagefolder" | "synthetic"
    preprocess: Preprocess
    num_classes: int | None
    class_names: Sequence[str] | None
    _splits: dict

    @property
    def has_labels(self) -> bool:
        return self.kind != "synthetic"

    def split(self, which: str, limit: int | None = None) -> Dataset:
        if which not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        ds = self._splits[which]()
        if limit is not None and limit < len(ds):
            ds = torch.utils.data.Subset(ds, range(limit))
        return ds

    def loader(self, which: str, batch_size: int = 256, shuffle: bool = False, limit: int | None = None,
               seed: int = 0, drop_last: bool = False, sampler=None) -> DataLoader:
        """Batches of ``(input float32 [N,3,H,W], labels int64 [N])``; labels are -1 on synthetic data."""
        ds = self.split(which, limit)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                          generator=gen, drop_last=drop_last, collate_fn=self.collate, num_workers=0)

    def collate(self, items):
        """Raw ``(pixels, label)`` items -> one preprocessed batch ``(input [N,3,H,W], labels [N])``."""
        pixels = [it[0] for it in items]
        labels = torch.tensor([int(it[1]) for it in items], dtype=torch.int64)
        if all(p.shape == pixels[0].shape for p in pixels):
            x = self.preprocess(torch.stack(pixels))
        else:  # imagefolder: every image has its own size
            x = torch.cat([self.preprocess(p.unsqueeze(0)) for p in pixels])
        return x, labels

    def resplit(self, train: Sequence[int], test: Sequence[int], of: str = "train") -> "DataSource":
        """This dataset with its "train" and "test" splits replaced by the given images of split ``of``
        (NetAdapt fine-tunes on one part of the train split and scores on another)."""
        base = self._splits[of]
        train, test = [int(i) for i in train], [int(i) for i in test]
        return dataclasses.replace(self, _splits={"train": lambda: torch.utils.data.Subset(base(), train),
                                                  "test": lambda: torch.utils.data.Subset(base(), test)})

    def numpy_batches(self, which: str, batch_size: int = 64, limit: int | None = None
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for x, y in self.loader(which, batch_size=batch_size, limit=limit):
            yield x.numpy(), y.numpy()


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


# -- ImageFolder --------------------------------------------------------------------------------------

class ImageFolderDataset(Dataset):
    """Pillow-decoded RGB images; class index = position of the folder name in sorted order (torchvision's rule)."""

    def __init__(self, samples: list[tuple[Path, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"cannot decode image {path}: {e}") from None
        return torch.from_numpy(arr.copy()), label


def _scan_classes(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders (expected ROOT/CLASS/IMAGE)")
    samples = []
    for idx, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / c, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((Path(dirpath) / f, idx))
    if not samples:
        raise UserError(f"image folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


def _imagefolder(path: str, input_size: int) -> DataSource:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train = _scan_classes(root / "train")
        val_classes, test = _scan_classes(root / "val")
        if val_classes != classes:
            raise UserError(f"{root}/train and {root}/val have different class folders")
    else:
        # a flat class folder: every 10th image (in sorted order) is held out as the test split
        classes, samples = _scan_classes(root)
        test = samples[::10]
        train = [s for i, s in enumerate(samples) if i % 10] or test
    pre = Preprocess((input_size, input_size), IMAGENET_MEAN, IMAGENET_STD, grayscale_to_rgb=False,
                     interpolation="bilinear", resize=int(round(input_size / 0.875)))
    return DataSource(f"imagefolder:{root}", "imagefolder", pre, len(classes), classes,
                      {"train": lambda: ImageFolderDataset(train), "test": lambda: ImageFolderDataset(test)})


# -- synthetic ----------------------------------------------------------------------------------------

def _synthetic(input_size: int) -> DataSource:
    def make(split: str) -> ArrayDataset:
        rng = np.random.default_rng(0 if split == "train" else 1)
        n = SYNTHETIC_SIZE[split]
        return ArrayDataset(rng.integers(0, 256, size=(n, input_size, input_size, 3), dtype=np.uint8),
                            np.full(n, -1, dtype=np.int64))

    pre = Preprocess((input_size, input_size), IMAGENET_MEAN, IMAGENET_STD)
    return DataSource("synthetic", "synthetic", pre, None, None,
                      {"train": lambda: make("train"), "test": lambda: make("test")})


def open_dataset(name: str = "fashion-mnist", input_size: int | None = None) -> DataSource:
    """Open a dataset by its CLI name.  ``fashion-mnist:PATH`` reads the idx files from PATH."""
    kind, _, arg = name.partition(":")
    if kind not in DEFAULT_INPUT_SIZE:
        raise UserError(f"unknown dataset {name!r}; use fashion-mnist, imagefolder:PATH or synthetic")
    size = int(input_size or DEFAULT_INPUT_SIZE[kind])
    if size < 8:
        raise UserError(f"input size must be at least 8, got {size}")
    if kind == "imagefolder":
        if not arg:
            raise UserError("imagefolder needs a path: --dataset imagefolder:PATH")
        return _imagefolder(arg, size)
    if kind == "synthetic":
        return _synthetic(size)
    root = arg or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR
    if not Path(root).is_dir():
        raise UserError(f"Fashion-MNIST not found at {root} (install it with 'apt-get install -y "
                        f"dataset-fashion-mnist' or set {FASHION_MNIST_ENV})")
    pre = Preprocess((size, size), FASHION_MNIST_MEAN, FASHION_MNIST_STD, grayscale_to_rgb=True,
                     interpolation="bilinear", resize=None)

    def split(s: str) -> ArrayDataset:
        return ArrayDataset(*load_fashion_mnist(str(root), s))

    return DataSource("fashion-mnist", "fashion-mnist", pre, 10, FASHION_MNIST_CLASSES,
                      {"train": lambda: split("train"), "test": lambda: split("test")})
