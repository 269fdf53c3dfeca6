"""The shared result format of every benchmark: a markdown table, then one JSON object as the last line.

Every benchmark times ours against a baseline in the same process, on the same files, and reports the ratio
(ours over the baseline, higher is better) next to its goal: absolute times drift on shared machines, ratios less so.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    name: str
    seconds: float
    items: int
    nbytes: int = 0
    note: str = ""
    skipped: str = ""  # why this row was not run (e.g. no GPU here): reported as such, with no figures

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")

    @property
    def mb_per_second(self) -> float:
        return self.nbytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class BenchResult:
    benchmark: str
    ratio: float
    goal: float
    rows: list[Row] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def markdown(self) -> str:
        lines = ["| run | seconds | images/s | MB/s | note |", "| --- | ---: | ---: | ---: | --- |"]
        for r in self.rows:
            if r.skipped:
                lines.append(f"| {r.name} | - | - | - | skipped: {r.skipped} |")
                continue
            lines.append(f"| {r.name} | {r.seconds:.3f} | {r.per_second:,.0f} | {r.mb_per_second:,.1f} | {r.note} |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "ratio": round(self.ratio, 3),
            "goal": self.goal,
            **self.extra,
            "rows": [
                {"name": r.name, "skipped": r.skipped}
                if r.skipped
                else {
                    "name": r.name,
                    "seconds": round(r.seconds, 4),
                    "images_per_s": round(r.per_second, 1),
                    "mb_per_s": round(r.mb_per_second, 2),
                    "note": r.note,
                }
                for r in self.rows
            ],
            "machine": machine(),
        }


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` wall-clock runs of ``fn`` (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "commit": commit,
    }


def warm_cache(paths: list[Path]) -> int:
    """Read every file once so each run starts from the page cache; returns the total bytes."""
    total = 0
    for p in paths:
        total += len(p.read_bytes())
    return total


def emit(result: BenchResult) -> None:
    print(result.markdown())
    print(json.dumps(result.to_json()))


def ensure_images(cache: Path, *, n: int, size: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """``n`` procedural fundus JPEGs (SynFundus layout) in ``cache``, generated on first use."""
    import shutil

    from retina_io.synth import generate_dataset

    folder = cache / f"synfundus-{n}-{size}-{seed}"
    labels = folder / "labels.csv"
    if not labels.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        generate_dataset(folder, n=n, size=size, seed=seed, workers=None, progress=True)
    return folder, labels


def ensure_packed(cache: Path, images: Path, labels: Path) -> Path:
    """The images packed (store mode, 5 folds) into ``cache``, on first use."""
    from retina_io.pack import PackConfig, pack

    out = cache / f"{images.name}-shards"
    if not (out / "manifest.json").is_file():
        pack(PackConfig(images=images, labels=labels, preset="synfundus", out=out, progress=False))
    return out
