"""An image's identity is its content: the same bytes never reach two folds (train/validation leakage) and never
carry two labellings.

The packer hashes (sha256) the bytes it checks, once per file; rows that name one file (another spelling of its path,
a case variant, a link or a hard link) share that file's hash, and byte-identical copies under other names have the
same hash too. Among rows whose images have the same hash:

- all with the same 11 labels: the first id (in sorted order, then by row) is packed, the others are rejected as
  ``duplicate_image``, naming the id that is packed;
- labels that differ: every one of them is rejected as ``conflicting_duplicate``, naming the others (which labelling
  is right cannot be told).

Columnar (polars): no Python object per row.
"""

from __future__ import annotations

import polars as pl

from retina_io.schema import CLASSES

SHOWN = 5  # ids named in a detail


def labels_text() -> pl.Expr:
    """The positive classes of a row, e.g. ``DR+GC`` (``none`` when there are none)."""
    positives = pl.concat_str(
        [pl.when(pl.col(c).fill_null(0) != 0).then(pl.lit(c)) for c in CLASSES], separator="+", ignore_nulls=True
    )
    return pl.when(positives == "").then(pl.lit("none")).otherwise(positives)


def split_duplicates(rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``rows`` (``row``, ``id``, ``relpath``, the classes, ``sha256`` as 32 bytes) -> the rows to pack, in input
    order, and the rejected ones (the columns of ``rows`` plus ``reason`` and ``detail``), in input order."""
    sig = pl.concat_str([pl.col(c).cast(pl.String).fill_null("-") for c in CLASSES], separator=",")
    g = rows.with_row_index("_pos").with_columns(_n=pl.len().over("sha256"))
    dup = g.filter(pl.col("_n") > 1)
    if dup.height == 0:
        return rows, rows.head(0).with_columns(reason=pl.lit(None, pl.String), detail=pl.lit(None, pl.String))
    dup = dup.sort("sha256", "id", "row").with_columns(
        _rank=pl.int_range(pl.len()).over("sha256"),
        _conflict=sig.n_unique().over("sha256") > 1,
        _who=pl.format("{} ({})", pl.col("id"), labels_text()),
        _sha=pl.col("sha256").bin.encode("hex").str.slice(0, 16),
    )
    firsts = dup.filter(pl.col("_rank") == 0).select(
        "sha256", _first=pl.format("{} ({}, row {})", pl.col("id"), pl.col("relpath"), pl.col("row"))
    )
    heads = dup.filter(pl.col("_rank") <= SHOWN).group_by("sha256").agg(_heads=pl.col("_who").sort_by("_rank"))
    dup = dup.join(firsts, on="sha256").join(heads, on="sha256")
    # The others in sorted order, at most SHOWN: the first SHOWN + 1 without the row itself.
    others = [pl.col("_heads").list.get(j, null_on_oob=True) for j in range(SHOWN + 1)]
    shown = pl.lit(None, dtype=pl.String)
    for r in range(SHOWN + 1):
        own = pl.concat_str([o for j, o in enumerate(others) if j != r][:SHOWN], separator=", ", ignore_nulls=True)
        shown = pl.when(pl.col("_rank") == r).then(own).otherwise(shown)
    shown = pl.when(pl.col("_rank") > SHOWN).then(pl.concat_str(others[:SHOWN], separator=", ")).otherwise(shown)
    extra = pl.col("_n") - 1 - SHOWN
    shown = shown + pl.when(extra > 0).then(pl.format(" and {} more", extra)).otherwise(pl.lit(""))
    conflicting = pl.format(
        "the same image (sha256 {}…) is labelled {} here and differently as {}; none of them is packed",
        pl.col("_sha"),
        labels_text(),
        shown,
    )
    same = pl.format("the same image (sha256 {}…) as id {} with the same labels; that one is packed", "_sha", "_first")
    dropped = dup.filter(pl.col("_conflict") | (pl.col("_rank") > 0)).select(
        "_pos",
        reason=pl.when(pl.col("_conflict")).then(pl.lit("conflicting_duplicate")).otherwise(pl.lit("duplicate_image")),
        detail=pl.when(pl.col("_conflict")).then(conflicting).otherwise(same),
    )
    g = g.join(dropped, on="_pos", how="left", maintain_order="left")
    kept = g.filter(pl.col("reason").is_null()).drop("_pos", "_n", "reason", "detail")
    rejected = g.filter(pl.col("reason").is_not_null()).drop("_pos", "_n")
    return kept, rejected
