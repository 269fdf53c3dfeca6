"""What a complete pack writes last: ``index.parquet`` (one row per sample, in tar order), ``rejects.parquet`` (one row
per input that was not packed) and ``manifest.json`` (docs/contracts.md, contract 2; the columns and every reject reason
for users: shards/README.md). Byte-deterministic: the same plan gives the same files."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
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


def conversion_counts(accepted) -> dict[str, int]:
    counts = Counter(
        c.split("=")[0] if c.startswith(("resize", "exif_orientation")) else c
        for _, pr in accepted
        for c in pr.plan.conversions
    )
    return dict(sorted(counts.items()))


def _parquet_bytes(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd", statistics=True)
    return buf.getvalue()


def write_outputs(cfg, preset, table, accepted, keys, folds, shards, done, rejects, label_rows, strays) -> dict:
    out = Path(cfg.out)
    present = preset.classes_present
    meta_cols = table.metadata_columns
    # index.parquet in tar order (fold, shard, position).
    recs = []
    for shard, fold, idx in shards:
        stored = done[shard]["stored"]
        for pos, i in enumerate(idx):
            row, pr = accepted[i]
            key, ext, nbytes, width, height = stored[pos]
            assert key == keys[i], f"{shard}: marker and plan disagree at position {pos}"
            recs.append(
                {
                    "key": key,
                    "id": row["id"],
                    "fold": int(fold),
                    "shard": shard,
                    **{c: (row[c] if c in present else None) for c in CLASSES},
                    **{c: row[c] for c in meta_cols},
                    "group": row["group"],
                    "path": row["relpath"],
                    "format": "jpeg" if ext == "jpg" else "png",
                    "bytes": nbytes,
                    "width": width,
                    "height": height,
                    "conversion": ",".join(pr.plan.conversions) or None,
                }
            )
    schema = {
        "key": pl.String,
        "id": pl.String,
        "fold": pl.Int32,
        "shard": pl.String,
        **{c: pl.UInt8 for c in CLASSES},
        **{c: table.frame.schema[c] for c in meta_cols},
        "group": pl.String,
        "path": pl.String,
        "format": pl.String,
        "bytes": pl.Int64,
        "width": pl.Int32,
        "height": pl.Int32,
        "conversion": pl.String,
    }
    index = pl.DataFrame(recs, schema=schema, orient="row")
    rej = pl.DataFrame(rejects, schema=REJECT_SCHEMA).sort(["source", "row", "path"], nulls_last=True)
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
            "inputs": label_rows + len(strays),
            "label_rows": label_rows,
            "unlabelled_files": len(strays),
            "accepted": len(accepted),
            "rejected": len(rejects),
            "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
            "converted_by_reason": conversion_counts(accepted),
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
            for s, f, _ in shards
        ],
    }
    write_atomic(out / "index.parquet", index_bytes)
    write_atomic(out / "rejects.parquet", rej_bytes)
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    return manifest
