"""Binary scores per class with paired bootstrap confidence intervals, and F1-optimal thresholds.

Every score here is computed from sample *weights*: the point estimate uses weight 1 for every sample, a bootstrap
resample uses the number of times each sample was drawn (``np.bincount`` of ``n`` draws with replacement). That
makes the bootstrap vectorised: one ``(resamples, n)`` weight matrix scores every class of every row (backbone,
mean, meta-learner) at once, and the resamples are paired across rows and classes, so a macro score's interval comes
from the same resamples as its classes' intervals.

- AUC: the Mann–Whitney statistic with ties counted one half, from one sort per (row, class) and cumulative sums of
  the weights in score order (equals :func:`sklearn.metrics.roc_auc_score`).
- AP: ``sum over distinct thresholds of (recall step) x precision`` (equals
  :func:`sklearn.metrics.average_precision_score`).
- F1, sensitivity, specificity: from weighted confusion counts of fixed 0/1 predictions, one matrix product.
- F1 over all classes, the three ways multi-label papers report it, each at 0.5 (``f1_05``) and at the tuned
  thresholds (``f1``): ``macro`` (the mean of the classes' F1), ``micro`` (one F1 from the TP, FP and FN counts pooled
  over the classes) and ``samples`` (each sample's F1 over its classes, ``2|y ∧ ŷ| / (|y| + |ŷ|)``, averaged over the
  samples; a sample with no label and no prediction counts 1, as ``sklearn.metrics.f1_score(average="samples",
  zero_division=1)``). The score table holds them as the "classes" ``macro``, ``micro`` and ``samples``.

A resample in which a class has no positive (or no negative) leaves that class's AUC/AP undefined (NaN); the interval
is taken over the resamples where it is defined.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import polars as pl
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("auc", "ap", "f1_05", "f1", "sensitivity", "specificity")
METRIC_LABELS = {
    "auc": "AUC",
    "ap": "AP",
    "f1_05": "F1@0.5",
    "f1": "F1@t",
    "sensitivity": "sensitivity@t",
    "specificity": "specificity@t",
}
MACRO = "macro"  # the mean over the classes (every metric)
MICRO = "micro"  # F1 from the counts pooled over the classes
SAMPLES = "samples"  # F1 per sample over its classes, averaged over the samples
F1_METRICS = ("f1_05", "f1")  # the metrics that also have a micro and a samples value
F1_AVERAGES = (MACRO, MICRO, SAMPLES)


# --------------------------------------------------------------------------------------------------- ranking scores


@dataclass(frozen=True)
class _Ranked:
    """One score vector sorted ascending, reduced to what AUC and AP need: the tie groups holding a positive.

    ``first``/``last`` are the sorted positions where each such group starts and ends, ``pos_idx`` the sorted
    positions of the positive samples and ``pos_seg`` where each group's positives start within ``pos_idx``.
    """

    order: np.ndarray
    first: np.ndarray
    last: np.ndarray
    pos_idx: np.ndarray
    pos_seg: np.ndarray | None  # None when every positive is alone in its group (no reduction needed)
    ties: bool  # some group holding a positive also holds another sample

    @classmethod
    def of(cls, y: np.ndarray, p: np.ndarray) -> _Ranked:
        order = np.argsort(p, kind="stable")
        ps = p[order]
        pos_idx = np.flatnonzero(np.asarray(y)[order])
        n = len(ps)
        new_group = np.empty(n, dtype=bool)
        new_group[:1] = True
        np.not_equal(ps[1:], ps[:-1], out=new_group[1:])
        group = np.cumsum(new_group) - 1  # group id of every sorted position
        starts = np.flatnonzero(new_group)
        ends = np.append(starts[1:], n) - 1
        g = group[pos_idx]
        seg_start = np.ones(len(g), dtype=bool)
        seg_start[1:] = g[1:] != g[:-1]
        groups = g[seg_start]
        pos_seg = None if seg_start.all() else np.flatnonzero(seg_start)
        first, last = starts[groups], ends[groups]
        return cls(order, first, last, pos_idx, pos_seg, bool((last > first).any()))


def _auc_ap(ranked: _Ranked, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted AUC and AP for each row of the weight matrix ``w`` (b, n): two ``(b,)`` arrays.

    Works on tie groups in ascending score order. Only the groups holding a positive contribute to either sum, so
    one cumulative sum of all weights (in score order) is the only pass over every sample; the rest runs on the
    positive groups. Point estimates (one row) are exact in float64; bootstrap rows use float32 (counts stay exact
    integers below 2**24 samples; the relative rounding of about 1e-7 is far below any interval's width).
    """
    b = w.shape[0]
    if len(ranked.pos_idx) == 0:
        return np.full(b, np.nan), np.full(b, np.nan)
    acc = np.float64 if b == 1 or w.shape[1] >= 2**24 else np.float32
    ws = np.take(w, ranked.order, axis=1)
    cum = np.cumsum(ws, axis=1, dtype=acc)  # all weight in positions <= i
    pg = np.take(ws, ranked.pos_idx, axis=1).astype(acc, copy=False)
    del ws
    if ranked.pos_seg is not None:
        pg = np.add.reduceat(pg, ranked.pos_seg, axis=1)  # positive weight per group
    cum_pos = np.cumsum(pg, axis=1, dtype=acc)  # positive weight in groups <= g
    cum_neg = np.take(cum, ranked.last, axis=1)  # all weight in groups <= g ...
    ng = None
    if ranked.ties:  # negative weight in group g itself
        ng = cum_neg - pg
        ng -= np.take(cum, np.maximum(ranked.first - 1, 0), axis=1)
        if ranked.first[0] == 0:
            ng[:, 0] += cum[:, 0]  # the group at position 0 has nothing before it
    cum_neg -= cum_pos  # ... minus the positive weight: negative weight in groups <= g
    p_tot = cum_pos[:, -1].astype(np.float64)
    n_tot = cum[:, -1].astype(np.float64) - p_tot
    del cum
    with np.errstate(invalid="ignore", divide="ignore"):
        # AUC: a positive beats the negatives of lower groups and half of its own group's negatives.
        below = cum_neg if ng is None else cum_neg - 0.5 * ng
        auc = np.einsum("ij,ij->i", pg, below, dtype=np.float64) / (p_tot * n_tot)
        # AP: thresholds from high to low; at group g the predicted positives are the groups >= g.
        tp = cum_pos
        np.subtract(p_tot.astype(acc)[:, None], cum_pos, out=tp)
        tp += pg  # positives in groups >= g
        fp = cum_neg
        np.subtract(n_tot.astype(acc)[:, None], cum_neg, out=fp)
        if ng is not None:
            fp += ng  # negatives in groups >= g
        fp += tp
        np.maximum(fp, 1e-30, out=fp)
        tp /= fp  # precision at group g
        ap = np.einsum("ij,ij->i", pg, tp, dtype=np.float64) / p_tot
    auc[(p_tot == 0) | (n_tot == 0)] = np.nan
    ap[p_tot == 0] = np.nan
    return auc, ap


