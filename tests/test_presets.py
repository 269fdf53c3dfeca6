"""Presets read the published layouts, map onto the 11 classes, and reject rows that do not fit with a reason."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from retina_io.pack import PackConfig, pack
from retina_io.presets import RFMID_COLUMNS, RFMID_DISEASES, PresetError, get_preset, read_labels
from retina_io.schema import CLASSES
from tests.conftest import SYNFUNDUS_HEADER, fundus_like, jpeg_bytes, png_bytes


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _png(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(Image.fromarray(fundus_like(seed))))


def _jpg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(fundus_like(seed)))


def _pack(tmp_path: Path, images: Path, labels: Path, preset: str, **kw) -> pl.DataFrame:
    out = tmp_path / f"out-{preset}"
    result = pack(
        PackConfig(images=images, labels=labels, preset=preset, out=out, folds=2, workers=1, progress=False, **kw)
    )
    assert result.complete
    return pl.read_parquet(out / "index.parquet"), pl.read_parquet(out / "rejects.parquet")


def test_rfmid_layout_and_mapping(tmp_path):
    images = tmp_path / "Training_Set" / "Training"
    rows = []
    for i in range(1, 9):
        _png(images / f"{i}.png", i)
        vals = dict.fromkeys(RFMID_DISEASES, 0)
        if i % 2:
            vals["ARMD"] = 1
        if i % 3 == 0:
            vals["CRVO"] = 1
        if i == 4:
            vals["MH"] = 1  # a class outside the 11: kept as metadata only
        rows.append([i, int(any(vals.values())), *vals.values()])
    labels = _write_csv(tmp_path / "RFMiD_Training_Labels.csv", list(RFMID_COLUMNS), rows)
    index, rejects = _pack(tmp_path, tmp_path / "Training_Set", labels, "rfmid")
    assert rejects.height == 0
    index = index.sort(pl.col("id").cast(pl.Int64))
    assert index["AMD"].to_list() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert index["RVO"].to_list() == [0, 0, 1, 0, 0, 1, 0, 0]
    assert index["CRP"].null_count() == 8, "classes RFMiD does not label are null (unknown), not 0"
    assert index["MH"].to_list()[3] == 1
    assert index["rfmid_DR"].to_list() == [0] * 8, "source columns named like a class keep a preset prefix"
    assert get_preset("rfmid").classes_present == ("DR", "AMD", "AON", "EM", "GC", "PM", "RVO")


def test_airogs_numbered_subfolders(tmp_path):
    rows = []
    for i in range(10):
        cid = f"TRAIN{i:06d}"
        _jpg(tmp_path / "images" / str(i // 4) / f"{cid}.jpg", i)
        rows.append([cid, "RG" if i % 3 == 0 else "NRG"])
    rows.append(["TRAIN999999", "maybe"])
    _jpg(tmp_path / "images" / "9" / "TRAIN999999.jpg", 99)
    labels = _write_csv(tmp_path / "train_labels.csv", ["challenge_id", "class"], rows)
    index, rejects = _pack(tmp_path, tmp_path / "images", labels, "airogs")
    index = index.sort("id")
    assert index["GC"].to_list() == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert index["path"].to_list()[5] == "1/TRAIN000005.jpg"
    assert rejects["reason"].to_list() == ["bad_label"]
    assert "class=maybe" in rejects["detail"][0]


def test_aptos_and_messidor2(tmp_path):
    rows = []
    for i in range(6):
        code = f"{i:012x}"
        _png(tmp_path / "train_images" / f"{code}.png", i)
        rows.append([code, i % 5])
    labels = _write_csv(tmp_path / "train.csv", ["id_code", "diagnosis"], rows)
    index, _ = _pack(tmp_path, tmp_path / "train_images", labels, "aptos")
    assert index.sort("id")["DR"].to_list() == [0, 1, 1, 1, 1, 0]
    assert index.sort("id")["diagnosis"].to_list() == [0, 1, 2, 3, 4, 0]

    rows = []
    for i in range(6):
        name = f"20051020_{i:05d}_0100_PP.png"
        _png(tmp_path / "IMAGES" / name, 10 + i)
        rows.append([name, "" if i == 5 else i % 5, int(i == 2), int(i != 5)])
    labels = _write_csv(
        tmp_path / "messidor_data.csv", ["id_code", "diagnosis", "adjudicated_dme", "adjudicated_gradable"], rows
    )
    index, rejects = _pack(tmp_path, tmp_path / "IMAGES", labels, "messidor2")
    assert index.sort("id")["DME"].to_list() == [0, 0, 1, 0, 0]
    assert rejects["reason"].to_list() == ["bad_label"], "an ungradable image without a grade is rejected"


def test_messidor2_as_google_published_it(tmp_path):
    """kaggle.com/datasets/google-brain/messidor2-dr-grades: image_id, adjudicated_dr_grade, adjudicated_dme,
    adjudicated_gradable; ungradable images have no grade (rejected, the message naming the user's column)."""
    rows = []
    for i in range(6):
        name = f"IM{i:06d}.JPG" if i % 2 else f"20051020_{i:05d}_0100_PP.png"
        (_jpg if i % 2 else _png)(tmp_path / "IMAGES" / name, 20 + i)
        rows.append([name, "" if i == 5 else i % 5, "" if i == 5 else int(i == 3), int(i != 5)])
    header = ["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"]
    labels = _write_csv(tmp_path / "messidor_data.csv", header, rows)
    index, rejects = _pack(tmp_path, tmp_path / "IMAGES", labels, "messidor2")
    index = index.sort("id")
    assert index["id"].to_list() == sorted(r[0] for r in rows[:5])
    by_id = {r[0]: r for r in rows}
    assert index["DR"].to_list() == [int(by_id[i][1] > 0) for i in index["id"]]
    assert index["DME"].to_list() == [by_id[i][2] for i in index["id"]]
    assert index["adjudicated_dr_grade"].to_list() == [by_id[i][1] for i in index["id"]]
    assert rejects["reason"].to_list() == ["bad_label"]
    assert "adjudicated_dr_grade=<empty>" in rejects["detail"][0]
    with pytest.raises(PresetError, match=r"id_code \(or image_id\)"):
        read_labels(_write_csv(tmp_path / "wrong.csv", ["name", "grade"], [["a.png", 1]]), get_preset("messidor2"))


def test_eyepacs_groups_patients_into_one_fold(tmp_path):
    rows = []
    for p in range(20):
        for side in ("left", "right"):
            _jpg(tmp_path / "train" / f"{p}_{side}.jpeg", p * 2 + (side == "right"))
            rows.append([f"{p}_{side}", (p + (side == "left")) % 5])
    labels = _write_csv(tmp_path / "trainLabels.csv", ["image", "level"], rows)
    index, _ = _pack(tmp_path, tmp_path / "train", labels, "eyepacs")
    per_patient = index.group_by("group").agg(pl.col("fold").n_unique().alias("folds"), pl.len())
    assert per_patient.height == 20
    assert per_patient["folds"].to_list() == [1] * 20
    assert per_patient["len"].to_list() == [2] * 20


def test_generic_with_path_and_label_columns(tmp_path):
    rows = []
    for i in range(6):
        _jpg(tmp_path / "imgs" / "a" / f"x{i}.jpg", i)
        rows.append([f"case{i}", f"a/x{i}.jpg", i % 2, int(i > 3), "site-A"])
    labels = _write_csv(tmp_path / "t.csv", ["case", "file", "has_dr", "glaucoma", "site"], rows)
    index, _ = _pack(
        tmp_path,
        tmp_path / "imgs",
        labels,
        "generic",
        id_column="case",
        path_column="file",
        label_columns=("has_dr:DR", "glaucoma:GC"),
    )
    index = index.sort("id")
    assert index["DR"].to_list() == [0, 1, 0, 1, 0, 1] and index["GC"].to_list() == [0, 0, 0, 0, 1, 1]
    assert index["site"].to_list() == ["site-A"] * 6
    with pytest.raises(PresetError, match="not a class"):
        get_preset("generic", id_column="case", label_columns=("glaucoma:GLAUCOMA",))


def test_parquet_input_with_numeric_columns(tmp_path):
    rng = np.random.default_rng(0)
    recs = []
    for i in range(8):
        name = f"p{i}.jpg"
        _jpg(tmp_path / "Fundus" / name, i)
        recs.append(
            {
                "file_name": name,
                "dr_grade": int(rng.integers(0, 5)),
                "eye_side": "right",
                **{c: int(rng.integers(0, 2)) for c in SYNFUNDUS_HEADER[3:]},
            }
        )
    df = pl.DataFrame(recs)
    df.write_parquet(tmp_path / "labels.parquet")
    index, rejects = _pack(tmp_path, tmp_path, tmp_path / "labels.parquet", "synfundus")
    assert rejects.height == 0 and index.height == 8
    got = index.sort("id")
    assert got["DR"].to_list() == (df.sort("file_name")["dr_grade"] > 0).cast(pl.UInt8).to_list()


def test_wrong_preset_names_missing_columns(tmp_path):
    labels = _write_csv(tmp_path / "t.csv", ["id_code", "diagnosis"], [["a", 1]])
    with pytest.raises(PresetError, match=r"missing column\(s\) file_name, dr_grade, eye_side"):
        read_labels(labels, get_preset("synfundus"))
    with pytest.raises(PresetError, match="unknown preset"):
        get_preset("kaggle")
    with pytest.raises(PresetError, match="does not exist"):
        read_labels(tmp_path / "nope.csv", get_preset("aptos"))


def test_semicolon_csv_from_a_spreadsheet(tmp_path):
    (tmp_path / "train_images").mkdir()
    rows = []
    for i in range(4):
        code = f"{i:012x}"
        _png(tmp_path / "train_images" / f"{code}.png", 30 + i)
        rows.append(f"{code};{i % 3}")
    labels = tmp_path / "train.csv"
    labels.write_text("id_code;diagnosis\n" + "\n".join(rows) + "\n", encoding="utf-8")
    index, _ = _pack(tmp_path, tmp_path / "train_images", labels, "aptos")
    assert index.sort("id")["diagnosis"].to_list() == [0, 1, 2, 0]


def test_header_bom_and_whitespace_values(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes("\ufeffid_code , diagnosis\n abc , 2 \n".encode())
    table = read_labels(path, get_preset("aptos"))
    row = table.accepted.row(0, named=True)
    assert row["id"] == "abc" and row["DR"] == 1 and [row[c] for c in CLASSES].count(None) == 10


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_labels_read_in_chunks_equal_one_piece(tmp_path, monkeypatch, suffix):
    """A label table is validated chunk by chunk as it is read (memory at a million rows); any chunk size gives the
    same table: row numbers, ragged rows, bad labels, duplicate ids across chunks, metadata."""
    import retina_io.tables as tables

    header = list(SYNFUNDUS_HEADER)
    rows = []
    for i in range(40):
        row = [f"synf_{i % 33:07d}.jpg", str(i % 5), "left" if i % 2 else "right"] + ["0"] * (len(header) - 3)
        row[3 + i % 11] = "1"
        rows.append(row)
    rows[5][1] = "7"  # a bad grade
    rows[34][3] = "1" if rows[34][3] == "0" else "0"  # id of row 2 repeated with other labels: conflict
    path = tmp_path / f"labels{suffix}"
    if suffix == ".csv":
        lines = [",".join(header)] + [",".join(r) for r in rows]
        lines[12] += ",extra"  # a ragged row
        path.write_text("\n".join(lines) + "\n")
    else:
        pl.DataFrame(rows, schema=header, orient="row").write_parquet(path)
    whole = read_labels(path, get_preset("synfundus")).frame
    monkeypatch.setattr(tables, "CHUNK_ROWS", 7)
    chunked = read_labels(path, get_preset("synfundus"))
    assert chunked.frame.equals(whole)
    assert whole.height == 40 and whole["row"].to_list() == list(range(1, 41))
    reasons = whole["reason"].value_counts().sort("reason").drop_nulls()
    # ids 0-6 repeat in rows 34-40 (row 6's id is the bad label's): 3 pairs conflict (both out), 3 repeat (one out)
    expected = {"bad_label": 1, "duplicate_id": 9} | ({"ragged_row": 1} if suffix == ".csv" else {})
    assert dict(reasons.iter_rows()) == expected, reasons
    assert chunked.metadata_columns == ("dr_grade", "eye_side", "is_fundus", "is_macular_readable",
                                        "is_optic_disc_readable", "is_retinal_region_readable")  # fmt: skip
