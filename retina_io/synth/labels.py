"""Labels: the latent screening model that draws them, and each layout's label table built from them.

:func:`sample_label_arrays` draws one image's labels per row from a small latent model (age, diabetes, hypertension,
high myopia), so prevalences are imbalanced and co-occur like screening data; a :class:`LayoutSpec` tilts it for an
external dataset (DR grade mix, glaucoma rate, paired eyes, gradable only). The draws are fixed per seed
(:mod:`retina_io.synth.streams`). From the arrays come the tables each layout publishes: :func:`synfundus_frame`
(SynFundus-1M ``labels.csv``, also what :func:`sample_labels` returns) and :func:`external_table` with its file names
from :func:`external_names` (RFMiD, AIROGS, APTOS, EyePACS, Messidor-2). The column names themselves live in
:mod:`retina_io.presets` (``LAYOUT_COLUMNS``); this module fills them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from retina_io.presets import (
    LAYOUT_COLUMNS,
    RFMID_DISEASES,
    SYNFUNDUS_CLASS_COLUMNS,
    SYNFUNDUS_COLUMNS,
    SYNFUNDUS_READABILITY,
)
from retina_io.schema import CLASSES
from retina_io.synth.errors import check_int
from retina_io.synth.streams import LABEL_STREAM

#: Our class -> RFMiD column (RVO goes to BRVO or CRVO at random; DM, CRP, HtR and DME have no RFMiD column here).
RFMID_MAP: dict[str, str] = {"DR": "DR", "AMD": "ARMD", "GC": "ODC", "PM": "MYA", "EM": "ERM", "AON": "ODE"}


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class LabelArrays:
    """Sampled labels, one entry per image: ``dr_grade`` int, ``right_eye`` bool, per-class and readability uint8."""

    dr_grade: np.ndarray
    right_eye: np.ndarray
    classes: dict[str, np.ndarray]  # CLASSES -> uint8, DR included (== dr_grade > 0)
    readability: dict[str, np.ndarray]  # SYNFUNDUS_READABILITY -> uint8

    def __len__(self) -> int:
        return len(self.dr_grade)

    def matrix(self) -> np.ndarray:
        """Compact uint8 matrix (dr_grade, right_eye, 10 non-DR classes, 4 readability) for shipping to workers."""
        cols = [self.dr_grade, self.right_eye]
        cols += [self.classes[c] for c in SYNFUNDUS_CLASS_COLUMNS]
        cols += [self.readability[c] for c in SYNFUNDUS_READABILITY]
        return np.stack([np.asarray(c, dtype=np.uint8) for c in cols], axis=1)


def row_from_matrix(row: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"dr_grade": int(row[0]), "eye_side": "right" if row[1] else "left", "DR": int(row[0] > 0)}
    for j, c in enumerate(SYNFUNDUS_CLASS_COLUMNS):
        out[c] = int(row[2 + j])
    for j, c in enumerate(SYNFUNDUS_READABILITY):
        out[c] = int(row[2 + len(SYNFUNDUS_CLASS_COLUMNS) + j])
    return out


def sample_label_arrays(
    n: int,
    rng: np.random.Generator,
    *,
    dr_grade_probs: Sequence[float] | None = None,
    gc_rate: float | None = None,
    paired_eyes: bool = False,
    gradable_only: bool = False,
) -> LabelArrays:
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
    hypertension = rng.random(n_subj) < 0.06 + 0.5 * sigmoid((age - 62.0) / 8.0)
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
    amd = bern(0.02 + 0.34 * sigmoid((age - 73.0) / 5.0))
    em = bern(0.015 + 0.1 * sigmoid((age - 67.0) / 6.0) + 0.015 * diabetes)
    gc_p = (0.022 + 0.1 * sigmoid((age - 67.0) / 7.0)) * np.where(myopia, 2.0, 1.0)
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
    return LabelArrays(
        dr_grade=dr_grade.astype(np.int64),
        right_eye=right_eye.astype(bool),
        classes={c: classes[c].astype(np.uint8) for c in CLASSES},
        readability={c: readable[c].astype(np.uint8) for c in SYNFUNDUS_READABILITY},
    )


def synfundus_frame(labels: LabelArrays, file_names: Sequence[str]) -> pl.DataFrame:
    cols: dict[str, Any] = {
        "file_name": list(file_names),
        "dr_grade": labels.dr_grade.astype(np.int64),
        "eye_side": np.where(labels.right_eye, "right", "left").tolist(),
    }
    cols.update({col: labels.classes[c].astype(np.int64) for c, col in SYNFUNDUS_CLASS_COLUMNS.items()})
    cols.update({c: labels.readability[c].astype(np.int64) for c in SYNFUNDUS_READABILITY})
    return pl.DataFrame(cols).select(SYNFUNDUS_COLUMNS)


def synfundus_name(i: int) -> str:
    return f"synf_{i:07d}.jpg"


def sample_labels(n: int, *, seed: int) -> pl.DataFrame:
    """Sample ``n`` label rows in the SynFundus-1M ``labels.csv`` layout (:data:`retina_io.presets.SYNFUNDUS_COLUMNS`).

    Args:
        n: number of rows (images).
        seed: non-negative seed; the labels come from ``np.random.default_rng([seed, 1_000_003])``.

    Returns:
        A DataFrame with ``file_name`` (``synf_0000000.jpg``, ...), ``dr_grade`` (0-4, DR positive iff > 0),
        ``eye_side`` (``left``/``right``), the ten ``is_*`` class columns and the four readability flags (all 0/1).
    """
    check_int("n", n, 1)
    check_int("seed", seed, 0)
    labels = sample_label_arrays(n, np.random.default_rng([seed, LABEL_STREAM]))
    return synfundus_frame(labels, [synfundus_name(i) for i in range(n)])


@dataclass(frozen=True)
class LayoutSpec:
    """How an external layout samples labels, names its files and writes its table."""

    dr_grade_probs: tuple[float, ...] | None = None
    gc_rate: float | None = None
    paired_eyes: bool = False
    gradable_only: bool = False


EXTERNAL_SPECS: dict[str, LayoutSpec] = {
    "rfmid": LayoutSpec(),
    "airogs": LayoutSpec(gc_rate=0.1),
    "aptos": LayoutSpec(dr_grade_probs=(0.49, 0.10, 0.27, 0.05, 0.08)),
    "eyepacs": LayoutSpec(dr_grade_probs=(0.735, 0.07, 0.15, 0.025, 0.02), paired_eyes=True),
    "messidor2": LayoutSpec(dr_grade_probs=(0.58, 0.155, 0.2, 0.045, 0.02), paired_eyes=True, gradable_only=True),
}


def external_names(layout: str, n: int, rng: np.random.Generator) -> list[str]:
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


def external_table(layout: str, lab: LabelArrays, names: list[str], rng: np.random.Generator) -> pl.DataFrame:
    """The label table of an external layout (columns :data:`retina_io.presets.LAYOUT_COLUMNS` ``[layout]``)."""
    n = len(lab)
    if layout == "rfmid":
        any_disease = np.zeros(n, dtype=np.int64)
        for c in CLASSES:
            any_disease |= lab.classes[c].astype(np.int64)
        table = {d: np.zeros(n, dtype=np.int64) for d in RFMID_DISEASES}
        for c, d in RFMID_MAP.items():
            table[d] = lab.classes[c].astype(np.int64)
        crvo = rng.random(n) < 0.3
        rvo = lab.classes["RVO"].astype(bool)
        table["BRVO"] = (rvo & ~crvo).astype(np.int64)
        table["CRVO"] = (rvo & crvo).astype(np.int64)
        values: list[Any] = [np.arange(1, n + 1, dtype=np.int64), any_disease, *table.values()]  # ID, Disease_Risk
    elif layout == "airogs":
        values = [[Path(p).stem for p in names], np.where(lab.classes["GC"] > 0, "RG", "NRG").tolist()]
    elif layout in ("aptos", "eyepacs"):
        values = [[Path(p).stem for p in names], lab.dr_grade.astype(np.int64)]
    elif layout == "messidor2":
        values = [
            names,
            lab.dr_grade.astype(np.int64),
            lab.classes["DME"].astype(np.int64),
            np.ones(n, dtype=np.int64),  # adjudicated_gradable: the layout draws gradable images only
        ]
    else:
        raise AssertionError(layout)
    return pl.DataFrame(dict(zip(LAYOUT_COLUMNS[layout], values, strict=True)))
