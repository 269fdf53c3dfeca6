"""The whole stacking step (:func:`run_stack`): table, nested CV and its control, final fit, scores, report.

**Strategy** ``auto`` (default): fit ``native`` and ``multioutput`` on the first fold of the nested CV; keep
``native`` when its macro-AUC on that fold is within 0.001 of ``multioutput``'s, else ``multioutput``. The check costs
one extra fold fit, not a second nested CV; the fold-0 model of the chosen strategy is reused.

**The control**: the same nested CV with the label rows permuted across samples (seeded; on at most
``control_max_rows`` rows, a seeded subsample) must score AUC ≈ 0.5. It shows that nothing leaks labels into the
features or the meta-OOF.

**The final model** fits on all rows; its per-class thresholds are F1-optimal on the nested meta-OOF.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from retina_io.errors import at_least, check_rules
from retina_io.fsutil import require_out_folder
from retina_train.stack import metrics
from retina_train.stack.errors import StackError
from retina_train.stack.meta import STRATEGIES, MetaLearner, MetaParams, create_meta_learner, resolve_device
from retina_train.stack.nested import NestedCV, nested_cv
from retina_train.stack.rows import CONTROL_ROW, MEAN_ROW, META_ROW
from retina_train.stack.table import FeatureTable, build_feature_table

log = logging.getLogger(__name__)

AUTO_TOLERANCE = 0.001


@dataclass
class StackConfig:
    runs: Path
    data: Path
    out: Path
    strategy: str = "auto"
    device: str = "auto"
    bootstrap: int = 1000
    seed: int = 0
    params: MetaParams = field(default_factory=MetaParams)
    control_max_rows: int = 200_000  # the shuffled-label control runs on a seeded subsample of at most this many rows
    ci: float = 0.95
    plot_max_rows: int = 200_000  # ROC / calibration curves from a seeded subsample (the curves look the same)
    progress: bool = True


@dataclass
class StackResult:
    config: StackConfig
    table: FeatureTable
    strategy: str
    strategy_check: dict | None
    device: str
    nested: NestedCV
    control: NestedCV
    control_rows: np.ndarray
    control_labels: np.ndarray
    final: MetaLearner
    scores: pl.DataFrame
    importance: pl.DataFrame
    files: dict[str, Path]
    seconds: dict[str, float]

    def macro(self, model: str, metric: str = "auc") -> float:
        row = self.scores.filter(
            (pl.col("model") == model) & (pl.col("class") == metrics.MACRO) & (pl.col("metric") == metric)
        )
        return float(row["value"].item())


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean([metrics.roc_auc(y[:, j], p[:, j]) for j in range(y.shape[1])]))


def _choose_strategy(
    cfg: StackConfig,
    make: Callable[[str], MetaLearner],
    X: np.ndarray,
    Y: np.ndarray,
    folds: np.ndarray,  # noqa: N803
) -> tuple[str, dict | None, dict[int, MetaLearner]]:
    if cfg.strategy not in STRATEGIES:
        raise StackError(f"--strategy {cfg.strategy!r}: choose one of {STRATEGIES}")
    if cfg.strategy != "auto":
        return cfg.strategy, None, {}
    f = int(np.unique(folds)[0])
    train, scored = folds != f, folds == f
    fitted, aucs, secs = {}, {}, {}
    for s in ("native", "multioutput"):
        t0 = time.perf_counter()
        fitted[s] = make(s).fit(X[train], Y[train])
        secs[s] = round(time.perf_counter() - t0, 3)
        aucs[s] = _macro_auc(Y[scored], fitted[s].predict_proba(X[scored]))
    chosen = "native" if aucs["native"] >= aucs["multioutput"] - AUTO_TOLERANCE else "multioutput"
    check = {"fold": f, "macro_auc": aucs, "fit_seconds": secs, "tolerance": AUTO_TOLERANCE, "chosen": chosen}
    log.info(
        "strategy auto: fold %d macro-AUC native %.5f, multioutput %.5f -> %s",
        f,
        aucs["native"],
        aucs["multioutput"],
        chosen,
    )
    return chosen, check, {f: fitted[chosen]}


def check_stack_config(cfg: StackConfig) -> None:
    """Every option in its range and ``--out`` usable as a folder: a StackError naming the first that is not, before
    anything is read or written."""
    p = cfg.params
    check_rules([at_least("--bootstrap", cfg.bootstrap, 0), at_least("--seed", cfg.seed, 0),
                 at_least("--control-rows", cfg.control_max_rows, 2), at_least("--n-estimators", p.n_estimators, 1),
                 at_least("--max-depth", p.max_depth, 0), at_least("--threads", p.n_jobs, 1),
                 (p.learning_rate > 0, f"--learning-rate must be > 0; got {p.learning_rate}"),
                 (0 < cfg.ci < 1, f"ci must be in (0, 1); got {cfg.ci}")], StackError)  # fmt: skip
    require_out_folder(Path(cfg.out), StackError)


def run_stack(cfg: StackConfig) -> StackResult:
    """The whole stacking step: table, nested CV (+ control), final fit, scores, importance, report files."""
    from retina_train.stack import report  # matplotlib: imported when a report is written

    check_stack_config(cfg)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    table = build_feature_table(cfg.runs, cfg.data)
    seconds["table"] = time.perf_counter() - t0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"features": out / "features.parquet"}
    table.frame.write_parquet(files["features"])

    X, Y, folds = table.X(), table.Y(), table.folds()
    device = resolve_device(cfg.device)

    def make(strategy: str) -> MetaLearner:
        return create_meta_learner(
            table.feature_columns, table.targets, strategy=strategy, device=device, params=cfg.params, seed=cfg.seed
        )

    t0 = time.perf_counter()
    strategy, check, prefit = _choose_strategy(cfg, make, X, Y, folds)
    nested = nested_cv(X, Y, folds, lambda: make(strategy), prefit=prefit, progress=cfg.progress)
    seconds["nested_cv"] = time.perf_counter() - t0
    meta_oof = pl.DataFrame({"key": table.frame["key"], "fold": table.frame["fold"]}).with_columns(
        [pl.Series(c, nested.oof[:, j], dtype=pl.Float32) for j, c in enumerate(table.targets)]
    )
    files["meta_oof"] = out / "meta_oof.parquet"
    meta_oof.write_parquet(files["meta_oof"])

    # the shuffled-label control: label rows permuted across samples, same folds, same meta-learner
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed + 1)
    rows = np.arange(table.n)
    if table.n > cfg.control_max_rows:
        rows = np.sort(rng.choice(table.n, cfg.control_max_rows, replace=False))
    y_control = Y[rows][rng.permutation(len(rows))]
    control = nested_cv(
        X[rows], y_control, folds[rows], lambda: make(strategy), progress=cfg.progress, desc="control folds"
    )
    seconds["control"] = time.perf_counter() - t0

    # the final meta-learner on every row, thresholds chosen on the (honest) meta-OOF
    t0 = time.perf_counter()
    final = make(strategy).fit(X, Y)
    final.thresholds = {c: metrics.best_f1_threshold(Y[:, j], nested.oof[:, j]) for j, c in enumerate(table.targets)}
    files["meta"] = final.save(
        out,
        extra={
            "skipped_classes": table.skipped,
            "strategy_requested": cfg.strategy,
            "strategy_check": check,
            "k": table.k,
            "samples": table.n,
            "runs": str(cfg.runs),
            "data": str(cfg.data),
        },
    )
    seconds["final_fit"] = time.perf_counter() - t0

    # scores: every backbone, their mean, the meta-learner; then the control on its own rows
    t0 = time.perf_counter()
    rows_scored: dict[str, metrics.Scored] = {}
    probs = {m: table.backbone(m) for m in table.models}
    probs[MEAN_ROW] = np.mean(np.stack(list(probs.values())), axis=0)
    for name, p in probs.items():
        thr = metrics.fold_thresholds(Y, p, folds, int(folds.max()) + 1)
        kind = "mean" if name == MEAN_ROW else "backbone"
        rows_scored[name] = metrics.Scored(p, metrics.apply_fold_thresholds(p, folds, thr), kind)
    rows_scored[META_ROW] = metrics.Scored(nested.oof, nested.predicted(folds), "meta")
    kw = {"n_bootstrap": cfg.bootstrap, "seed": cfg.seed, "ci": cfg.ci, "progress": cfg.progress}
    scores = metrics.score_table(Y, rows_scored, table.targets, **kw)
    control_row = metrics.Scored(control.oof, control.predicted(folds[rows]), "control")
    scores = pl.concat([scores, metrics.score_table(y_control, {CONTROL_ROW: control_row}, table.targets, **kw)])
    files["scores"] = out / "scores.parquet"
    scores.write_parquet(files["scores"])
    seconds["scores"] = time.perf_counter() - t0

    imp = final.importance(table.models)
    importance = pl.DataFrame({"class": table.targets}).with_columns(
        [pl.Series(m, imp[:, i]) for i, m in enumerate(table.models)]
    )
    files["importance"] = out / "importance.parquet"
    importance.write_parquet(files["importance"])
    importance.write_csv(out / "importance.csv")
    files["importance_csv"] = out / "importance.csv"

    result = StackResult(
        cfg,
        table,
        strategy,
        check,
        device,
        nested,
        control,
        rows,
        y_control,
        final,
        scores,
        importance,
        files,
        seconds,
    )
    t0 = time.perf_counter()
    inputs = report.ReportInputs(
        out=out,
        runs=cfg.runs,
        data=cfg.data,
        models=table.models,
        classes=table.targets,
        skipped=table.skipped,
        n_files=table.files,
        n_features=len(table.feature_columns),
        k=table.k,
        y=Y,
        probs={**probs, META_ROW: nested.oof},
        scores=scores,
        importance=importance,
        strategy=strategy,
        strategy_check=check,
        device=device,
        params=asdict(cfg.params),
        model_files=final.model_files(),
        control_rows=len(rows),
        meta_thresholds=nested.thresholds,
        final_thresholds=final.thresholds,
        seconds=seconds,
        seed=cfg.seed,
        bootstrap=cfg.bootstrap,
        ci=cfg.ci,
        plot_max_rows=cfg.plot_max_rows,
    )
    files.update(report.write_report(inputs))
    seconds["report"] = time.perf_counter() - t0
    log.info("stacking done: %s", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return result