def _weights(n: int, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        return np.ones((1, n), np.float32)
    return np.atleast_2d(np.asarray(weights, dtype=np.float32))


def roc_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> float | np.ndarray:
    """ROC AUC of scores ``p`` for 0/1 labels ``y``; with ``weights`` (b, n) one AUC per weight row."""
    w = _weights(len(y), weights)
    auc, _ = _auc_ap(_Ranked.of(y, p), w)
    return float(auc[0]) if weights is None else auc


def average_precision(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> float | np.ndarray:
    """Average precision (area under the step precision–recall curve), as scikit-learn defines it."""
    w = _weights(len(y), weights)
    _, ap = _auc_ap(_Ranked.of(y, p), w)
    return float(ap[0]) if weights is None else ap


# ---------------------------------------------------------------------------------------------------- thresholds


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold ``t`` (one of the scores) that maximises F1 of ``p >= t``; 0.5 when ``y`` has no positive."""
    return float(_best_f1_sorted(*_sorted_desc(y, p)))


def _sorted_desc(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-np.asarray(p, dtype=np.float64), kind="stable")
    return np.asarray(y)[order].astype(np.float64), np.asarray(p)[order]


def _best_f1_sorted(y_desc: np.ndarray, p_desc: np.ndarray) -> float:
    n_pos = y_desc.sum()
    if n_pos == 0 or len(y_desc) == 0:
        return 0.5
    tp = np.cumsum(y_desc)
    fp = np.arange(1, len(y_desc) + 1) - tp
    # only the last position of each tie group is a reachable cut (p >= t takes the whole group)
    last = np.ones(len(p_desc), dtype=bool)
    last[:-1] = p_desc[1:] != p_desc[:-1]
    f1 = np.where(last, 2 * tp / (2 * tp + fp + (n_pos - tp)), -1.0)
    return float(p_desc[int(np.argmax(f1))])


def fold_thresholds(y: np.ndarray, p: np.ndarray, folds: np.ndarray, k: int) -> np.ndarray:
    """``(k, classes)`` F1-optimal thresholds: row ``f`` is chosen on the samples *outside* fold ``f`` only.

    Used for fixed scores (a backbone's OOF probabilities, their mean): fold ``f``'s labels never choose fold ``f``'s
    threshold. One sort per class; each fold's subset keeps that order.
    """
    y = np.asarray(y)
    out = np.full((k, y.shape[1]), 0.5)
    for c in range(y.shape[1]):
        y_desc, p_desc = _sorted_desc(y[:, c], p[:, c])
        f_desc = folds[np.argsort(-np.asarray(p[:, c], dtype=np.float64), kind="stable")]
        for f in range(k):
            keep = f_desc != f
            out[f, c] = _best_f1_sorted(y_desc[keep], p_desc[keep])
    return out


def apply_fold_thresholds(p: np.ndarray, folds: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """0/1 predictions: sample ``i`` of fold ``f`` is positive for class ``c`` when ``p[i, c] >= thresholds[f, c]``."""
    return (p >= thresholds[folds]).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ scores and CIs


@dataclass(frozen=True)
class Scored:
    """One row of the score table: probabilities (n, classes) and their 0/1 predictions at the tuned thresholds."""

    probs: np.ndarray
    predicted: np.ndarray
    kind: str = "model"  # backbone | mean | meta | control


def bootstrap_weights(n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """``(b, n)`` float32: how often each sample is drawn in each of ``b`` resamples of size ``n``."""
    w = np.empty((b, n), np.float32)
    for j in range(b):
        w[j] = np.bincount(rng.integers(0, n, n), minlength=n)
    return w


def _confusion_cells(y: np.ndarray, predicted: Sequence[np.ndarray]) -> np.ndarray:
    """``(n, 4 x classes x len(predicted))`` float32 indicators of TP, FP, FN, TN for each 0/1 prediction matrix."""
    y = y.astype(bool)
    parts = []
    for yhat in predicted:
        yhat = yhat.astype(bool)
        parts += [y & yhat, ~y & yhat, y & ~yhat, ~y & ~yhat]
    return np.concatenate(parts, axis=1).astype(np.float32)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-30), np.nan)


def _confusion_scores(w: np.ndarray, cells: np.ndarray, c: int) -> list[dict[str, np.ndarray]]:
    """F1, sensitivity, specificity per weight row and class, and the micro-F1 per weight row (``"micro"``), for each
    prediction matrix in ``cells``."""
    counts = (w @ cells).astype(np.float64)
    out = []
    for s in range(cells.shape[1] // (4 * c)):
        tp, fp, fn, tn = (counts[:, (4 * s + i) * c : (4 * s + i + 1) * c] for i in range(4))
        f1 = _f1(tp, fp, fn)
        micro = _f1(tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append({"f1": f1, "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), MICRO: micro})
    return out


def sample_f1(y: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """``(n,)``: each sample's F1 over its classes, ``2|y ∧ ŷ| / (|y| + |ŷ|)``; 1 when it has no label and no
    prediction (nothing to find, nothing claimed)."""
    y, predicted = np.asarray(y).astype(bool), np.asarray(predicted).astype(bool)
    tp = (y & predicted).sum(axis=1)
    total = y.sum(axis=1) + predicted.sum(axis=1)
    return np.where(total > 0, 2 * tp / np.maximum(total, 1), 1.0)


def _sample_means(w: np.ndarray, per_sample: np.ndarray) -> np.ndarray:
    """``(b, columns)`` weighted means of ``per_sample`` ``(n, columns)``: float64 for one weight row (the point
    estimate), float32 products for bootstrap rows."""
    acc = np.float64 if w.shape[0] == 1 else np.float32
    sums = w.astype(acc, copy=False) @ per_sample.astype(acc, copy=False)
    return sums.astype(np.float64) / w.sum(axis=1, dtype=np.float64)[:, None]


def _all_scores(
    w: np.ndarray,
    ranked: list[_Ranked],
    cells: np.ndarray,
    per_sample: np.ndarray,
    pool: ThreadPoolExecutor | None = None,
) -> dict[str | tuple[str, str], np.ndarray]:
    """Every metric for one row: name -> (b, classes), and (MICRO or SAMPLES, F1 metric) -> (b,). ``cells`` holds
    the 0.5 and the tuned predictions, ``per_sample`` their sample F1 (n, 2)."""
    results = pool.map(lambda r: _auc_ap(r, w), ranked) if pool else (_auc_ap(r, w) for r in ranked)
    aucs, aps = zip(*results, strict=True)
    half, tuned = _confusion_scores(w, cells, len(ranked))
    samples = _sample_means(w, per_sample)
    return {
        "auc": np.stack(aucs, axis=1),
        "ap": np.stack(aps, axis=1),
        "f1_05": half["f1"],
        "f1": tuned["f1"],
        "sensitivity": tuned["sensitivity"],
        "specificity": tuned["specificity"],
        (MICRO, "f1_05"): half[MICRO],
        (MICRO, "f1"): tuned[MICRO],
        (SAMPLES, "f1_05"): samples[:, 0],
        (SAMPLES, "f1"): samples[:, 1],
    }


def _bootstrap(
    y: np.ndarray,
    ranked: Mapping[str, list[_Ranked]],
    cells: Mapping[str, np.ndarray],
    per_sample: Mapping[str, np.ndarray],
    boot: dict[str, dict],
    *,
    n_bootstrap: int,
    seed: int,
    chunk: int | None,
    progress: bool,
    workers: int,
) -> None:
    """Append every metric of every row for ``n_bootstrap`` resamples, drawn in chunks shared by all rows.

    The classes of a row are scored by ``workers`` threads (numpy releases the GIL in the sorts' gathers and sums).
    """
    if n_bootstrap <= 0:
        return
    n = len(y)
    rng = np.random.default_rng(seed)
    chunk = chunk or max(1, min(64, 16_000_000 // max(n, 1)))  # about 64 MB of weights at a time
    log.info(
        "bootstrap: %d resamples of %d samples x %d rows x %d classes",
        n_bootstrap,
        n,
        len(ranked),
        len(next(iter(ranked.values()), [])),
    )
    with ThreadPoolExecutor(max_workers=workers) if workers > 1 else nullcontext() as pool:
        for s in tqdm(range(0, n_bootstrap, chunk), desc="bootstrap", unit="chunk", disable=not progress):
            w = bootstrap_weights(n, min(chunk, n_bootstrap - s), rng)
            for name in ranked:
                for m, v in _all_scores(w, ranked[name], cells[name], per_sample[name], pool).items():
                    boot[name].setdefault(m, []).append(v)


def score_table(
    y: np.ndarray,
    rows: Mapping[str, Scored],
    classes: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    chunk: int | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> pl.DataFrame:
    """Scores of every row, per class and macro (mean over classes), with paired percentile bootstrap intervals;
    for F1 (at 0.5 and tuned) also micro and sample-based.

    Returns a long table: ``model, kind, class, metric, value, lo, hi, n, positives`` (``class`` is a class name,
    ``"macro"``, or for the F1 metrics also ``"micro"`` and ``"samples"``). ``n_bootstrap=0`` gives point estimates
    only (``lo``/``hi`` null). ``workers``: threads scoring classes in parallel (default: the cores, at most 8; each
    holds two ``(chunk, n)`` float32 arrays).
    """
    workers = workers or min(8, os.cpu_count() or 1)
    y = np.asarray(y, dtype=np.uint8)
    n, c = y.shape
    if c != len(classes):
        raise ValueError(f"labels have {c} columns, classes are {list(classes)}")
    ranked = {name: [_Ranked.of(y[:, j], r.probs[:, j]) for j in range(c)] for name, r in rows.items()}
    cells = {name: _confusion_cells(y, [r.probs >= 0.5, r.predicted]) for name, r in rows.items()}
    per_sample = {
        name: np.stack([sample_f1(y, r.probs >= 0.5), sample_f1(y, r.predicted)], axis=1) for name, r in rows.items()
    }
    ones = np.ones((1, n), np.float32)
    point = {name: _all_scores(ones, ranked[name], cells[name], per_sample[name]) for name in rows}

    boot: dict[str, dict] = {name: {} for name in rows}
    # one BLAS thread: the products are small, and a busy machine makes spinning BLAS threads 10-100x slower
    with threadpool_limits(1, user_api="blas"):
        _bootstrap(
            y,
            ranked,
            cells,
            per_sample,
            boot,
            n_bootstrap=n_bootstrap,
            seed=seed,
            chunk=chunk,
            progress=progress,
            workers=workers,
        )

    alpha = (1 - ci) / 2
    records = []
    positives = y.sum(axis=0)
    for name, r in rows.items():
        for m in METRICS:
            pt = point[name][m][0]
            draws = np.concatenate(boot[name][m]) if boot[name] else None
            cols = [
                (cls, pt[j], None if draws is None else draws[:, j], int(positives[j])) for j, cls in enumerate(classes)
            ]
            # macro: the mean over classes; a resample where some class is undefined drops out of the interval
            macro_draws = None if draws is None else draws.mean(axis=1)
            cols.append((MACRO, float(np.mean(pt)), macro_draws, int(positives.sum())))
            if m in F1_METRICS:  # pooled over the classes, and per sample
                for avg in (MICRO, SAMPLES):
                    d = np.concatenate(boot[name][(avg, m)]) if boot[name] else None
                    cols.append((avg, float(point[name][(avg, m)][0]), d, int(positives.sum())))
            for cls, value, s, pos in cols:
                lo = hi = None
                if s is not None and np.isfinite(s).any():
                    lo, hi = (float(v) for v in np.nanquantile(s, [alpha, 1 - alpha]))
                records.append((name, r.kind, cls, m, float(value), lo, hi, n, pos))
    return pl.DataFrame(
        records,
        schema={
            "model": pl.String,
            "kind": pl.String,
            "class": pl.String,
            "metric": pl.String,
            "value": pl.Float64,
            "lo": pl.Float64,
            "hi": pl.Float64,
            "n": pl.Int64,
            "positives": pl.Int64,
        },
        orient="row",
    )
