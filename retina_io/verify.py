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

Speed: shards are checked in parallel (``workers`` processes, forked before any polars query), each read once into
memory: sha256 over the whole buffer, the headers checked against the ``.idx`` all at once
(:func:`retina_io.tario.scan_indexed`), labels
compared as one array. That fast path only ever says "fine"; on anything it does not accept it hands the shard to the
reference reader (``tarfile`` via :func:`retina_io.tario.iter_tar`, one pass hashing and parsing), whose verdict and
message stand. Results come back in manifest order, so the first bad shard is the one named.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from retina_io.dataset import DatasetError, PackedDataset
from retina_io.schema import CLASSES, NUM_CLASSES, decode_labels
from retina_io.tario import MemberError, ScannedTar, idx_bytes, idx_text, iter_tar, scan_indexed, sha256_file

RECORDED_FILES = ("index.parquet", "rejects.parquet")
IMAGES = {b"jpg", b"png"}
_SCAN_ONCE = json.JSONDecoder().scan_once  # the C scanner json.loads runs: one JSON value from an index


class _MemberRefused(DatasetError):
    """A member that breaks the format's naming rules: reported as such even when the checksum differs too."""


@dataclass
class VerifyReport:
    shards: int
    samples: int
    bytes: int


@dataclass
class _ShardJob:
    """One shard and what the index says it holds (``keys`` None: no index rows name it)."""

    folder: Path
    entry: dict
    keys: list[str] | None
    labels: np.ndarray | None  # uint8 [samples, 11], unlabelled classes 0
    fold_ok: bool  # every index row of the shard is in the shard's fold


def verify(folder: Path, *, progress: bool = True, workers: int | None = None) -> VerifyReport:
    """Verify ``folder`` with ``workers`` processes (default: all cores); raise :class:`DatasetError` naming the
    first problem (the first bad shard in manifest order)."""
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
    shards = manifest["shards"]
    n_workers = min(workers or os.cpu_count() or 1, len(shards))
    with _pool(n_workers) as pool:  # forked before the index is read
        index = ds.index()
        if "shard" not in index.columns:
            raise DatasetError(f"{folder / 'index.parquet'} lacks the column 'shard'; repack with `retina-shard pack`")
        rows = index.with_row_index("_row").group_by("shard", maintain_order=True).agg("_row")
        by_shard = dict(zip(rows["shard"].to_list(), rows["_row"].to_list(), strict=True))
        stray = sorted(set(by_shard) - {s["path"] for s in shards}, key=str)
        if stray:
            raise DatasetError(
                f"{folder / 'index.parquet'} names shard {stray[0]!r}, which manifest.json does not list"
            )
        table = _IndexColumns(index)
        jobs = (table.job(folder, entry, by_shard.get(entry["path"])) for entry in shards)
        results = _in_order(pool, jobs, window=2 * n_workers) if pool is not None else map(_check_shard, jobs)
        for error in tqdm(results, total=len(shards), desc="verify shards", unit="shard", disable=not progress):
            if error is not None:
                raise error
    total = sum(s["samples"] for s in shards)
    if total != index.height or total != manifest["counts"]["accepted"]:
        raise DatasetError(
            f"{folder}: shards hold {total} samples, index.parquet {index.height}, manifest says "
            f"{manifest['counts']['accepted']}"
        )
    return VerifyReport(len(shards), total, sum(s["bytes"] for s in shards))


@contextmanager
def _pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """Forked workers (they run only numpy, hashlib and json; never polars), or None for one. They are started here,
    before the caller reads the index with polars. On exit the shards not started are cancelled and the running ones
    finish (a ``multiprocessing.Pool``'s terminate could hang when it stopped on the first bad shard)."""
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        pool.submit(int).result()  # a fork-context executor starts all its workers at the first task
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _in_order(pool: ProcessPoolExecutor, jobs: Iterator[_ShardJob], *, window: int) -> Iterator[DatasetError | None]:
    """:func:`_check_shard` of ``jobs`` in the pool, results in job order, at most ``window`` jobs in flight."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(_check_shard, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _IndexColumns:
    """The index columns a shard's job needs, converted once (not once per shard): keys, labels as uint8, folds."""

    def __init__(self, index: pl.DataFrame):
        self.keys = index["key"]
        self.labels = index.select(CLASSES).fill_null(0).to_numpy().astype(np.uint8)
        self.folds = index["fold"]

    def job(self, folder: Path, entry: dict, rows: list[int] | None) -> _ShardJob:
        if rows is None:
            return _ShardJob(folder, entry, None, None, False)
        at = pl.Series(rows, dtype=pl.UInt32)
        fold_ok = bool((self.folds.gather(at) == entry["fold"]).all())
        return _ShardJob(folder, entry, self.keys.gather(at).to_list(), self.labels[np.asarray(rows)], fold_ok)


