"""``retina-eval``: zero-shot evaluation of a trained run on an external packed dataset.

Every fold model of every backbone predicts every sample (:func:`retina_train.inference.predict_runs`: each batch
decoded once per preprocessing group and predicted by every fold model of the group; per backbone the mean of its
k fold models), the saved meta-learner turns the ``MODEL__CLASS`` table into 11 probabilities, and the result is
scored against the dataset's own labels through its preset's mapping — only on the classes the dataset labels
(``classes_present``: RFMiD several, AIROGS only GC, the DR sets only DR), with bootstrap CIs — for each backbone,
the plain mean of the backbones, and the meta-learner. Outputs: ``predictions.parquet``, ``scores.parquet``,
``report.md`` with ROC and calibration plots, ``summary.json``.

No silent partial ensemble (issue 11): every fold model of every backbone must be there (k as training recorded it,
:func:`retina_train.inference.open_backbones`), else the evaluation is refused naming each missing file; with
``allow_partial`` (``--allow-partial``) it goes on with the fold models present and says so in the log, in
``summary.json`` (``partial``, ``fold_models``) and at the top of ``report.md``. Options and ``--out`` are checked
before anything is computed or written.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from retina_io.cli import config_from_args, console_main, setup_logging
from retina_io.dataset import PackedDataset
from retina_io.errors import RetinaError, at_least, check_rules
from retina_io.fsutil import require_out_folder
from retina_train.inference import open_backbones, predict_runs
from retina_train.stack import metrics
from retina_train.stack.rows import MEAN_ROW, META_ROW

log = logging.getLogger(__name__)


class EvalError(RetinaError, RuntimeError):
    """An evaluation that cannot be done as asked; the message names the input and the fix."""


@dataclass
class EvalConfig:
    runs: Path
    data: Path
    out: Path
    stack: Path | None = None  # default: runs/stack
    device: str = "cpu"
    backend: str = "dali"
    batch_size: int | None = None  # None: each preprocessing group's data.eval_batch_size (the smallest)
    bootstrap: int = 1000
    seed: int = 0
    num_threads: int = 2
    allow_partial: bool = False  # go on when fold models are missing, and report the ensemble as partial


@dataclass
class EvalResult:
    out: Path
    classes: list[str]
    scores: pl.DataFrame
    predictions: pl.DataFrame
    seconds: float
    partial: bool = False  # some fold models were missing (allowed by allow_partial)

    def macro(self, model: str = META_ROW, metric: str = "auc") -> float:
        row = self.scores.filter(
            (pl.col("model") == model) & (pl.col("class") == metrics.MACRO) & (pl.col("metric") == metric)
        )
        return float(row["value"].item())


def check_eval_config(cfg: EvalConfig) -> None:
    """Every option in its range and ``--out`` usable as a folder (an EvalError naming the first that is not)."""
    check_rules([at_least("--batch-size", cfg.batch_size, 1), at_least("--bootstrap", cfg.bootstrap, 0),
                 at_least("--seed", cfg.seed, 0), at_least("num_threads", cfg.num_threads, 1)], EvalError)  # fmt: skip
    require_out_folder(Path(cfg.out), EvalError)


def evaluate_external(cfg: EvalConfig) -> EvalResult:
    from retina_train.stack import StackError, load_meta_learner

    t0 = time.perf_counter()
    check_eval_config(cfg)
    ds = PackedDataset.open(cfg.data)
    backbones = open_backbones(Path(cfg.runs), cfg.device, allow_partial=cfg.allow_partial)
    stack_dir = Path(cfg.stack) if cfg.stack else Path(cfg.runs) / "stack"
    try:
        meta = load_meta_learner(stack_dir)
    except (StackError, FileNotFoundError) as exc:
        raise EvalError(
            f"no usable meta-learner in {stack_dir} ({exc}); run `retina-stack --runs {cfg.runs}` first"
        ) from exc
    index = ds.index()
    classes = [c for c in meta.classes if c in ds.classes_present]
    scorable = [c for c in classes if 0 < int(index[c].fill_null(0).sum()) < index[c].drop_nulls().len()]
    if not classes:
        raise EvalError(f"{cfg.data} labels {list(ds.classes_present)}, the meta-learner predicts {meta.classes}: "
                        "they share no class, so there is nothing to score")  # fmt: skip
    skipped = sorted(set(classes) - set(scorable))
    if skipped:
        log.warning("classes %s have only one label value in %s: not scored", skipped, cfg.data)
    if not scorable:
        raise EvalError(f"{cfg.data}: every shared class ({classes}) has only positives or only negatives")

    features = predict_runs(backbones, Path(cfg.data), device=cfg.device, batch_size=cfg.batch_size,
                            backend=cfg.backend, num_threads=cfg.num_threads)  # fmt: skip
    try:
        meta_probs = meta.predict_proba(features)
    except StackError as exc:
        raise EvalError(f"the backbones under {cfg.runs} do not match the meta-learner in {stack_dir}: {exc}") from exc
    joined = features.join(index.select("key", "id", *scorable), on="key", how="left")
    if joined.height != index.height or joined["id"].null_count():
        raise EvalError(f"predictions cover {joined.height} samples, {cfg.data} has {index.height}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    predictions = pl.DataFrame({"key": features["key"], "id": joined["id"],
                                **{c: meta_probs[:, j] for j, c in enumerate(meta.classes)}})  # fmt: skip
    predictions.write_parquet(out / "predictions.parquet")

    # score only the rows with labels for all scored classes (a class is null where the dataset does not label it)
    labelled = joined.select(scorable).to_numpy()
    keep = ~np.isnan(labelled.astype(np.float64)).any(axis=1)
    y = labelled[keep].astype(np.uint8)
    models = sorted({c.rsplit("__", 1)[0] for c in meta.feature_columns})
    rows: dict[str, metrics.Scored] = {}
    per_backbone = []
    for m in models:
        p = joined.select([f"{m}__{c}" for c in scorable]).to_numpy()[keep]
        per_backbone.append(p)
        rows[m] = metrics.Scored(p, p >= 0.5, kind="backbone")
    mean = np.mean(per_backbone, axis=0)
    rows[MEAN_ROW] = metrics.Scored(mean, mean >= 0.5, kind="mean")
    mp = meta_probs[:, [meta.classes.index(c) for c in scorable]][keep]
    thresholds = np.array([meta.thresholds.get(c, 0.5) for c in scorable])
    rows[META_ROW] = metrics.Scored(mp, mp >= thresholds, kind="meta")
    scores = metrics.score_table(y, rows, scorable, n_bootstrap=cfg.bootstrap, seed=cfg.seed)
    scores.write_parquet(out / "scores.parquet")
    folds = fold_model_record(backbones)
    _write_report(cfg, out, ds, scorable, skipped, y, {k: v.probs for k, v in rows.items()}, scores, stack_dir, folds)
    partial = any(f["missing"] for f in folds.values())
    result = EvalResult(out, scorable, scores, predictions, time.perf_counter() - t0, partial)
    (out / "summary.json").write_text(json.dumps({
        "data": str(cfg.data), "preset": ds.manifest["preset"], "classes": scorable, "samples": int(keep.sum()),
        "macro_auc": {r: result.macro(r) for r in rows}, "seconds": round(result.seconds, 1),
        "partial": partial, "fold_models": folds,
    }, indent=1))  # fmt: skip
    return result


def fold_model_record(backbones) -> dict[str, dict]:
    """Per backbone: the fold model files used and those missing (empty unless ``--allow-partial`` let them be)."""
    return {b.name: {"used": [str(w) for w in b.weights], "missing": [str(m) for m in b.missing]} for b in backbones}


def _fold_lines(folds: dict[str, dict]) -> list[str]:
    """The report's sentence on the fold models: all of them, or a warning naming what a partial ensemble lacks."""
    if not any(f["missing"] for f in folds.values()):
        return ["Each backbone's probability is the mean of all its fold models; the meta-learner is applied to all "
                "of them."]  # fmt: skip
    lines = ["**Partial ensemble (`--allow-partial`): these scores are not those of the trained ensemble.** "
             "Each backbone's probability is the mean of the fold models present:", ""]  # fmt: skip
    for name, f in folds.items():
        n, k = len(f["used"]), len(f["used"]) + len(f["missing"])
        lines.append(f"- {name}: {n} of {k} fold models" + (f"; missing {', '.join(f'`{m}`' for m in f['missing'])}"
                                                             if f["missing"] else ""))  # fmt: skip
    return lines


