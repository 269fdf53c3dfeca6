"""Out-of-fold prediction shards (docs/contracts.md, contract 3) and their exactly-once check.

``runs/EXP/MODEL/fold{k}/oof-rank{R}.parquet``: ``key`` (String, the shard key), ``fold`` (Int32), then one
``Float32`` probability column per class named as the class. Each rank writes the samples it predicted (padded rows
never); together the ranks cover fold k exactly once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from retina_io.fsutil import atomic_path
from retina_io.schema import CLASSES, NUM_CLASSES, format_keys


def oof_frame(keys: np.ndarray, probs: np.ndarray, *, fold: int) -> pl.DataFrame:
    keys = np.asarray(keys, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape != (len(keys), NUM_CLASSES):
        raise ValueError(f"probabilities must be (n, {NUM_CLASSES}); got {probs.shape}")
    if (keys < 0).any():
        raise ValueError("padded rows (key -1) must not reach an OOF file")
    return pl.DataFrame(
        {"key": format_keys(keys), "fold": np.full(len(keys), fold, np.int32),
         **{c: probs[:, j] for j, c in enumerate(CLASSES)}},
        schema={"key": pl.String, "fold": pl.Int32, **{c: pl.Float32 for c in CLASSES}},
    )  # fmt: skip


def write_oof(path: Path, keys: np.ndarray, probs: np.ndarray, *, fold: int) -> None:
    """Write one rank's OOF shard atomically (a killed run leaves no half file)."""
    with atomic_path(path) as tmp:
        oof_frame(keys, probs, fold=fold).write_parquet(tmp)


def check_fold_oof(fold_dir: Path, expected_keys: list[str]) -> pl.DataFrame:
    """Read a fold's OOF shards; raise unless they cover ``expected_keys`` exactly once."""
    files = sorted(Path(fold_dir).glob("oof-rank*.parquet"))
    if not files:
        raise FileNotFoundError(f"no OOF shards in {fold_dir}")
    df = pl.concat([pl.read_parquet(f) for f in files])
    counts = df.group_by("key").len()
    dup = counts.filter(pl.col("len") > 1)["key"].to_list()
    have = set(df["key"].to_list())
    missing = sorted(set(expected_keys) - have)
    extra = sorted(have - set(expected_keys))
    if dup or missing or extra:
        raise ValueError(f"{fold_dir}: OOF not exactly once: {len(dup)} duplicated (e.g. {dup[:3]}), {len(missing)} "
                         f"missing (e.g. {missing[:3]}), {len(extra)} not in the fold (e.g. {extra[:3]})")  # fmt: skip
    return df
