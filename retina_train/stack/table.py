"""The out-of-fold feature table (docs/contracts.md, contract 3): every backbone's OOF predictions, checked and
reshaped to one row per index sample.

Every ``runs/EXP/MODEL/fold{k}/oof-rank{R}.parquet`` is scanned with polars, joined to the dataset's
``index.parquet`` on ``key`` and reshaped to one row per index sample with one ``MODEL__CLASS`` column per backbone
and class: models sorted by name, classes in :data:`CLASSES` order (``a__DR, a__AMD, …, a__RVO, b__DR, …``; 6
backbones give 66 features, any number works). A table is refused, with the first 10 keys and the count of every
problem, when an index sample lacks a model's prediction, a model predicts a key twice (in one file or across
files/ranks), an OOF key is not in the index, the OOF ``fold`` differs from the index fold (or from the ``fold{k}``
folder), or a probability is missing, NaN or outside [0, 1].

**Targets.** Only classes the dataset labels (``classes_present``) with at least one positive and one negative in
every training split (the samples outside each fold) are predicted; the others are skipped, with the reason.
The meta-learner's *inputs* are always all ``MODEL__CLASS`` columns.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from retina_io.dataset import DatasetError, PackedDataset
from retina_io.schema import CLASSES, FEATURE_SEP, feature_name
from retina_train.stack.errors import SHOW, StackError

log = logging.getLogger(__name__)

OOF_GLOB = "*/fold*/oof-rank*.parquet"

_FOLD_DIR = re.compile(r"^fold(\d+)$")
_RANK_FILE = re.compile(r"^oof-rank(\d+)\.parquet$")


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
    bad_names = [m for m in models if FEATURE_SEP in m]
    if bad_names:
        raise StackError(
            f"model folders {bad_names} under {runs} contain '{FEATURE_SEP}', the feature-name separator; rename"
        )
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
