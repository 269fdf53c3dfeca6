"""Shared fixtures: small image folders with good and bad inputs of every kind the packer must handle."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retina_io.presets import SYNFUNDUS_COLUMNS, SYNFUNDUS_FLAGS

SYNFUNDUS_HEADER = list(SYNFUNDUS_COLUMNS)


def fundus_like(seed: int, size: tuple[int, int] = (72, 56)) -> np.ndarray:
    """A small smooth RGB image (compresses like a photograph) that differs per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 200, 3)
    img = base + 40 * np.sin(xx[..., None] / rng.uniform(4, 12) + rng.uniform(0, 6, 3))
    img = img + 30 * np.cos(yy[..., None] / rng.uniform(4, 12))
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=kw.pop("quality", 92), **kw)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class MessyDataset:
    images: Path
    labels: Path
    expected_reject: dict[str, str] = field(default_factory=dict)  # label-row id or stray path -> reason
    expected_conversion: dict[str, str] = field(default_factory=dict)  # id -> conversion prefix ("" = stored)
    reference: dict[str, np.ndarray] = field(default_factory=dict)  # id -> expected RGB pixels after packing
    lossy: set[str] = field(default_factory=set)  # ids whose stored pixels are re-encoded as JPEG
    labels_by_id: dict[str, list[int]] = field(default_factory=dict)
    n_label_rows: int = 0
    n_strays: int = 0


def _row(name: str, rng: np.random.Generator) -> list:
    flags = [int(rng.random() < 0.3) for _ in SYNFUNDUS_FLAGS]
    return [name, int(rng.integers(0, 5)), "left", *flags, 1, 1, 1, 1]


def _labels_of(row: list) -> list[int]:
    # class order DR, AMD, AON, CRP, DM, DME, EM, GC, HtR, PM, RVO == dr_grade>0 then the is_* flags in order
    return [int(int(row[1]) > 0), *[int(v) for v in row[3:13]]]


