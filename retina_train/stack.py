"""Stacking: the out-of-fold feature table, the XGBoost meta-learner, and its nested cross-validation.

**The feature table** (DESIGN.md, contract 3). Every ``runs/EXP/MODEL/fold{k}/oof-rank{R}.parquet`` is scanned with
polars, joined to the dataset's ``index.parquet`` on ``key`` and reshaped to one row per index sample with one
``MODEL__CLASS`` column per backbone and class: models sorted by name, classes in :data:`CLASSES` order
(``a__DR, a__AMD, …, a__RVO, b__DR, …``; 6 backbones give 66 features, any number works). A table is refused, with
the first 10 keys and the count of every problem, when an index sample lacks a model's prediction, a model predicts
a key twice (in one file or across files/ranks), an OOF key is not in the index, the OOF ``fold`` differs from the
index fold (or from the ``fold{k}`` folder), or a probability is missing, NaN or outside [0, 1].

**Targets.** Only classes the dataset labels (``classes_present``) with at least one positive and one negative in
every training split (the samples outside each fold) are predicted; the others are skipped, with the reason.
The meta-learner's *inputs* are always all ``MODEL__CLASS`` columns.

**The meta-learner** (:func:`create_meta_learner`): XGBoost, ``tree_method="hist"``, on ``device="cuda"`` when a GPU
is visible. Two strategies fit the same model — binary relevance, one boosted tree ensemble per class:

- ``multioutput``: scikit-learn ``MultiOutputClassifier(XGBClassifier(...))``, as in the paper: one booster per
  class, each building its own quantile sketch.
- ``native``: one ``XGBClassifier`` on the 2-D label matrix with ``multi_strategy="one_output_per_tree"`` (XGBoost's
  own multi-label mode: ``binary:logistic`` per target, one tree per target per round, one shared sketch and one
  booster). ``multi_output_tree`` (vector leaves) also trains multi-label ``binary:logistic`` in XGBoost 3.2, but it
  is a different model (one tree shared by all classes; lower AUC on our synthetic OOF and slower on CPU) and its
  gain cannot be split per class, so it is not used.
- ``auto`` (default): fit both on the first fold of the nested CV; keep ``native`` when its macro-AUC on that fold is
  within 0.001 of ``multioutput``'s, else ``multioutput``. The check costs one extra fold fit, not a second nested CV;
  the fold-0 model of the chosen strategy is reused.

**Nested cross-validation** (:func:`nested_cv`), on the dataset's own folds: for fold ``k`` a fresh meta-learner
trains on the other folds' rows and predicts fold ``k``, so every sample gets one meta-OOF probability from a model
that never saw it. The training and scored rows of every fold are recorded and checked disjoint, and every row is
scored exactly once (:meth:`NestedCV.check`). The F1 threshold used for fold ``k`` is the F1-optimal one on the fold-
``k`` meta-learner's own (in-sample) predictions of its training rows: fold ``k``'s labels never choose it. (Choosing
it on the other folds' meta-OOF would not be honest: those predictions come from meta-learners that trained on fold
``k``.) Single backbones and their mean are fixed scores; their fold-``k`` threshold is chosen on the other folds.

**The control**: the same nested CV with the label rows permuted across samples (seeded; on at most
``control_max_rows`` rows, a seeded subsample) must score AUC ≈ 0.5. It shows that nothing leaks labels into the
features or the meta-OOF.

**The saved model**: the final meta-learner fits on all rows, is saved as XGBoost UBJSON (``meta_model.ubj``, or
``meta_model_CLASS.ubj`` per class for ``multioutput``) with ``meta.json`` (feature columns in order, classes,
strategy, parameters, models, per-class thresholds chosen on the meta-OOF); :func:`load_meta_learner` reads it back.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from retina_io.dataset import DatasetError, PackedDataset
from retina_io.errors import RetinaError
from retina_io.schema import CLASSES
from retina_train import metrics

log = logging.getLogger(__name__)

SEP = "__"
OOF_GLOB = "*/fold*/oof-rank*.parquet"
STRATEGIES = ("auto", "native", "multioutput")
DEVICES = ("auto", "cuda", "cpu")
AUTO_TOLERANCE = 0.001
META_FORMAT = "retina-stack"
META_VERSION = 1
SHOW = 10  # keys listed per problem in an error message

_FOLD_DIR = re.compile(r"^fold(\d+)$")
_RANK_FILE = re.compile(r"^oof-rank(\d+)\.parquet$")


class StackError(RetinaError, RuntimeError):
    """A problem with the inputs of stacking that the user can fix (the message names the input and the fix)."""


# ------------------------------------------------------------------------------------------------- feature table


def feature_name(model: str, cls: str) -> str:
    return f"{model}{SEP}{cls}"


def feature_columns(models: Sequence[str], classes: Sequence[str] = CLASSES) -> list[str]:
    """The fixed feature order: models sorted by name, each with its classes in ``classes`` order."""
    return [feature_name(m, c) for m in sorted(models) for c in classes]


@dataclass(frozen=True)
class OOFFile:
    model: str
    fold: int  # from the fold{k} folder
    rank: int
    path: Path


def find_oof_files(runs: Path) -> dict[str, list[OOFFile]]:
    """Every ``runs/MODEL/fold{k}/oof-rank{R}.parquet``, by model (sorted); folders that do not match are ignored."""
    runs = Path(runs)
    if not runs.is_dir():
        raise StackError(f"--runs {runs} is not a folder; point it at one experiment folder, runs/EXP")
    found: dict[str, list[OOFFile]] = {}
    for path in sorted(runs.glob(OOF_GLOB)):
        fold_m, rank_m = _FOLD_DIR.match(path.parent.name), _RANK_FILE.match(path.name)
        if not (fold_m and rank_m):
            log.warning("ignoring %s: not MODEL/fold{k}/oof-rank{R}.parquet", path)
            continue
        model = path.parent.parent.name
        found.setdefault(model, []).append(OOFFile(model, int(fold_m[1]), int(rank_m[1]), path))
    if not found:
        raise StackError(
            f"no OOF prediction files under --runs {runs}: expected {runs}/MODEL/fold{{k}}/oof-rank{{R}}.parquet "
            "(contract 3). Point --runs at the experiment folder that training wrote (runs/EXP), or train the "
            "backbones first."
        )
    return dict(sorted(found.items()))


def _check_schemas(files: Mapping[str, list[OOFFile]]) -> None:
    bad = []
    for f in (f for fs in files.values() for f in fs):
        try:
            schema = pl.read_parquet_schema(f.path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            bad.append(f"{f.path}: not a readable parquet file ({exc})")
            continue
        missing = [c for c in ("key", "fold", *CLASSES) if c not in schema]
        wrong = [
            f"{c} is {schema[c]}"
            for c in CLASSES
            if c in schema and not (schema[c].is_float() or schema[c].is_integer())
        ]
        if "key" in schema and schema["key"] != pl.String:
            wrong.append(f"key is {schema['key']}, not String")
        if "fold" in schema and not schema["fold"].is_integer():
            wrong.append(f"fold is {schema['fold']}, not an integer")
        if missing or wrong:
            bad.append(f"{f.path}: " + "; ".join(([f"missing columns {missing}"] if missing else []) + wrong))
    if bad:
        raise StackError(
            "OOF files that do not follow contract 3 (key: String, fold: Int32, one Float32 probability column "
            f"per class {list(CLASSES)}):\n  "
            + "\n  ".join(bad[:SHOW])
            + (f"\n  … {len(bad)} files in all" if len(bad) > SHOW else "")
            + "\nRewrite them with the training OOF writer (retina_train/run.py)."
        )


@dataclass
class FeatureTable:
    """One row per index sample: ``key``, ``fold``, the target labels (UInt8), then the ``MODEL__CLASS`` features."""

    frame: pl.DataFrame
    models: list[str]
    feature_columns: list[str]
    targets: list[str]
    skipped: dict[str, str]
    k: int
    files: int

    @property
    def n(self) -> int:
        return self.frame.height

    def X(self) -> np.ndarray:  # noqa: N802 - the usual name of a feature matrix
        return self.frame.select(self.feature_columns).to_numpy().astype(np.float32, copy=False)

    def Y(self) -> np.ndarray:  # noqa: N802
        return self.frame.select(self.targets).to_numpy().astype(np.uint8, copy=False)

    def folds(self) -> np.ndarray:
        return self.frame["fold"].to_numpy().astype(np.int64)

    def backbone(self, model: str) -> np.ndarray:
        """One backbone's OOF probabilities of the target classes, ``(n, targets)``."""
        return self.frame.select([feature_name(model, c) for c in self.targets]).to_numpy().astype(np.float32)


