"""A packed dataset folder (shard format v1) as the readers see it: manifest, folds, shards, index.

Every reader (the DALI pipeline, the fallback loader, verification, training, stacking) opens a dataset through
:meth:`PackedDataset.open`, so a folder that is not shard format v1, a version mismatch, a fold out of range, a fold
with no shards or a missing ``.idx`` is one clear :class:`DatasetError` naming the path and what to run.

A dataset is untrusted input (copied from elsewhere, edited, damaged). Opening checks the manifest, cheaply (no tar is
read): every path it names (a shard's ``path`` and ``index``, the ``files`` entries) stays inside the dataset folder
(relative, no ``..``, no link leading out), and ``k``, each shard's fold, the per-fold counts and ``accepted`` agree.
:meth:`PackedDataset.index` checks the index against them (folds, per-fold counts, keys); :func:`check_dali_indexes`
checks the ``.idx`` files a DALI reader follows; ``retina-shard verify`` re-reads every tar.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import polars as pl

from retina_io.errors import RetinaError
from retina_io.schema import CLASSES, KEY_WIDTH, NUM_CLASSES
from retina_io.tario import IdxColumns, MemberError, read_idx, scan_idx

FORMAT_NAME = "retina-shards"
FORMAT_VERSION = 1


class DatasetError(RetinaError, RuntimeError):
    """A folder that is not a readable shard-format-v1 dataset, or one that fails verification."""


def load_manifest(folder: Path) -> dict:
    """Read and sanity-check ``manifest.json``; the error names the folder and what to run."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder; pack a dataset into it with `retina-shard pack`")
    if not path.is_file():
        hint = " (packing still in progress on other nodes?)" if (folder / ".work").is_dir() else ""
        raise DatasetError(
            f"{folder} is not a packed dataset: no manifest.json{hint}. Create one with `retina-shard pack`."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise DatasetError(f"{path} is not valid JSON ({exc}); repack with `retina-shard pack`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path} is not a retina shard manifest; pack the data with `retina-shard pack`")
    if manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{folder} is shard format v{manifest.get('version')}, this retina reads v{FORMAT_VERSION}; repack it "
            "with this version's `retina-shard pack`"
        )
    if manifest.get("classes") != list(CLASSES):
        raise DatasetError(f"{path}: classes {manifest.get('classes')} differ from {list(CLASSES)}")
    _check_manifest(folder, path, manifest)
    return manifest


