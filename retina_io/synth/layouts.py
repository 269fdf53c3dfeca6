"""The published layouts retina-synth writes, and :func:`generate_dataset` that writes one into a folder.

A layout is a public dataset's file arrangement: ``synfundus`` (``Fundus/*.jpg`` + ``labels.csv``, SynFundus-1M) and
external-dataset-shaped copies (``rfmid``, ``airogs``, ``aptos``, ``eyepacs``, ``messidor2``) that
:mod:`retina_io.presets` reads back; their column names live there (``LAYOUT_COLUMNS``). :func:`plan_layout` fixes
everything before any pixel (labels, file names, table, seed keys; :mod:`retina_io.synth.labels`); the images are
rendered by :func:`~retina_io.synth.workers.render_all`; the table is written last, atomically.

The output folder must be empty or hold an earlier retina-synth output of the same layout, recognised by its content
(:func:`_is_previous_output`), which is replaced; anything else is refused, so a real dataset is never overwritten.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

from retina_io.fsutil import TMP_MARK, atomic_path
from retina_io.presets import LAYOUT_COLUMNS
from retina_io.synth.errors import SynthError, check_int
from retina_io.synth.labels import (
    EXTERNAL_SPECS,
    LabelArrays,
    external_names,
    external_table,
    sample_label_arrays,
    synfundus_frame,
    synfundus_name,
)
from retina_io.synth.streams import EXTERNAL_STREAM, LABEL_STREAM, S_LAYOUT
from retina_io.synth.workers import render_all

logger = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("synfundus", "rfmid", "airogs", "aptos", "eyepacs", "messidor2")

# What each layout writes at the top of --out (labels file, image folder); below, its images' extension.
_LAYOUT_FILES: dict[str, tuple[str, str]] = {
    "synfundus": ("labels.csv", "Fundus"),
    "rfmid": ("labels.csv", "images"),
    "airogs": ("labels.csv", "images"),
    "aptos": ("train.csv", "train_images"),
    "eyepacs": ("trainLabels.csv", "train"),
    "messidor2": ("messidor_data.csv", "IMAGES"),
}
_LAYOUT_EXT: dict[str, str] = {
    "synfundus": ".jpg", "rfmid": ".png", "airogs": ".jpg", "aptos": ".png", "eyepacs": ".jpeg", "messidor2": ".png",
}  # fmt: skip


def _is_previous_output(out: Path, layout: str, entries: set[str]) -> bool:
    """Whether ``out`` holds only an earlier retina-synth output of ``layout`` (safe to replace).

    Recognised by content, so no marker file lands among the images: only the layout's labels file and image folder
    (plus ``*preview*.png`` contact sheets) at the top, the labels file starts with the layout's exact header, the
    image folder holds only the layout's image type, and its first image is square (real datasets' photographs are
    not).
    """
    labels_name, image_dir = _LAYOUT_FILES[layout]
    extra = {e for e in entries if e.endswith(".png") and "preview" in e and (out / e).is_file()}
    if not entries - extra <= {labels_name, image_dir}:
        return False
    if (out / labels_name).exists():
        try:
            with open(out / labels_name, encoding="utf-8") as fh:
                header = fh.readline().strip()
        except (OSError, UnicodeDecodeError):
            return False
        if header != ",".join(LAYOUT_COLUMNS[layout]):
            return False
    images = out / image_dir
    if images.exists():
        if not images.is_dir():
            return False
        files = sorted(p for p in images.rglob("*") if p.is_file())
        ext = _LAYOUT_EXT[layout]
        if any(not (p.name.endswith(ext) or TMP_MARK in p.name) for p in files):
            return False
        first = next((p for p in files if p.name.endswith(ext)), None)
        if first is not None:
            try:
                with Image.open(first) as im:
                    if im.width != im.height:
                        return False
            except OSError:
                return False
    return True


def _prepare_out(out: Path, layout: str) -> None:
    """Create ``out``, or clear a previous retina-synth output of the same layout; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out} exists and is not a directory")
    if not out.exists():
        out.mkdir(parents=True)
        return
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    if not _is_previous_output(out, layout, entries):
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise SynthError(
            f"--out {out} is not empty ({shown}) and is not a previous retina-synth {layout!r} output; "
            "choose an empty or new directory"
        )
    labels_name, image_dir = _LAYOUT_FILES[layout]
    logger.info("replacing the previous %s output in %s", layout, out)
    if (out / image_dir).is_dir():
        shutil.rmtree(out / image_dir)
    (out / labels_name).unlink(missing_ok=True)