def _first(df: pl.DataFrame, col: str = "key") -> str:
    return ", ".join(str(v) for v in df[col].head(SHOW).to_list())


@dataclass
class KeyMap:
    """Index key -> index row, for every OOF key.

    The shard writer's keys are zero-padded decimal ranks (``000000000``, ``000000001``, …). When every index key
    is a fixed-width decimal and the numbers are dense, keys map through an integer lookup table (direct addressing:
    no hashing, and the OOF scan parses its keys to integers in parallel with reading); an OOF key then matches only
    with the same width and a number present in the table. Any other keys fall back to a hash join on the strings.
    """

    keys: pl.Series
    width: int | None = None  # dense mode when set
    lut: np.ndarray | None = None

    @classmethod
    def of(cls, keys: pl.Series) -> KeyMap:
        n = keys.len()
        as_int = keys.cast(pl.UInt64, strict=False)
        widths = keys.str.len_bytes()
        if (
            n
            and as_int.null_count() == 0
            and widths.min() == widths.max()
            and not keys.str.starts_with("+").any()
            and int(as_int.max()) < 4 * n + 1024
        ):
            values = as_int.to_numpy()
            lut = np.full(int(values.max()) + 2, -1, dtype=np.int64)  # the last slot: "no such key"
            lut[values] = np.arange(n)
            if (lut >= 0).sum() != n:
                raise ValueError("duplicate keys")
            return cls(keys, int(widths[0]), lut)
        if keys.n_unique() != n:
            raise ValueError("duplicate keys")
        return cls(keys)

    def expr(self) -> pl.Expr:
        """The ``_k`` column of an OOF scan: the key as a lookup number (null when it cannot match), or the key."""
        if self.width is None:
            return pl.col("key").alias("_k")
        key = pl.col("key")
        ok = (key.str.len_bytes() == self.width) & ~key.str.starts_with("+")
        return pl.when(ok).then(key.cast(pl.UInt64, strict=False)).alias("_k")

    def rows(self, k: pl.Series) -> np.ndarray:
        """The index row of each ``_k`` value, -1 when the key is not in the index."""
        if self.lut is None:
            idx = pl.DataFrame({"_k": self.keys}).with_row_index("_row")
            joined = pl.DataFrame({"_k": k}).join(idx, on="_k", how="left", maintain_order="left")
            return joined["_row"].fill_null(-1).to_numpy().astype(np.int64)
        missing = len(self.lut) - 1
        values = k.fill_null(missing).to_numpy()
        return self.lut[np.minimum(values, missing)]