def _check_shard(job: _ShardJob) -> DatasetError | None:
    """The shard's first problem, or None (runs in a worker; the error travels back to be raised in order)."""
    try:
        _verify_shard(job)
    except DatasetError as exc:
        return exc
    return None


def _verify_shard(job: _ShardJob) -> None:
    entry = job.entry
    tar = job.folder / entry["path"]
    where = f"shard {tar}"
    if not tar.is_file():
        raise DatasetError(f"{where} is missing")
    if tar.stat().st_size != entry["bytes"]:
        raise DatasetError(f"{where} has {tar.stat().st_size} bytes, manifest says {entry['bytes']}")
    if job.keys is None:
        raise DatasetError(f"{where} has no rows in index.parquet")
    if not job.fold_ok:
        raise DatasetError(f"{where} is in fold {entry['fold']}, but index.parquet puts some of its rows elsewhere")
    if _fast_ok(tar, job):
        return
    sha = hashlib.sha256()
    corrupt = DatasetError(f"{where} does not match its sha256 in manifest.json (corrupt or modified)")
    try:
        keys, members_all = _parse_shard(tar, where, entry, job.keys, job.labels, sha)
    except _MemberRefused:
        raise
    except DatasetError as exc:  # a damaged tar fails to parse first; its checksum is the clearer report
        if sha256_file(tar) != entry["sha256"]:  # the digest so far is partial: hash the file afresh
            raise corrupt from exc
        raise
    if sha.hexdigest() != entry["sha256"]:
        raise corrupt
    if len(keys) != entry["samples"] or len(keys) != len(job.keys):
        raise DatasetError(
            f"{where} holds {len(keys)} samples; manifest says {entry['samples']}, index.parquet {len(job.keys)}"
        )
    idx = job.folder / entry["index"]
    if not idx.is_file():
        raise DatasetError(f"{where}: its DALI index {idx} is missing")
    if idx.read_text(encoding="ascii", errors="replace") != idx_text(members_all):
        raise DatasetError(f"{where}: its DALI index {idx} does not match the tar")


def _fast_ok(tar: Path, job: _ShardJob) -> bool:
    """True when the shard passes every check of :func:`_parse_shard` and the ones after it, read in one piece into
    memory; False whenever anything is off or unusual (the reference path then decides and names the problem)."""
    idx = job.folder / job.entry["index"]
    if not idx.is_file():
        return False
    buf = tar.read_bytes()
    if hashlib.sha256(buf).hexdigest() != job.entry["sha256"] or len(job.keys) != job.entry["samples"]:
        return False
    idx_data = idx.read_bytes()
    scanned = scan_indexed(buf, idx_data)
    return scanned is not None and idx_data == idx_bytes(scanned, per_sample=3) and _samples_ok(buf, scanned, job)


def _samples_ok(buf: bytes, scanned: ScannedTar, job: _ShardJob) -> bool:
    """Members in samples of three under the index's keys (the same component order in every sample): one image,
    ``labels`` equal to the index's, ``json`` naming the key and the shard's fold."""
    keys = [k.encode("ascii") for k in job.keys]
    if len(scanned.keys) != 3 * len(keys) or any(scanned.keys[j::3] != keys for j in range(3)):
        return False
    kinds = [set(scanned.exts[j::3]) for j in range(3)]
    slot = {ext: j for j, kind in enumerate(kinds) if len(kind) == 1 for ext in kind}
    if b"labels" not in slot or b"json" not in slot or not kinds[3 - slot[b"labels"] - slot[b"json"]] <= IMAGES:
        return False
    at, sizes = scanned.offsets[slot[b"labels"] :: 3], scanned.sizes[slot[b"labels"] :: 3]
    if set(sizes) != {NUM_CLASSES}:
        return False
    raw = np.frombuffer(b"".join([buf[o : o + NUM_CLASSES] for o in at]), dtype=np.uint8)
    if raw.max(initial=0) > 1 or not np.array_equal(raw.reshape(-1, NUM_CLASSES), job.labels):
        return False
    fold, scan = job.entry["fold"], _SCAN_ONCE
    at, sizes = scanned.offsets[slot[b"json"] :: 3], scanned.sizes[slot[b"json"] :: 3]
    for key, o, n in zip(job.keys, at, sizes, strict=True):
        # strict UTF-8 first: where it decodes, json.loads(bytes) reads the same text (else: the fallback). json.loads
        # is this scan plus whitespace around the value, which the packer never writes (any: the fallback decides).
        try:
            text = buf[o : o + n].decode("utf-8")
            doc, end = scan(text, 0)
        except (ValueError, RecursionError, StopIteration):
            return False
        if end != len(text) or type(doc) is not dict or doc.get("key") != key or doc.get("fold") != fold:
            return False
    return True


def _parse_shard(
    tar: Path, where: str, entry: dict, expected_keys: list[str], expected_labels: np.ndarray, sha
) -> tuple[list[str], list]:
    """Every sample of ``tar`` against the index rows, hashing the file on the same pass (the reference reader)."""
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
