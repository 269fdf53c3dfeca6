"""``retina-shard verify``: re-read a packed dataset against its manifest and index, and name the first bad shard.

Checks, per shard in manifest order: the tar exists with the recorded size and sha256; it holds exactly the recorded
number of samples, each with one image (``jpg`` or ``png``), ``json`` and an 11-byte ``labels`` component; its keys
and labels are those of ``index.parquet`` for that shard (classes the dataset does not label are 0 in the bytes and
null in the index); the ``.idx`` beside it is exactly what ``wds2idx`` would write. Also the index and rejects files
against their recorded sha256, and the manifest's counts against the index.

The dataset is untrusted input: opening it checks every manifest path and the manifest's fold counts
(:meth:`retina_io.dataset.PackedDataset.open`); here, every tar member must be a regular file named ``KEY.EXT`` with
the format's key and an allowed extension (a member elsewhere, a link or a folder is named with its shard), each index
row's fold and shard must be its shard's, and the manifest must record the sha256 of the index and rejects files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from retina_io.dataset import DatasetError, PackedDataset
from retina_io.schema import CLASSES, decode_labels
from retina_io.tario import MemberError, idx_text, iter_tar, sha256_file

RECORDED_FILES = ("index.parquet", "rejects.parquet")


class _MemberRefused(DatasetError):
    """A member that breaks the format's naming rules: reported as such even when the checksum differs too."""


@dataclass
class VerifyReport:
    shards: int
    samples: int
    bytes: int


def verify(folder: Path, *, progress: bool = True) -> VerifyReport:
    """Verify ``folder``; raise :class:`DatasetError` naming the first problem."""
    folder = Path(folder)
    ds = PackedDataset.open(folder)
    manifest = ds.manifest
    files = manifest.get("files", {})
    unrecorded = [name for name in RECORDED_FILES if name not in files]
    if unrecorded:
        raise DatasetError(
            f"{folder / 'manifest.json'}: files records no sha256 of {unrecorded}; repack with `retina-shard pack`"
        )
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            raise DatasetError(f"{p} is missing; repack with `retina-shard pack`")
        if sha256_file(p) != digest:
            raise DatasetError(f"{p} does not match its sha256 in manifest.json; repack with `retina-shard pack`")
    index = ds.index()
    if "shard" not in index.columns:
        raise DatasetError(f"{folder / 'index.parquet'} lacks the column 'shard'; repack with `retina-shard pack`")
    shards = manifest["shards"]
    by_shard = {s: df for (s,), df in index.group_by("shard", maintain_order=True)}
    stray = sorted(set(by_shard) - {s["path"] for s in shards}, key=str)
    if stray:
        raise DatasetError(f"{folder / 'index.parquet'} names shard {stray[0]!r}, which manifest.json does not list")
    total = nbytes = 0
    for entry in tqdm(shards, desc="verify shards", unit="shard", disable=not progress):
        _verify_shard(folder, entry, by_shard.get(entry["path"]))
        total += entry["samples"]
        nbytes += entry["bytes"]
    if total != index.height or total != manifest["counts"]["accepted"]:
        raise DatasetError(
            f"{folder}: shards hold {total} samples, index.parquet {index.height}, manifest says "
            f"{manifest['counts']['accepted']}"
        )
    return VerifyReport(len(shards), total, nbytes)


def _verify_shard(folder: Path, entry: dict, rows: pl.DataFrame | None) -> None:
    tar = folder / entry["path"]
    where = f"shard {tar}"
    if not tar.is_file():
        raise DatasetError(f"{where} is missing")
    if tar.stat().st_size != entry["bytes"]:
        raise DatasetError(f"{where} has {tar.stat().st_size} bytes, manifest says {entry['bytes']}")
    if rows is None:
        raise DatasetError(f"{where} has no rows in index.parquet")
    if not (rows["fold"] == entry["fold"]).all():
        raise DatasetError(f"{where} is in fold {entry['fold']}, but index.parquet puts some of its rows elsewhere")
    sha = hashlib.sha256()
    corrupt = DatasetError(f"{where} does not match its sha256 in manifest.json (corrupt or modified)")
    try:
        keys, members_all = _parse_shard(tar, where, entry, rows, sha)
    except _MemberRefused:
        raise
    except DatasetError as exc:  # a damaged tar fails to parse first; its checksum is the clearer report
        if sha256_file(tar) != entry["sha256"]:  # the digest so far is partial: hash the file afresh
            raise corrupt from exc
        raise
    if sha.hexdigest() != entry["sha256"]:
        raise corrupt
    expected_keys = rows["key"].to_list()
    if len(keys) != entry["samples"] or len(keys) != len(expected_keys):
        raise DatasetError(
            f"{where} holds {len(keys)} samples; manifest says {entry['samples']}, index.parquet {len(expected_keys)}"
        )
    idx = folder / entry["index"]
    if not idx.is_file():
        raise DatasetError(f"{where}: its DALI index {idx} is missing")
    if idx.read_text(encoding="ascii", errors="replace") != idx_text(members_all):
        raise DatasetError(f"{where}: its DALI index {idx} does not match the tar")


def _parse_shard(tar: Path, where: str, entry: dict, rows: pl.DataFrame, sha) -> tuple[list[str], list]:
    """Every sample of ``tar`` against the index rows, hashing the file on the same pass."""
    expected_keys = rows["key"].to_list()
    expected_labels = rows.select(CLASSES).fill_null(0).to_numpy().astype(np.uint8)
    members_all = []
    keys = []
    try:
        for i, (sample, members) in enumerate(iter_tar(tar, sha=sha)):
            comps = sample.components
            images = [e for e in ("jpg", "png") if e in comps]
            if len(images) != 1 or "json" not in comps or "labels" not in comps or len(comps) != 3:
                raise DatasetError(
                    f"{where}: sample {sample.key} has components {sorted(comps)}; "
                    "expected one of jpg/png, json, labels"
                )
            raw = comps["labels"]
            try:
                decoded = decode_labels(raw)
            except ValueError as exc:
                raise DatasetError(f"{where}: sample {sample.key}: {exc}") from None
            if i < len(expected_keys):
                if sample.key != expected_keys[i]:
                    raise DatasetError(f"{where}: sample {i} is {sample.key}, index.parquet says {expected_keys[i]}")
                if not np.array_equal(decoded, expected_labels[i]):
                    raise DatasetError(
                        f"{where}: sample {sample.key} labels {list(raw)} differ from index.parquet "
                        f"{expected_labels[i].tolist()}"
                    )
                try:
                    doc = json.loads(comps["json"])
                except ValueError:
                    doc = None
                if not isinstance(doc, dict):
                    raise DatasetError(f"{where}: sample {sample.key}: its json component is not a JSON object")
                if doc.get("key") != sample.key or doc.get("fold") != entry["fold"]:
                    raise DatasetError(
                        f"{where}: sample {sample.key} json names key {doc.get('key')} fold {doc.get('fold')}"
                    )
            keys.append(sample.key)
            members_all.append(members)
    except DatasetError:
        raise
    except MemberError as exc:
        raise _MemberRefused(f"{where}: {exc}; a shard holds only KEY.jpg|png, KEY.labels and KEY.json files") from None
    except Exception as exc:
        raise DatasetError(f"{where} cannot be read as a tar ({exc})") from exc
    return keys, members_all
