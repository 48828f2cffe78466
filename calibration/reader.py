"""Calibration data for onnxruntime's static quantization: a deterministic subset of the TRAIN split.

The test split is never read here: it measures the result, so it must not shape the quantization ranges.
The images are :func:`calibration.subsets.calibration_indices` (seeded: the same images on every run and
machine); tuning and mixed precision measure on train images disjoint from them
(:class:`calibration.subsets.Holdout`).
"""
from __future__ import annotations

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from calibration.datasets import DataSource
from calibration.subsets import CALIBRATION_SPLIT, calibration_indices, train_batches

__all__ = ["TrainSplitReader"]


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
