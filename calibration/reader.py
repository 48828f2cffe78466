"""Calibration data for onnxruntime's static quantization: a deterministic subset of the TRAIN split.

The test split is never read here: it measures the result, so it must not shape the quantization ranges.
:func:`calibration_indices` draws ``size`` distinct train images with a seeded generator (the same images on
every run and machine); :func:`holdout_indices` gives train images disjoint from them, which the tuning loop
uses to measure accuracy without touching the test split.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader

from calibration.datasets import DataSource
from compress.errors import UserError

__all__ = ["TrainSplitReader", "calibration_indices", "holdout_indices", "CALIBRATION_SPLIT"]

CALIBRATION_SPLIT = "train"


def calibration_indices(n_train: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` distinct indices into the train split, drawn by ``seed`` and sorted (reads stay sequential)."""
    if size < 1:
        raise UserError(f"calibration size must be at least 1, got {size}")
    if size > n_train:
        raise UserError(f"calibration size {size} exceeds the {n_train} images of the train split "
                        f"(use --calibration-size {n_train} or less)")
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_train)[:size])


def holdout_indices(n_train: int, calib_size: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` train indices disjoint from :func:`calibration_indices` (same ``seed``): tuning's validation set."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_train)
    rest = perm[calib_size:]
    if size > len(rest):
        raise UserError(f"tuning needs {size} train images besides the {calib_size} calibration images, "
                        f"but the train split has only {n_train}")
    return np.sort(rest[:size])


def train_batches(source: DataSource, indices: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Preprocessed ``(inputs [N,3,H,W] float32, labels [N])`` batches of the given train images."""
    ds = torch.utils.data.Subset(source.split(CALIBRATION_SPLIT), [int(i) for i in indices])
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=source._collate,
                                         num_workers=0)
    for x, y in loader:
        yield x.numpy(), y.numpy()


class TrainSplitReader(CalibrationDataReader):
    """ORT ``CalibrationDataReader`` over ``size`` images of ``source``'s train split.

    Batches are preprocessed once (calibration at 32x32 is a few MB; at 224x224, 512 images are ~300 MB) and
    replayed by :meth:`rewind`, so several calibration methods can share one reader.
    """

    def __init__(self, source: DataSource, size: int, batch_size: int = 32, seed: int = 0,
                 input_name: str = "input", progress: bool = False) -> None:
        n_train = len(source.split(CALIBRATION_SPLIT))
        self.indices = calibration_indices(n_train, size, seed)
        self.source_name = source.name
        self.input_name = input_name
        self.batch_size = batch_size
        self.seed = seed
        batches = train_batches(source, self.indices, batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=-(-size // batch_size), desc="calibration data", unit="batch",
                           leave=False)
        self._batches = [x for x, _ in batches]
        self._pos = 0

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def num_images(self) -> int:
        return int(sum(len(b) for b in self._batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._batches):
            return None
        x = self._batches[self._pos]
        self._pos += 1
        return {self.input_name: x}

    def rewind(self) -> None:
        self._pos = 0

    def describe(self) -> dict:
        """What the report records about the calibration data."""
        return {"dataset": self.source_name, "split": CALIBRATION_SPLIT, "images": self.num_images,
                "batch_size": self.batch_size, "seed": self.seed}
