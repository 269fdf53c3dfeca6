"""The stacking report: markdown tables and PNG plots (matplotlib, Agg backend), readable on their own.

It takes plain data (arrays, polars frames, paths, row names; :class:`ReportInputs`), never the stacking step's
objects, so ``retina-eval`` reuses its tables and plots and nothing here imports the stacking code.

- ``scores.md``: macro scores of every row (backbones, their mean, the meta-learner, the shuffled-label control) with
  95% bootstrap intervals; F1 macro, micro and sample-based, at 0.5 and at the out-of-fold thresholds; AUC per class
  and row (the paper's table); the meta-learner's scores per class.
- ``roc.png``: ROC curves per class (backbones thin, their mean dashed, the meta-learner bold).
- ``calibration.png``: reliability diagrams per class of the meta-learner's OOF probabilities (and the mean of the
  backbones), with the expected calibration error.
- ``importance.png``: the classes x backbones share of the meta-learner's gain (the paper's Fig. 6).
- ``report.md``: inputs, meta-learner, how the scores stay honest, all tables, the meta-learner's thresholds per
  class and fold, links to the PNGs, timings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from retina_train.stack.metrics import F1_AVERAGES, MACRO, METRIC_LABELS, METRICS, MICRO  # noqa: E402
from retina_train.stack.rows import CONTROL_ROW, MEAN_ROW, META_ROW  # noqa: E402

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------- tables


def _fmt(value: float | None, lo: float | None = None, hi: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if lo is None or hi is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "---:") -> str:
    lines = ["| " + " | ".join(header) + " |", "| --- | " + " | ".join([align] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _row_order(scores: pl.DataFrame) -> list[str]:
    kinds = {"backbone": 0, "mean": 1, "meta": 2, "control": 3}
    seen = scores.select("model", "kind").unique(maintain_order=True).rows()
    return [m for m, _ in sorted(seen, key=lambda mk: (kinds.get(mk[1], 9), mk[0] if mk[1] == "backbone" else ""))]


def _lookup(scores: pl.DataFrame) -> dict[tuple[str, str, str], tuple[float, float | None, float | None]]:
    return {
        (m, c, k): (v, lo, hi)
        for m, c, k, v, lo, hi in scores.select("model", "class", "metric", "value", "lo", "hi").iter_rows()
    }


def f1_markdown(scores: pl.DataFrame, *, ci: float = 0.95) -> str:
    """F1 of every row the three ways (macro, micro, sample-based), each at 0.5 and at the tuned thresholds, with
    CIs; empty when ``scores`` has no micro rows."""
    look = _lookup(scores)
    rows = _row_order(scores)
    if not rows or (rows[0], MICRO, "f1") not in look:
        return ""
    cols = [(avg, m) for avg in F1_AVERAGES for m in ("f1_05", "f1")]
    header = ["row", *(f"{'sample' if avg == 'samples' else avg}-{METRIC_LABELS[m]}" for avg, m in cols)]
    return "\n".join(
        [
            f"### F1 three ways ({ci:.0%} bootstrap interval)",
            "",
            _table(header, [[r, *(_fmt(*look[(r, avg, m)]) for avg, m in cols)] for r in rows]),
            "",
            "Macro: the mean of the classes' F1. Micro: one F1 from the true/false positives and false negatives "
            "pooled over the classes. Sample-based: each sample's F1 over its classes, averaged over the samples (a "
            "sample with no label and no prediction counts 1).",
            "",
        ]
    )


def scores_markdown(scores: pl.DataFrame, classes: Sequence[str], *, meta_row: str, ci: float = 0.95) -> str:
    """Four tables: macro scores per row with CIs; F1 macro, micro and sample-based per row with CIs; AUC per class
    and row; the meta-learner per class with CIs."""
    look = _lookup(scores)
    rows = _row_order(scores)
    pct = f"{ci:.0%}"
    f1 = f1_markdown(scores, ci=ci)
    parts = [
        f"### Macro scores (mean over {len(classes)} classes; {pct} bootstrap interval)",
        "",
        _table(
            ["row", *(METRIC_LABELS[m] for m in METRICS)],
            [[r, *(_fmt(*look[(r, MACRO, m)]) for m in METRICS)] for r in rows],
        ),
        "",
        *([f1] if f1 else []),
        "### AUC per class",
        "",
        _table(
            ["row", *classes, "macro"], [[r, *(_fmt(look[(r, c, "auc")][0]) for c in (*classes, MACRO))] for r in rows]
        ),
        "",
        f"### {meta_row} per class ({pct} bootstrap interval)",
        "",
        _table(
            ["class", *(METRIC_LABELS[m] for m in METRICS)],
            [[c, *(_fmt(*look[(meta_row, c, m)]) for m in METRICS)] for c in (*classes, MACRO)],
        ),
        "",
        "F1@0.5: predictions at probability 0.5. F1@t, sensitivity@t, specificity@t: at the F1-optimal threshold "
        "chosen without the scored fold's labels (see report.md).",
    ]
    return "\n".join(parts) + "\n"


def thresholds_markdown(
    fold_thresholds: np.ndarray, classes: Sequence[str], final: Mapping[str, float], positives: Sequence[int]
) -> str:
    """Per class: the threshold each fold's predictions were cut at (``fold_thresholds`` (k, classes)) and the final
    model's (``final``), with the class's positives."""
    k = fold_thresholds.shape[0]
    rows = [
        [c, *(f"{fold_thresholds[f, j]:.3f}" for f in range(k)), _fmt(final.get(c)), str(int(positives[j]))]
        for j, c in enumerate(classes)
    ]
    return _table(["class", *(f"fold {f}" for f in range(k)), "final (meta.json)", "positives"], rows)


def importance_markdown(importance: pl.DataFrame) -> str:
    models = [c for c in importance.columns if c != "class"]
    rows = [[r[0], *(f"{v:.2f}" for v in r[1:])] for r in importance.rows()]
    return _table(["class", *models], rows)


# -------------------------------------------------------------------------------------------------------- plots


def _grid(n: int, *, cols: int = 4, size: float = 3.0):
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def _subsample(n: int, limit: int, seed: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def plot_roc(
    path: Path, y: np.ndarray, probs: Mapping[str, np.ndarray], classes: Sequence[str], *, bold: str, dashed: str
) -> Path:
    """ROC curves per class: every row in ``probs``; ``bold`` (the meta-learner) and ``dashed`` (the mean) stand out."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, axes = _grid(len(classes))
    cmap = plt.get_cmap("tab10")
    for j, (ax, cls) in enumerate(zip(axes, classes, strict=False)):
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        for i, (name, p) in enumerate(probs.items()):
            fpr, tpr, _ = roc_curve(y[:, j], p[:, j])
            auc = roc_auc_score(y[:, j], p[:, j])
            style = {"lw": 0.9, "alpha": 0.8, "color": cmap(i % 10)}
            if name == bold:
                style = {"lw": 2.2, "color": "black"}
            elif name == dashed:
                style = {"lw": 1.4, "color": "0.35", "ls": "--"}
            ax.plot(fpr, tpr, label=f"{name} ({auc:.3f})", **style)
        ax.set_title(cls, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5.5, loc="lower right", frameon=False)
    fig.supxlabel("false positive rate")
    fig.supylabel("true positive rate")
    fig.suptitle("ROC per class (out-of-fold; AUC in the legend)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Uniform-bin reliability: mean predicted, observed fraction, count per bin, and the expected calibration error."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, weights=p, minlength=bins) / count
        frac = np.bincount(which, weights=y, minlength=bins) / count
    ece = float(np.nansum(count / max(count.sum(), 1) * np.abs(frac - mean_p)))
    return mean_p, frac, count, ece


