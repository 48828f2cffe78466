"""The calibration reader: a deterministic subset of the TRAIN split, never the test split."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibration.datasets import open_dataset  # noqa: E402
from calibration.reader import TrainSplitReader  # noqa: E402
from calibration.subsets import calibration_indices  # noqa: E402


def test_reader_feeds_the_chosen_train_images_and_never_the_test_split():
    source = open_dataset("fashion-mnist", 32)

    def no_test_split():
        raise AssertionError("calibration read the test split")

    source._splits["test"] = no_test_split
    reader = TrainSplitReader(source, size=70, batch_size=32, seed=0)
    batches = []
    while (item := reader.get_next()) is not None:
        batches.append(item["input"])
    assert [len(b) for b in batches] == [32, 32, 6] and len(reader) == 3
    assert all(b.dtype == np.float32 and b.shape[1:] == (3, 32, 32) for b in batches)
    # exactly the preprocessed train images at the calibration indices
    idx = calibration_indices(60000, 70, seed=0)
    train = source.split("train")
    expected = source.preprocess(torch.stack([train[int(i)][0] for i in idx[:32]])).numpy()
    np.testing.assert_array_equal(batches[0], expected)
    # rewind replays the same data (several calibration methods share one reader)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["input"], batches[0])
    d = reader.describe()
    assert d["split"] == "train" and d["images"] == 70 and d["seed"] == 0
