"""Hostile inputs to retina-shard pack (issue 11): every input is packed or rejected with a reason, no image reaches
two folds, nothing unchecked is stored, nothing hangs or decodes a pixel bomb, and user errors are one line."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import signal
import struct
import zlib
from pathlib import Path

import polars as pl
import pytest
from PIL import Image, ImageFile

import retina_io.pack as pack_module
from retina_io.pack import PackConfig, pack
from retina_io.presets import PresetError, get_preset, read_labels
from retina_io.shard_cli import main as shard_main
from retina_io.tario import iter_tar
from tests.conftest import SYNFUNDUS_HEADER, fundus_like, jpeg_bytes, png_bytes

N_GOOD = 8


def _label_row(name: str, dr: int = 0, flags: tuple[int, ...] = (0,) * 10) -> list:
    return [name, dr, "left", *flags, 1, 1, 1, 1]


def _write_labels(path: Path, rows: list[list], header: list[str] = SYNFUNDUS_HEADER) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _dataset(root: Path, files: dict[str, bytes], rows: list[list]) -> tuple[Path, Path]:
    """SynFundus layout: ``N_GOOD`` good images ``good_i.jpg`` (labels alternate) plus ``files`` under Fundus/, and a
    label table with the good rows plus ``rows``."""
    images = root / "images"
    (images / "Fundus").mkdir(parents=True)
    good = []
    for i in range(N_GOOD):
        (images / "Fundus" / f"good_{i}.jpg").write_bytes(jpeg_bytes(fundus_like(1000 + i)))
        good.append(_label_row(f"good_{i}.jpg", dr=i % 2, flags=(int(i % 3 == 0),) + (0,) * 9))
    for name, data in files.items():
        (images / "Fundus" / name).write_bytes(data)
    return images, _write_labels(root / "labels.csv", good + rows)


def _pack(images: Path, labels: Path, out: Path, **kw):
    kw = {"folds": 2, "workers": 1, "progress": False, "shard_samples": 4, **kw}
    return pack(PackConfig(images=images, labels=labels, preset="synfundus", out=out, **kw))


def _outputs(out: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    return pl.read_parquet(out / "index.parquet"), pl.read_parquet(out / "rejects.parquet")


def _reasons(rejects: pl.DataFrame) -> dict[str, str]:
    return dict(zip(rejects["id"].to_list(), rejects["reason"].to_list(), strict=True))


def _stored_images(out: Path) -> dict[str, bytes]:
    images = {}
    for tar in sorted(out.glob("fold*/*.tar")):
        for sample, _ in iter_tar(tar):
            images[sample.key] = sample.components.get("jpg") or sample.components.get("png")
    return images


def _accounted(out: Path, n_rows: int, n_strays: int = 0) -> None:
    index, rejects = _outputs(out)
    assert index.height + rejects.height == n_rows + n_strays
    assert all(rejects["reason"].to_list()) and all(rejects["detail"].to_list())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rejected_by_reason"] == dict(sorted(rejects["reason"].value_counts().iter_rows()))


# 1. One image in two folds ------------------------------------------------------------------------------------------


def test_same_image_under_other_ids_is_packed_once(tmp_path):
    x = jpeg_bytes(fundus_like(1))
    y = jpeg_bytes(fundus_like(2))
    rows = [
        _label_row("x.jpg", dr=1),
        _label_row("./x.jpg", dr=1),  # another spelling of the same path
        _label_row("X.JPG", dr=1),  # a case variant that resolves to the same file
        _label_row("Fundus/x.jpg", dr=1),
        _label_row("copy_of_x.jpg", dr=1),  # the same bytes under another name
        _label_row("link_to_x.jpg", dr=1),  # a hard link
        _label_row("y.jpg", dr=0),
        _label_row("y_again.jpg", dr=1),  # the same bytes with other labels
    ]
    images, labels = _dataset(tmp_path, {"x.jpg": x, "copy_of_x.jpg": x, "y.jpg": y, "y_again.jpg": y}, rows)
    os.link(images / "Fundus" / "x.jpg", images / "Fundus" / "link_to_x.jpg")
    out = tmp_path / "out"
    result = _pack(images, labels, out)
    index, rejects = _outputs(out)
    reasons = _reasons(rejects)
    assert index.filter(pl.col("id") == "./x.jpg").height == 1, "the first id in sorted order is packed"
    for other in ("x.jpg", "X.JPG", "Fundus/x.jpg", "copy_of_x.jpg", "link_to_x.jpg"):
        assert reasons[other] == "duplicate_image", other
    assert "./x.jpg" in rejects.filter(pl.col("id") == "copy_of_x.jpg")["detail"][0], "the detail names the kept id"
    assert reasons["y.jpg"] == reasons["y_again.jpg"] == "conflicting_duplicate"
    assert "y_again.jpg" in rejects.filter(pl.col("id") == "y.jpg")["detail"][0]
    stored = _stored_images(out)
    digests = [hashlib.sha256(b).hexdigest() for b in stored.values()]
    assert len(digests) == len(set(digests)) == N_GOOD + 1, "no image is stored twice"
    assert hashlib.sha256(y).hexdigest() not in digests
    _accounted(out, N_GOOD + len(rows))
    assert result.rejected_by_reason == {"conflicting_duplicate": 2, "duplicate_image": 5}


# 2. Label tables read strictly --------------------------------------------------------------------------------------


def test_ragged_rows_rejected_with_their_line_not_shifted(tmp_path):
    images, labels = _dataset(tmp_path, {f"r{i}.jpg": jpeg_bytes(fundus_like(50 + i)) for i in range(3)}, [])
    good_rows = labels.read_text(encoding="utf-8").splitlines()
    extra = _label_row("r0.jpg", dr=0)
    extra.insert(2, "1")  # one field too many: read naively, every label after it shifts by one
    short = _label_row("r1.jpg", dr=2)[:-3]  # fields missing
    fine = _label_row("r2.jpg", dr=3, flags=(1,) + (0,) * 9)
    lines = good_rows + [",".join(map(str, r)) for r in (extra, short, fine)]
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    _pack(images, labels, out)
    index, rejects = _outputs(out)
    reasons = _reasons(rejects)
    assert reasons["r0.jpg"] == reasons["r1.jpg"] == "ragged_row"
    details = dict(zip(rejects["id"].to_list(), rejects["detail"].to_list(), strict=True))
    assert f"line {N_GOOD + 2} has {len(SYNFUNDUS_HEADER) + 1} fields" in details["r0.jpg"]
    assert f"line {N_GOOD + 3} has {len(SYNFUNDUS_HEADER) - 3} fields" in details["r1.jpg"]
    r2 = index.filter(pl.col("id") == "r2.jpg").row(0, named=True)
    assert (r2["DR"], r2["AMD"], r2["dr_grade"]) == (1, 1, 3)
    _accounted(out, N_GOOD + 3)


def test_repeated_column_names_are_an_error_naming_them(tmp_path):
    header = [*SYNFUNDUS_HEADER, "is_amd"]
    labels = _write_labels(tmp_path / "t.csv", [_label_row("a.jpg") + [1]], header=header)
    with pytest.raises(PresetError, match="same name: is_amd"):
        read_labels(labels, get_preset("synfundus"))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-8-sig"])
def test_utf16_and_bom_tables_are_decoded(tmp_path, encoding):
    images, labels = _dataset(tmp_path, {}, [])
    text = labels.read_text(encoding="utf-8")
    labels.write_bytes(text.encode(encoding))  # utf-16: with a byte-order mark; utf-16-le: without
    table = read_labels(labels, get_preset("synfundus"))
    assert table.frame.height == N_GOOD and table.frame["reason"].null_count() == N_GOOD
    assert table.frame["DR"].to_list() == [i % 2 for i in range(N_GOOD)]


def test_other_encodings_and_header_only_tables_are_one_line_errors(tmp_path, capsys):
    images, labels = _dataset(tmp_path, {}, [])
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(labels.read_text(encoding="utf-8").replace("good_3", "gööd_3").encode("latin-1"))
    header_only = tmp_path / "header_only.csv"
    header_only.write_text(",".join(SYNFUNDUS_HEADER) + "\n", encoding="utf-8")
    for table, message in ((latin1, "is not UTF-8 text: byte 0xf6 on line 5"), (header_only, "no data rows")):
        argv = ["pack", "--images", str(images), "--labels", str(table), "--preset", "synfundus",
                "--out", str(tmp_path / "out"), "--no-progress", "--workers", "1"]  # fmt: skip
        assert shard_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and str(table) in err and message in err, err
    assert not (tmp_path / "out").exists(), "a refused pack leaves no --out behind"


# 3./4. Check what is stored -----------------------------------------------------------------------------------------


def _cut_mid_scan(data: bytes) -> bytes:
    """A JPEG cut in the middle of its entropy-coded data, with an end-of-image marker appended."""
    sos = data.index(b"\xff\xda")
    cut = data[: sos + (len(data) - sos) // 2].rstrip(b"\xff")
    return cut + b"\xff\xd9"


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png_claiming(width: int, height: int, rows: int = 0) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (8-bit RGB), with ``rows`` rows of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    comp = zlib.compressobj(9)
    raw = b"".join(comp.compress(b"\x00" + bytes(3 * width)) for _ in range(rows)) + comp.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


def test_corrupt_files_are_rejected_and_trailing_bytes_accepted(tmp_path):
    big = jpeg_bytes(fundus_like(7, size=(160, 128)), quality=95)
    png = png_bytes(Image.fromarray(fundus_like(8)))
    crc_broken = bytearray(png)
    crc_broken[40] ^= 0x01  # inside the IDAT data: its CRC no longer matches
    trailing = jpeg_bytes(fundus_like(9)) + b"CAMERA-METADATA\x00\xff\xd8\xff" + os.urandom(6000)
    files = {
        "cut.jpg": _cut_mid_scan(big),
        "no_iend.png": png[:-12],
        "half.png": png[: len(png) // 2],
        "crc.png": bytes(crc_broken),
        "no_eoi.jpg": big[:-2],
        "trailing.jpg": trailing,
    }
    rows = [_label_row(name, dr=1) for name in files]
    images, labels = _dataset(tmp_path, files, rows)
    for check in ("header", "decode"):
        out = tmp_path / check
        _pack(images, labels, out, check=check)
        index, rejects = _outputs(out)
        reasons = _reasons(rejects)
        for name in ("no_iend.png", "half.png", "crc.png", "no_eoi.jpg"):
            assert reasons.get(name) == "corrupt_image", (check, name, reasons)
        if check == "decode":
            assert reasons.get("cut.jpg") == "corrupt_image", "libjpeg's 'premature end of data segment' is corruption"
            assert "premature end" in rejects.filter(pl.col("id") == "cut.jpg")["detail"][0]
        assert "trailing.jpg" in index["id"].to_list(), (check, "a JPEG with bytes after its end marker is valid")
        key = index.filter(pl.col("id") == "trailing.jpg")["key"][0]
        assert _stored_images(out)[key] == trailing, "stored as it is"
        _accounted(out, N_GOOD + len(rows))


def test_fast_jpeg_check_accepts_only_what_the_slow_one_accepts(monkeypatch):
    """The one strict libjpeg-turbo decode (``decodes_without_warning``) may only accept files that the two-decode
    test accepts too; every cut of the entropy data fails it, and what merely warns goes on to the slow test."""
    import retina_io.imaging as imaging

    arr = fundus_like(12, size=(136, 120))
    variants = {}
    kinds = {"baseline": {}, "restart": {"restart_marker_blocks": 3}, "progressive": {"progressive": True},
             "gray": {"gray": True}}  # fmt: skip
    for name, kw in kinds.items():
        buf = io.BytesIO()
        Image.fromarray(arr).convert("L" if kw.pop("gray", False) else "RGB").save(buf, "JPEG", quality=90, **kw)
        variants[name] = buf.getvalue()

    def slow_accepts(data: bytes) -> bool:
        with monkeypatch.context() as m:
            m.setattr(imaging, "decodes_without_warning", lambda *a, **k: False)
            try:
                imaging.plan_image(data)
            except imaging.ImageRejected:
                return False
            return True

    cuts = 0
    for name, data in variants.items():
        assert imaging.decodes_without_warning(data) and slow_accepts(data), name
        sos = data.index(b"\xff\xda")
        for cut in range(sos + 12, len(data) - 2, 37):  # cut anywhere in the scans, end marker appended
            bad = data[:cut].rstrip(b"\xff") + b"\xff\xd9"
            assert not imaging.decodes_without_warning(bad), (name, cut)
            cuts += 1
        eoi = data.rindex(b"\xff\xd9")
        padded = data[:eoi] + b"\x00" * 40 + data[eoi:]  # whole data, bytes before the end marker: libjpeg warns
        assert not imaging.decodes_without_warning(padded) and slow_accepts(padded), name
        imaging.plan_image(padded)  # the slow test decides: accepted
        for i in range(sos + 20, eoi, 53):  # flipped bits: whatever the fast check accepts, the slow one accepts
            flipped = bytearray(data)
            flipped[i] ^= 0x10
            flipped = bytes(flipped)
            if imaging.decodes_without_warning(flipped):
                assert slow_accepts(flipped), (name, i)
    assert cuts > 50
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, "JPEG")
    assert imaging.plan_image(cmyk.getvalue()).conversions == ("mode=CMYK",), "CMYK: decoded by PIL, converted"


def test_jpeg_structure_counts_restart_markers_and_progressive_scans():
    from retina_io.imgcheck import jpeg_structure, png_structure

    arr = fundus_like(11, size=(150, 110))
    for kw in ({"restart_marker_blocks": 2}, {"progressive": True}, {}):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
        data = buf.getvalue()
        assert jpeg_structure(data).problem is None, kw
        assert jpeg_structure(data + b"\x00" * 100).problem is None, kw
        if kw:  # cut between restart intervals / between scans, end marker appended: not whole
            cut = data.rindex(b"\xff\xd0" if "restart_marker_blocks" in kw else b"\xff\xda")
            assert "truncated" in jpeg_structure(data[:cut] + b"\xff\xd9").problem, kw
    png = png_bytes(Image.fromarray(arr))
    assert png_structure(png + b"extra").problem is None
    assert png_structure(_png_claiming(60000, 60000)).width == 60000


def test_file_changed_after_check_or_after_scan_is_not_stored(tmp_path, monkeypatch):
    files = {f"c{i}.jpg": jpeg_bytes(fundus_like(60 + i)) for i in range(2)}
    images, labels = _dataset(tmp_path, files, [_label_row(n, dr=1) for n in files])
    other = jpeg_bytes(fundus_like(99))
    real_probe, real_folder = pack_module._probe, pack_module.ImageFolder

    def replace(name: str) -> None:
        path = images / "Fundus" / name
        path.write_bytes(other)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    def probe_then_change(*args, **kw):
        results = real_probe(*args, **kw)
        replace("c0.jpg")  # after its check, before the shards are written
        return results

    class ScanThenChange(real_folder):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            replace("c1.jpg")  # after the scan, before it is read

    monkeypatch.setattr(pack_module, "_probe", probe_then_change)
    monkeypatch.setattr(pack_module, "ImageFolder", ScanThenChange)
    out = tmp_path / "out"
    _pack(images, labels, out)
    index, rejects = _outputs(out)
    assert _reasons(rejects) == {"c1.jpg": "file_changed"}
    digests = {hashlib.sha256(b).hexdigest() for b in _stored_images(out).values()}
    assert hashlib.sha256(other).hexdigest() not in digests, "bytes that were never checked are not stored"
    # Each image is read once: c0 is stored as it was read and checked, whatever happens to the file afterwards.
    assert hashlib.sha256(files["c0.jpg"]).hexdigest() in digests
    assert index.height == N_GOOD + 1
    _accounted(out, N_GOOD + 2)


# 5. Only regular files are opened -----------------------------------------------------------------------------------


def test_fifo_named_like_an_image_is_rejected_without_blocking(tmp_path):
    images, labels = _dataset(tmp_path, {}, [_label_row("pipe.jpg", dr=1), _label_row("folder.jpg")])
    os.mkfifo(images / "Fundus" / "pipe.jpg")
    os.symlink(images / "Fundus", images / "Fundus" / "folder.jpg")  # a link to a folder, named like an image

    def hang(*_):
        raise TimeoutError("pack blocked on a named pipe")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        _pack(images, labels, tmp_path / "out")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    _, rejects = _outputs(tmp_path / "out")
    assert _reasons(rejects) == {"pipe.jpg": "not_a_regular_file", "folder.jpg": "not_a_regular_file"}
    assert "named pipe" in rejects.filter(pl.col("id") == "pipe.jpg")["detail"][0]
    _accounted(tmp_path / "out", N_GOOD + 2)


# 6. Pixel limit from the header -------------------------------------------------------------------------------------


def test_pixel_limit_rejects_from_the_header_without_decoding(tmp_path, monkeypatch):
    bomb = _png_claiming(60000, 60000)  # 3.6 gigapixels in under 100 bytes
    assert len(bomb) < 100
    over_default = _png_claiming(8000, 8000, rows=8000)  # 64 MP of zeros: a valid PNG of about 200 kB
    files = {"bomb.png": bomb, "over.png": over_default}
    files |= {f"small{i}.jpg": jpeg_bytes(fundus_like(5 + i, size=(40, 30))) for i in range(2)}
    images, labels = _dataset(tmp_path, files, [_label_row(n, dr=1) for n in files])
    decoded: list = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real_load(im))
    for check in ("header", "decode"):
        out = tmp_path / check
        _pack(images, labels, out, check=check)
        reasons = _reasons(_outputs(out)[1])
        assert reasons == {"bomb.png": "image_too_large", "over.png": "image_too_large"}, (check, reasons)
        assert not any(w * h > 50_000_000 for w, h in decoded), "nothing over the limit is ever decoded"
    out = tmp_path / "limit"
    _pack(images, labels, out, max_pixels=1500)  # 40x30 = 1200 passes, the 72x56 good images do not
    index, rejects = _outputs(out)
    assert sorted(index["id"].to_list()) == ["small0.jpg", "small1.jpg"]
    assert "over --max-pixels 1500" in rejects.filter(pl.col("id") == "good_0.jpg")["detail"][0]
    argv = ["pack", "--images", str(images), "--labels", str(labels), "--preset", "synfundus", "--out",
            str(tmp_path / "cli"), "--max-pixels", "0", "--no-progress"]  # fmt: skip
    assert shard_main(argv) == 2


# 10./11. Messages, lock, --out inside --images ----------------------------------------------------------------------


def test_second_pack_into_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    images, labels = _dataset(tmp_path, {}, [])
    out = tmp_path / "out"
    argv = ["pack", "--images", str(images), "--labels", str(labels), "--preset", "synfundus", "--out", str(out),
            "--folds", "2", "--workers", "1", "--no-progress"]  # fmt: skip
    (out / ".work").mkdir(parents=True)
    with open(out / ".work" / "lock", "w") as held:  # what a running pack holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert shard_main(argv) == 2
        err = capsys.readouterr().err
        assert "being written by another retina-shard pack" in err and str(out) in err and err.count("\n") == 1
        assert not (out / "manifest.json").exists()
    assert shard_main(argv) == 0, "the lock is free once the first pack ends"


def test_out_inside_images_is_not_scanned(tmp_path):
    images, labels = _dataset(tmp_path, {}, [])
    out = images / "packed"
    first = _pack(images, labels, out)
    again = _pack(images, labels, out)
    assert first.rejected == again.rejected == 0, "the outputs are not unlabelled inputs"
    assert again.shards_written == 0 and again.manifest == first.manifest


def test_unusable_out_is_one_line_before_any_image_is_read(tmp_path, capsys, monkeypatch):
    images, labels = _dataset(tmp_path, {}, [])
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    monkeypatch.setattr(pack_module, "_probe", lambda *a, **k: pytest.fail("images were read"))
    for out in (a_file, a_file / "sub"):
        argv = ["pack", "--images", str(images), "--labels", str(labels), "--preset", "synfundus",
                "--out", str(out), "--no-progress", "--workers", "1"]  # fmt: skip
        assert shard_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("retina-shard: error: --out ") and str(out) in err and err.count("\n") == 1, err


def test_duplicates_resolved_the_same_with_worker_processes(tmp_path):
    x = jpeg_bytes(fundus_like(3))
    images, labels = _dataset(tmp_path, {"a.jpg": x, "b.jpg": x}, [_label_row("b.jpg"), _label_row("a.jpg")])
    one, two = tmp_path / "one", tmp_path / "two"
    _pack(images, labels, one, workers=1)
    _pack(images, labels, two, workers=2)
    for name in ("index.parquet", "rejects.parquet", "manifest.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    index, rejects = _outputs(one)
    assert "a.jpg" in index["id"].to_list() and _reasons(rejects) == {"b.jpg": "duplicate_image"}


def test_names_that_are_not_utf8_and_conversions_under_header_check(tmp_path):
    """A stray file whose name is not UTF-8 is reported, not a crash; an image that must be converted is decoded at
    check time even under --check header (a truncated TIFF would otherwise fail the shard writer)."""
    buf = io.BytesIO()
    Image.fromarray(fundus_like(21, size=(120, 90))).save(buf, "TIFF")
    tiff = buf.getvalue()
    files = {"scan.tif": tiff, "cut.tif": tiff[: len(tiff) // 2]}
    images, labels = _dataset(tmp_path, files, [_label_row(n) for n in files])
    (images / os.fsdecode(b"Fundus/caf\xe9.jpg")).write_bytes(jpeg_bytes(fundus_like(22)))  # a Latin-1 file name
    out = tmp_path / "out"
    _pack(images, labels, out, check="header")
    index, rejects = _outputs(out)
    assert "scan.tif" in index["id"].to_list()
    assert _reasons(rejects)["cut.tif"] == "corrupt_image"
    assert rejects.filter(pl.col("reason") == "no_label_row")["path"].to_list() == ["Fundus/caf\\xe9.jpg"]
    _accounted(out, N_GOOD + 2, n_strays=1)
