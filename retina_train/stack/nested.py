"""Nested cross-validation of the meta-learner on the dataset's own folds.

For fold ``k`` a fresh meta-learner trains on the other folds' rows and predicts fold ``k``, so every sample gets one
meta-OOF probability from a model that never saw it. The training and scored rows of every fold are recorded and
checked disjoint, and every row is scored exactly once (:meth:`NestedCV.check`).

**Thresholds.** The F1 threshold of class ``c`` used for fold ``k`` is the F1-optimal one on the *other folds'
meta-OOF* (:func:`retina_train.stack.metrics.fold_thresholds`): on predictions of rows by meta-learners that never
trained on those rows, so they are as (un)confident as the fold-``k`` predictions the threshold is applied to, and
fold ``k``'s labels never choose it. It is the same rule as for the single backbones and their mean, and it can be
recomputed from ``meta_oof.parquet``, the labels and the folds alone. (Until issue 15 the threshold was chosen on
the fold-``k`` meta-learner's in-sample predictions of its own training rows; a boosted model is overconfident there,
so the thresholds sat too high and sensitivity collapsed.) An inner cross-validation over the training folds would
also give out-of-sample predictions, at k x (k - 1) more fits, from models trained on fewer rows than the scored
fold's; the other folds' meta-OOF costs nothing. Their models did train on fold ``k``'s rows, but fold ``k``'s labels
enter the threshold only through how those models score *other* rows, as they do for the backbones' thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from retina_train.stack import metrics


class Estimator(Protocol):
    """What :func:`nested_cv` needs of a meta-learner."""

    def fit(self, X: np.ndarray, Y: np.ndarray) -> Estimator: ...  # noqa: N803

    def predict_proba(self, X) -> np.ndarray: ...  # noqa: N803


@dataclass
class NestedCV:
    """Meta-OOF probabilities and, per fold, the rows its meta-learner trained on and the rows it scored."""

    oof: np.ndarray  # (n, classes)
    thresholds: np.ndarray  # (k, classes): fold f's threshold, F1-optimal on the other folds' meta-OOF
    train_rows: dict[int, np.ndarray]
    scored_rows: dict[int, np.ndarray]

    def check(self, n: int) -> None:
        """No row is scored by a meta-learner that trained on it; every row is scored exactly once."""
        for f, scored in self.scored_rows.items():
            leaked = np.intersect1d(self.train_rows[f], scored)
            if leaked.size:
                raise AssertionError(f"fold {f}: {leaked.size} rows scored by a meta-learner that trained on them")
        counts = np.bincount(np.concatenate(list(self.scored_rows.values())), minlength=n)
        if not (counts == 1).all():
            raise AssertionError(f"{int((counts != 1).sum())} rows scored {set(counts.tolist()) - {1}} times, not once")

    def predicted(self, folds: np.ndarray) -> np.ndarray:
        return metrics.apply_fold_thresholds(self.oof, folds, self.thresholds)


def nested_cv(
    X: np.ndarray,  # noqa: N803
    Y: np.ndarray,  # noqa: N803
    folds: np.ndarray,
    factory: Callable[[], Estimator],
    *,
    prefit: Mapping[int, Estimator] | None = None,
    progress: bool = False,
    desc: str = "meta-learner folds",
) -> NestedCV:
    """For each fold ``f``: a fresh ``factory()`` model fits the rows outside ``f`` and scores the rows of ``f``;
    then fold ``f``'s thresholds are chosen on the meta-OOF of the rows outside ``f``.

    ``prefit[f]`` is a model already fitted on exactly the rows outside ``f`` (reused, not refitted).
    """
    n, c = Y.shape
    oof = np.full((n, c), np.nan, dtype=np.float32)
    fold_ids = [int(f) for f in np.unique(folds)]
    train_rows: dict[int, np.ndarray] = {}
    scored_rows: dict[int, np.ndarray] = {}
    for f in tqdm(fold_ids, desc=desc, unit="fold", disable=not progress):
        scored = np.flatnonzero(folds == f)
        train = np.flatnonzero(folds != f)
        if np.intersect1d(train, scored).size:  # by construction impossible; kept as the recorded guarantee
            raise AssertionError(f"fold {f}: training and scored rows overlap")
        model = (prefit or {}).get(f)
        if model is None:
            model = factory().fit(X[train], Y[train])
        oof[scored] = model.predict_proba(X[scored])
        train_rows[f], scored_rows[f] = train, scored
    thresholds = metrics.fold_thresholds(Y, oof, folds, max(fold_ids) + 1)
    result = NestedCV(oof, thresholds, train_rows, scored_rows)
    result.check(n)
    return result
