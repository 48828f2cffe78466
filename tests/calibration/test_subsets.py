"""Train-split subsets: one seeded permutation cut into disjoint pieces (calibration, holdouts, pools)."""
from __future__ import annotations

import numpy as np
import pytest

from calibration.subsets import calibration_indices, holdout_indices, partition
from compress.errors import UserError


def test_indices_are_deterministic_distinct_and_sorted():
    a = calibration_indices(60000, 500, seed=0)
    assert np.array_equal(a, calibration_indices(60000, 500, seed=0))
    assert len(np.unique(a)) == 500 and np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < 60000
    assert not np.array_equal(a, calibration_indices(60000, 500, seed=1))
    assert a.max() > 30000  # spread over the split, not its first images
    with pytest.raises(UserError, match="exceeds"):
        calibration_indices(100, 101)
    with pytest.raises(UserError):
        calibration_indices(100, 0)


def test_holdout_is_disjoint_from_calibration():
    cal = calibration_indices(60000, 512, seed=3)
    hold = holdout_indices(60000, 512, 2000, seed=3)
    assert len(hold) == 2000 and not set(cal) & set(hold)
    with pytest.raises(UserError, match="train images besides"):
        holdout_indices(1000, 512, 600)


def test_partition_cuts_one_permutation_into_disjoint_pieces():
    a, b, rest = partition(100, [10, 20, None], seed=5, sort=False)
    assert (len(a), len(b), len(rest)) == (10, 20, 70)
    assert sorted(np.concatenate([a, b, rest]).tolist()) == list(range(100))
    # the same permutation with sort=True: the same sets, in index order
    sa, sb, _ = partition(100, [10, 20, None], seed=5)
    assert set(sa) == set(a) and set(sb) == set(b) and np.all(np.diff(sb) > 0)
    # calibration is the first piece, a holdout the second: the helpers are views of one partition
    assert np.array_equal(calibration_indices(100, 10, seed=5), sa)
    assert np.array_equal(holdout_indices(100, 10, 20, seed=5), sb)
    with pytest.raises(ValueError, match="exceed"):
        partition(10, [6, 6])