def _write_csv(frame: pl.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.write_csv(tmp)


@dataclass(frozen=True)
class Plan:
    """Everything a layout writes, before rendering: labels, relative image paths, the table, seed keys."""

    labels: LabelArrays
    rel_paths: list[str]
    table: pl.DataFrame
    key_prefix: tuple[int, ...]
    fmt: str


def plan_layout(layout: str, *, n: int, seed: int) -> Plan:
    """What ``layout`` writes for ``n`` images and ``seed`` (draws labels and names; renders nothing)."""
    if layout == "synfundus":
        lab = sample_label_arrays(n, np.random.default_rng([seed, LABEL_STREAM]))
        rel = [synfundus_name(i) for i in range(n)]
        return Plan(lab, rel, synfundus_frame(lab, rel), (seed,), "JPEG")
    li = LAYOUTS.index(layout)
    spec = EXTERNAL_SPECS[layout]
    lab = sample_label_arrays(
        n,
        np.random.default_rng([seed, LABEL_STREAM, li]),
        dr_grade_probs=spec.dr_grade_probs,
        gc_rate=spec.gc_rate,
        paired_eyes=spec.paired_eyes,
        gradable_only=spec.gradable_only,
    )
    lrng = np.random.default_rng([seed, LABEL_STREAM, li, S_LAYOUT])
    rel = external_names(layout, n, lrng)
    table = external_table(layout, lab, rel, lrng)
    return Plan(lab, rel, table, (seed, EXTERNAL_STREAM + li), "PNG" if rel[0].endswith(".png") else "JPEG")


def generate_dataset(
    out: Path,
    *,
    n: int,
    size: int,
    seed: int,
    workers: int | None = None,
    quality: int = 92,
    layout: str = "synfundus",
    progress: bool = True,
) -> Path:
    """Render a labelled synthetic fundus dataset into ``out`` and return the path of its labels file.

    Args:
        out: output directory; created if missing. It must be empty or hold a previous retina-synth output of the
            same layout (which is replaced).
        n: number of images (>= 1).
        size: image width and height in pixels (>= 32).
        seed: non-negative seed; same arguments give byte-identical files for any ``workers``.
        workers: worker processes (default ``os.cpu_count()``, or 1 for n <= 16); 1 renders in this process.
        quality: JPEG quality (1-100; PNG layouts ignore it).
        layout: one of :data:`LAYOUTS`.
        progress: show a tqdm progress bar.

    Raises:
        SynthError: an argument out of range or an ``out`` that is neither empty nor a previous output of ``layout``
            (the message names the flag: ``--n``, ``--size``, ``--seed``, ``--workers``, ``--quality``, ``--layout``,
            ``--out``); nothing is written then.
    """
    if layout not in LAYOUTS:
        raise SynthError(f"--layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    out = Path(out)
    check_int("n", n, 1)
    check_int("size", size, 32)
    check_int("seed", seed, 0)
    check_int("quality", quality, 1, 100)
    if workers is not None:
        check_int("workers", workers, 1)
    labels_name, image_dir = _LAYOUT_FILES[layout]
    _prepare_out(out, layout)
    plan = plan_layout(layout, n=n, seed=seed)
    img_dir = out / image_dir
    render_all(plan.labels, [img_dir / r for r in plan.rel_paths], key_prefix=plan.key_prefix, size=size,
               fmt=plan.fmt, quality=quality, workers=workers, progress=progress,
               desc=f"retina-synth {layout}")  # fmt: skip
    _write_csv(plan.table, out / labels_name)
    logger.info("wrote %s layout: %s, %s", layout, out / labels_name, img_dir)
    return out / labels_name