def make_messy_dataset(root: Path, *, n_good: int = 30) -> MessyDataset:
    """A SynFundus-layout folder with good images and every kind of bad input."""
    rng = np.random.default_rng(7)
    images = root / "images"
    (images / "Fundus" / "nested" / "deeper").mkdir(parents=True)
    ds = MessyDataset(images=images, labels=root / "labels.csv")
    rows: list[list] = []

    def add(name: str, data: bytes | None, *, ref: np.ndarray | None = None, conversion: str = "", lossy=False):
        if data is not None:
            p = images / "Fundus" / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        row = _row(name, rng)
        rows.append(row)
        ds.labels_by_id[name] = _labels_of(row)
        if ref is not None:
            ds.reference[name] = ref
            ds.expected_conversion[name] = conversion
            if lossy:
                ds.lossy.add(name)
        return row

    for i in range(n_good):
        arr = fundus_like(i)
        data = jpeg_bytes(arr)
        add(f"good_{i:03d}.jpg", data, ref=np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    # names: nested, dotted, unicode
    for j, name in enumerate(["nested/deeper/a.jpg", "dotted.name.v2.jpg", "ünïcødé_👁.jpg"]):
        data = jpeg_bytes(fundus_like(100 + j))
        add(name, data, ref=np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    # grayscale JPEG: stored as is
    gray = fundus_like(200)[..., 0]
    data = jpeg_bytes(gray)
    add("gray.jpg", data, ref=np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    # a PNG named .jpg: stored as PNG (contents decide)
    arr = fundus_like(201)
    add("really_png.jpg", png_bytes(Image.fromarray(arr)), ref=arr)
    # a normal RGB PNG
    arr = fundus_like(202)
    add("plain.png", png_bytes(Image.fromarray(arr)), ref=arr)
    # CMYK JPEG: converted to RGB JPEG
    cmyk = Image.fromarray(fundus_like(203)).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    add("cmyk.jpg", buf.getvalue(), ref=ref, conversion="mode=CMYK", lossy=True)
    # 16-bit grayscale PNG: converted to 8-bit RGB PNG (lossless)
    arr16 = (fundus_like(204)[..., 1].astype(np.uint16) * 257).astype(np.uint16)
    im16 = Image.fromarray(arr16)
    add(
        "sixteen.png",
        png_bytes(im16),
        ref=np.repeat((arr16 >> 8).astype(np.uint8)[..., None], 3, axis=2),
        conversion="16bit",
    )
    # EXIF-rotated JPEG (orientation 6: rotate 90° clockwise to display): converted to an upright JPEG
    arr = fundus_like(205, size=(80, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg_bytes(arr, exif=exif.tobytes())
    upright = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270))
    add("rotated.jpg", data, ref=upright, conversion="exif_orientation=6", lossy=True)
    # RGBA PNG and a TIFF: converted (lossless -> PNG)
    arr = fundus_like(206)
    rgba = Image.fromarray(np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)]))
    add("alpha.png", png_bytes(rgba), ref=arr, conversion="mode=RGBA")
    arr = fundus_like(207)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    add("scan.tif", buf.getvalue(), ref=arr, conversion="format=tiff")

    # bad image files
    good = jpeg_bytes(fundus_like(300))
    add("truncated.jpg", good[: len(good) // 2])
    ds.expected_reject["truncated.jpg"] = "corrupt_image"
    add("empty.jpg", b"")
    ds.expected_reject["empty.jpg"] = "empty_file"
    add("text.jpg", b"this is not an image, it is a note\n" * 5)
    ds.expected_reject["text.jpg"] = "not_an_image"
    add("missing.jpg", None)
    ds.expected_reject["missing.jpg"] = "missing_file"

    # bad label rows (their files exist and are fine)
    def bad_row(name: str, column: int, value, reason: str):
        (images / "Fundus" / name).write_bytes(jpeg_bytes(fundus_like(len(rows) + 400)))
        row = _row(name, rng)
        row[column] = value
        rows.append(row)
        ds.expected_reject[name] = reason

    bad_row("nan_label.jpg", 3, "NaN", "bad_label")
    bad_row("range_label.jpg", 1, "7", "bad_label")
    bad_row("text_label.jpg", 4, "yes", "bad_label")
    bad_row("empty_label.jpg", 5, "", "bad_label")
    # duplicate ids: identical rows keep the first; conflicting rows lose all
    dup = add("dup_same.jpg", jpeg_bytes(fundus_like(500)))
    ds.reference["dup_same.jpg"] = np.asarray(Image.open(images / "Fundus" / "dup_same.jpg").convert("RGB"))
    ds.expected_conversion["dup_same.jpg"] = ""
    rows.append(list(dup))
    conflict = add("dup_conflict.jpg", jpeg_bytes(fundus_like(501)))
    other = list(conflict)
    other[3] = 1 - int(other[3])
    rows.append(other)
    ds.expected_reject["dup_conflict.jpg"] = "duplicate_id"
    # unsafe paths
    (root / "outside.jpg").write_bytes(jpeg_bytes(fundus_like(502)))
    rows.append(_row("../../outside.jpg", rng))
    ds.expected_reject["../../outside.jpg"] = "unsafe_path"
    rows.append(_row(str((root / "outside.jpg").resolve()), rng))
    ds.expected_reject[str((root / "outside.jpg").resolve())] = "unsafe_path"
    # a link inside --images that leads outside it
    (images / "Fundus" / "escape.jpg").symlink_to(root / "outside.jpg")
    rows.append(_row("escape.jpg", rng))
    ds.expected_reject["escape.jpg"] = "unsafe_path"
    # a stray file with no label row
    (images / "Fundus" / "stray.jpg").write_bytes(jpeg_bytes(fundus_like(503)))
    ds.n_strays = 1

    with open(ds.labels, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(SYNFUNDUS_HEADER)
        w.writerows(rows)
    ds.n_label_rows = len(rows)
    return ds


@pytest.fixture(scope="session")
def messy(tmp_path_factory) -> MessyDataset:
    return make_messy_dataset(tmp_path_factory.mktemp("messy"))


def write_synfundus_folder(root: Path, n: int, *, seed: int = 0, size=(64, 48)) -> tuple[Path, Path]:
    """n good JPEGs with random labels in the SynFundus layout; returns (images folder, labels file)."""
    rng = np.random.default_rng(seed)
    (root / "Fundus").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"img_{i:05d}.jpg"
        (root / "Fundus" / name).write_bytes(jpeg_bytes(fundus_like(seed * 100_000 + i, size=size)))
        rows.append(_row(name, rng))
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SYNFUNDUS_HEADER)
        w.writerows(rows)
    return root, labels
