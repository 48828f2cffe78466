"""``imagefolder:PATH``: your own images, ``PATH/train/CLASS/*`` + ``PATH/val/CLASS/*`` (ImageNet's layout), or one
folder of class folders where every 10th image (in sorted order) is held out as the test split.

Class index = position of the folder name in sorted order (torchvision's rule).  Image files are recognised by
extension in any case (ImageNet's are ``.JPEG``); other files are ignored.  Every image is decoded with Pillow
and converted to RGB (grayscale, RGBA, CMYK, palette), in DataLoader worker processes (``--workers``, default one
per core up to 8).  A class folder without images, a split without images, and an image that cannot be decoded
(named in the error) are one-line errors.  Preprocessing is ImageNet's: resize the shorter side to
``input / 0.875`` (256 for 224), center crop, ImageNet mean / std.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from calibration.preprocess import imagenet_preprocess
from calibration.source import DataSource, file_fingerprint
from compress.errors import UserError

__all__ = ["open_imagefolder", "ImageFolderDataset", "IMAGE_EXTENSIONS", "default_workers"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def default_workers() -> int:
    """DataLoader processes for decoding images: one per usable core, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class ImageFolderDataset(Dataset):
    """Pillow-decoded RGB images as uint8 ``[H, W, 3]`` tensors, with their class index."""

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
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot decode image {path}: {first}") from None
        return torch.from_numpy(arr.copy()), label


def _scan_classes(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[Path]]:
    """(class names, (image, class) samples, every image path) of ``root/CLASS/...``."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders (expected ROOT/CLASS/IMAGE)")
    samples: list[tuple[Path, int]] = []
    for idx, c in enumerate(classes):
        found = 0
        for dirpath, dirs, files in os.walk(root / c, followlinks=True):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    samples.append((Path(dirpath) / f, idx))
                    found += 1
        if not found:
            raise UserError(f"class folder {root / c} has no images ({', '.join(IMAGE_EXTENSIONS)}, any case); "
                            f"remove it or add images")
    return classes, samples, [p for p, _ in samples]


def open_imagefolder(path: str, input_size: int) -> DataSource:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    root = root.resolve()
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, train, files = _scan_classes(root / "train")
        val_classes, test, val_files = _scan_classes(root / "val")
        if val_classes != classes:
            raise UserError(f"{root}/train and {root}/val have different class folders")
        files = files + val_files
    else:
        classes, samples, files = _scan_classes(root)
        test = samples[::10]
        train = [s for i, s in enumerate(samples) if i % 10]
        if not train:
            raise UserError(f"image folder {root} has {len(samples)} image(s): too few to hold out every 10th "
                            f"as the test split and train on the rest (or use {root}/train + {root}/val)")
    pre = imagenet_preprocess(input_size)
    rel = [p.relative_to(root) for p in files]
    return DataSource(f"imagefolder:{root}", "imagefolder", pre, len(classes), classes,
                      {"train": lambda: ImageFolderDataset(train), "test": lambda: ImageFolderDataset(test)},
                      lambda: _tree_fingerprint(root, rel), default_workers())


def _tree_fingerprint(root: Path, rel: list[Path]) -> str:
    """The file list (relative paths), each file's size and mtime: cheap, and changes when the data does."""
    import hashlib

    h = hashlib.sha1()
    for r in rel:
        h.update(str(r).encode())
    h.update(file_fingerprint([root / r for r in rel]).encode())
    return h.hexdigest()[:12]