def _write_report(cfg, out, ds, classes, skipped, y, probs, scores, stack_dir, folds) -> None:
    from retina_train.stack.report import plot_calibration, plot_roc, scores_markdown

    plot_roc(out / "roc.png", y, probs, classes, bold=META_ROW, dashed=MEAN_ROW)
    plot_calibration(out / "calibration.png", y, {META_ROW: probs[META_ROW], MEAN_ROW: probs[MEAN_ROW]}, classes)
    lines = [
        f"# Zero-shot evaluation on `{Path(cfg.data).name}` ({ds.manifest['preset']} preset)",
        "",
        f"Run `{cfg.runs}`, meta-learner `{stack_dir}`. {len(y)} samples; scored classes (the dataset's labels mapped "
        f"onto the 11 through its preset): {', '.join(classes)}."
        + (f" Not scored (one label value only): {', '.join(skipped)}." if skipped else ""),
        *_fold_lines(folds),
        "",
        scores_markdown(scores, classes, meta_row=META_ROW),
        "![ROC per class](roc.png)",
        "",
        "![Calibration / reliability](calibration.png)",
        "",
    ]
    importance = Path(stack_dir) / "importance.png"
    if importance.is_file():
        import shutil

        shutil.copyfile(importance, out / "importance.png")
        lines += ["Per-disease importance of each backbone in the meta-learner (XGBoost gain summed per backbone):",
                  "", "![Backbone importance per class](importance.png)", ""]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    return console_main("retina-eval", _run, argv)


def _run(argv: list[str] | None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="retina-eval", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, required=True, help="the run folder (runs/EXP) with trained backbones")
    p.add_argument("--data", type=Path, required=True, help="an external packed dataset (retina-shard pack)")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. runs/EXP/eval/NAME")
    p.add_argument("--stack", type=Path, default=None, help="the retina-stack output (default: RUNS/stack)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="dali", choices=("dali", "wds"))
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: the backbones' data.eval_batch_size)")  # fmt: skip
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-partial", action="store_true", help="evaluate although fold models are missing (refused "
                   "by default); the output and report then say which were used and which are missing")  # fmt: skip
    args = p.parse_args(argv)
    setup_logging()
    from retina_train.distributed import resolve_device

    cfg = config_from_args(EvalConfig, args, device=resolve_device(args.device))
    result = evaluate_external(cfg)
    print((result.out / "report.md").read_text().split("### AUC per class")[0])
    print(
        json.dumps(
            {
                "external_macro_auc": result.macro(),
                "classes": result.classes,
                "report": str(result.out / "report.md"),
                "partial": result.partial,
            }
        )
    )
    return 0