@dataclass
class _Checks:
    """Per model: rows, and the counts of every kind of problem (all zero for a sound table)."""

    model: str
    start: int
    stop: int
    unknown: int = 0
    duplicated: int = 0
    missing: int = 0
    fold_bad: int = 0
    path_bad: int = 0
    value_bad: int = 0

    @property
    def ok(self) -> bool:
        return not (self.unknown or self.duplicated or self.missing or self.fold_bad or self.path_bad or self.value_bad)


def _problems(checks: list[_Checks], long: pl.DataFrame, rows: np.ndarray, index: pl.DataFrame, files) -> list[str]:
    """Human-readable descriptions, with the first keys, of everything wrong with the OOF rows."""
    names = {i: str(f.path) for i, f in enumerate(files)}
    ifold = index["fold"].to_numpy()
    out: list[str] = []
    for c in checks:
        mine = long.slice(c.start, c.stop - c.start).with_columns(
            pl.Series("_row", rows[c.start : c.stop]),
            pl.Series(
                "_ifold", np.where(rows[c.start : c.stop] >= 0, ifold[np.maximum(rows[c.start : c.stop], 0)], -1)
            ),
        )
        m = c.model
        if c.start == c.stop:
            out.append(f"{m}: no OOF rows at all (its files are empty)")
            continue
        if c.unknown:
            bad = mine.filter(pl.col("_row") < 0)
            out.append(f"{m}: {c.unknown} OOF rows have a key that is not in index.parquet: {_first(bad)}")
        if c.duplicated:
            dup = mine.filter((pl.col("_row") >= 0) & (pl.len().over("_row") > 1))
            d = dup.group_by("key", maintain_order=True).agg(pl.col("_file").unique().sort())
            example = "; ".join(f"{k} in {', '.join(names[i] for i in fs)}" for k, fs in d.head(SHOW).iter_rows())
            out.append(f"{m}: {c.duplicated} keys predicted more than once: {example}")
        if c.missing:
            seen = np.zeros(index.height, dtype=bool)
            seen[rows[c.start : c.stop][rows[c.start : c.stop] >= 0]] = True
            miss = index.filter(pl.Series(~seen))
            per_fold = miss.group_by("fold").len().sort("fold")
            folds = ", ".join(f"fold {f}: {n}" for f, n in per_fold.iter_rows())
            out.append(f"{m}: {c.missing} index samples have no prediction ({folds}): {_first(miss)}")
        if c.fold_bad:
            bad = mine.filter((pl.col("_row") >= 0) & (pl.col("fold") != pl.col("_ifold")))
            ex = ", ".join(
                f"{k} (OOF {a}, index {b})" for k, a, b in bad.select("key", "fold", "_ifold").head(SHOW).rows()
            )
            out.append(f"{m}: {c.fold_bad} OOF rows disagree with the index fold: {ex}")
        if c.path_bad:
            bad = mine.filter(pl.col("fold") != pl.col("_pfold"))
            out.append(
                f"{m}: {c.path_bad} OOF rows have a fold that differs from their fold{{k}} folder: {_first(bad)}"
            )
        if c.value_bad:
            bad = mine.filter(~_IN_RANGE)
            out.append(
                f"{m}: {c.value_bad} OOF rows have a probability that is missing, NaN or outside [0, 1]: {_first(bad)}"
            )
    return out