SHARD_FIELDS = ("path", "fold", "samples", "bytes", "sha256", "index")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def resolve_inside(folder: Path, rel, what: str, manifest: Path) -> Path:
    """The resolved ``folder / rel``, when ``rel`` is a relative path that stays inside ``folder`` once links are
    resolved.

    Anything else (not a string, absolute, a ``..`` component, a link leading out) is a :class:`DatasetError` naming
    ``manifest`` and the entry ``what``."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise DatasetError(f"{manifest}: {what} is not a relative path inside the dataset folder")
    if rel.startswith("/") or ".." in PurePosixPath(rel).parts:
        raise DatasetError(f"{manifest}: {what} leads outside the dataset folder {folder} (absolute or '..')")
    try:
        real = (folder / rel).resolve()
        contained = real.is_relative_to(folder.resolve())
    except (OSError, RuntimeError) as exc:  # RuntimeError: a link loop
        raise DatasetError(f"{manifest}: {what} cannot be resolved ({exc})") from None
    if not contained:
        raise DatasetError(f"{manifest}: {what} is a link leading outside the dataset folder {folder}")
    return real


def _check_manifest(folder: Path, path: Path, m: dict) -> None:
    """The manifest's own consistency: paths inside ``folder``; ``k``, shard folds, per-fold counts and totals agree.

    A manifest without shards (an index-only dataset, e.g. to stack OOF predictions) is allowed; its loaders then
    refuse every fold for having no shards."""

    def bad(what: str) -> DatasetError:
        return DatasetError(f"{path}: {what}; run `retina-shard verify {folder}` or repack with `retina-shard pack`")

    resolve_inside(folder, "manifest.json", "manifest.json", path)
    k = m.get("k")
    if not _is_int(k) or k < 2:
        raise bad(f"k is {k!r}, not a fold count >= 2")
    present = m.get("classes_present")
    if (
        not isinstance(present, list)
        or not all(isinstance(c, str) and c in CLASSES for c in present)
        or len(set(present)) != len(present)
    ):
        raise bad(f"classes_present {present!r} is not a list of distinct classes of {list(CLASSES)}")
    if not isinstance(m.get("preset"), str):
        raise bad("preset is missing")
    counts = m.get("counts")
    per_fold = counts.get("per_fold") if isinstance(counts, dict) else None
    if not isinstance(per_fold, list) or len(per_fold) != k or not all(_is_int(n) and n >= 1 for n in per_fold):
        raise bad(f"counts.per_fold {per_fold!r} is not one sample count >= 1 per fold of k={k}")
    if not _is_int(counts.get("accepted")) or counts["accepted"] != sum(per_fold):
        raise bad(f"counts.accepted {counts.get('accepted')!r} is not the sum of counts.per_fold ({sum(per_fold)})")
    files = m.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise bad("files is not a map of file name to sha256")
    for name in files:
        resolve_inside(folder, name, f"files entry {name!r}", path)
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad("shards is not a list")
    held, named = [0] * k, set()
    for i, s in enumerate(shards):
        where = f"shards[{i}]"
        if not isinstance(s, dict) or any(f not in s for f in SHARD_FIELDS):
            raise bad(f"{where} is not an object with {', '.join(SHARD_FIELDS)}")
        for field, suffix in (("path", ".tar"), ("index", ".idx")):
            rel = s[field]
            real = resolve_inside(folder, rel, f"{where}.{field} {rel!r}", path)
            if not rel.endswith(suffix):
                raise bad(f"{where}.{field} {rel!r} does not end in {suffix}")
            if real in named:  # resolved: another spelling of a path, or a link, is the same file
                raise bad(f"{where}.{field} {rel!r} names a file named before")
            named.add(real)
        where = f"{where} ({s['path']})"
        if not _is_int(s["fold"]) or not 0 <= s["fold"] < k:
            raise bad(f"{where} is in fold {s['fold']!r}, outside the folds 0..{k - 1} of k={k}")
        if not _is_int(s["samples"]) or s["samples"] < 1 or not _is_int(s["bytes"]) or s["bytes"] < 0:
            raise bad(f"{where} has samples {s['samples']!r} and bytes {s['bytes']!r}, not counts")
        if not isinstance(s["sha256"], str):
            raise bad(f"{where} has no sha256")
        held[s["fold"]] += s["samples"]
    for fold, (n, want) in enumerate(zip(held, per_fold, strict=True)):
        if shards and n != want:
            what = "has no shards" if n == 0 else f"has shards holding {n} samples"
            raise bad(f"fold {fold} {what}, but counts.per_fold says {want}")


@dataclass(frozen=True)
class ShardEntry:
    tar: Path
    idx: Path
    fold: int
    samples: int


@dataclass
class PackedDataset:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, folder: Path) -> PackedDataset:
        folder = Path(folder)
        return cls(folder, load_manifest(folder))

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def classes_present(self) -> tuple[str, ...]:
        return tuple(self.manifest["classes_present"])

    def check_folds(self, folds: Sequence[int]) -> list[int]:
        folds = sorted({int(f) for f in folds})
        bad = [f for f in folds if not 0 <= f < self.k]
        if bad or not folds:
            raise DatasetError(f"{self.root} has folds 0..{self.k - 1}; asked for {list(folds) or 'none'}")
        return folds

    def shards(self, folds: Sequence[int]) -> list[ShardEntry]:
        """The tar shards (with their ``.idx``) of ``folds``, in manifest order; every path checked."""
        out = []
        for fold in self.check_folds(folds):
            entries = [s for s in self.manifest["shards"] if s["fold"] == fold]
            if not entries:
                raise DatasetError(f"{self.root}: fold {fold} has no shards; run `retina-shard verify {self.root}`")
            for s in entries:
                tar, idx = self.root / s["path"], self.root / s["index"]
                if not tar.is_file():
                    raise DatasetError(f"shard {tar} is missing; run `retina-shard verify {self.root}`")
                if not idx.is_file():
                    raise DatasetError(
                        f"DALI index {idx} is missing; run `retina-shard verify {self.root}` (or repack with "
                        "`retina-shard pack`, which writes it)"
                    )
                out.append(ShardEntry(tar, idx, fold, int(s["samples"])))
        return out

    def index(self, folds: Sequence[int] | None = None) -> pl.DataFrame:
        """``index.parquet`` (the rows of ``folds``, or all), checked against the manifest: folds, counts, keys."""
        path = self.root / "index.parquet"
        if not path.is_file():
            raise DatasetError(f"{path} is missing; run `retina-shard verify {self.root}`")
        resolve_inside(self.root, "index.parquet", "index.parquet", self.root / "manifest.json")
        try:
            df = pl.read_parquet(path)
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise DatasetError(f"{path} cannot be read ({exc}); run `retina-shard verify {self.root}`") from None
        self._check_index(path, df)
        if folds is not None:
            df = df.filter(pl.col("fold").is_in(self.check_folds(folds)))
        return df

    def _check_index(self, path: Path, df: pl.DataFrame) -> None:
        hint = f"run `retina-shard verify {self.root}`"
        missing = [c for c in ("key", "fold", *CLASSES) if c not in df.columns]
        if missing:
            raise DatasetError(f"{path} lacks the columns {missing}; {hint}")
        folds, want = df["fold"], self.manifest["counts"]["per_fold"]
        if not folds.dtype.is_integer() or folds.null_count() or not folds.is_between(0, self.k - 1).all():
            raise DatasetError(
                f"{path}: its folds are not all in 0..{self.k - 1} (k={self.k} in manifest.json); {hint}"
            )
        per_fold = np.bincount(folds.to_numpy(), minlength=self.k).tolist()
        if per_fold != want:
            raise DatasetError(f"{path}: samples per fold {per_fold} differ from manifest.json's {want}; {hint}")
        keys = df["key"]
        if keys.dtype != pl.String or keys.null_count() or not keys.str.contains(f"^[0-9]{{{KEY_WIDTH}}}$").all():
            raise DatasetError(f"{path}: not every key is {KEY_WIDTH} decimal digits; {hint}")
        if keys.n_unique() != df.height:
            raise DatasetError(f"{path} has duplicate keys; {hint}")

    def check_dali_indexes(self, shards: Sequence[ShardEntry]) -> list[IdxColumns]:
        """The ``.idx`` files a DALI reader follows (it takes member names and offsets from them, not from the tar),
        as columns (one table per shard).

        Each must list the manifest's number of samples, each sample one image (``jpg`` or ``png``), ``labels`` (11
        bytes) and ``json`` under one ``KEY``, inside the tar; no key twice. Cheap: no tar is read, and an ``.idx`` in
        the packer's exact form is checked by one regular expression (:func:`retina_io.tario.scan_idx`); any other is
        read line by line (:func:`retina_io.tario.read_idx`), which names what is wrong."""
        hint = f"run `retina-shard verify {self.root}`"
        tables = []
        for s in shards:
            tar_bytes = s.tar.stat().st_size
            table = scan_idx(s.idx.read_bytes(), tar_bytes)
            if table is None:
                table = self._read_idx(s, tar_bytes, hint)
            if len(table.keys) != s.samples:
                raise DatasetError(
                    f"DALI index {s.idx} lists {len(table.keys)} samples, manifest.json {s.samples}; {hint}"
                )
            tables.append(table)
        keys = np.concatenate([t.keys for t in tables]) if tables else np.zeros(0, np.int64)
        order = np.argsort(keys, kind="stable")
        repeated = order[1:][keys[order[1:]] == keys[order[:-1]]]  # every later occurrence of a key
        if repeated.size:
            at = int(repeated.min())  # the first sample, in manifest order, whose key came before
            first = int(np.flatnonzero(keys == keys[at])[0])
            ends = np.cumsum([len(t.keys) for t in tables])
            shard, earlier = (shards[int(np.searchsorted(ends, i, "right"))] for i in (at, first))
            raise DatasetError(f"DALI index {shard.idx}: key {keys[at]:0{KEY_WIDTH}d} is also in {earlier.idx}; {hint}")
        return tables

    @staticmethod
    def _read_idx(s: ShardEntry, tar_bytes: int, hint: str) -> IdxColumns:
        """An ``.idx`` not in the packer's exact form, read and checked line by line (the messages name the line)."""
        try:
            samples = read_idx(s.idx, tar_bytes)
        except MemberError as exc:
            raise DatasetError(f"DALI index {s.idx}: {exc}; {hint}") from None
        for members in samples:
            key = members[0][0].partition(".")[0]
            exts = sorted(name.partition(".")[2] for name, _, _ in members)
            if exts not in (["jpg", "json", "labels"], ["json", "labels", "png"]):
                raise DatasetError(f"DALI index {s.idx}: sample {key} has {exts}, not jpg|png, json, labels; {hint}")
            if next(size for name, _, size in members if name.endswith(".labels")) != NUM_CLASSES:
                raise DatasetError(f"DALI index {s.idx}: sample {key}'s labels are not {NUM_CLASSES} bytes; {hint}")
        return IdxColumns.of_samples(samples)
