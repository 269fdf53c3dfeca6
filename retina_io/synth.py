"""Procedural fundus-photograph dataset generator (console script ``retina-synth``).

Draws colour fundus photographs from scratch (numpy + PIL): black surround, circular field, orange-red retina with
vignetting, a branching artery/vein tree leaving the optic disc, a macula 2.5 disc diameters temporal to the disc, and
for each of the 11 SynFundus-1M classes (:data:`retina_io.schema.CLASSES`) its own visible sign, sized relative to the
image so it survives downsampling to 64-128 px.

Labels come from a small latent model (age, diabetes, hypertension, high myopia) so prevalences are imbalanced and
co-occur like screening data. Everything is deterministic for a seed: the labels are drawn up front from
``np.random.default_rng([seed, 1_000_003])`` and image ``i`` from generators keyed ``[seed, i, component]`` (external
layouts: ``[seed, 2_000_003 + layout, i, component]``), so the output is byte-identical for any number of workers.

Within one image, anatomy, vessel tree, nuisance (field, illumination, blur, noise) and each class's lesions come from
separate generator streams, so toggling one class with the same seed changes only that class's sign.

Layouts: ``synfundus`` (``Fundus/*.jpg`` + ``labels.csv``, the SynFundus-1M layout) and external-dataset-shaped copies
(``rfmid``, ``airogs``, ``aptos``, ``eyepacs``, ``messidor2``) drawn by the same renderer from a different seed stream.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from retina_io.schema import CLASS_DESCRIPTIONS, CLASSES

logger = logging.getLogger(__name__)

__all__ = [
    "AIROGS_COLUMNS",
    "APTOS_COLUMNS",
    "CLASS_COLUMNS",
    "EYEPACS_COLUMNS",
    "LAYOUTS",
    "MESSIDOR2_COLUMNS",
    "READABILITY_COLUMNS",
    "RFMID_COLUMNS",
    "RFMID_DISEASES",
    "RFMID_MAP",
    "SYNFUNDUS_COLUMNS",
    "FundusLandmarks",
    "LayoutPaths",
    "fundus_landmarks",
    "generate_dataset",
    "main",
    "render_fundus",
    "sample_labels",
    "write_airogs",
    "write_aptos",
    "write_eyepacs",
    "write_messidor2",
    "write_preview",
    "write_rfmid",
    "write_synfundus",
]

# ----------------------------------------------------------------------------------------------------------------------
# Column layouts
# ----------------------------------------------------------------------------------------------------------------------

LAYOUTS: tuple[str, ...] = ("synfundus", "rfmid", "airogs", "aptos", "eyepacs", "messidor2")

#: ``is_*`` column of every class except DR (DR is carried by ``dr_grade > 0``), in :data:`CLASSES` order.
CLASS_COLUMNS: dict[str, str] = {c: f"is_{c.lower()}" for c in CLASSES if c != "DR"}
READABILITY_COLUMNS: tuple[str, ...] = (
    "is_fundus",
    "is_macular_readable",
    "is_optic_disc_readable",
    "is_retinal_region_readable",
)
SYNFUNDUS_COLUMNS: tuple[str, ...] = (
    "file_name",
    "dr_grade",
    "eye_side",
    *CLASS_COLUMNS.values(),
    *READABILITY_COLUMNS,
)

#: The 45 RFMiD disease columns, in the published order (after ``ID`` and ``Disease_Risk``).
RFMID_DISEASES: tuple[str, ...] = (
    "DR", "ARMD", "MH", "DN", "MYA", "BRVO", "TSLN", "ERM", "LS", "MS", "CSR", "ODC", "CRVO", "TV", "AH", "ODP", "ODE",
    "ST", "AION", "PT", "RT", "RS", "CRS", "EDN", "RPEC", "MHL", "RP", "CWS", "CB", "ODPM", "PRH", "MNF", "HR", "CRAO",
    "TD", "CME", "PTCR", "CF", "VH", "MCA", "VS", "BRAO", "PLQ", "HPED", "CL",
)  # fmt: skip
RFMID_COLUMNS: tuple[str, ...] = ("ID", "Disease_Risk", *RFMID_DISEASES)
#: Our class -> RFMiD column (RVO goes to BRVO or CRVO at random; DM, CRP, HtR and DME have no RFMiD column here).
RFMID_MAP: dict[str, str] = {"DR": "DR", "AMD": "ARMD", "GC": "ODC", "PM": "MYA", "EM": "ERM", "AON": "ODE"}
AIROGS_COLUMNS: tuple[str, ...] = ("challenge_id", "class")
APTOS_COLUMNS: tuple[str, ...] = ("id_code", "diagnosis")
EYEPACS_COLUMNS: tuple[str, ...] = ("image", "level")
MESSIDOR2_COLUMNS: tuple[str, ...] = ("id_code", "diagnosis", "adjudicated_dme", "adjudicated_gradable")

# What each layout writes at the top of --out (labels file, image folder).
_LAYOUT_FILES: dict[str, tuple[str, str]] = {
    "synfundus": ("labels.csv", "Fundus"),
    "rfmid": ("labels.csv", "images"),
    "airogs": ("labels.csv", "images"),
    "aptos": ("train.csv", "train_images"),
    "eyepacs": ("trainLabels.csv", "train"),
    "messidor2": ("messidor_data.csv", "IMAGES"),
}

# Seed streams. Labels: default_rng([seed, _LABEL_STREAM(, layout)]); image i of the synfundus layout is keyed
# (seed, i), image i of an external layout (seed, _EXTERNAL_STREAM + layout index, i); render_fundus(seed=s) is (s,).
_LABEL_STREAM = 1_000_003
_EXTERNAL_STREAM = 2_000_003
_S_ANATOMY, _S_NUISANCE, _S_VESSELS, _S_READABILITY, _S_NOISE, _S_LAYOUT = 1, 2, 3, 4, 5, 6
_S_CLASS = 100  # + class index

# Reflectance colours (before illumination, colour cast and gamma), 0-255 RGB.
_VEIN = (128, 26, 28)
_ARTERY = (182, 58, 42)
_ARTERY_HTR = (198, 84, 50)
_HEM_DARK = (112, 14, 12)
_HEM = (140, 24, 16)
_EXUDATE = (252, 236, 150)
_EXUDATE_HI = (255, 250, 205)
_DRUSEN = (236, 200, 112)
_DRUSEN_HI = (248, 226, 150)
_PIGMENT = (52, 26, 14)
_ATROPHY = (240, 214, 168)
_COTTON = (246, 238, 222)
_SCAR = (242, 228, 196)


def _rng(key: tuple[int, ...], stream: int) -> np.random.Generator:
    return np.random.default_rng([*key, stream])


# ----------------------------------------------------------------------------------------------------------------------
# Label sampling
# ----------------------------------------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class _LabelArrays:
    """Sampled labels, one entry per image: ``dr_grade`` int, ``right_eye`` bool, per-class and readability uint8."""

    dr_grade: np.ndarray
    right_eye: np.ndarray
    classes: dict[str, np.ndarray]  # CLASSES -> uint8, DR included (== dr_grade > 0)
    readability: dict[str, np.ndarray]  # READABILITY_COLUMNS -> uint8

    def __len__(self) -> int:
        return len(self.dr_grade)

    def matrix(self) -> np.ndarray:
        """Compact uint8 matrix (dr_grade, right_eye, 10 non-DR classes, 4 readability) for shipping to workers."""
        cols = [self.dr_grade, self.right_eye]
        cols += [self.classes[c] for c in CLASS_COLUMNS]
        cols += [self.readability[c] for c in READABILITY_COLUMNS]
        return np.stack([np.asarray(c, dtype=np.uint8) for c in cols], axis=1)


def _row_from_matrix(row: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"dr_grade": int(row[0]), "eye_side": "right" if row[1] else "left", "DR": int(row[0] > 0)}
    for j, c in enumerate(CLASS_COLUMNS):
        out[c] = int(row[2 + j])
    for j, c in enumerate(READABILITY_COLUMNS):
        out[c] = int(row[2 + len(CLASS_COLUMNS) + j])
    return out


def _sample_label_arrays(
    n: int,
    rng: np.random.Generator,
    *,
    dr_grade_probs: Sequence[float] | None = None,
    gc_rate: float | None = None,
    paired_eyes: bool = False,
    gradable_only: bool = False,
) -> _LabelArrays:
    """Draw labels from the latent screening model (age, diabetes, hypertension, high myopia).

    Marginals on the default settings (100k draws): about 50% healthy and 95% with at most two diseases; DR ~27%
    (grades 1/2/3/4 ~ 42/34/14/10 % of DR), DME ~5.5% (97% of it with DR), AMD ~7.5% and EM ~5% (age), GC ~5.5% (age,
    myopia), HtR ~7% and RVO ~2% (hypertension; RVO also follows HtR), PM ~4% and DM ~3% (high myopia; correlated),
    AON ~3.5%, CRP ~3%; readability flags 0 on ~3% of images. ``paired_eyes`` draws one subject per two consecutive
    images (left, right). The number of draws does not depend on the options, so the stream stays aligned.
    """
    n_subj = (n + 1) // 2 if paired_eyes else n
    age = np.clip(rng.normal(57.0, 14.0, n_subj), 18.0, 92.0)
    diabetes = rng.random(n_subj) < 0.46
    hypertension = rng.random(n_subj) < 0.06 + 0.5 * _sigmoid((age - 62.0) / 8.0)
    myopia = rng.random(n_subj) < 0.1
    idx = np.repeat(np.arange(n_subj), 2)[:n] if paired_eyes else np.arange(n)
    age, diabetes, hypertension, myopia = age[idx], diabetes[idx], hypertension[idx], myopia[idx]

    def bern(p: np.ndarray | float) -> np.ndarray:
        return rng.random(n) < p

    dr = bern(np.where(diabetes, 0.55, 0.04))
    grade = rng.choice(np.arange(1, 5), size=n, p=[0.42, 0.34, 0.14, 0.10])
    dr_grade = np.where(dr, grade, 0)
    if dr_grade_probs is not None:
        dr_grade = rng.choice(5, size=n, p=np.asarray(dr_grade_probs, dtype=float) / np.sum(dr_grade_probs))
    dme = bern(np.array([0.003, 0.07, 0.2, 0.38, 0.5])[dr_grade])
    amd = bern(0.02 + 0.34 * _sigmoid((age - 73.0) / 5.0))
    em = bern(0.015 + 0.1 * _sigmoid((age - 67.0) / 6.0) + 0.015 * diabetes)
    gc_p = (0.022 + 0.1 * _sigmoid((age - 67.0) / 7.0)) * np.where(myopia, 2.0, 1.0)
    gc = bern(gc_p if gc_rate is None else gc_rate)
    htr = bern(0.012 + 0.18 * hypertension + 0.02 * diabetes)
    rvo = bern(0.006 + 0.04 * hypertension + 0.08 * htr)
    pm = bern(0.004 + 0.38 * myopia)
    dm = bern(0.004 + np.where(pm, 0.5, 0.12) * myopia)
    aon = bern(0.03 + 0.02 * hypertension)
    crp = bern(0.024 + 0.05 * myopia)
    side = rng.random(n) < 0.5
    right_eye = (np.arange(n) % 2 == 1) if paired_eyes else side

    retinal_bad = bern(0.025 + 0.03 * (age > 72))
    macular_bad = (retinal_bad & bern(0.6)) | bern(0.012)
    disc_bad = (retinal_bad & bern(0.5)) | bern(0.01)
    not_fundus = bern(0.004)
    if gradable_only:
        retinal_bad[:] = False
        macular_bad[:] = False
        disc_bad[:] = False
        not_fundus[:] = False
    readable = {
        "is_fundus": ~not_fundus,
        "is_macular_readable": ~(macular_bad | not_fundus),
        "is_optic_disc_readable": ~(disc_bad | not_fundus),
        "is_retinal_region_readable": ~(retinal_bad | not_fundus),
    }
    classes = {
        "DR": dr_grade > 0, "AMD": amd, "AON": aon, "CRP": crp, "DM": dm, "DME": dme, "EM": em, "GC": gc,
        "HtR": htr, "PM": pm, "RVO": rvo,
    }  # fmt: skip
    return _LabelArrays(
        dr_grade=dr_grade.astype(np.int64),
        right_eye=right_eye.astype(bool),
        classes={c: classes[c].astype(np.uint8) for c in CLASSES},
        readability={c: readable[c].astype(np.uint8) for c in READABILITY_COLUMNS},
    )


def _synfundus_frame(labels: _LabelArrays, file_names: Sequence[str]) -> pl.DataFrame:
    cols: dict[str, Any] = {
        "file_name": list(file_names),
        "dr_grade": labels.dr_grade.astype(np.int64),
        "eye_side": np.where(labels.right_eye, "right", "left").tolist(),
    }
    cols.update({col: labels.classes[c].astype(np.int64) for c, col in CLASS_COLUMNS.items()})
    cols.update({c: labels.readability[c].astype(np.int64) for c in READABILITY_COLUMNS})
    return pl.DataFrame(cols).select(SYNFUNDUS_COLUMNS)


def _synfundus_name(i: int) -> str:
    return f"synf_{i:07d}.jpg"


def sample_labels(n: int, *, seed: int) -> pl.DataFrame:
    """Sample ``n`` label rows in the SynFundus-1M ``labels.csv`` layout (:data:`SYNFUNDUS_COLUMNS`).

    Args:
        n: number of rows (images).
        seed: non-negative seed; the labels come from ``np.random.default_rng([seed, 1_000_003])``.

    Returns:
        A DataFrame with ``file_name`` (``synf_0000000.jpg``, ...), ``dr_grade`` (0-4, DR positive iff > 0),
        ``eye_side`` (``left``/``right``), the ten ``is_*`` class columns and the four readability flags (all 0/1).
    """
    _check_int("n", n, 1)
    _check_int("seed", seed, 0)
    labels = _sample_label_arrays(n, np.random.default_rng([seed, _LABEL_STREAM]))
    return _synfundus_frame(labels, [_synfundus_name(i) for i in range(n)])


# ----------------------------------------------------------------------------------------------------------------------
# Rendering: geometry
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FundusLandmarks:
    """Where the anatomy of one rendered image lies, in pixel coordinates (x right, y down) of the output image."""

    size: int
    eye_side: str
    field_center: tuple[float, float]
    field_radius: float
    fovea: tuple[float, float]
    disc_center: tuple[float, float]
    disc_radius: float


class _Scene:
    """Per-image geometry, anatomy and nuisance parameters, in right-eye coordinates (disc right of the macula)."""

    def __init__(self, size: int, key: tuple[int, ...]) -> None:
        s = float(size)
        self.size = size
        nz = _rng(key, _S_NUISANCE)
        an = _rng(key, _S_ANATOMY)
        # Nuisance: field, illumination, colour, optics, sensor.
        self.R = s * nz.uniform(0.44, 0.495)
        self.cx = s / 2 + nz.normal(0.0, 0.012) * s
        self.cy = s / 2 + nz.normal(0.0, 0.012) * s
        crop = nz.random() < 0.3
        crop_h = self.R * nz.uniform(0.8, 0.93)
        self.crop_h = crop_h if crop else None
        self.vig_k = nz.uniform(0.3, 0.65)
        self.vig_p = nz.uniform(2.0, 3.5)
        self.grad_amp = nz.uniform(0.0, 0.25)
        self.grad_ang = nz.uniform(0.0, 2 * math.pi)
        self.gain = nz.uniform(0.85, 1.12)
        self.gamma = nz.uniform(0.8, 1.2)
        self.cast = nz.uniform((0.93, 0.88, 0.78), (1.05, 1.1, 1.1))
        self.blur = s * nz.uniform(0.0005, 0.0025)
        self.noise_sigma = nz.uniform(1.5, 6.0)
        self.heavy_blur = s * nz.uniform(0.012, 0.03)
        self.heavy_dark = nz.uniform(0.25, 0.5)
        # Anatomy.
        self.pigment = an.beta(2.0, 2.0)
        self.dd = self.R * an.uniform(0.27, 0.32)  # disc diameter
        self.rd = self.dd / 2
        off = an.normal(0.0, 0.035, 2) * self.R
        self.fx = self.cx - 0.07 * self.R + off[0]
        self.fy = self.cy + off[1]
        df = an.uniform(2.3, 2.6) * self.dd
        ang = an.uniform(-10.0, -2.0) * math.pi / 180
        self.dx = self.fx + df * math.cos(ang)
        self.dy = self.fy + df * math.sin(ang)
        self.macula_depth = an.uniform(0.2, 0.35)
        self.macula_sigma = an.uniform(0.55, 0.8) * self.dd
        self.cdr = an.uniform(0.3, 0.4)
        self.disc_aspect = an.uniform(1.03, 1.14)
        self.cup_dx = an.uniform(-0.15, 0.02) * self.rd
        self.rim_jitter = an.uniform(-12, 12, 3)
        self.reflex = an.uniform(0.35, 0.9)
        self.mottle = an.normal(size=(9, 9)).astype(np.float32)
        self.mottle_amp = an.uniform(0.03, 0.08)
        self.grain = an.normal(size=(64, 64)).astype(np.float32)
        self.grain_amp = an.uniform(0.015, 0.035)
        self.glow = an.uniform(0.04, 0.12)
        blond = np.array([206.0, 100.0, 46.0])
        dark = np.array([160.0, 60.0, 28.0])
        self.base = blond + (dark - blond) * self.pigment + an.normal(0.0, 5.0, 3)

    def landmarks(self, eye_side: str) -> FundusLandmarks:
        def fx(x: float) -> float:
            return self.size - x if eye_side == "left" else x

        return FundusLandmarks(
            size=self.size,
            eye_side=eye_side,
            field_center=(fx(self.cx), self.cy),
            field_radius=self.R,
            fovea=(fx(self.fx), self.fy),
            disc_center=(fx(self.dx), self.dy),
            disc_radius=self.rd,
        )


def _ellipse_poly(
    cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, jitter: np.ndarray | None = None, k: int = 14
) -> np.ndarray:
    """Polygon (k, 2) of a rotated ellipse; ``jitter`` (k,) scales the radius per vertex for irregular blobs."""
    t = np.linspace(0.0, 2 * math.pi, k, endpoint=False)
    r = 1.0 if jitter is None else jitter
    x, y = rx * np.cos(t) * r, ry * np.sin(t) * r
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cx + x * ca - y * sa, cy + x * sa + y * ca], axis=1)


# A shape: ("e", cx, cy, rx, ry, alpha) ellipse, ("p", pts(k,2), alpha) polygon, ("l", pts(k,2), width, alpha) line.
_Shape = tuple[Any, ...]


def _shape_extent(shape: _Shape) -> tuple[float, float, float, float]:
    if shape[0] == "e":
        _, cx, cy, rx, ry, _a = shape
        return cx - rx, cy - ry, cx + rx, cy + ry
    pts = shape[1]
    pad = shape[2] / 2 if shape[0] == "l" else 0.0
    return pts[:, 0].min() - pad, pts[:, 1].min() - pad, pts[:, 0].max() + pad, pts[:, 1].max() + pad


def _paint(
    canvas: Image.Image, colour: Sequence[float], shapes: Sequence[_Shape], *, ss: int, blur: float = 0.0
) -> None:
    """Blend ``colour`` into ``canvas`` through an antialiased (``ss``x supersampled), optionally blurred mask."""
    if not shapes:
        return
    ext = np.array([_shape_extent(s) for s in shapes])
    pad = 2.0 + 3.0 * blur
    size = canvas.size[0]
    x0, y0 = max(0, math.floor(ext[:, 0].min() - pad)), max(0, math.floor(ext[:, 1].min() - pad))
    x1, y1 = min(size, math.ceil(ext[:, 2].max() + pad)), min(size, math.ceil(ext[:, 3].max() + pad))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(mask)
    off = np.array([x0, y0], dtype=float)
    for shape in shapes:
        kind = shape[0]
        fill = int(round(255 * min(1.0, max(0.0, shape[-1]))))
        if kind == "e":
            _, cx, cy, rx, ry, _a = shape
            rx, ry = max(rx * ss, 0.5), max(ry * ss, 0.5)
            px, py = (cx - x0) * ss, (cy - y0) * ss
            draw.ellipse((px - rx, py - ry, px + rx, py + ry), fill=fill)
        elif kind == "p":
            pts = ((shape[1] - off) * ss).ravel().tolist()
            draw.polygon(pts, fill=fill)
        else:
            pts = ((shape[1] - off) * ss).ravel().tolist()
            draw.line(pts, fill=fill, width=max(1, int(round(shape[2] * ss))), joint="curve")
    if ss > 1:
        mask = mask.reduce(ss)
    if blur > 0.3:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    canvas.paste(tuple(int(round(c)) for c in colour), (x0, y0, x1, y1), mask)


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[float, float, float]:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)


# ----------------------------------------------------------------------------------------------------------------------
# Rendering: vessel tree
# ----------------------------------------------------------------------------------------------------------------------

_N0, _N1, _N2 = 28, 14, 8  # points per main vessel / branch / twig
_K1, _K2 = 4, 2  # branches per main vessel / twigs per branch
# Arcades (right eye; temporal is -x): initial heading (deg), total turn (deg), length (in field radii).
_ARCADES = (
    ("ST", -78.0, -100.0, 1.35),
    ("IT", 78.0, 100.0, 1.35),
    ("SN", -50.0, 15.0, 0.75),
    ("IN", 50.0, -15.0, 0.75),
    ("N", 4.0, 0.0, 0.55),
)


@dataclass
class _Level:
    """One generation of vessels: per-vessel parameters and per-step random increments (fixed draws)."""

    h0: np.ndarray  # (V,) initial heading offset (rad)
    turn: np.ndarray  # (V,) total heading change (rad)
    length: np.ndarray  # (V,) in field radii
    width: np.ndarray  # (V,) start width (main: in disc diameters; branches: fraction of parent width)
    walk: np.ndarray  # (V, n) random-walk heading increments
    wiggle: np.ndarray  # (V, n) high-frequency heading noise
    vein: np.ndarray  # (V,) bool
    parent: np.ndarray  # (V,) index into the previous level (-1 for main vessels)
    frac: np.ndarray  # (V,) spawn position along the parent (0-1)
    start: np.ndarray  # (V, 2) start offset at the disc (main only, in disc radii)
    arcade: np.ndarray  # (V,) arcade index


def _vessel_spec(rng: np.random.Generator) -> list[_Level]:
    n_main = 2 * len(_ARCADES)
    vein = np.tile([False, True], len(_ARCADES))
    arcade = np.repeat(np.arange(len(_ARCADES)), 2)
    base = np.array([[a[1], a[2], a[3]] for a in _ARCADES])[arcade]
    sep = np.where(vein, 1.0, -1.0) * rng.uniform(3.0, 9.0, n_main)
    main = _Level(
        h0=np.deg2rad(base[:, 0] + sep + rng.normal(0.0, 6.0, n_main)),
        turn=np.deg2rad(base[:, 1] * rng.uniform(0.88, 1.12, n_main)),
        length=base[:, 2] * rng.uniform(0.88, 1.1, n_main),
        width=np.where(vein, 0.1, 0.072) * rng.uniform(0.9, 1.1, n_main) * np.where(arcade >= 2, 0.75, 1.0),
        walk=rng.normal(0.0, 1.0, (n_main, _N0)),
        wiggle=rng.normal(0.0, 1.0, (n_main, _N0)),
        vein=vein,
        parent=np.full(n_main, -1),
        frac=np.zeros(n_main),
        start=rng.normal(0.0, 0.18, (n_main, 2)),
        arcade=arcade,
    )
    levels = [main]
    for k, npts, (lo, hi), (llo, lhi) in ((_K1, _N1, (0.12, 0.9), (0.2, 0.5)), (_K2, _N2, (0.2, 0.85), (0.1, 0.25))):
        prev = levels[-1]
        nv = len(prev.vein) * k
        parent = np.repeat(np.arange(len(prev.vein)), k)
        levels.append(
            _Level(
                h0=np.deg2rad(rng.uniform(20.0, 50.0, nv) * rng.choice([-1.0, 1.0], nv)),
                turn=np.deg2rad(rng.normal(0.0, 20.0, nv)),
                length=rng.uniform(llo, lhi, nv),
                width=rng.uniform(0.5, 0.72, nv),
                walk=rng.normal(0.0, 1.0, (nv, npts)),
                wiggle=rng.normal(0.0, 1.0, (nv, npts)),
                vein=prev.vein[parent],
                parent=parent,
                frac=rng.uniform(lo, hi, nv),
                start=np.zeros((nv, 2)),
                arcade=prev.arcade[parent],
            )
        )
    return levels


@dataclass
class _Vessels:
    pts: list[np.ndarray]  # per level (V, n, 2) in px
    width: list[np.ndarray]  # per level (V, n) in px
    heading: list[np.ndarray]  # per level (V, n)
    vein: list[np.ndarray]


def _realise_vessels(
    spec: list[_Level],
    sc: _Scene,
    *,
    tort: list[np.ndarray],
    wscale: list[np.ndarray],
) -> _Vessels:
    """Turn the vessel spec into polylines; ``tort``/``wscale`` are per-level (V, n) tortuosity and width factors."""
    out = _Vessels([], [], [], [])
    for lev, (lv, t_f, w_f) in enumerate(zip(spec, tort, wscale, strict=True)):
        nv, npts = lv.walk.shape
        t = np.linspace(0.0, 1.0, npts)
        amp_walk = np.where(lv.vein, 0.055, 0.045)[:, None] * (0.6 if lev == 0 else 1.0)
        amp_wig = np.where(lv.vein, 0.09, 0.07)[:, None]
        wig = lv.wiggle.copy()
        wig[:, 1:-1] = (lv.wiggle[:, :-2] + lv.wiggle[:, 1:-1] + lv.wiggle[:, 2:]) / 3.0
        dh = np.cumsum(lv.walk * amp_walk * t_f, axis=1) + wig * amp_wig * t_f
        if lev == 0:
            head0 = lv.h0
            side = np.array([-0.3, 0.3, -0.25, 0.25, 0.0])[lv.arcade]  # superior vessels leave the top of the cup
            start = np.stack([np.full(len(side), sc.dx + sc.cup_dx), sc.dy + side * sc.rd], 1)
            start = start + lv.start * sc.rd * 0.25
            w0 = lv.width * sc.dd
        else:
            ppts, pw, ph = out.pts[-1], out.width[-1], out.heading[-1]
            pidx = np.minimum((lv.frac * (ppts.shape[1] - 1)).astype(int), ppts.shape[1] - 1)
            start = ppts[lv.parent, pidx]
            head0 = ph[lv.parent, pidx] + lv.h0
            w0 = pw[lv.parent, pidx] * lv.width
        shape = 1.0 - (1.0 - t) ** 2.2 if lev == 0 else t  # main arcades bend early, then run temporally
        heading = head0[:, None] + lv.turn[:, None] * shape[None, :] + dh
        step = (lv.length * sc.R / (npts - 1))[:, None]
        d = np.stack([np.cos(heading[:, :-1]), np.sin(heading[:, :-1])], axis=2) * step[:, :, None]
        pts = np.concatenate([start[:, None, :], start[:, None, :] + np.cumsum(d, axis=1)], axis=1)
        width = w0[:, None] * (1.0 - (0.5 if lev == 0 else 0.35) * t[None, :]) * w_f
        out.pts.append(pts)
        out.width.append(width)
        out.heading.append(heading)
        out.vein.append(lv.vein)
    return out


def _draw_vessel_mask(
    size: int, ss: int, levels: list[tuple[np.ndarray, np.ndarray]], fovea: tuple[float, float], faz: float
) -> Image.Image:
    """Supersampled L mask of vessel polylines, per level (points (V,n,2), widths (V,n) in px).

    Vessels stop at the foveal avascular zone (radius ``faz``); sub-pixel vessels fade via the mask value.
    """
    mask = Image.new("L", (size * ss, size * ss), 0)
    line = ImageDraw.Draw(mask).line
    f = np.asarray(fovea)
    runs: list[tuple[list[list[float]], int, int]] = []
    for pts, width in levels:
        nv, npts = width.shape
        inside = ((pts[..., 0] - f[0]) ** 2 + (pts[..., 1] - f[1]) ** 2) < faz * faz
        end = np.where(inside.any(axis=1), inside.argmax(axis=1) - 1, npts - 1)
        w = width * ss
        wq = np.maximum(1, (w + 0.5).astype(int))
        wq = np.where(wq > 6, (wq + 1) // 2 * 2, wq)  # even widths above 6 px: fewer, longer runs
        fill = np.where(w < 1.0, np.where(w < 0.5, 96, 176), 255)  # sub-pixel vessels fade (two levels: few runs)
        key = wq * 1000 + fill
        rows, cols = np.nonzero(key[:, 1:-1] != key[:, :-2])
        cols += 1
        plist = (pts * ss).tolist()
        wl, fl = wq.tolist(), fill.tolist()
        cuts: list[list[int]] = [[] for _ in range(nv)]
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            cuts[r].append(c)
        for v in range(nv):
            e = int(end[v])
            a = 0
            for b in [*cuts[v], e]:
                if b > e:
                    b = e
                if b > a:
                    runs.append((plist[v][a : b + 1], fl[v][a], wl[v][a]))
                a = b
                if a >= e:
                    break
    # Soft vessel walls: a faint wider pass under every wide run, then the cores on top.
    for seg, fill_v, w_v in runs:
        if w_v >= 3:
            line(seg, fill=fill_v * 2 // 5, width=w_v + 2 + w_v // 3)
    for seg, fill_v, w_v in runs:
        line(seg, fill=fill_v, width=w_v)
    if ss > 1:
        mask = mask.reduce(ss)
    return mask


# ----------------------------------------------------------------------------------------------------------------------
# Rendering: the image
# ----------------------------------------------------------------------------------------------------------------------


def _normalise_labels(labels: Mapping[str, Any]) -> dict[str, Any]:
    """Accept class names (``DR``, ``AMD``, ...) or ``is_*`` column names; fill defaults (healthy, right eye)."""
    out: dict[str, Any] = {}
    for c in CLASSES:
        v = labels.get(c, labels.get(f"is_{c.lower()}", 0))
        out[c] = int(bool(v))
    grade = int(labels.get("dr_grade", 0) or 0)
    if grade < 0 or grade > 4:
        raise ValueError(f"dr_grade must be 0-4; got {grade}")
    if "DR" in labels:
        grade = (grade or 2) if out["DR"] else 0
    out["dr_grade"] = grade
    out["DR"] = int(grade > 0)
    side = str(labels.get("eye_side", "right"))
    if side not in ("left", "right"):
        raise ValueError(f"eye_side must be 'left' or 'right'; got {side!r}")
    out["eye_side"] = side
    for c in READABILITY_COLUMNS:
        out[c] = int(bool(labels.get(c, 1)))
    return out


class _Renderer:
    def __init__(self, labels: Mapping[str, Any], size: int, key: tuple[int, ...]) -> None:
        self.lab = _normalise_labels(labels)
        self.size = size
        self.key = key
        self.ss = 2  # supersampling of every drawn mask (antialiasing)
        self.sc = _Scene(size, key)
        self.px = 1.0  # one output pixel, for minimum lesion sizes
        self.fovea_reflex = True  # off where a lesion covers the fovea

    def crng(self, cls: str) -> np.random.Generator:
        return _rng(self.key, _S_CLASS + CLASSES.index(cls))

    # -- background -----------------------------------------------------------------------------------------------
    def _lowres(self) -> tuple[Image.Image, np.ndarray]:
        sc, s = self.sc, self.size
        n = min(s, 64)
        c = (np.arange(n, dtype=np.float32) + 0.5) * (s / n)
        x, y = c[None, :], c[:, None]
        mot = Image.fromarray(sc.mottle, "F").resize((n, n), Image.Resampling.BICUBIC)
        refl = np.ones((n, n, 3), dtype=np.float32) * sc.base.astype(np.float32)
        refl *= (1.0 + sc.mottle_amp * np.asarray(mot) + sc.grain_amp * sc.grain[:n, :n])[:, :, None]
        dm = ((x - sc.fx) ** 2 + (y - sc.fy) ** 2) / (2 * sc.macula_sigma**2)
        g = np.exp(-dm)
        depth = sc.macula_depth * np.array([0.8, 1.15, 1.15], dtype=np.float32)
        refl *= 1.0 - g[:, :, None] * depth
        gd = np.exp(-((x - sc.dx) ** 2 + (y - sc.dy) ** 2) / (2 * (1.1 * sc.dd) ** 2))
        refl *= (1.0 + sc.glow * gd)[:, :, None]
        if self.lab["PM"]:
            self._staphyloma(refl, x, y)
        if self.lab["DM"]:
            refl *= np.array([1.02, 0.92, 0.9], dtype=np.float32)  # thin, paler-orange fundus
        # Illumination (multiplies everything drawn later): vignetting, gradient, readability shadows.
        r = np.sqrt((x - sc.cx) ** 2 + (y - sc.cy) ** 2) / sc.R
        r2 = np.clip(r, 0, 1.2)[:, :, None] ** 2
        refl *= 1.0 - r2 * np.array([0.0, 0.22, 0.3], dtype=np.float32)  # the periphery is redder
        illum = (1.0 - sc.vig_k * np.clip(r, 0, 1.2) ** sc.vig_p) * (
            1.0 + sc.grad_amp * ((x - sc.cx) * math.cos(sc.grad_ang) + (y - sc.cy) * math.sin(sc.grad_ang)) / sc.R
        )
        if not self.lab["is_macular_readable"]:
            illum *= 1.0 - 0.8 * np.exp(-dm * (sc.macula_sigma / (1.4 * sc.dd)) ** 2)
        if not self.lab["is_retinal_region_readable"]:
            illum *= sc.heavy_dark
        img = Image.fromarray(np.clip(refl, 0, 255).astype(np.uint8), "RGB")
        if n != s:
            img = img.resize((s, s), Image.Resampling.BILINEAR)
        return img, np.clip(illum / 1.25, 0.0, 1.0)

    def _staphyloma(self, refl: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """PM: posterior staphyloma, a darker ring around the posterior pole."""
        sc, rng = self.sc, self.crng("PM")
        cx = sc.fx + (sc.dx - sc.fx) * rng.uniform(0.35, 0.65)
        cy = sc.fy + rng.normal(0.0, 0.2) * sc.dd
        rad = rng.uniform(1.9, 2.5) * sc.dd
        width = rng.uniform(0.16, 0.26) * sc.dd
        d = np.sqrt((x - cx) ** 2 + ((y - cy) * 1.15) ** 2)
        ring = np.exp(-((d - rad) ** 2) / (2 * width**2))
        inside = _sigmoid((rad - d) / (0.15 * sc.dd))
        dark = rng.uniform(0.3, 0.42)
        theta = np.arctan2(y - cy, x - cx)
        ring *= 0.55 + 0.45 * np.cos(theta - rng.uniform(0, 2 * math.pi))  # the edge is sharper on one side
        refl *= (1.0 - dark * ring - 0.1 * inside)[:, :, None] * np.array([1.0, 0.95, 0.95], dtype=np.float32)

    def _tessellation(self, canvas: Image.Image, strength: float, rng: np.random.Generator) -> None:
        """Tigroid fundus: large choroidal vessels (orange bands) radiating outward between dark interspaces."""
        sc, s = self.sc, self.size
        nv, k = 80, 12
        c = np.array([sc.fx + (sc.dx - sc.fx) * 0.4, sc.fy])
        ang = rng.uniform(0, 2 * math.pi, nv)
        r0 = rng.uniform(0.0, 0.5, nv) * sc.R
        head = (ang + rng.normal(0.0, 0.35, nv))[:, None] + np.cumsum(rng.normal(0.0, 0.12, (nv, k)), axis=1)
        step = (rng.uniform(0.5, 1.0, nv) * sc.R / k)[:, None, None]
        width = np.maximum(1.5, rng.uniform(0.011, 0.02, nv) * s)
        p0 = c + r0[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)
        pts = p0[:, None, :] + np.cumsum(np.stack([np.cos(head), np.sin(head)], 2) * step, axis=1)
        pts = np.concatenate([p0[:, None, :], pts], axis=1).tolist()
        mask = Image.new("L", (s, s), 0)
        line = ImageDraw.Draw(mask).line
        for i in range(nv):
            line(pts[i], fill=255, width=int(round(width[i])), joint="curve")
        mask = mask.filter(ImageFilter.GaussianBlur(0.004 * s + 0.4))
        inter = ImageChops.invert(mask).point(lambda v: int(v * strength))
        canvas.paste((104, 42, 26), (0, 0, s, s), inter)
        canvas.paste((234, 122, 60), (0, 0, s, s), mask.point(lambda v: int(v * 0.3 * strength)))

    # -- disc ------------------------------------------------------------------------------------------------------
    def _disc(self, canvas: Image.Image) -> None:
        sc, lab, ss = self.sc, self.lab, self.ss
        rx, ry = sc.rd, sc.rd * sc.disc_aspect
        angle = 0.0
        rim = np.array([246.0, 176.0, 108.0]) + sc.rim_jitter
        cup = (252.0, 230.0, 176.0)
        cdr, cup_dy = sc.cdr, 1.05
        swollen = pale = False
        if lab["PM"]:
            rng = self.crng("PM")
            rx *= rng.uniform(0.6, 0.75)  # tilted, oval disc
            angle = rng.uniform(12.0, 28.0) * rng.choice([-1.0, 1.0]) * math.pi / 180
            cw = rng.uniform(0.45, 0.8) * sc.rd  # temporal crescent of peripapillary atrophy
            crescent = _ellipse_poly(sc.dx - cw * 0.55, sc.dy, rx + cw, ry * 1.04, angle)
            _paint(canvas, _ATROPHY, [("p", crescent, 0.95)], ss=ss, blur=0.06 * sc.rd)
            _paint(canvas, (178, 120, 80), [("l", crescent[4:11], max(self.px, 0.08 * sc.rd), 0.6)], ss=ss, blur=0.5)
        if lab["DM"]:
            rng = self.crng("DM")
            jit = 1.0 + 0.18 * rng.normal(size=14)
            rr = rng.uniform(1.9, 2.5)
            ring = _ellipse_poly(sc.dx - 0.35 * sc.rd, sc.dy, sc.rd * rr, sc.rd * rr * 0.9, 0.0, jit)
            _paint(canvas, _ATROPHY, [("p", ring, 0.92)], ss=ss, blur=0.12 * sc.rd)
            _paint(canvas, _PIGMENT, [("l", np.vstack([ring, ring[:1]]), max(self.px, 0.1 * sc.rd), 0.55)], ss=ss,
                   blur=0.1 * sc.rd)  # fmt: skip
        if lab["GC"]:
            rng = self.crng("GC")
            cdr = rng.uniform(0.72, 0.9)
            cup_dy = rng.uniform(1.1, 1.2)
            cup = (254.0, 238.0, 196.0)
            rim = rim * np.array([1.0, 0.94, 0.94])
            if rng.random() < 0.6:  # wedge-shaped nerve-fibre-layer defect leaving the disc (infero/superotemporal)
                th = math.pi + rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.8)
                spread = rng.uniform(0.12, 0.22)
                r0, r1 = 1.1 * sc.rd, rng.uniform(2.2, 3.2) * sc.dd
                wedge = np.array([[sc.dx + r * math.cos(th + d * spread), sc.dy + r * math.sin(th + d * spread)]
                                  for r, d in ((r0, -0.6), (r1, -1.0), (r1, 1.0), (r0, 0.6))])  # fmt: skip
                _paint(canvas, sc.base * 0.62, [("p", wedge, 0.55)], ss=ss, blur=0.15 * sc.dd)
            if rng.random() < 0.3:  # splinter (Drance) haemorrhage at the disc margin
                t = math.pi + rng.normal(0, 0.6)
                c = (sc.dx + rx * 1.02 * math.cos(t), sc.dy + ry * 1.02 * math.sin(t))
                flame = _ellipse_poly(c[0], c[1], max(self.px, 0.22 * sc.rd), max(0.5 * self.px, 0.06 * sc.rd), t)
                _paint(canvas, _HEM, [("p", flame, 0.9)], ss=ss, blur=0.3)
        if lab["AON"]:
            rng = self.crng("AON")
            if rng.random() < 0.6:
                swollen = True
                rx, ry = rx * rng.uniform(1.2, 1.4), ry * rng.uniform(1.2, 1.4)
                rim = np.array([232.0, 128.0, 92.0])
                cdr = 0.12
                cup = tuple(rim * 1.04)
            else:
                pale = True
                rim = np.array([250.0, 238.0, 206.0])
                cup = (255.0, 246.0, 220.0)
        bg = sc.base
        halo = _ellipse_poly(sc.dx, sc.dy, rx * 1.1, ry * 1.1, angle)
        _paint(canvas, _mix(bg, rim, 0.5), [("p", halo, 0.5)], ss=ss, blur=0.12 * sc.rd)
        disc = _ellipse_poly(sc.dx, sc.dy, rx, ry, angle, k=24)
        _paint(canvas, rim, [("p", disc, 1.0)], ss=ss, blur=(0.3 if swollen else 0.03) * sc.rd)
        cx = sc.dx + sc.cup_dx
        if not swollen:
            cup_poly = _ellipse_poly(cx, sc.dy, rx * cdr, min(ry * 0.95, ry * cdr * cup_dy), angle, k=20)
            _paint(canvas, cup, [("p", cup_poly, 0.95)], ss=ss, blur=0.1 * sc.rd)
            core = _ellipse_poly(cx, sc.dy, rx * cdr * 0.55, ry * cdr * cup_dy * 0.55, angle)
            _paint(canvas, _mix(cup, (255, 255, 245), 0.5), [("p", core, 0.8)], ss=ss, blur=0.1 * sc.rd)
        self._aon_state = (swollen, pale, rx, ry, angle, rim)

    def _disc_overlay(self, canvas: Image.Image) -> None:
        """AON after the vessels: swollen margins hide the vessel roots; a pale disc veils its capillaries."""
        sc, ss = self.sc, self.ss
        swollen, pale, rx, ry, angle, rim = self._aon_state
        rng = self.crng("AON")
        if swollen:
            ring = _ellipse_poly(sc.dx, sc.dy, rx * 1.05, ry * 1.05, angle, k=24)
            _paint(canvas, _mix(rim, (245, 170, 130), 0.4), [("p", ring, 0.7)], ss=ss, blur=0.35 * sc.rd)
            k = 5
            a = rng.uniform(0, 2 * math.pi, k)
            shapes = [
                ("p", _ellipse_poly(sc.dx + 1.3 * rx * math.cos(t), sc.dy + 1.3 * ry * math.sin(t),
                                    max(self.px, 0.35 * sc.rd), max(self.px * 0.6, 0.1 * sc.rd), t), 0.9)
                for t in a
            ]  # fmt: skip
            _paint(canvas, _HEM, shapes, ss=ss, blur=0.3)
        elif pale:
            disc = _ellipse_poly(sc.dx, sc.dy, rx * 0.95, ry * 0.95, angle, k=24)
            _paint(canvas, (250, 238, 210), [("p", disc, 0.45)], ss=ss, blur=0.08 * sc.rd)

    # -- lesions ---------------------------------------------------------------------------------------------------
    def _posterior_points(self, rng: np.random.Generator, k: int, spread: float) -> np.ndarray:
        """Points scattered over the posterior pole, avoiding the disc."""
        sc = self.sc
        r = np.sqrt(rng.uniform(0.0, 1.0, k)) * spread * sc.R
        a = rng.uniform(0.0, 2 * math.pi, k)
        pts = np.stack([sc.fx + 0.25 * sc.dd + r * np.cos(a), sc.fy + r * np.sin(a) * 0.9], axis=1)
        d = np.hypot(pts[:, 0] - sc.dx, pts[:, 1] - sc.dy)
        push = np.clip(1.3 * sc.rd - d, 0, None)[:, None] * (pts - [sc.dx, sc.dy]) / np.maximum(d, 1e-3)[:, None]
        return pts + push

    def _blobs(
        self, rng: np.random.Generator, pts: np.ndarray, r: np.ndarray, alpha: float, jitter: float = 0.2
    ) -> list[_Shape]:
        out: list[_Shape] = []
        jit = rng.normal(size=(len(pts), 12))
        jit = 1.0 + jitter * 1.4 * (jit + np.roll(jit, 1, axis=1) + np.roll(jit, -1, axis=1)) / 3.0  # smooth outline
        asp = rng.uniform(0.75, 1.0, len(pts))
        ang = rng.uniform(0, math.pi, len(pts))
        for i, (p, rr) in enumerate(zip(pts, r, strict=True)):
            out.append(
                ("p", _ellipse_poly(p[0], p[1], rr, rr * asp[i], ang[i], np.clip(jit[i], 0.5, 1.6), k=12), alpha)
            )
        return out

    def _dr_under(self, canvas: Image.Image) -> None:
        """DR: microaneurysms, dot/blot haemorrhages (count and size grow with grade), hard exudates."""
        g = self.lab["dr_grade"]
        rng = self.crng("DR")
        s, ss, px = self.size, self.ss, self.px
        n_ma = (0, rng.integers(10, 18), rng.integers(12, 20), rng.integers(12, 20), rng.integers(12, 20))[g]
        n_hem = (0, rng.integers(2, 5), rng.integers(10, 18), rng.integers(22, 36), rng.integers(18, 30))[g]
        pts = self._posterior_points(rng, int(n_ma), 0.75)
        r = np.maximum(0.8 * px, rng.uniform(0.0035, 0.0055, len(pts)) * s)
        _paint(canvas, _HEM_DARK, [("e", p[0], p[1], rr, rr, 0.95) for p, rr in zip(pts, r, strict=True)], ss=ss)
        pts = self._posterior_points(rng, int(n_hem), 0.8)
        r = np.maximum(0.9 * px, rng.uniform(0.007, 0.013, len(pts)) * s * (1.0 + 0.18 * (g - 2)))
        half = len(pts) // 2
        _paint(canvas, _HEM, self._blobs(rng, pts[:half], r[:half], 0.95), ss=ss, blur=0.25)
        _paint(canvas, _HEM_DARK, self._blobs(rng, pts[half:], r[half:], 0.95), ss=ss, blur=0.25)
        if g >= 2:
            pts = self._posterior_points(rng, int(rng.integers(2, 6 + 2 * g)), 0.6)
            r = np.maximum(0.6 * px, rng.uniform(0.003, 0.006, len(pts)) * s)
            _paint(canvas, _EXUDATE, [("e", p[0], p[1], rr, rr, 0.9) for p, rr in zip(pts, r, strict=True)], ss=ss)

    def _dr_over(self, canvas: Image.Image, vs: _Vessels) -> None:
        """DR grade 3-4: cotton-wool spots; grade 4: neovascular tufts, pre-retinal haemorrhage."""
        g = self.lab["dr_grade"]
        if g < 3:
            return
        rng = _rng(self.key, _S_CLASS + 50)  # a separate stream so grades 1-2 keep their draws
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        k = int(rng.integers(3, 7))
        pts = self._near_arcades(rng, vs, k)
        r = np.maximum(1.2 * px, rng.uniform(0.014, 0.024, k) * s)
        _paint(canvas, _COTTON, self._blobs(rng, pts, r, 0.85, 0.3), ss=ss, blur=0.3 * float(r.mean()))
        if g < 4:
            return
        tufts = []
        centres = [np.array([sc.dx, sc.dy]) + rng.normal(0, 0.4, 2) * sc.rd]
        centres += list(self._near_arcades(rng, vs, int(rng.integers(1, 3))))
        for c in centres:
            for _ in range(9):
                h = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, 0.9, 6))
                step = rng.uniform(0.08, 0.16) * sc.dd
                p = c + rng.normal(0, 0.2, 2) * sc.dd
                pts = p + np.concatenate([[[0, 0]], np.cumsum(np.stack([np.cos(h), np.sin(h)], 1) * step, 0)])
                tufts.append(("l", pts, max(0.9 * px, 0.0035 * s), 0.95))
        _paint(canvas, (150, 26, 30), tufts, ss=ss, blur=0.3)
        if rng.random() < 0.6:  # boat-shaped pre-retinal haemorrhage
            c = self._near_arcades(rng, vs, 1)[0]
            w, h = rng.uniform(0.6, 1.0) * sc.dd, rng.uniform(0.45, 0.7) * sc.dd
            t = np.linspace(0, math.pi, 12)
            boat = np.stack([c[0] + w * np.cos(t), c[1] + h * np.sin(t)], 1)
            _paint(canvas, (120, 12, 12), [("p", boat, 0.95)], ss=ss, blur=0.5)

    def _near_arcades(self, rng: np.random.Generator, vs: _Vessels, k: int) -> np.ndarray:
        pts = vs.pts[0][:4].reshape(-1, 2)  # the two temporal arcades
        pts = pts[(np.hypot(pts[:, 0] - self.sc.dx, pts[:, 1] - self.sc.dy) > 1.5 * self.sc.dd)]
        pick = pts[rng.integers(0, len(pts), k)]
        return pick + rng.normal(0.0, 0.35, (k, 2)) * self.sc.dd

    def _amd(self, canvas: Image.Image) -> None:
        """AMD: drusen clustered around the macula (size by stage); pigment clumps; some geographic atrophy."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = self.crng("AMD")
        stage = rng.choice(3, p=[0.35, 0.45, 0.2])
        k = int(rng.integers(18, 40))
        r = np.sqrt(rng.uniform(0, 1, k)) * rng.uniform(1.0, 1.5) * sc.dd
        a = rng.uniform(0, 2 * math.pi, k)
        pts = np.stack([sc.fx + r * np.cos(a), sc.fy + r * np.sin(a) * 0.85], 1)
        lo, hi = ((0.005, 0.009), (0.008, 0.016), (0.009, 0.018))[stage]
        rr = np.maximum(0.8 * px, rng.uniform(lo, hi, k) * s)
        half = k // 2
        blur = 0.25 * float(rr.mean())
        _paint(canvas, _DRUSEN, [("e", p[0], p[1], q, q, 0.9) for p, q in zip(pts[:half], rr[:half], strict=True)],
               ss=ss, blur=blur)  # fmt: skip
        _paint(canvas, _DRUSEN_HI, [("e", p[0], p[1], q, q, 0.9) for p, q in zip(pts[half:], rr[half:], strict=True)],
               ss=ss, blur=blur)  # fmt: skip
        if stage >= 1:
            kp = int(rng.integers(2, 7))
            pp = np.stack([sc.fx, sc.fy]) + rng.normal(0, 0.5, (kp, 2)) * sc.dd
            _paint(canvas, _PIGMENT, self._blobs(rng, pp, np.full(kp, max(0.7 * px, 0.006 * s)), 0.8), ss=ss)
        if stage == 2:
            jit = np.clip(1.0 + 0.2 * rng.normal(size=12), 0.6, 1.4)
            ga = _ellipse_poly(sc.fx, sc.fy, 0.45 * sc.dd, 0.4 * sc.dd, rng.uniform(0, math.pi), jit, k=12)
            _paint(canvas, (228, 184, 140), [("p", ga, 0.95)], ss=ss, blur=0.5)
            self.fovea_reflex = False

    def _dme(self, canvas: Image.Image) -> None:
        """DME: a circinate ring of hard exudates around the macula."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = self.crng("DME")
        c = np.array([sc.fx, sc.fy]) + rng.normal(0, 0.2, 2) * sc.dd
        ring_r = rng.uniform(0.65, 1.05) * sc.dd
        span = rng.uniform(1.3, 2.0) * math.pi
        a0 = rng.uniform(0, 2 * math.pi)
        nc = int(rng.integers(12, 22))
        ca = a0 + rng.uniform(0, span, nc)
        cr = ring_r * (1 + rng.normal(0, 0.1, nc))
        cent = c + np.stack([np.cos(ca), np.sin(ca)], 1) * cr[:, None]
        per = rng.integers(2, 5, nc)
        pts = np.repeat(cent, per, axis=0) + rng.normal(0, 0.09, (int(per.sum()), 2)) * sc.dd
        r = np.maximum(0.7 * px, rng.uniform(0.004, 0.008, len(pts)) * s)
        shapes = [("e", p[0], p[1], q, q, 1.0) for p, q in zip(pts, r, strict=True)]
        _paint(canvas, (230, 190, 150), [("e", c[0], c[1], ring_r * 1.2, ring_r * 1.1, 0.18)], ss=1, blur=0.3 * sc.dd)
        _paint(canvas, _EXUDATE, shapes, ss=ss, blur=0.2)
        _paint(canvas, _EXUDATE_HI, shapes[::3], ss=ss)

    def _crp(self, canvas: Image.Image) -> None:
        """CRP: scattered chorioretinal scars in the periphery (white atrophic cores, pigmented borders)."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = self.crng("CRP")
        k = int(rng.integers(3, 8))
        a = rng.uniform(0, 2 * math.pi, k)
        d = rng.uniform(0.55, 0.85, k) * sc.R
        pts = np.stack([sc.cx + d * np.cos(a), sc.cy + d * np.sin(a)], 1)
        dd = np.hypot(pts[:, 0] - sc.dx, pts[:, 1] - sc.dy)
        near = dd < 1.8 * sc.dd  # keep the scars off the disc: swing them round the field centre
        pts[near] = np.stack(
            [sc.cx + d[near] * np.cos(a[near] + math.pi / 2), sc.cy + d[near] * np.sin(a[near] + math.pi / 2)], 1
        )
        r = np.maximum(2.0 * px, rng.uniform(0.03, 0.065, k) * s)
        white = rng.random(k) < 0.7
        cores = self._blobs(rng, pts, r, 0.95, 0.28)
        _paint(canvas, _SCAR, [c for c, w in zip(cores, white, strict=True) if w], ss=ss, blur=0.15 * float(r.mean()))
        _paint(canvas, _PIGMENT, [c for c, w in zip(cores, white, strict=True) if not w], ss=ss, blur=0.5)
        clumps = []
        for p, rr in zip(pts, r, strict=True):
            m = int(rng.integers(3, 7))
            t = rng.uniform(0, 2 * math.pi, m)
            cp = p + np.stack([np.cos(t), np.sin(t)], 1) * rr * rng.uniform(0.7, 1.05, (m, 1))
            clumps += self._blobs(rng, cp, np.maximum(0.8 * px, rr * rng.uniform(0.2, 0.38, m)), 0.9, 0.3)
        _paint(canvas, _PIGMENT, clumps, ss=ss, blur=0.4)

    def _dm_patches(self, canvas: Image.Image) -> None:
        """DM: large patches of chorioretinal atrophy at the posterior pole."""
        sc, ss, px = self.sc, self.ss, self.px
        rng = _rng(self.key, _S_CLASS + 60)
        k = int(rng.integers(1, 4))
        pts = np.stack([sc.fx + rng.uniform(-0.8, 1.2, k) * sc.dd, sc.fy + rng.uniform(-1.0, 1.0, k) * sc.dd], 1)
        r = rng.uniform(0.45, 0.95, k) * sc.dd
        patches = self._blobs(rng, pts, r, 0.93, 0.22)
        _paint(canvas, _ATROPHY, patches, ss=ss, blur=0.025 * sc.dd)  # sharply demarcated
        outline = [("l", np.vstack([p[1], p[1][:1]]), max(px, 0.05 * sc.dd), 0.5) for p in patches]
        _paint(canvas, _PIGMENT, outline, ss=ss, blur=0.025 * sc.dd)
        if rng.random() < 0.5:  # Fuchs spot: a pigmented scar at the fovea
            spot = self._blobs(rng, np.array([[sc.fx, sc.fy]]), np.array([max(px, 0.2 * sc.dd)]), 0.85, 0.3)
            _paint(canvas, (46, 30, 24), spot, ss=ss, blur=0.06 * sc.dd)
            self.fovea_reflex = False

    def _rvo(self, canvas: Image.Image, vs: _Vessels, target: tuple[int, int, np.ndarray]) -> None:
        """RVO: flame haemorrhages along the occluded branch vein (drawn over the vessels), a few cotton-wool spots."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = self.crng("RVO")
        v, i0, kids = target
        path = np.concatenate([vs.pts[0][v][i0:], *vs.pts[1][kids]])
        head = np.concatenate([vs.heading[0][v][i0:], *vs.heading[1][kids]])
        inside = np.hypot(path[:, 0] - sc.cx, path[:, 1] - sc.cy) < 0.92 * sc.R
        if inside.sum() >= 4:  # haemorrhages where the photograph can show them
            path, head = path[inside], head[inside]
        k = int(rng.integers(40, 70))
        j = rng.integers(0, len(path), k)
        perp = head[j] + math.pi / 2
        off = rng.normal(0, 0.4, k) * sc.dd
        c = path[j] + np.stack([np.cos(perp), np.sin(perp)], 1) * off[:, None]
        ln = np.maximum(1.2 * px, rng.uniform(0.1, 0.26, k) * sc.dd)
        wd = np.maximum(0.6 * px, rng.uniform(0.03, 0.065, k) * sc.dd)
        ang = head[j] + rng.normal(0, 0.25, k)
        flames = [("p", _ellipse_poly(c[i, 0], c[i, 1], ln[i], wd[i], ang[i], k=10), 0.92) for i in range(k)]
        half = k // 2
        _paint(canvas, _HEM, flames[:half], ss=ss, blur=0.3 + 0.03 * sc.dd)  # feathery edges
        _paint(canvas, _HEM_DARK, flames[half:], ss=ss, blur=0.3 + 0.02 * sc.dd)
        kc = int(rng.integers(0, 3))
        if kc:
            cc = path[rng.integers(0, len(path), kc)] + rng.normal(0, 0.5, (kc, 2)) * sc.dd
            r = np.maximum(1.2 * px, rng.uniform(0.012, 0.02, kc) * s)
            _paint(canvas, _COTTON, self._blobs(rng, cc, r, 0.8, 0.3), ss=ss, blur=0.3 * float(r.mean()))

    def _em(self, canvas: Image.Image) -> None:
        """EM: a glistening cellophane sheen over the macula with fine, wavy, bright wrinkles (striae)."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = self.crng("EM")
        c = np.array([sc.fx, sc.fy]) + rng.normal(0, 0.2, 2) * sc.dd
        rad = rng.uniform(1.1, 1.5) * sc.dd
        jit = np.clip(1.0 + 0.22 * rng.normal(size=14), 0.5, 1.5)
        sheen = _ellipse_poly(c[0], c[1], rad, rad * 0.85, rng.uniform(0, math.pi), jit)
        _paint(canvas, (228, 226, 208), [("p", sheen, rng.uniform(0.3, 0.42))], ss=1, blur=0.25 * sc.dd)
        k = int(rng.integers(16, 26))
        t = np.linspace(0.0, 1.0, 12)
        lines = []
        for i in range(k):
            # Wrinkles: wavy arcs, some radial (pulled towards the contraction centre), some tangential.
            a = rng.uniform(0, 2 * math.pi)
            r0 = rng.uniform(0.15, 0.85) * rad
            ln = rng.uniform(0.35, 0.8) * rad
            wob = np.sin(t * rng.uniform(8, 16) + rng.uniform(0, 6)) * rng.uniform(0.03, 0.06) * rad
            if i % 2:
                rr = r0 + ln * t * 0.8
                aa = a + wob / np.maximum(rr, 1e-3) + rng.normal(0, 0.3) * t
            else:
                rr = r0 + wob
                aa = a + ln * (t - 0.5) / max(r0, 1e-3)
            pts = c + np.stack([np.cos(aa), np.sin(aa)], 1) * rr[:, None]
            lines.append(("l", pts, max(0.7 * px, 0.0028 * s), 0.5))
        _paint(canvas, (248, 244, 230), lines, ss=ss, blur=0.3)

    def _htr_extra(self, canvas: Image.Image, vs: _Vessels) -> None:
        """HtR: AV nicking at artery-over-vein crossings (veins tapered to a gap under the artery)."""
        sc, ss = self.sc, self.ss
        a = np.concatenate([vs.pts[lv][~vs.vein[lv]].reshape(-1, 2) for lv in (0, 1)])
        v = np.concatenate([vs.pts[lv][vs.vein[lv]].reshape(-1, 2) for lv in (0, 1)])
        vw = np.concatenate([vs.width[lv][vs.vein[lv]].reshape(-1) for lv in (0, 1)])
        d = np.hypot(a[:, None, 0] - v[None, :, 0], a[:, None, 1] - v[None, :, 1])
        ia, iv = np.nonzero(d < np.maximum(vw[None, :], 1.0) * 1.2)
        keep: list[int] = []
        for j in iv:
            p = v[j]
            if np.hypot(p[0] - sc.dx, p[1] - sc.dy) < 1.5 * sc.dd:
                continue
            if all(np.hypot(*(p - v[q])) > 0.5 * sc.dd for q in keep):
                keep.append(int(j))
            if len(keep) >= 8:
                break
        vh = np.concatenate([vs.heading[lv][vs.vein[lv]].reshape(-1) for lv in (0, 1)])
        size = self.size
        for j in keep:
            # Fill the vein either side of the artery with the retina next to it: the vein seems to taper away.
            h, w = float(vh[j]), float(vw[j])
            off = np.array([-math.sin(h), math.cos(h)]) * (1.5 * w + 1.5)
            samples = [canvas.getpixel((int(min(size - 1, max(0, q[0]))), int(min(size - 1, max(0, q[1])))))
                       for q in (v[j] + off, v[j] - off)]  # fmt: skip
            colour = np.mean(np.array(samples, dtype=float), axis=0)
            gap = ("p", _ellipse_poly(v[j][0], v[j][1], 1.8 * w + 0.5, 0.7 * w + 0.5, h, k=12), 0.95)
            _paint(canvas, colour, [gap], ss=ss, blur=0.3)

    def _htr_retinopathy(self, canvas: Image.Image, vs: _Vessels) -> None:
        """HtR grade III-IV (most cases here): flame haemorrhages and cotton-wool spots near the arcades, and in the
        most severe cases a macular star of exudates radiating from the fovea."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = _rng(self.key, _S_CLASS + 80)
        severity = rng.random()
        if severity < 0.25:  # grade I-II: the vessel changes only
            return
        k = int(rng.integers(3, 8))
        c = self._near_arcades(rng, vs, k)
        ang = np.arctan2(c[:, 1] - sc.dy, c[:, 0] - sc.dx) + rng.normal(0, 0.2, k)  # along the nerve fibres
        ln = np.maximum(1.2 * px, rng.uniform(0.15, 0.3, k) * sc.dd)
        wd = np.maximum(0.6 * px, rng.uniform(0.05, 0.08, k) * sc.dd)
        flames = [("p", _ellipse_poly(c[i, 0], c[i, 1], ln[i], wd[i], ang[i], k=10), 0.9) for i in range(k)]
        _paint(canvas, _HEM, flames, ss=ss, blur=0.3)
        k = int(rng.integers(2, 5))
        pts = self._near_arcades(rng, vs, k)
        r = np.maximum(1.2 * px, rng.uniform(0.012, 0.02, k) * s)
        _paint(canvas, _COTTON, self._blobs(rng, pts, r, 0.8, 0.3), ss=ss, blur=0.3 * float(r.mean()))
        if severity > 0.82:  # grade IV: macular star (streaks of exudate radiating from the fovea, Henle layer)
            rays = int(rng.integers(7, 13))
            a = rng.uniform(0, 2 * math.pi) + np.arange(rays) * 2 * math.pi / rays + rng.normal(0, 0.2, rays)
            dots = []
            for t in a:
                m = int(rng.integers(2, 6))
                rr = np.sort(rng.uniform(0.3, 1.2, m)) * sc.dd
                tt = t + rng.normal(0, 0.08, m)
                for q, u in zip(rr, tt, strict=True):
                    ln = max(0.7 * px, rng.uniform(0.004, 0.009) * s)
                    c0 = (sc.fx + q * math.cos(u), sc.fy + q * math.sin(u))
                    dots.append(("p", _ellipse_poly(c0[0], c0[1], ln, max(0.5 * px, 0.4 * ln), u, k=8), 0.9))
            _paint(canvas, _EXUDATE, dots, ss=ss, blur=0.2)

    # -- vessels -----------------------------------------------------------------------------------------------------
    def _vessels(self, canvas: Image.Image) -> tuple[_Vessels, tuple[int, int, np.ndarray] | None]:
        sc, lab, ss, s = self.sc, self.lab, self.ss, self.size
        spec = _vessel_spec(_rng(self.key, _S_VESSELS))
        tort = [np.ones_like(lv.walk) for lv in spec]
        wsc = [np.ones_like(lv.walk) for lv in spec]
        art_colour: tuple[float, float, float] = _ARTERY
        if lab["HtR"]:
            rng = self.crng("HtR")
            narrow = rng.uniform(0.4, 0.55)
            for lv, t, w in zip(spec, tort, wsc, strict=True):
                t[~lv.vein] *= 0.15
                w[~lv.vein] *= narrow
            art_colour = _ARTERY_HTR
        target = None
        if lab["RVO"]:
            rng = self.crng("RVO")
            v = int(rng.choice([1, 3]))  # superotemporal or inferotemporal vein
            i0 = int(rng.integers(3, 8))
            ramp = np.clip((np.arange(_N0) - i0) / 4.0, 0, 1)
            tort[0][v] *= 1.0 + 2.5 * ramp
            wsc[0][v] *= 1.0 + 0.6 * ramp
            kids = np.flatnonzero((spec[1].parent == v) & (spec[1].frac * (_N0 - 1) >= i0))
            tort[1][kids] *= 2.5
            wsc[1][kids] *= 1.5
            target = (v, i0, kids)
        vs = _realise_vessels(spec, sc, tort=tort, wscale=wsc)
        faz = 0.35 * sc.dd
        fov = (sc.fx, sc.fy)
        veins = [(vs.pts[lv][vs.vein[lv]], vs.width[lv][vs.vein[lv]]) for lv in range(3)]
        arts = [(vs.pts[lv][~vs.vein[lv]], vs.width[lv][~vs.vein[lv]]) for lv in range(3)]
        vein_colour: tuple[float, float, float] = _VEIN
        if lab["RVO"]:
            vein_colour = _mix(_VEIN, (90, 10, 20), 0.3)
        canvas.paste(tuple(int(c) for c in vein_colour), (0, 0, s, s), _draw_vessel_mask(s, ss, veins, fov, faz))
        if lab["HtR"]:
            self._htr_extra(canvas, vs)
        canvas.paste(tuple(int(c) for c in art_colour), (0, 0, s, s), _draw_vessel_mask(s, ss, arts, fov, faz))
        # Central light reflex on the larger arteries (broad "copper wire" reflex in HtR).
        reflex_w = 0.4 if lab["HtR"] else 0.25
        reflex = [("l", p[:-4], float(w[:-4].mean()) * reflex_w, 0.75 if lab["HtR"] else 0.5)
                  for p, w in zip(*arts[0], strict=True) if w[0] * reflex_w * ss >= 0.6]  # fmt: skip
        reflex_colour = (232, 142, 86) if lab["HtR"] else (220, 120, 90)
        if s < 384:
            _paint(canvas, reflex_colour, reflex, ss=ss)
        else:  # wide enough to draw directly (cheaper than a full-size antialiased mask)
            draw = ImageDraw.Draw(canvas)
            for _, p, w, alpha in reflex:
                colour = tuple(int(round(c)) for c in _mix(art_colour, reflex_colour, alpha))
                draw.line(p.tolist(), fill=colour, width=max(1, int(round(w))))
        return vs, target

    # -- compose ---------------------------------------------------------------------------------------------------
    def render(self) -> Image.Image:
        sc, lab, ss = self.sc, self.lab, self.ss
        canvas, illum = self._lowres()
        if lab["DM"] or lab["PM"]:
            cls = "DM" if lab["DM"] else "PM"
            self._tessellation(canvas, 0.55 if lab["DM"] else 0.22, _rng(self.key, _S_CLASS + 70 + (cls == "DM")))
        if lab["CRP"]:
            self._crp(canvas)
        if lab["DM"]:
            self._dm_patches(canvas)
        if lab["AMD"]:
            self._amd(canvas)
        if lab["DME"]:
            self._dme(canvas)
        if lab["DR"]:
            self._dr_under(canvas)
        self._disc(canvas)
        vs, rvo_target = self._vessels(canvas)
        if lab["AON"]:
            self._disc_overlay(canvas)
        if rvo_target is not None:
            self._rvo(canvas, vs, rvo_target)
        if lab["DR"]:
            self._dr_over(canvas, vs)
        if lab["HtR"]:
            self._htr_retinopathy(canvas, vs)
        if lab["EM"]:
            self._em(canvas)
        if self.fovea_reflex:
            fr = max(0.6 * self.px, 0.045 * sc.dd)
            _paint(canvas, (255, 226, 170), [("e", sc.fx, sc.fy, fr, fr, sc.reflex)], ss=ss, blur=0.6 * fr)
        return self._finish(canvas, illum)

    def _finish(self, canvas: Image.Image, illum_low: np.ndarray) -> Image.Image:
        sc, lab, s = self.sc, self.lab, self.size
        rrng = _rng(self.key, _S_READABILITY)
        glare = rrng.random() < 0.5
        extreme = rrng.uniform(0.04, 0.08) * s
        if not lab["is_optic_disc_readable"]:
            colour = (255, 244, 226) if glare else (20, 10, 6)
            _paint(canvas, colour, [("e", sc.dx, sc.dy, 1.3 * sc.dd, 1.3 * sc.dd, 0.92)], ss=1, blur=0.5 * sc.dd)
        if not lab["is_macular_readable"]:
            box = tuple(
                int(round(v)) for v in (sc.fx - 2 * sc.dd, sc.fy - 2 * sc.dd, sc.fx + 2 * sc.dd, sc.fy + 2 * sc.dd)
            )
            box = (max(0, box[0]), max(0, box[1]), min(s, box[2]), min(s, box[3]))
            if box[2] > box[0] and box[3] > box[1]:
                canvas.paste(canvas.crop(box).filter(ImageFilter.GaussianBlur(0.4 * sc.dd)), box)
        blur = sc.blur
        if not lab["is_retinal_region_readable"]:
            blur = max(blur, sc.heavy_blur)
        if not lab["is_fundus"]:
            blur = max(blur, extreme)
        if blur > 2.0:
            canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
        elif blur > 0.9:  # cheap ~1 px optical blur
            canvas = canvas.reduce(2).resize((s, s), Image.Resampling.BILINEAR)
        n = illum_low.shape[0]
        field = Image.fromarray((illum_low * 255.0).astype(np.uint8), "L")
        if n != s:
            field = field.resize((s, s), Image.Resampling.BILINEAR)
        mask = Image.new("L", (2 * s, 2 * s), 0)
        md = ImageDraw.Draw(mask)
        md.ellipse((2 * (sc.cx - sc.R), 2 * (sc.cy - sc.R), 2 * (sc.cx + sc.R), 2 * (sc.cy + sc.R)), fill=255)
        if sc.crop_h is not None:
            md.rectangle((0, 0, 2 * s, 2 * (sc.cy - sc.crop_h)), fill=0)
            md.rectangle((0, 2 * (sc.cy + sc.crop_h), 2 * s, 2 * s), fill=0)
        mask = mask.reduce(2)
        field = ImageChops.multiply(field, mask)
        # Sensor noise on the field, so it scales with the signal (and is faint in the black surround).
        noise = _rng(self.key, _S_NOISE).integers(0, 256, (s, s), dtype=np.uint8)
        field = ImageChops.add(field, Image.fromarray(noise, "L").point(_noise_lut(round(sc.noise_sigma * 4) / 4)),
                               1.0, -128)  # fmt: skip
        rgb = ImageChops.multiply(canvas, field.convert("RGB"))
        if not lab["is_fundus"]:
            haze = (230, 200, 170) if glare else (8, 4, 2)
            rgb.paste(haze, (0, 0, s, s), mask.point(lambda v: int(v * 0.8)))
        rgb = rgb.point(_tone_lut(sc.gain * 1.25, tuple(float(c) for c in sc.cast), sc.gamma))
        if lab["eye_side"] == "left":
            rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return rgb


_NOISE_LUTS: dict[float, list[int]] = {}


def _noise_lut(sigma: float) -> list[int]:
    """Uniform bytes -> 128 + N(0, sigma) via the normal quantile function (cheap, deterministic Gaussian noise)."""
    lut = _NOISE_LUTS.get(sigma)
    if lut is None:
        nd = statistics.NormalDist()
        lut = [int(min(255, max(0, round(128 + sigma * nd.inv_cdf((i + 0.5) / 256))))) for i in range(256)]
        _NOISE_LUTS[sigma] = lut
    return lut


def _tone_lut(gain: float, cast: tuple[float, ...], gamma: float) -> list[int]:
    v = np.arange(256, dtype=np.float64) / 255.0
    out = []
    knee = 0.8
    for c in cast:
        y = v * gain * c
        y = np.where(y < knee, y, knee + (1 - knee) * np.tanh((y - knee) / (1 - knee)))  # soft shoulder, no hue clip
        out += np.clip(np.round(255.0 * y**gamma), 0, 255).astype(int).tolist()
    return out


def fundus_landmarks(*, size: int, seed: int, eye_side: str = "right") -> FundusLandmarks:
    """The field, fovea and optic-disc positions that :func:`render_fundus` uses for ``size`` and ``seed``."""
    _check_int("size", size, 32)
    _check_int("seed", seed, 0)
    return _Scene(size, (seed,)).landmarks(eye_side)


def _render(labels: Mapping[str, Any], size: int, key: tuple[int, ...]) -> Image.Image:
    return _Renderer(labels, size, key).render()


def render_fundus(labels: Mapping[str, Any], *, size: int, seed: int) -> Image.Image:
    """Render one synthetic colour fundus photograph.

    Args:
        labels: class name (``"DR"``, ``"AMD"``, ... as in :data:`CLASSES`, or the ``is_*`` column names) -> 0/1,
            plus ``dr_grade`` (0-4; DR is on iff > 0, a bare ``DR: 1`` means grade 2) and ``eye_side``
            (``"left"``/``"right"``; left eyes are mirrored, disc on the left). Optional readability flags
            (:data:`READABILITY_COLUMNS`, default 1) set to 0 degrade the image (heavy blur/darkness, a shadowed
            macula, glare over the disc, or no usable fundus at all). Missing keys mean 0 / healthy.
        size: output width and height in pixels (>= 32).
        seed: non-negative seed driving anatomy, vessel tree and nuisance; each class's lesions have their own stream,
            so toggling one class with the same seed changes only that class's sign.

    Returns:
        An RGB ``PIL.Image.Image`` of ``size`` x ``size``.
    """
    _check_int("size", size, 32)
    _check_int("seed", seed, 0)
    return _render(labels, size, (seed,))


# ----------------------------------------------------------------------------------------------------------------------
# Dataset generation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutPaths:
    """What a layout writer produced."""

    labels: Path
    images: Path


@dataclass(frozen=True)
class _Job:
    """One chunk of images for a worker."""

    key_prefix: tuple[int, ...]
    start: int
    labels: np.ndarray  # (k, 16) uint8, see _LabelArrays.matrix
    paths: list[str]
    size: int
    fmt: str
    quality: int


def _save(img: Image.Image, path: Path, fmt: str, quality: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        if fmt == "JPEG":
            img.save(fh, "JPEG", quality=quality, optimize=False, subsampling=2)
        else:
            img.save(fh, "PNG", optimize=False, compress_level=4)
    os.replace(tmp, path)


def _run_job(job: _Job) -> int:
    for j, (row, path) in enumerate(zip(job.labels, job.paths, strict=True)):
        key = (*job.key_prefix, job.start + j)
        _save(_render(_row_from_matrix(row), job.size, key), Path(path), job.fmt, job.quality)
    return len(job.paths)


def _render_all(
    labels: _LabelArrays,
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


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    flag = f"--{name}" if name in ("n", "size", "seed", "workers", "quality") else name
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SystemExit(f"retina-synth: {flag} must be an integer; got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise SystemExit(f"retina-synth: {flag} must be {rng}; got {value}")


_LAYOUT_HEADERS: dict[str, tuple[str, ...]] = {
    "synfundus": SYNFUNDUS_COLUMNS,
    "rfmid": RFMID_COLUMNS,
    "airogs": AIROGS_COLUMNS,
    "aptos": APTOS_COLUMNS,
    "eyepacs": EYEPACS_COLUMNS,
    "messidor2": MESSIDOR2_COLUMNS,
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
        if header != ",".join(_LAYOUT_HEADERS[layout]):
            return False
    images = out / image_dir
    if images.exists():
        if not images.is_dir():
            return False
        files = sorted(p for p in images.rglob("*") if p.is_file())
        ext = _LAYOUT_EXT[layout]
        if any(not (p.name.endswith(ext) or p.name.endswith(".tmp")) for p in files):
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
        raise SystemExit(f"retina-synth: --out {out} exists and is not a directory")
    if not out.exists():
        out.mkdir(parents=True)
        return
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    if not _is_previous_output(out, layout, entries):
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise SystemExit(
            f"retina-synth: --out {out} is not empty ({shown}) and is not a previous retina-synth {layout!r} output; "
            "choose an empty or new directory"
        )
    labels_name, image_dir = _LAYOUT_FILES[layout]
    logger.info("replacing the previous %s output in %s", layout, out)
    if (out / image_dir).is_dir():
        shutil.rmtree(out / image_dir)
    (out / labels_name).unlink(missing_ok=True)


def _write_csv(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.write_csv(tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class _LayoutSpec:
    """How an external layout samples labels, names its files and writes its table."""

    dr_grade_probs: tuple[float, ...] | None = None
    gc_rate: float | None = None
    paired_eyes: bool = False
    gradable_only: bool = False


_EXTERNAL_SPECS: dict[str, _LayoutSpec] = {
    "rfmid": _LayoutSpec(),
    "airogs": _LayoutSpec(gc_rate=0.1),
    "aptos": _LayoutSpec(dr_grade_probs=(0.49, 0.10, 0.27, 0.05, 0.08)),
    "eyepacs": _LayoutSpec(dr_grade_probs=(0.735, 0.07, 0.15, 0.025, 0.02), paired_eyes=True),
    "messidor2": _LayoutSpec(dr_grade_probs=(0.58, 0.155, 0.2, 0.045, 0.02), paired_eyes=True, gradable_only=True),
}


def _external_names(layout: str, n: int, rng: np.random.Generator) -> list[str]:
    """Relative image paths under the layout's image folder."""
    if layout == "rfmid":
        return [f"{i + 1}.png" for i in range(n)]
    if layout == "airogs":
        return [f"{i // 1000}/TRAIN{i:06d}.jpg" for i in range(n)]
    if layout == "aptos":
        ids: list[str] = []
        seen: set[str] = set()
        while len(ids) < n:
            for v in rng.integers(0, 2**48, n - len(ids), dtype=np.int64):
                h = f"{int(v):012x}"
                if h not in seen:
                    seen.add(h)
                    ids.append(h)
        return [f"{h}.png" for h in ids]
    if layout == "eyepacs":
        n_pat = (n + 1) // 2
        patients = 10 + np.concatenate([[0], np.cumsum(rng.integers(1, 4, n_pat - 1))]).astype(int)
        return [f"{patients[i // 2]}_{'left' if i % 2 == 0 else 'right'}.jpeg" for i in range(n)]
    if layout == "messidor2":
        days = np.cumsum(rng.integers(0, 2, (n + 1) // 2)) // 3  # a few exams (two eyes each) per day
        base = np.datetime64("2005-01-10")
        names = []
        for i in range(n):
            date = str(base + np.timedelta64(int(days[i // 2]), "D")).replace("-", "")
            names.append(f"{date}_{43808 + i // 2:05d}_{'0100' if i % 2 == 0 else '0200'}_PP.png")
        return names
    raise AssertionError(layout)


def _external_table(layout: str, lab: _LabelArrays, names: list[str], rng: np.random.Generator) -> pl.DataFrame:
    n = len(lab)
    if layout == "rfmid":
        cols: dict[str, Any] = {"ID": np.arange(1, n + 1, dtype=np.int64)}
        any_disease = np.zeros(n, dtype=np.int64)
        for c in CLASSES:
            any_disease |= lab.classes[c].astype(np.int64)
        cols["Disease_Risk"] = any_disease
        table = {d: np.zeros(n, dtype=np.int64) for d in RFMID_DISEASES}
        for c, d in RFMID_MAP.items():
            table[d] = lab.classes[c].astype(np.int64)
        crvo = rng.random(n) < 0.3
        rvo = lab.classes["RVO"].astype(bool)
        table["BRVO"] = (rvo & ~crvo).astype(np.int64)
        table["CRVO"] = (rvo & crvo).astype(np.int64)
        cols.update(table)
        return pl.DataFrame(cols).select(RFMID_COLUMNS)
    if layout == "airogs":
        ids = [Path(p).stem for p in names]
        cls = np.where(lab.classes["GC"] > 0, "RG", "NRG").tolist()
        return pl.DataFrame({"challenge_id": ids, "class": cls})
    if layout == "aptos":
        return pl.DataFrame({"id_code": [Path(p).stem for p in names], "diagnosis": lab.dr_grade.astype(np.int64)})
    if layout == "eyepacs":
        return pl.DataFrame({"image": [Path(p).stem for p in names], "level": lab.dr_grade.astype(np.int64)})
    if layout == "messidor2":
        return pl.DataFrame(
            {
                "id_code": names,
                "diagnosis": lab.dr_grade.astype(np.int64),
                "adjudicated_dme": lab.classes["DME"].astype(np.int64),
                "adjudicated_gradable": np.ones(n, dtype=np.int64),
            }
        )
    raise AssertionError(layout)


@dataclass(frozen=True)
class _Plan:
    """Everything a layout writes, before rendering: labels, relative image paths, the table, seed keys."""

    labels: _LabelArrays
    rel_paths: list[str]
    table: pl.DataFrame
    key_prefix: tuple[int, ...]
    fmt: str


def _plan_layout(layout: str, *, n: int, seed: int) -> _Plan:
    if layout == "synfundus":
        lab = _sample_label_arrays(n, np.random.default_rng([seed, _LABEL_STREAM]))
        rel = [_synfundus_name(i) for i in range(n)]
        return _Plan(lab, rel, _synfundus_frame(lab, rel), (seed,), "JPEG")
    li = LAYOUTS.index(layout)
    spec = _EXTERNAL_SPECS[layout]
    lab = _sample_label_arrays(
        n,
        np.random.default_rng([seed, _LABEL_STREAM, li]),
        dr_grade_probs=spec.dr_grade_probs,
        gc_rate=spec.gc_rate,
        paired_eyes=spec.paired_eyes,
        gradable_only=spec.gradable_only,
    )
    lrng = np.random.default_rng([seed, _LABEL_STREAM, li, _S_LAYOUT])
    rel = _external_names(layout, n, lrng)
    table = _external_table(layout, lab, rel, lrng)
    return _Plan(lab, rel, table, (seed, _EXTERNAL_STREAM + li), "PNG" if rel[0].endswith(".png") else "JPEG")


def _write_layout(
    layout: str, out: Path, *, n: int, size: int, seed: int, workers: int | None, quality: int, progress: bool
) -> LayoutPaths:
    out = Path(out)
    _check_int("n", n, 1)
    _check_int("size", size, 32)
    _check_int("seed", seed, 0)
    _check_int("quality", quality, 1, 100)
    if workers is not None:
        _check_int("workers", workers, 1)
    if layout not in LAYOUTS:
        raise SystemExit(f"retina-synth: --layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    labels_name, image_dir = _LAYOUT_FILES[layout]
    _prepare_out(out, layout)
    plan = _plan_layout(layout, n=n, seed=seed)
    lab, rel, frame, key_prefix, fmt = plan.labels, plan.rel_paths, plan.table, plan.key_prefix, plan.fmt
    img_dir = out / image_dir
    paths = [img_dir / r for r in rel]
    _render_all(lab, paths, key_prefix=key_prefix, size=size, fmt=fmt, quality=quality, workers=workers,
                progress=progress, desc=f"retina-synth {layout}")  # fmt: skip
    _write_csv(frame, out / labels_name)
    logger.info("wrote %s layout: %s, %s", layout, out / labels_name, img_dir)
    return LayoutPaths(labels=out / labels_name, images=img_dir)


def _layout_writer(layout: str, doc: str) -> Callable[..., LayoutPaths]:
    def writer(
        out: Path,
        *,
        n: int,
        size: int,
        seed: int,
        workers: int | None = None,
        quality: int = 92,
        progress: bool = True,
    ) -> LayoutPaths:
        return _write_layout(layout, Path(out), n=n, size=size, seed=seed, workers=workers, quality=quality,
                             progress=progress)  # fmt: skip

    writer.__name__ = writer.__qualname__ = f"write_{layout}"
    writer.__doc__ = doc + "\n\nReturns the paths of the labels file and the image folder (:class:`LayoutPaths`)."
    return writer


write_synfundus = _layout_writer(
    "synfundus", "SynFundus-1M layout: ``Fundus/synf_0000000.jpg`` ... and ``labels.csv`` (:data:`SYNFUNDUS_COLUMNS`)."
)
write_rfmid = _layout_writer(
    "rfmid", "RFMiD layout: ``images/{ID}.png`` and ``labels.csv`` (``ID``, ``Disease_Risk``, 45 disease columns)."
)
write_airogs = _layout_writer(
    "airogs", "AIROGS layout: ``images/{n // 1000}/TRAIN{n:06d}.jpg`` and ``labels.csv`` (``challenge_id,class``)."
)
write_aptos = _layout_writer(
    "aptos", "APTOS-2019 layout: ``train_images/{id_code}.png`` and ``train.csv`` (``id_code,diagnosis``)."
)
write_eyepacs = _layout_writer(
    "eyepacs", "EyePACS layout: ``train/{patient}_{left|right}.jpeg`` and ``trainLabels.csv`` (``image,level``)."
)
write_messidor2 = _layout_writer(
    "messidor2",
    "Messidor-2 layout: ``IMAGES/{date}_{exam}_{0100|0200}_PP.png`` and ``messidor_data.csv``"
    " (``id_code,diagnosis,adjudicated_dme,adjudicated_gradable``).",
)


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
    """
    if layout not in LAYOUTS:
        raise SystemExit(f"retina-synth: --layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    paths = _write_layout(layout, Path(out), n=n, size=size, seed=seed, workers=workers, quality=quality,
                          progress=progress)  # fmt: skip
    return paths.labels


# ----------------------------------------------------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------------------------------------------------


def caption_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - very old Pillow / no FreeType
        return ImageFont.load_default()


def write_preview(path: Path, *, size: int, seed: int, n_examples: int = 4) -> Path:
    """Write a PNG contact sheet: a healthy row, then one row per class, ``n_examples`` images each.

    Column ``j`` uses the same seed (and eye) in every row, so each row differs from the healthy row only by its
    class's sign. The DR row shows grades 1-4.
    """
    _check_int("size", size, 32)
    _check_int("seed", seed, 0)
    path = Path(path)
    rows: list[tuple[str, list[dict[str, Any]]]] = []
    sides = ["right", "left"]
    base = [{"eye_side": sides[j % 2]} for j in range(n_examples)]
    rows.append(("healthy", [dict(b) for b in base]))
    for c in CLASSES:
        if c == "DR":
            rows.append((f"DR - {CLASS_DESCRIPTIONS[c]} (grades 1-4)",
                         [{**b, "dr_grade": 1 + j % 4} for j, b in enumerate(base)]))  # fmt: skip
        else:
            rows.append((f"{c} - {CLASS_DESCRIPTIONS[c]}", [{**b, c: 1} for b in base]))
    title_h = max(14, size // 10)
    font = caption_font(max(10, title_h * 3 // 4))
    sheet = Image.new("RGB", (n_examples * size, len(rows) * (size + title_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (title, labs) in enumerate(rows):
        y = r * (size + title_h)
        draw.text((4, y + 1), title, fill=(0, 0, 0), font=font)
        for j, lab in enumerate(labs):
            sheet.paste(render_fundus(lab, size=size, seed=seed + j), (j * size, y + title_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, "PNG", optimize=False)
    logger.info("wrote preview %s", path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retina-synth", description="Render a labelled synthetic fundus dataset.")
    p.add_argument("--out", type=Path, required=True, help="output directory (empty, or a previous output)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--size", type=int, required=True, help="image size in pixels (square)")
    p.add_argument("--seed", type=int, required=True, help="random seed (same seed -> byte-identical output)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--quality", type=int, default=92, help="JPEG quality (default 92)")
    p.add_argument("--layout", default="synfundus", help=f"one of {', '.join(LAYOUTS)} (default synfundus)")
    p.add_argument("--preview", type=Path, default=None, help="also write a PNG contact sheet of every class")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``retina-synth``; returns the process exit status."""
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.layout not in LAYOUTS:
        raise SystemExit(f"retina-synth: --layout must be one of {', '.join(LAYOUTS)}; got {args.layout!r}")
    t0 = time.perf_counter()
    labels = generate_dataset(args.out, n=args.n, size=args.size, seed=args.seed, workers=args.workers,
                              quality=args.quality, layout=args.layout, progress=not args.quiet)  # fmt: skip
    dt = time.perf_counter() - t0
    print(f"retina-synth: wrote {args.n} {args.layout} images ({args.size} px) to {args.out} in {dt:.1f} s "
          f"({args.n / max(dt, 1e-9):.1f} img/s); labels: {labels}")  # fmt: skip
    if args.preview is not None:
        write_preview(args.preview, size=args.size, seed=args.seed)
        print(f"retina-synth: preview {args.preview}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
