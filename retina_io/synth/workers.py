"""Rendering a planned list of images to files, in this process or in a pool of worker processes.

:func:`render_all` cuts the images into chunks (:class:`_Job`: seed keys, label rows, paths) and renders each with
:func:`~retina_io.synth.render.render_image` keyed ``(*key_prefix, i)``, so the bytes do not depend on the number of
workers or the order chunks finish in. Workers are spawned, not forked. Each file is written beside its target and
renamed into place (:mod:`retina_io.fsutil`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from retina_io.fsutil import atomic_path
from retina_io.synth.labels import LabelArrays, row_from_matrix
from retina_io.synth.render import render_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    """One chunk of images for a worker."""

    key_prefix: tuple[int, ...]
    start: int
    labels: np.ndarray  # (k, 16) uint8, see LabelArrays.matrix
    paths: list[str]
    size: int
    fmt: str
    quality: int


def _save(img: Image.Image, path: Path, fmt: str, quality: int) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        if fmt == "JPEG":
            img.save(fh, "JPEG", quality=quality, optimize=False, subsampling=2)
        else:
            img.save(fh, "PNG", optimize=False, compress_level=4)


def _run_job(job: _Job) -> int:
    for j, (row, path) in enumerate(zip(job.labels, job.paths, strict=True)):
        key = (*job.key_prefix, job.start + j)
        _save(render_image(row_from_matrix(row), job.size, key), Path(path), job.fmt, job.quality)
    return len(job.paths)


def render_all(
    labels: LabelArrays,
    paths: Sequence[Path],
    *,
    key_prefix: tuple[int, ...],
    size: int,
    fmt: str,
    quality: int,
    workers: int | None,
    progress: bool,
    desc: str,
) -> None:
    """Render image ``i`` of ``labels`` (keyed ``(*key_prefix, i)``) to ``paths[i]`` as ``fmt`` (JPEG or PNG).

    ``workers`` None: every core, or this process alone for up to 16 images. ``desc`` labels the progress bar.
    """
    n = len(paths)
    if workers is None:  # default: every core, but no process pool for a handful of images
        workers = 1 if n <= 16 else (os.cpu_count() or 1)
    workers = max(1, min(workers, n))
    chunk = max(1, min(64, n // (workers * 4) or 1))
    mat = labels.matrix()
    for d in sorted({p.parent for p in paths}):
        d.mkdir(parents=True, exist_ok=True)

    def jobs() -> Iterator[_Job]:
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            yield _Job(key_prefix, a, mat[a:b], [str(p) for p in paths[a:b]], size, fmt, quality)

    t0 = time.perf_counter()
    with tqdm(total=n, unit="img", desc=desc, disable=not progress, smoothing=0.1) as bar:
        if workers == 1:
            for job in jobs():
                bar.update(_run_job(job))
        else:
            with get_context("spawn").Pool(workers) as pool:
                for done in pool.imap_unordered(_run_job, jobs()):
                    bar.update(done)
    dt = time.perf_counter() - t0
    logger.info(
        "rendered %d images at %d px in %.1f s (%.1f img/s, %d workers)", n, size, dt, n / max(dt, 1e-9), workers
    )