_IN_RANGE = pl.all_horizontal([pl.col(c).is_between(0.0, 1.0).fill_null(False) for c in CLASSES])


def _with_keys(files: list[OOFFile]) -> pl.DataFrame:
    """Every OOF row again, with its key string, file number and folder fold (for error messages only)."""
    return pl.concat(
        [
            pl.scan_parquet(f.path).select(
                pl.col("key"),
                pl.col("fold").cast(pl.Int32),
                *[pl.col(c).cast(pl.Float32) for c in CLASSES],
                pl.lit(i, dtype=pl.UInt32).alias("_file"),
                pl.lit(f.fold, dtype=pl.Int32).alias("_pfold"),
            )
            for i, f in enumerate(files)
        ],
        how="vertical",
    ).collect()


def build_feature_table(runs: Path, data: Path) -> FeatureTable:
    """Read every OOF shard under ``runs`` and the index of ``data``; validate; one row per sample, 66 features.

    One lazy scan of every file (models in name order, so each model's rows are contiguous), every key mapped to its
    index row, then per model: the exactly-once check (a bincount over index rows), fold and value checks, and the
    reshape (each model's probabilities gathered into index order, renamed ``MODEL__CLASS``).
    """
    runs, data = Path(runs), Path(data)
    try:
        ds = PackedDataset.open(data)
        index = ds.index()
    except DatasetError as exc:
        raise StackError(f"--data {data}: {exc}") from exc
    files_by_model = find_oof_files(runs)
    _check_schemas(files_by_model)
    models = list(files_by_model)
    bad_names = [m for m in models if SEP in m]
    if bad_names:
        raise StackError(f"model folders {bad_names} under {runs} contain '{SEP}', the feature-name separator; rename")
    files = [f for fs in files_by_model.values() for f in fs]
    t0 = time.perf_counter()
    try:
        keymap = KeyMap.of(index["key"])
    except ValueError:
        raise StackError(
            f"{data}/index.parquet has duplicate keys; repack the dataset with `retina-shard pack`"
        ) from None

    # one lazy scan: key -> lookup number, fold, probabilities, and the per-row checks, computed per file in parallel
    long = pl.concat(
        [
            pl.scan_parquet(f.path).select(
                keymap.expr(),
                pl.col("fold").cast(pl.Int32),
                *[pl.col(c).cast(pl.Float32) for c in CLASSES],
                (~_IN_RANGE).alias("_value_bad"),
                (pl.col("fold") != f.fold).alias("_path_bad"),
            )
            for f in files
        ],
        how="vertical",
    ).collect()
    rows = keymap.rows(long["_k"])
    n = index.height
    known = rows >= 0
    path_bad = long["_path_bad"].to_numpy()
    value_bad = long["_value_bad"].to_numpy()
    file_rows = {f.path: pl.scan_parquet(f.path).select(pl.len()).collect().item() for f in files}
    ifold = index["fold"].cast(pl.Int32)
    checks, wide, start = [], [], 0
    for m in models:
        stop = start + sum(file_rows[f.path] for f in files_by_model[m])
        sl = slice(start, stop)
        r, k = rows[sl], known[sl]
        counts = np.bincount(r[k], minlength=n)
        c = _Checks(
            m,
            start,
            stop,
            unknown=int((~k).sum()),
            duplicated=int((counts > 1).sum()),
            missing=int((counts == 0).sum()),
            path_bad=int(path_bad[sl].sum()),
            value_bad=int(value_bad[sl].sum()),
        )
        if not (c.unknown or c.duplicated or c.missing):
            # exactly once: the rows are a permutation of the index rows; gather them into index order
            part = long.slice(start, n).select("fold", *CLASSES).rechunk()  # one chunk per file: slow gathers
            if not np.array_equal(r, np.arange(n)):
                order = np.empty(n, dtype=np.int64)
                order[r] = np.arange(n)
                part = part[order]
            c.fold_bad = int((part["fold"] != ifold).sum())
            wide.append(part.drop("fold").rename({cls: feature_name(m, cls) for cls in CLASSES}))
        else:
            oof_fold = long["fold"].to_numpy()[sl][k]
            c.fold_bad = int((oof_fold != ifold.to_numpy()[r[k]]).sum())
        checks.append(c)
        start = stop
    if not all(c.ok for c in checks):
        raise StackError(
            f"the OOF predictions under {runs} do not cover {data}/index.parquet exactly once per model "
            f"({n} samples, {len(models)} models, {len(files)} files):\n  "
            + "\n  ".join(_problems(checks, _with_keys(files), rows, index, files))
            + "\nEvery backbone must predict every index sample exactly once (runs/EXP/MODEL/fold{k}/oof-rank{R}."
            "parquet, contract 3): rerun the missing folds' OOF prediction, remove stale or duplicated rank files, "
            "and pass the --data folder the backbones were trained on."
        )
    targets, skipped = _targets(index, ds)
    frame = pl.concat(
        [index.select("key", pl.col("fold").cast(pl.Int32), *[pl.col(c).cast(pl.UInt8) for c in targets]), *wide],
        how="horizontal",
    )
    log.info(
        "feature table: %d samples x %d features (%d models, %d files) in %.2f s; targets %s",
        frame.height,
        len(models) * len(CLASSES),
        len(models),
        len(files),
        time.perf_counter() - t0,
        targets,
    )
    if skipped:
        log.info("classes skipped: %s", "; ".join(f"{c} ({r})" for c, r in skipped.items()))
    return FeatureTable(frame, models, feature_columns(models), targets, skipped, ds.k, len(files))


