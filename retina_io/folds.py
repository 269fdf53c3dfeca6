"""Fold assignment: multilabel-stratified k folds (iterative stratification), seeded, optionally group-aware."""

from __future__ import annotations

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold


def assign_folds(
    labels: np.ndarray,
    *,
    k: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Assign each sample a fold in ``0..k-1`` so that every class's positives spread evenly over the folds.

    ``labels`` is an ``(n, C)`` 0/1 matrix (unknown labels as 0). With ``groups`` (one value per sample, e.g. the
    patient), labels are aggregated per group (a group is positive for a class when any of its images is) and whole
    groups are assigned, so every image of one group lands in one fold. Uses iterative-stratification's
    ``MultilabelStratifiedKFold(shuffle=True, random_state=seed)``; the same inputs give the same folds.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be an (n, classes) matrix; got shape {labels.shape}")
    n = labels.shape[0]
    if k < 2:
        raise ValueError(f"--folds must be at least 2; got {k}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"groups must have one value per sample ({n}); got shape {groups.shape}")
        uniq, inverse = np.unique(groups, return_inverse=True)
        group_labels = np.zeros((len(uniq), labels.shape[1]), dtype=np.uint8)
        np.maximum.at(group_labels, inverse, labels.astype(np.uint8))
        return _stratify(group_labels, k=k, seed=seed, what="groups")[inverse]
    return _stratify(labels, k=k, seed=seed, what="samples")


def _stratify(y: np.ndarray, *, k: int, seed: int, what: str) -> np.ndarray:
    n = y.shape[0]
    if n < k:
        raise ValueError(f"cannot split {n} {what} into {k} folds; pack more data or use fewer --folds")
    folds = np.full(n, -1, dtype=np.int64)
    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros((n, 1)), y.astype(np.int64))):
        folds[test] = fold
    assert (folds >= 0).all(), "every sample gets exactly one fold"
    return folds


def shuffle_within_folds(folds: np.ndarray, *, seed: int) -> list[np.ndarray]:
    """Per fold, the sample indices in a seeded random order (a global shuffle: DALI shuffles only in a buffer)."""
    out = []
    for fold in range(int(folds.max()) + 1):
        idx = np.flatnonzero(folds == fold)
        out.append(idx[np.random.default_rng([seed, fold]).permutation(len(idx))])
    return out
