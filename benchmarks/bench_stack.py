"""``retina-bench stack``: the stacking table and the meta-learner.

1. **Table**: 1,000,000 samples x 6 backbones x 5 folds of OOF parquet (30 files, Float32 probabilities, rows of each
   file in random order) -> the 66-column ``MODEL__CLASS`` table joined to the index labels.
   Ours: :func:`retina_train.stack.build_feature_table` (polars lazy scans, one join, validation that every sample is
   predicted exactly once per model, reshape). Baseline: pandas ``read_parquet`` + ``concat`` + ``pivot`` +
   ``merge`` (no validation). ``ratio`` = pandas time / polars time; goal >= 5 (and polars <= 3 s at 1M).
2. **Meta-learner**: XGBoost on the 66 features -> 11 labels, trained on folds 1-4 and scored on fold 0, with the
   same parameters: ``native`` (one booster, ``multi_strategy="one_output_per_tree"``) vs scikit-learn
   ``MultiOutputClassifier(XGBClassifier)``. Goal: native >= 1.2x faster at equal macro-AUC (+-0.001).
3. **GPU row**: the native meta-learner on ``device="cuda"`` (same data, parameters and folds) when XGBoost sees a
   CUDA GPU; elsewhere the row is reported as skipped, with the reason. :func:`nested_cv_seconds` times the whole
   nested CV (``retina-bench device`` runs it on 1M rows on the GPU; goal < 60 s).

``--quick``: 100,000 samples. The OOF files are generated once into the cache folder. ``--workers`` sets XGBoost's
threads (polars uses its own pool, all cores). OpenMP's wait policy is OpenMP's default unless ``OMP_WAIT_POLICY`` is
set (on a busy shared machine ``PASSIVE`` steadies the timings; on a quiet one it made the demo's fits 1.8x slower).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.common import BenchResult, Row, best_of, warm_cache
from retina_io.schema import CLASSES

TABLE_GOAL = 5.0
META_GOAL = 1.2
BACKBONES = ("convnext", "efficientnet", "inception", "resnet", "swin", "vit")


def make_oof_inputs(
    root: Path,
    *,
    n: int,
    models: Sequence[str] = BACKBONES,
    k: int = 5,
    ranks: int = 1,
    seed: int = 0,
    prevalence: float = 0.15,
    strength: Mapping[str, Sequence[float] | float] | float = 1.5,
    classes_present: Sequence[str] = CLASSES,
) -> tuple[Path, Path]:
    """A minimal packed-dataset folder (``index.parquet`` + ``manifest.json``) and contract-3 OOF files for it.

    Keys are ``f"{i:09d}"``, folds random and balanced, the index in fold order (as packing writes it), labels
    Bernoulli(``prevalence``) per class. Backbone ``m``'s
    probability for class ``c`` is ``sigmoid(s * (2y - 1) + N(0, 1.5))`` with ``s = strength[m][c]`` (0: pure
    noise). Each fold's samples are split across ``ranks`` files in random order. Returns ``(runs, data)``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    data, runs = root / "data", root / "runs"
    data.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    # like retina-shard pack: keys are the ranks of the label rows, the index is in tar order (fold by fold, samples
    # shuffled within a fold)
    fold_of_key = rng.permutation(np.arange(n) % k)
    order = np.lexsort((rng.random(n), fold_of_key))
    keys = np.char.zfill(order.astype(str), 9)
    folds = fold_of_key[order].astype(np.int32)
    y = (rng.random((n, len(CLASSES))) < prevalence).astype(np.uint8)
    index = pl.DataFrame(
        {
            "key": keys,
            "id": np.char.add("img_", keys),
            "fold": folds,
            "shard": np.char.add(np.char.add("fold", folds.astype(str)), "/000000.tar"),
            **{
                c: pl.Series(c, y[:, j] if c in classes_present else [None] * n, dtype=pl.UInt8)
                for j, c in enumerate(CLASSES)
            },
        }
    ).with_columns(pl.col("fold").cast(pl.Int32))
    index.write_parquet(data / "index.parquet")
    manifest = {
        "format": "retina-shards",
        "version": 1,
        "classes": list(CLASSES),
        "classes_present": [c for c in CLASSES if c in classes_present],
        "preset": "synthetic-oof",
        "seed": seed,
        "k": k,
        "counts": {"accepted": n, "per_fold": [int((folds == f).sum()) for f in range(k)]},
        "shards": [],
    }
    (data / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    for m in models:
        s = strength.get(m, 1.5) if isinstance(strength, Mapping) else strength
        s = np.broadcast_to(np.asarray(s, dtype=np.float32), (len(CLASSES),))
        logit = s * (2.0 * y - 1.0) + rng.normal(0, 1.5, y.shape).astype(np.float32)
        prob = (1 / (1 + np.exp(-logit))).astype(np.float32)
        for f in range(k):
            rows = rng.permutation(np.flatnonzero(folds == f))
            for r, part in enumerate(np.array_split(rows, ranks)):
                out = runs / m / f"fold{f}" / f"oof-rank{r}.parquet"
                out.parent.mkdir(parents=True, exist_ok=True)
                pl.DataFrame(
                    {
                        "key": keys[part],
                        "fold": pl.Series("fold", folds[part], dtype=pl.Int32),
                        **{c: pl.Series(c, prob[part, j], dtype=pl.Float32) for j, c in enumerate(CLASSES)},
                    }
                ).write_parquet(out)
    return runs, data


def ensure_oof(cache: Path, n: int) -> tuple[Path, Path]:
    folder = cache / f"stack-oof-v2-{n}"
    done = folder / ".complete"
    if not done.is_file():
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        make_oof_inputs(folder, n=n, strength=np.linspace(0.6, 2.4, len(CLASSES)))
        done.write_text("ok\n")
    return folder / "runs", folder / "data"


def pandas_table(runs: Path, data: Path) -> object:
    """The baseline: pandas concat + pivot + merge with the index labels (no validation)."""
    import pandas as pd

    frames = []
    for path in sorted(runs.glob("*/fold*/oof-rank*.parquet")):
        df = pd.read_parquet(path)
        df["model"] = path.parent.parent.name
        frames.append(df)
    long = pd.concat(frames, ignore_index=True)
    wide = long.pivot(index="key", columns="model", values=list(CLASSES))
    wide = wide.swaplevel(axis=1)
    models = sorted(long["model"].unique())
    wide = wide[[(m, c) for m in models for c in CLASSES]]
    wide.columns = [f"{m}__{c}" for m, c in wide.columns]
    index = pd.read_parquet(data / "index.parquet", columns=["key", "fold", *CLASSES])
    return index.merge(wide, left_on="key", right_index=True, how="left")


def _meta(
    X: np.ndarray,  # noqa: N803
    Y: np.ndarray,  # noqa: N803
    folds: np.ndarray,
    strategy: str,
    workers: int,
    device: str = "cpu",
) -> tuple[float, float]:
    from retina_train.stack import MetaParams, create_meta_learner, feature_columns
    from retina_train.stack.metrics import roc_auc

    learner = create_meta_learner(
        feature_columns(BACKBONES), list(CLASSES), strategy=strategy, device=device, params=MetaParams(n_jobs=workers)
    )
    train, test = folds != 0, folds == 0
    t0 = time.perf_counter()
    learner.fit(X[train], Y[train])
    seconds = time.perf_counter() - t0
    p = learner.predict_proba(X[test])
    auc = float(np.mean([roc_auc(Y[test, j], p[:, j]) for j in range(Y.shape[1])]))
    return seconds, auc


def gpu_skip_reason() -> str:
    """Why the stack's GPU rows cannot run here ("" when XGBoost sees a CUDA GPU)."""
    import xgboost as xgb

    from retina_train.stack.meta import cuda_available

    if not xgb.build_info().get("USE_CUDA"):
        return "this XGBoost build has no CUDA support"
    return "" if cuda_available() else "no CUDA GPU visible to XGBoost"


def nested_cv_seconds(
    *,
    n: int,
    device: str,
    workers: int | None = None,
    strategy: str = "auto",
    n_estimators: int = 100,
    cache: Path | None = None,
) -> dict:
    """The stack's nested CV (as ``retina-stack`` runs it: the ``auto`` strategy check, then one meta-learner per
    fold) over ``n`` samples of synthetic OOF for the paper's six backbones, on ``device``. Returns the seconds of
    the nested CV (and of building the table), the strategy kept and the meta-OOF macro-AUC."""
    from retina_train.stack import MetaParams, StackConfig, build_feature_table, create_meta_learner
    from retina_train.stack.nested import nested_cv
    from retina_train.stack.run import _choose_strategy, _macro_auc

    cache = cache or Path(tempfile.gettempdir()) / "retina-bench-cache"
    logging.getLogger("retina_train").setLevel(logging.WARNING)
    runs, data = ensure_oof(cache, n)
    t0 = time.perf_counter()
    table = build_feature_table(runs, data)
    t_table = time.perf_counter() - t0
    X, Y, folds = table.X(), table.Y(), table.folds()
    params = MetaParams(n_estimators=n_estimators, n_jobs=workers)

    def make(s: str):
        return create_meta_learner(table.feature_columns, table.targets, strategy=s, device=device, params=params)

    cfg = StackConfig(runs=runs, data=data, out=cache, strategy=strategy, device=device, progress=False)
    t0 = time.perf_counter()
    chosen, _, prefit = _choose_strategy(cfg, make, X, Y, folds)
    result = nested_cv(X, Y, folds, lambda: make(chosen), prefit=prefit)
    seconds = time.perf_counter() - t0
    return {"samples": n, "device": device, "strategy": chosen, "n_estimators": n_estimators,
            "nested_cv_seconds": round(seconds, 2), "table_seconds": round(t_table, 2),
            "macro_auc": round(_macro_auc(Y, result.oof), 5)}  # fmt: skip


def run(*, quick: bool = False, workers: int = 2, cache: Path | None = None) -> BenchResult:
    from retina_train.stack import build_feature_table

    n = 100_000 if quick else 1_000_000
    repeats = 2 if quick else 3
    cache = cache or Path(tempfile.gettempdir()) / "retina-bench-cache"
    logging.getLogger("retina_train").setLevel(logging.WARNING)
    runs, data = ensure_oof(cache, n)
    files = sorted(runs.glob("*/fold*/oof-rank*.parquet"))
    nbytes = warm_cache(files)

    t_polars = best_of(lambda: build_feature_table(runs, data), repeats)
    t_pandas = best_of(lambda: pandas_table(runs, data), repeats)
    table = build_feature_table(runs, data)
    X, Y, folds = table.X(), table.Y(), table.folds()

    t_native, auc_native = _meta(X, Y, folds, "native", workers)
    t_multi, auc_multi = _meta(X, Y, folds, "multioutput", workers)
    n_train = int((folds != 0).sum())
    rows = [
        Row("pandas concat + pivot + merge (baseline)", t_pandas, n, nbytes, f"{len(files)} files"),
        Row("polars build_feature_table (validated)", t_polars, n, nbytes, f"{len(table.feature_columns)} features"),
        Row("meta: MultiOutputClassifier(XGBClassifier)", t_multi, n_train, 0, f"macro-AUC {auc_multi:.4f}"),
        Row("meta: native one_output_per_tree", t_native, n_train, 0, f"macro-AUC {auc_native:.4f}"),
    ]
    gpu: dict = {}
    skip = gpu_skip_reason()
    if skip:
        rows.append(Row("meta: native one_output_per_tree, device=cuda", 0.0, n_train, skipped=skip))
        gpu["meta_native_cuda_skipped"] = skip
    else:
        t_gpu, auc_gpu = _meta(X, Y, folds, "native", workers, device="cuda")
        rows.append(Row("meta: native one_output_per_tree, device=cuda", t_gpu, n_train, 0,
                        f"macro-AUC {auc_gpu:.4f}, {t_native / t_gpu:.1f}x the CPU's speed"))  # fmt: skip
        gpu.update(meta_native_cuda_seconds=round(t_gpu, 2), meta_native_cuda_auc=round(auc_gpu, 5))
    return BenchResult(
        "stack",
        ratio=t_pandas / t_polars,
        goal=TABLE_GOAL,
        rows=rows,
        extra={
            "samples": n,
            "polars_seconds": round(t_polars, 3),
            "pandas_seconds": round(t_pandas, 3),
            "meta_ratio": round(t_multi / t_native, 3),
            "meta_goal": META_GOAL,
            "meta_native_seconds": round(t_native, 2),
            "meta_multioutput_seconds": round(t_multi, 2),
            "meta_native_auc": round(auc_native, 5),
            "meta_multioutput_auc": round(auc_multi, 5),
            "meta_auc_diff": round(auc_native - auc_multi, 5),
            "xgboost_threads": workers,
            **gpu,
        },
    )
