"""Scores and bootstrap intervals of retina_train.stack.metrics against scikit-learn on fixed inputs."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import average_precision_score, f1_score, recall_score, roc_auc_score

from retina_train.stack import metrics
from retina_train.stack.metrics import MACRO, MICRO, SAMPLES, Scored


def _data(n: int, c: int = 3, seed: int = 0, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(np.uint8)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).astype(np.float32)
    if ties:
        p = np.round(p, 1)
    return y, p


@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_ap_equal_sklearn(ties):
    y, p = _data(3000, ties=ties)
    for j in range(y.shape[1]):
        assert metrics.roc_auc(y[:, j], p[:, j]) == pytest.approx(roc_auc_score(y[:, j], p[:, j]), abs=1e-9)
        assert metrics.average_precision(y[:, j], p[:, j]) == pytest.approx(
            average_precision_score(y[:, j], p[:, j]), abs=1e-9
        )


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_scores_equal_sklearn_with_sample_weight(ties):
    y, p = _data(800, ties=ties)
    rng = np.random.default_rng(1)
    w = metrics.bootstrap_weights(len(y), 4, rng)
    assert w.shape == (4, 800) and (w.sum(axis=1) == 800).all()
    auc = metrics.roc_auc(y[:, 0], p[:, 0], w)
    ap = metrics.average_precision(y[:, 0], p[:, 0], w)
    for b in range(4):  # several weight rows are computed in float32 (bootstrap precision)
        assert auc[b] == pytest.approx(roc_auc_score(y[:, 0], p[:, 0], sample_weight=w[b]), abs=1e-6)
        assert ap[b] == pytest.approx(average_precision_score(y[:, 0], p[:, 0], sample_weight=w[b]), abs=1e-6)


def test_point_scores_equal_sklearn():
    y, p = _data(2000, c=4)
    tuned = (p >= 0.42).astype(np.uint8)
    table = metrics.score_table(y, {"m": Scored(p, tuned)}, ["A", "B", "C", "D"], n_bootstrap=0)
    look = {(r["class"], r["metric"]): r["value"] for r in table.iter_rows(named=True)}
    for j, c in enumerate("ABCD"):
        assert look[(c, "auc")] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
        assert look[(c, "ap")] == pytest.approx(average_precision_score(y[:, j], p[:, j]))
        assert look[(c, "f1_05")] == pytest.approx(f1_score(y[:, j], p[:, j] >= 0.5))
        assert look[(c, "f1")] == pytest.approx(f1_score(y[:, j], tuned[:, j]))
        assert look[(c, "sensitivity")] == pytest.approx(recall_score(y[:, j], tuned[:, j]))
        assert look[(c, "specificity")] == pytest.approx(recall_score(1 - y[:, j], 1 - tuned[:, j]))
    for m in metrics.METRICS:
        assert look[(MACRO, m)] == pytest.approx(np.mean([look[(c, m)] for c in "ABCD"]))
    for m, yhat in (("f1_05", p >= 0.5), ("f1", tuned)):
        assert look[(MACRO, m)] == pytest.approx(f1_score(y, yhat, average="macro"))
        assert look[(MICRO, m)] == pytest.approx(f1_score(y, yhat, average="micro"))
        assert look[(SAMPLES, m)] == pytest.approx(f1_score(y, yhat, average="samples", zero_division=1))
    assert abs(look[(SAMPLES, "f1")] - look[(MICRO, "f1")]) > 0.05  # not the same number under another name
    assert not table.filter(pl.col("class").is_in([MICRO, SAMPLES]) & ~pl.col("metric").is_in(["f1", "f1_05"])).height
    assert table.filter(pl.col("lo").is_not_null()).height == 0


def test_sample_f1_counts_a_sample_with_no_label_and_no_prediction_as_right():
    y = np.array([[0, 0], [1, 0], [0, 1], [0, 0]], dtype=np.uint8)
    yhat = np.array([[0, 0], [1, 1], [0, 0], [1, 0]], dtype=np.uint8)
    assert metrics.sample_f1(y, yhat).tolist() == pytest.approx([1.0, 2 / 3, 0.0, 0.0])
    p = yhat.astype(np.float32)
    table = metrics.score_table(y, {"m": Scored(p, yhat)}, ["A", "B"], n_bootstrap=0)
    value = table.filter((pl.col("class") == SAMPLES) & (pl.col("metric") == "f1"))["value"].item()
    assert value == pytest.approx(5 / 12)


@pytest.mark.parametrize("average", [MICRO, SAMPLES])
def test_bootstrap_f1_averages_equal_sklearn_with_sample_weight(average):
    y, p = _data(700, c=4)
    yhat = (p >= 0.45).astype(np.uint8)
    cells = metrics._confusion_cells(y, [p >= 0.5, yhat])
    per_sample = np.stack([metrics.sample_f1(y, p >= 0.5), metrics.sample_f1(y, yhat)], axis=1)
    ranked = [metrics._Ranked.of(y[:, j], p[:, j]) for j in range(4)]
    w = metrics.bootstrap_weights(len(y), 5, np.random.default_rng(2))
    scores = metrics._all_scores(w, ranked, cells, per_sample)
    extra = {"zero_division": 1} if average == SAMPLES else {}
    for b in range(5):
        for m, pred in (("f1_05", p >= 0.5), ("f1", yhat)):
            want = f1_score(y, pred, average=average, sample_weight=w[b], **extra)
            assert scores[(average, m)][b] == pytest.approx(want, abs=1e-6)


def test_best_f1_threshold_is_the_brute_force_optimum():
    y, p = _data(600, c=1, ties=True)
    y, p = y[:, 0], p[:, 0]
    t = metrics.best_f1_threshold(y, p)
    best = max(f1_score(y, p >= s) for s in np.unique(p))
    assert f1_score(y, p >= t) == pytest.approx(best)
    assert metrics.best_f1_threshold(np.zeros(5), np.linspace(0, 1, 5)) == 0.5


def test_fold_thresholds_ignore_the_scored_folds_labels():
    y, p = _data(1000, c=2)
    folds = np.arange(1000) % 4
    thr = metrics.fold_thresholds(y, p, folds, 4)
    y2 = y.copy()
    y2[folds == 0] = 1 - y2[folds == 0]  # fold 0's labels change completely
    thr2 = metrics.fold_thresholds(y2, p, folds, 4)
    assert np.array_equal(thr[0], thr2[0])
    assert not np.array_equal(thr[1:], thr2[1:])
    for f in range(4):
        assert thr[f, 0] == metrics.best_f1_threshold(y[folds != f, 0], p[folds != f, 0])
    pred = metrics.apply_fold_thresholds(p, folds, thr)
    assert np.array_equal(pred[folds == 2], (p[folds == 2] >= thr[2]).astype(np.uint8))


def _ci(n: int, seed: int = 0) -> pl.DataFrame:
    y, p = _data(n, seed=seed)
    return metrics.score_table(y, {"m": Scored(p, (p >= 0.5).astype(np.uint8))}, ["A", "B", "C"], n_bootstrap=200)


def test_intervals_contain_the_estimate_and_shrink_with_more_data():
    small, large = _ci(400), _ci(6400)
    for t in (small, large):
        assert t.filter((pl.col("lo") > pl.col("value") + 1e-12) | (pl.col("hi") < pl.col("value") - 1e-12)).height == 0
    width = {
        name: t.filter(pl.col("class") == MACRO).select((pl.col("hi") - pl.col("lo")).alias("w"))["w"].to_numpy()
        for name, t in (("small", small), ("large", large))
    }
    assert (width["large"] < 0.5 * width["small"]).all()  # about 1/sqrt(16) = 1/4
    assert _ci(400).equals(small)  # seeded


def test_bootstrap_is_paired_across_rows():
    """Two identical rows get identical intervals: every row sees the same resamples."""
    y, p = _data(500)
    s = Scored(p, (p >= 0.5).astype(np.uint8))
    t = metrics.score_table(y, {"x": s, "y": s}, ["A", "B", "C"], n_bootstrap=50)
    a = t.filter(pl.col("model") == "x").drop("model")
    b = t.filter(pl.col("model") == "y").drop("model")
    assert a.equals(b)


@pytest.mark.slow
def test_bootstrap_speed_100k_rows_11_classes_200_resamples():
    y, p = _data(100_000, c=11)
    t0 = time.perf_counter()
    metrics.score_table(y, {"m": Scored(p, (p >= 0.5).astype(np.uint8))}, list("ABCDEFGHIJK"), n_bootstrap=200)
    assert time.perf_counter() - t0 < 10
