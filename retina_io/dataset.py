"""A packed dataset folder (shard format v1) as the readers see it: manifest, folds, shards, index.

Every reader (the DALI pipeline, the fallback loader, verification, training, stacking) opens a dataset through
:meth:`PackedDataset.open`, so a folder that is not shard format v1, a version mismatch, a fold out of range, a fold
with no shards or a missing ``.idx`` is one clear :class:`DatasetError` naming the path and what to run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from retina_io.errors import RetinaError
from retina_io.schema import CLASSES

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
    except ValueError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}); repack with `retina-shard pack`") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path} is not a retina shard manifest; pack the data with `retina-shard pack`")
    if manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{folder} is shard format v{manifest.get('version')}, this retina reads v{FORMAT_VERSION}; repack it "
            "with this version's `retina-shard pack`"
        )
    if tuple(manifest.get("classes", ())) != CLASSES:
        raise DatasetError(f"{path}: classes {manifest.get('classes')} differ from {list(CLASSES)}")
    return manifest


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
        path = self.root / "index.parquet"
        if not path.is_file():
            raise DatasetError(f"{path} is missing; run `retina-shard verify {self.root}`")
        df = pl.read_parquet(path)
        if folds is not None:
            df = df.filter(pl.col("fold").is_in(self.check_folds(folds)))
        return df