def _targets(index: pl.DataFrame, ds: PackedDataset) -> tuple[list[str], dict[str, str]]:
    """The classes the meta-learner predicts and why the others are skipped."""
    present = [c for c in CLASSES if c in set(ds.classes_present)]
    nulls = index.select(pl.col(present).null_count()).row(0, named=True) if present else {}
    per_fold = index.group_by("fold").agg(pl.len().alias("_n"), *[pl.col(c).cast(pl.Int64).sum() for c in present])
    n_fold = per_fold["_n"].to_numpy()
    targets, skipped = [], {}
    for c in CLASSES:
        if c not in present:
            skipped[c] = "not labelled by this dataset"
            continue
        if nulls[c]:
            skipped[c] = f"{nulls[c]} samples unlabelled (null)"
            continue
        pos_in = per_fold[c].to_numpy()
        n_pos, n_neg = int(pos_in.sum()), int((n_fold - pos_in).sum())
        pos, neg = n_pos - pos_in, n_neg - (n_fold - pos_in)  # in each training split (all folds but one)
        if n_pos == 0 or n_neg == 0:
            skipped[c] = f"{n_pos} positives, {n_neg} negatives: needs both"
        elif (pos == 0).any() or (neg == 0).any():
            skipped[c] = "some training split (all folds but one) has no positive or no negative"
        else:
            targets.append(c)
    if not targets:
        raise StackError(
            f"--data {ds.root} shares no scorable class with the backbones' {list(CLASSES)}: "
            + "; ".join(f"{c}: {r}" for c, r in skipped.items())
            + ". Stack on the dataset the backbones were cross-validated on (its OOF predictions), which labels "
            "these classes with positives and negatives in every fold."
        )
    return targets, skipped


