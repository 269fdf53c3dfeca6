"""Folds: every class's positives spread evenly over the folds; groups stay whole; the same seed, the same folds."""

from __future__ import annotations

import numpy as np
import pytest

from retina_io.folds import assign_folds, shuffle_within_folds

PREVALENCE = np.array([0.25, 0.08, 0.03, 0.02, 0.05, 0.06, 0.04, 0.10, 0.08, 0.06, 0.03])


def _labels(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, len(PREVALENCE))) < PREVALENCE).astype(np.uint8)


def test_stratified_positives_per_fold():
    y = _labels(5000)
    folds = assign_folds(y, k=5, seed=0)
    assert set(np.unique(folds)) == set(range(5))
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 2
    for c in range(y.shape[1]):
        per_fold = np.array([y[folds == f, c].sum() for f in range(5)])
        expected = y[:, c].sum() / 5
        assert np.abs(per_fold - expected).max() <= max(1.0, 0.05 * expected), (c, per_fold, expected)


def test_better_than_random_split():
    y = _labels(2000, seed=1)
    folds = assign_folds(y, k=5, seed=0)
    rand = np.random.default_rng(0).permutation(np.arange(2000) % 5)

    def spread(f):
        return sum(np.ptp([y[f == k, c].sum() for k in range(5)]) for c in range(y.shape[1]))

    assert spread(folds) < spread(rand) / 3


def test_deterministic_and_seed_dependent():
    y = _labels(1000)
    assert np.array_equal(assign_folds(y, k=5, seed=3), assign_folds(y, k=5, seed=3))
    assert not np.array_equal(assign_folds(y, k=5, seed=3), assign_folds(y, k=5, seed=4))


def test_groups_stay_in_one_fold_and_stay_stratified():
    rng = np.random.default_rng(2)
    patients = np.repeat(np.arange(600), 2)  # two eyes per patient
    y = _labels(1200, seed=2)
    y[1::2] = np.where(rng.random(y[1::2].shape) < 0.7, y[0::2], y[1::2])  # eyes of one patient correlate
    folds = assign_folds(y, k=5, seed=0, groups=patients)
    assert (folds[0::2] == folds[1::2]).all()
    group_y = np.maximum(y[0::2], y[1::2])
    gf = folds[0::2]
    for c in range(y.shape[1]):
        per_fold = np.array([group_y[gf == f, c].sum() for f in range(5)])
        assert np.ptp(per_fold) <= max(2, 0.1 * group_y[:, c].sum() / 5), (c, per_fold)


def test_too_few_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot split 3 samples into 5 folds"):
        assign_folds(_labels(3), k=5, seed=0)


def test_shuffle_within_folds_is_a_permutation():
    folds = assign_folds(_labels(500), k=5, seed=0)
    order = shuffle_within_folds(folds, seed=0)
    for f, idx in enumerate(order):
        assert sorted(idx.tolist()) == np.flatnonzero(folds == f).tolist()
        assert idx.tolist() != sorted(idx.tolist())
