"""What a complete pack writes last: ``index.parquet`` (one row per sample, in tar order), ``rejects.parquet`` (one row
per input that was not packed) and ``manifest.json`` (docs/contracts.md, contract 2; the columns and every reject reason
for users: shards/README.md). Byte-deterministic: the same plan gives the same files."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import polars as pl

from retina_io.dataset import FORMAT_NAME, FORMAT_VERSION
from retina_io.fsutil import write_atomic
from retina_io.schema import CLASSES

REJECT_SCHEMA = {
    "source": pl.String,
    "row": pl.Int64,
    "id": pl.String,
    "path": pl.String,
    "reason": pl.String,
    "detail": pl.String,
}


# What a worker's check gives per file (retina_io.pack_worker.PROBE_COLUMNS), as columns.
PROBE_SCHEMA = {
    "probe": pl.UInt32,
    "reason": pl.String,
    "detail": pl.String,
    "size": pl.Int64,
    "mtime_ns": pl.Int64,
    "sha256": pl.Binary,
    "source_format": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "conversion": pl.String,
    "ext": pl.String,
    "out_width": pl.Int32,
    "out_height": pl.Int32,
    "offset": pl.Int64,
    "length": pl.Int64,
}


def conversion_counts(conversion: pl.Series) -> dict[str, int]:
    """Samples per conversion reason (``resize=256`` and ``exif_orientation=6`` counted as their name)."""
    reasons = conversion.drop_nulls().str.split(",").explode()
    reasons = reasons.str.replace(r"^(resize|exif_orientation)=.*$", "$1")
    return dict(sorted((str(k), int(v)) for k, v in reasons.value_counts().iter_rows()))


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd", statistics=True)
    return buf.getvalue()


def write_outputs(cfg, preset, table, plan, shards, done, rejects, label_rows, n_strays, conversions) -> dict:
    """``plan``: one row per sample in tar order (pack.py); ``shards``: ``(path, fold, first row, samples)``."""
    out = Path(cfg.out)
    present = preset.classes_present
    meta_cols = table.metadata_columns
    offsets = [start for _, _, start, _ in shards]
    assert offsets == sorted(offsets) and sum(c for *_, c in shards) == plan.height, "the plan is in tar order"
    index = plan.select(
        "key",
        "id",
        pl.col("fold").cast(pl.Int32),
        "shard",
        *[pl.col(c).cast(pl.UInt8) if c in present else pl.lit(None, dtype=pl.UInt8).alias(c) for c in CLASSES],
        *[pl.col(c).cast(table.frame.schema[c]) for c in meta_cols],
        pl.col("group").cast(pl.String),
        path=pl.col("relpath"),
        format=pl.when(pl.col("ext") == "jpg").then(pl.lit("jpeg")).otherwise(pl.lit("png")),
        bytes=pl.col("length").cast(pl.Int64),
        width=pl.col("out_width").cast(pl.Int32),
        height=pl.col("out_height").cast(pl.Int32),
        conversion=pl.col("conversion"),
    )
    for s, _, _, count in shards:
        assert done[s]["samples"] == count, f"{s}: its done-marker and the plan disagree"
    rej = rejects.select(pl.col(c).cast(t) for c, t in REJECT_SCHEMA.items())
    rej = rej.sort(["source", "row", "path"], nulls_last=True, maintain_order=True)
    index_bytes, rej_bytes = _parquet_bytes(index), _parquet_bytes(rej)

    labels = index.select(CLASSES).fill_null(0).to_numpy()
    fold_arr = index["fold"].to_numpy()
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "classes": list(CLASSES),
        "classes_present": list(present),
        "preset": preset.name,
        "labels_file": Path(cfg.labels).name,
        "seed": cfg.seed,
        "k": cfg.folds,
        "options": {
            "shard_samples": cfg.shard_samples,
            "resize": cfg.resize,
            "quality": cfg.quality,
            "check": cfg.check,
            "group_column": cfg.group_column or (preset.name if preset.group else None),
        },
        "counts": {
            "inputs": label_rows + n_strays,
            "label_rows": label_rows,
            "unlabelled_files": n_strays,
            "accepted": index.height,
            "rejected": rej.height,
            "rejected_by_reason": dict(sorted(rej["reason"].value_counts().iter_rows())),
            "converted_by_reason": conversions,
            "per_fold": [int((fold_arr == f).sum()) for f in range(cfg.folds)],
            "positives": {c: int(labels[:, j].sum()) for j, c in enumerate(CLASSES) if c in present},
            "positives_per_fold": {
                c: [int(labels[fold_arr == f, j].sum()) for f in range(cfg.folds)]
                for j, c in enumerate(CLASSES)
                if c in present
            },
        },
        "files": {
            "index.parquet": hashlib.sha256(index_bytes).hexdigest(),
            "rejects.parquet": hashlib.sha256(rej_bytes).hexdigest(),
        },
        "shards": [
            {
                "path": s,
                "fold": f,
                "samples": done[s]["samples"],
                "bytes": done[s]["bytes"],
                "sha256": done[s]["sha256"],
                "index": s.removesuffix(".tar") + ".idx",
            }
            for s, f, _, _ in shards
        ],
    }
    write_atomic(out / "index.parquet", index_bytes)
    write_atomic(out / "rejects.parquet", rej_bytes)
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    return manifest