# -------------------------------------------------------------------------------------------------- meta-learner


@dataclass
class MetaParams:
    """XGBoost parameters of the meta-learner (the same for every strategy, fold and the control)."""

    n_estimators: int = 100
    max_depth: int = 4
    learning_rate: float = 0.1
    subsample: float = 1.0
    colsample_bytree: float = 1.0
    min_child_weight: float = 1.0
    reg_lambda: float = 1.0
    max_bin: int = 256
    n_jobs: int | None = None  # None: all cores

    def xgb_kwargs(self, *, device: str, seed: int) -> dict:
        kw = asdict(self)
        return {**kw, "tree_method": "hist", "device": device, "random_state": seed, "objective": "binary:logistic"}


def cuda_available() -> bool:
    """Whether XGBoost can train on a CUDA GPU here (torch's view when torch is installed, else a tiny XGBoost fit)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, or a broken CUDA install: ask XGBoost
        pass
    import xgboost as xgb

    if not xgb.build_info().get("USE_CUDA"):
        return False
    try:
        xgb.train({"device": "cuda", "tree_method": "hist"}, xgb.DMatrix(np.zeros((2, 1)), label=[0, 1]), 1)
        return True
    except xgb.core.XGBoostError:
        return False


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise StackError(f"--device {device!r}: choose one of {DEVICES}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise StackError("--device cuda, but no CUDA GPU is visible to XGBoost; use --device auto or --device cpu")
    return device


class Estimator(Protocol):
    """What :func:`nested_cv` needs of a meta-learner."""

    def fit(self, X: np.ndarray, Y: np.ndarray) -> Estimator: ...  # noqa: N803

    def predict_proba(self, X) -> np.ndarray: ...  # noqa: N803


@dataclass
class MetaLearner:
    """The XGBoost meta-learner: ``MODEL__CLASS`` features in a fixed order -> one probability per target class."""

    feature_columns: list[str]
    classes: list[str]
    strategy: str = "native"
    device: str = "cpu"
    params: MetaParams = field(default_factory=MetaParams)
    seed: int = 0
    boosters: list = field(default_factory=list)  # xgboost.Booster: one (native) or one per class (multioutput)
    thresholds: dict[str, float] = field(default_factory=dict)

    def fit(self, X: np.ndarray, Y: np.ndarray) -> MetaLearner:  # noqa: N803
        from xgboost import XGBClassifier

        X = np.ascontiguousarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=np.uint8)
        if X.shape[1] != len(self.feature_columns) or Y.shape[1] != len(self.classes):
            raise ValueError(
                f"fit on X {X.shape}, Y {Y.shape}: expected {len(self.feature_columns)} features and "
                f"{len(self.classes)} classes"
            )
        kw = self.params.xgb_kwargs(device=self.device, seed=self.seed)
        if self.strategy == "native":
            clf = XGBClassifier(**kw, multi_strategy="one_output_per_tree").fit(X, Y)
            self.boosters = [clf.get_booster()]
        elif self.strategy == "multioutput":
            from sklearn.multioutput import MultiOutputClassifier

            clf = MultiOutputClassifier(XGBClassifier(**kw)).fit(X, Y)
            self.boosters = [e.get_booster() for e in clf.estimators_]
        else:
            raise ValueError(f"strategy {self.strategy!r}: native or multioutput")
        for b in self.boosters:
            b.feature_names = list(self.feature_columns)
        return self

    def check_frame(self, features: pl.DataFrame) -> np.ndarray:
        """The feature matrix of ``features``; refuses a frame whose ``MODEL__CLASS`` columns differ from the order."""
        have = [c for c in features.columns if SEP in c]
        if have != self.feature_columns:
            missing = [c for c in self.feature_columns if c not in have]
            extra = [c for c in have if c not in self.feature_columns]
            detail = []
            if missing:
                detail.append(
                    f"missing {missing[:SHOW]}" + (f" (+{len(missing) - SHOW})" if len(missing) > SHOW else "")
                )
            if extra:
                detail.append(f"not trained on {extra[:SHOW]}")
            if not missing and not extra:
                at = next(i for i, (a, b) in enumerate(zip(have, self.feature_columns, strict=True)) if a != b)
                detail.append(
                    f"order differs from position {at}: got {have[at]!r}, expected {self.feature_columns[at]!r}"
                )
            raise StackError(
                "the feature frame does not match the meta-learner's feature order (meta.json 'feature_columns': "
                f"models {sorted({c.rsplit(SEP, 1)[0] for c in self.feature_columns})} x classes in CLASSES order): "
                + "; ".join(detail)
                + ". Build it with retina_train.stack.feature_columns(models) from the same backbones."
            )
        return features.select(self.feature_columns).to_numpy().astype(np.float32)

    def predict_proba(self, features: pl.DataFrame | np.ndarray) -> np.ndarray:  # noqa: N803
        """``(n, classes)`` probabilities. A polars frame is checked against :attr:`feature_columns` first."""
        if isinstance(features, pl.DataFrame):
            X = self.check_frame(features)
        else:
            X = np.ascontiguousarray(features, dtype=np.float32)
            if X.ndim != 2 or X.shape[1] != len(self.feature_columns):
                raise StackError(f"feature matrix of shape {X.shape}: expected (n, {len(self.feature_columns)})")
        if not self.boosters:
            raise StackError("the meta-learner is not fitted")
        preds = [np.asarray(b.inplace_predict(X)).reshape(len(X), -1) for b in self.boosters]
        return np.concatenate(preds, axis=1).astype(np.float32)

    def gain(self) -> np.ndarray:
        """``(classes, features)`` total split gain of each feature in each class's trees."""
        out = np.zeros((len(self.classes), len(self.feature_columns)))
        for bi, booster in enumerate(self.boosters):
            model = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]
            for tree, target in zip(model["trees"], model["tree_info"], strict=True):
                left = np.asarray(tree["left_children"])
                split = np.asarray(tree["split_indices"])[left != -1]
                loss = np.asarray(tree["loss_changes"], dtype=np.float64)[left != -1]
                np.add.at(out[bi + target], split, loss)
        return out

    def importance(self, models: Sequence[str]) -> np.ndarray:
        """``(classes, models)``: each class's gain summed per backbone, normalised to sum 1 per class."""
        gain = self.gain()
        per_model = np.stack(
            [
                gain[:, [j for j, c in enumerate(self.feature_columns) if c.rsplit(SEP, 1)[0] == m]].sum(axis=1)
                for m in models
            ],
            axis=1,
        )
        total = per_model.sum(axis=1, keepdims=True)
        return np.divide(per_model, total, out=np.zeros_like(per_model), where=total > 0)

    def model_files(self) -> list[str]:
        if self.strategy == "native":
            return ["meta_model.ubj"]
        return [f"meta_model_{c}.ubj" for c in self.classes]

    def save(self, folder: Path, extra: Mapping | None = None) -> Path:
        """Write the booster file(s) and ``meta.json`` into ``folder``; returns the path of ``meta.json``."""
        import xgboost as xgb

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = self.model_files()
        for b, name in zip(self.boosters, names, strict=True):
            b.save_model(str(folder / name))
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "feature_columns": self.feature_columns,
            "classes": self.classes,
            "models": sorted({c.rsplit(SEP, 1)[0] for c in self.feature_columns}),
            "strategy": self.strategy,
            "multi_strategy": "one_output_per_tree" if self.strategy == "native" else None,
            "device": self.device,
            "params": asdict(self.params),
            "seed": self.seed,
            "model_files": names,
            "thresholds": self.thresholds,
            "xgboost": xgb.__version__,
            **(extra or {}),
        }
        path = folder / "meta.json"
        path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return path


