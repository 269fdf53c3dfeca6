"""The packer's memory does not grow with the number of images beyond its columns (issue 14): no Python object per
image survives a step (label rows, scanned files, checks, plan, index are polars/numpy columns; work travels in
bounded chunks)."""

from __future__ import annotations

import csv
import tracemalloc
from pathlib import Path

import numpy as np

from retina_io import sources, tables
from retina_io.pack import PackConfig, pack
from tests.conftest import SYNFUNDUS_HEADER, _row, fundus_like, jpeg_bytes

CHUNK = 256  # rows per chunk while reading the table, scanning and checking (the defaults are larger)


def _tiny_dataset(root: Path, n: int) -> tuple[Path, Path]:
    """``n`` different 16 px JPEGs (one picture, a unique trailer after its end marker) in the SynFundus layout."""
    rng = np.random.default_rng(0)
    picture = jpeg_bytes(fundus_like(1, size=(16, 16)))
    (root / "Fundus").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = f"{i:06d}.jpg"
        (root / "Fundus" / name).write_bytes(picture + i.to_bytes(8, "little"))
        rows.append(_row(name, rng))
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([SYNFUNDUS_HEADER, *rows])
    return root, labels


def _python_peak(root: Path, n: int) -> int:
    """The peak of Python allocations (tracemalloc) while packing ``n`` images in this process."""
    images, labels = _tiny_dataset(root / "src", n)
    cfg = PackConfig(images=images, labels=labels, preset="synfundus", out=root / "out", workers=1, shard_samples=100,
                     progress=False)  # fmt: skip
    tracemalloc.start()
    try:
        result = pack(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.complete and result.accepted == n
    return peak


def test_python_memory_does_not_grow_per_image(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "CHUNK_ROWS", CHUNK, raising=False)
    monkeypatch.setattr(sources, "SCAN_CHUNK", CHUNK, raising=False)
    small, large = 500, 2000
    _python_peak(tmp_path / "warm", 200)  # first-use caches (imports, regexes, polars) outside the comparison
    grown = _python_peak(tmp_path / "large", large) - _python_peak(tmp_path / "small", small)
    per_image = grown / (large - small)
    # Before issue 14 each image held a dict per label row, scanned file, check and index row (3.3 KB per image here,
    # 4.6 KB of resident memory at a million); now only numpy columns (labels, folds, order) grow with the images.
    assert per_image < 100, (
        f"Python memory grows by {per_image:.0f} bytes per image ({grown} bytes for {large - small})"
    )
