"""Deterministic subsets of a dataset's TRAIN split: calibration images, holdouts, fine-tune pools.

Everything is cut from ONE seeded permutation (:func:`partition`), so the pieces a run uses are disjoint and
the same on every run and machine: calibration takes the first ``calib`` images of the permutation, a tuning /
mixed-precision holdout the next ones (:func:`holdout_indices`), and NetAdapt its own holdout plus the rest as
its fine-tune pool.  The test split is never read here: it measures results.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from compress.errors import UserError

__all__ = ["CALIBRATION_SPLIT", "partition", "calibration_indices", "holdout_indices", "train_batches", "Holdout"]

CALIBRATION_SPLIT = "train"
_CACHE_LIMIT_BYTES = 512 << 20


def partition(n: int, sizes: Sequence[int | None], seed: int = 0, sort: bool = True) -> list[np.ndarray]:
    """Consecutive pieces of one ``seed``-ed permutation of ``range(n)``, of the given sizes (``None``: all the
    rest).  ``sort`` returns each piece in index order (reads stay sequential); otherwise in permutation order."""
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for size in sizes:
        stop = n if size is None else start + int(size)
        if stop > n:
            raise ValueError(f"pieces of {list(sizes)} exceed the {n} items")
        piece = perm[start:stop]
        out.append(np.sort(piece) if sort else piece)
        start = stop
    return out


def calibration_indices(n_train: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` distinct train indices, drawn by ``seed`` and sorted: the calibration images."""
    if size < 1:
        raise UserError(f"calibration size must be at least 1, got {size}")
    if size > n_train:
        raise UserError(f"calibration size {size} exceeds the {n_train} images of the train split "
                        f"(use --calibration-size {n_train} or less)")
    return partition(n_train, [size], seed)[0]


def holdout_indices(n_train: int, calib_size: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` train indices disjoint from :func:`calibration_indices` (same ``seed``): a validation set."""
    if calib_size + size > n_train:
        raise UserError(f"tuning needs {size} train images besides the {calib_size} calibration images, "
                        f"but the train split has only {n_train}")
    return partition(n_train, [calib_size, size], seed)[1]


def train_batches(source, indices: Sequence[int], batch_size: int, split: str = CALIBRATION_SPLIT
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Preprocessed ``(inputs [N,3,H,W] float32, labels [N])`` numpy batches of the given images of ``split``."""
    import torch

    ds = torch.utils.data.Subset(source.split(split), [int(i) for i in indices])
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=source.collate,
                                         num_workers=0)
    for x, y in loader:
        yield x.numpy(), y.numpy()


class Holdout:
    """Train-split images disjoint from calibration, preprocessed once (when they fit in 512 MB) and replayed:
    what tuning and mixed precision measure candidates on, never the test split."""

    def __init__(self, source, calib_size: int, size: int, seed: int = 0, batch_size: int = 250) -> None:
        self.indices = holdout_indices(len(source.split(CALIBRATION_SPLIT)), calib_size, size, seed)
        self.source = source
        self.batch_size = batch_size
        h, w = source.preprocess.input_size
        cached = size * 3 * h * w * 4 <= _CACHE_LIMIT_BYTES
        self._batches = list(self._load()) if cached else None

    def _load(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return train_batches(self.source, self.indices, self.batch_size)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return iter(self._batches) if self._batches is not None else self._load()

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.source.name, "split": CALIBRATION_SPLIT, "images": int(len(self.indices)),
                "disjoint_from_calibration": True}