def create_meta_learner(
    feature_columns: Sequence[str],
    classes: Sequence[str],
    *,
    strategy: str = "native",
    device: str = "cpu",
    params: MetaParams | None = None,
    seed: int = 0,
) -> MetaLearner:
    """An unfitted meta-learner (``strategy``: ``native`` or ``multioutput``; ``device``: ``cpu`` or ``cuda``)."""
    if strategy not in ("native", "multioutput"):
        raise StackError(f"strategy {strategy!r}: choose native or multioutput (auto is resolved by run_stack)")
    return MetaLearner(list(feature_columns), list(classes), strategy, device, params or MetaParams(), seed)


def load_meta_learner(stack_dir: Path) -> MetaLearner:
    """The final meta-learner that ``retina-stack`` saved in ``stack_dir`` (``meta.json`` + booster files)."""
    import xgboost as xgb

    stack_dir = Path(stack_dir)
    path = stack_dir / "meta.json"
    if not path.is_file():
        raise StackError(f"{stack_dir} holds no meta.json: not a retina-stack output folder; run `retina-stack` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}); rerun `retina-stack`") from exc
    if meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        raise StackError(f"{path} is not a retina-stack v{META_VERSION} meta.json; rerun `retina-stack`")
    learner = MetaLearner(
        list(meta["feature_columns"]),
        list(meta["classes"]),
        meta["strategy"],
        "cpu",
        MetaParams(**meta["params"]),
        int(meta["seed"]),
        thresholds={k: float(v) for k, v in meta.get("thresholds", {}).items()},
    )
    for name in meta["model_files"]:
        f = stack_dir / name
        if not f.is_file():
            raise StackError(f"{f} (named in {path}) is missing; rerun `retina-stack`")
        booster = xgb.Booster(model_file=str(f))
        booster.set_param({"device": "cpu"})  # trained on a GPU or not, predict where the caller's arrays live
        learner.boosters.append(booster)
    return learner