def plot_calibration(
    path: Path,
    y: np.ndarray,
    probs: Mapping[str, np.ndarray],
    classes: Sequence[str],
    *,
    bins: int = 10,
    min_count: int = 5,
) -> Path:
    """Reliability diagrams per class for each row of ``probs``: marker area ~ samples in the bin; bins with fewer
    than ``min_count`` samples are left out (their observed fraction is noise)."""
    fig, axes = _grid(len(classes))
    styles = [{"color": "black", "marker": "o", "ls": "-"}, {"color": "tab:orange", "marker": "s", "ls": "--"}]
    for j, (ax, cls) in enumerate(zip(axes, classes, strict=False)):
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        for (name, p), style in zip(probs.items(), styles, strict=False):
            mean_p, frac, count, ece = reliability(y[:, j].astype(np.float64), p[:, j].astype(np.float64), bins)
            ok = count >= min_count
            ax.plot(mean_p[ok], frac[ok], lw=1.1, ls=style["ls"], color=style["color"], label=f"{name} (ECE {ece:.3f})")
            sizes = 6 + 80 * count[ok] / max(count.max(), 1)
            ax.scatter(mean_p[ok], frac[ok], s=sizes, marker=style["marker"], color=style["color"], zorder=3)
        ax.set_title(cls, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left", frameon=False)
    fig.supxlabel("mean predicted probability")
    fig.supylabel("observed fraction positive")
    fig.suptitle(f"Reliability per class (out-of-fold; {bins} bins, marker area ~ samples, bins < {min_count} hidden)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_importance(path: Path, importance: pl.DataFrame) -> Path:
    """Heatmap: classes (rows) x backbones (columns), each row the class's share of the meta-learner's gain."""
    models = [c for c in importance.columns if c != "class"]
    classes = importance["class"].to_list()
    mat = importance.select(models).to_numpy()
    fig, ax = plt.subplots(figsize=(1.3 + 1.0 * len(models), 1.2 + 0.42 * len(classes)))
    im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=max(float(mat.max()), 1e-9), aspect="auto")
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    for i in range(mat.shape[0]):
        for k in range(mat.shape[1]):
            v = mat[i, k]
            ax.text(
                k,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v < 0.6 * mat.max() else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.05, label="share of gain")
    ax.set_title("Meta-learner: each backbone's share of the gain per class", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------- report


@dataclass
class ReportInputs:
    """Everything ``report.md`` shows, as plain data: the rows' probabilities and scores, and what produced them."""

    out: Path
    runs: Path  # the OOF predictions (runs/EXP)
    data: Path  # the packed dataset
    models: list[str]  # the backbones, sorted
    classes: list[str]  # the scored classes
    skipped: Mapping[str, str]  # class -> why it is not scored
    n_files: int  # OOF files read
    n_features: int
    k: int  # folds
    y: np.ndarray  # (n, classes) labels
    probs: Mapping[str, np.ndarray]  # row name -> (n, classes) OOF probabilities; META_ROW and MEAN_ROW among them
    scores: pl.DataFrame  # metrics.score_table's long table
    importance: pl.DataFrame  # class, then one gain-share column per backbone
    strategy: str
    strategy_check: Mapping | None  # what `auto` measured, or None
    device: str
    params: Mapping  # the meta-learner's XGBoost parameters (n_estimators, max_depth, learning_rate, ...)
    model_files: list[str]  # the final meta-learner's booster files
    control_rows: int  # rows of the shuffled-label control
    meta_thresholds: np.ndarray  # (folds, classes): the meta-learner's threshold per fold, from the other folds
    final_thresholds: Mapping[str, float]  # class -> the final meta-learner's threshold (meta.json)
    seconds: Mapping[str, float]  # timings per stage
    seed: int = 0
    bootstrap: int = 1000
    ci: float = 0.95
    plot_max_rows: int = 200_000  # ROC / calibration curves from a seeded subsample of at most this many rows


def write_report(r: ReportInputs) -> dict[str, Path]:
    """Write ``scores.md``, the three PNGs and ``report.md`` into ``r.out``; returns their paths by name."""
    out = Path(r.out)
    classes, probs = r.classes, r.probs
    keep = _subsample(len(r.y), r.plot_max_rows, r.seed)
    y_plot = r.y[keep]
    files = {
        "roc": plot_roc(
            out / "roc.png", y_plot, {k: v[keep] for k, v in probs.items()}, classes, bold=META_ROW, dashed=MEAN_ROW
        ),
        "calibration": plot_calibration(
            out / "calibration.png", y_plot, {META_ROW: probs[META_ROW][keep], MEAN_ROW: probs[MEAN_ROW][keep]}, classes
        ),
        "importance_png": plot_importance(out / "importance.png", r.importance),
    }
    scores_md = scores_markdown(r.scores, classes, meta_row=META_ROW, ci=r.ci)
    files["scores_md"] = out / "scores.md"
    files["scores_md"].write_text(scores_md, encoding="utf-8")

    look = _lookup(r.scores)
    meta_auc = look[(META_ROW, MACRO, "auc")]
    mean_auc = look[(MEAN_ROW, MACRO, "auc")]
    control_auc = look[(CONTROL_ROW, MACRO, "auc")]
    best_backbone = max(r.models, key=lambda m: look[(m, MACRO, "auc")][0])
    skipped = "; ".join(f"{c} ({why})" for c, why in r.skipped.items()) or "none"
    p = r.params
    check = r.strategy_check
    check_line = ""
    if check:
        check_line = (
            f" Chosen by `auto`: on fold {check['fold']} native macro-AUC {check['macro_auc']['native']:.4f} "
            f"({check['fit_seconds']['native']:.1f} s fit) vs multioutput {check['macro_auc']['multioutput']:.4f} "
            f"({check['fit_seconds']['multioutput']:.1f} s fit); native is kept when within {check['tolerance']}."
        )
    control_n = r.control_rows
    lines = [
        "# Stacking report",
        "",
        f"- OOF predictions: `{r.runs}` — {len(r.models)} backbones ({', '.join(r.models)}), {r.n_files} files",
        f"- Dataset: `{r.data}` — {len(r.y):,} samples, {r.k} folds",
        f"- Features: {r.n_features} columns `MODEL__CLASS` (models sorted by name, classes in the "
        "fixed class order) — `features.parquet`",
        f"- Classes scored: {', '.join(classes)}; skipped: {skipped}",
        "",
        "## Result",
        "",
        f"Meta-learner macro-AUC **{_fmt(*meta_auc)}**; mean of the backbones {_fmt(*mean_auc)}; best single "
        f"backbone {best_backbone} {_fmt(*look[(best_backbone, MACRO, 'auc')])}. Shuffled-label control "
        f"{_fmt(*control_auc)} (should be ≈ 0.5).",
        "",
        scores_md,
        "## Meta-learner",
        "",
        f"XGBoost, strategy `{r.strategy}`"
        + (
            ' (one booster on the 2-D label matrix, `multi_strategy="one_output_per_tree"`)'
            if r.strategy == "native"
            else " (scikit-learn `MultiOutputClassifier(XGBClassifier)`, one booster per class)"
        )
        + f', device `{r.device}`, `tree_method="hist"`, {p["n_estimators"]} trees per class, depth '
        f"{p['max_depth']}, learning rate {p['learning_rate']}, seed {r.seed}.{check_line}",
        "The final model (fitted on all rows) is "
        + ", ".join(f"`{f}`" for f in r.model_files)
        + "; `meta.json` holds its feature order, classes, parameters and the per-class thresholds (F1-optimal on "
        "the meta-OOF). Load it with `retina_train.stack.load_meta_learner`.",
        "",
        "## How the scores stay honest",
        "",
        f"- Nested cross-validation on the dataset's {r.k} folds: for fold k a fresh meta-learner trains on the "
        "other folds and scores fold k; every sample's meta-probability (`meta_oof.parquet`) comes from a model that "
        "never trained on it (checked: training and scored rows disjoint, every row scored once).",
        "- Thresholds for F1@t / sensitivity@t / specificity@t: fold k's threshold of a class is the F1-optimal one "
        "on the other folds' out-of-fold predictions — the meta-learner's on the other folds' meta-OOF, a backbone's "
        "(or the mean's) on the other folds' OOF. They are chosen on predictions from models that never trained on "
        "those rows (not on the meta-learner's overconfident in-sample predictions of its own training rows), and "
        "fold k's labels never choose fold k's threshold; `meta_oof.parquet` with the labels and folds reproduces "
        "them. F1 is given macro (mean of the classes), micro (pooled counts) and sample-based.",
        f"- Intervals: {r.bootstrap} paired bootstrap resamples of the samples (seed {r.seed}), "
        f"{r.ci:.0%} percentile intervals.",
        f"- Control: the same nested CV with the label rows permuted across samples ({control_n:,} rows"
        + (", a seeded subsample" if control_n < len(r.y) else "")
        + f"): macro-AUC {_fmt(*control_auc)}. Near 0.5 means nothing leaks labels into features or scores.",
        "",
        "## Thresholds of the meta-learner",
        "",
        "Per class: the threshold that fold k's meta-OOF was cut at (F1-optimal on the other folds' meta-OOF), and "
        "the final model's (F1-optimal on all the meta-OOF; saved in `meta.json` for `retina-eval`):",
        "",
        thresholds_markdown(r.meta_thresholds, classes, r.final_thresholds, r.y.sum(axis=0)),
        "",
        "## Per-disease importance of each backbone",
        "",
        "Share of the final meta-learner's total split gain per class, summed over each backbone's 11 features "
        "(`importance.parquet`, `importance.csv`):",
        "",
        importance_markdown(r.importance),
        "",
        "![importance](importance.png)",
        "",
        "## ROC curves",
        "",
        "![roc](roc.png)",
        "",
        "## Calibration",
        "",
        "![calibration](calibration.png)",
        "",
        "## Timings",
        "",
        ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items()),
        "",
    ]
    files["report"] = out / "report.md"
    files["report"].write_text("\n".join(lines), encoding="utf-8")
    return files