# ------------------------------------------------------------------------------------------------------ nested CV


@dataclass
class NestedCV:
    """Meta-OOF probabilities and, per fold, the rows its meta-learner trained on and the rows it scored."""

    oof: np.ndarray  # (n, classes)
    thresholds: np.ndarray  # (k, classes): fold f's threshold, chosen on fold f's training rows
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
    """For each fold ``f``: a fresh ``factory()`` model fits the rows outside ``f`` and scores the rows of ``f``.

    ``prefit[f]`` is a model already fitted on exactly the rows outside ``f`` (reused, not refitted).
    """
    n, c = Y.shape
    oof = np.full((n, c), np.nan, dtype=np.float32)
    fold_ids = [int(f) for f in np.unique(folds)]
    thresholds = np.full((max(fold_ids) + 1, c), 0.5)
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
        in_sample = model.predict_proba(X[train])
        thresholds[f] = [metrics.best_f1_threshold(Y[train, j], in_sample[:, j]) for j in range(c)]
        train_rows[f], scored_rows[f] = train, scored
    result = NestedCV(oof, thresholds, train_rows, scored_rows)
    result.check(n)
    return result


# ------------------------------------------------------------------------------------------------------- run it


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


META_ROW = "meta-learner"
MEAN_ROW = "mean of backbones"
CONTROL_ROW = "control (shuffled labels)"


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


def run_stack(cfg: StackConfig) -> StackResult:
    """The whole stacking step: table, nested CV (+ control), final fit, scores, importance, report files."""
    from retina_train import report

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
    files.update(report.write_report(result, probs={**probs, META_ROW: nested.oof}))
    seconds["report"] = time.perf_counter() - t0
    log.info("stacking done: %s", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return result
