"""retina-shard pack/verify: every input accounted for, pixels and labels round-trip, deterministic, resumable."""

from __future__ import annotations

import glob
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from retina_io.pack import PackConfig, PackError, pack
from retina_io.schema import CLASSES
from retina_io.shard_cli import main as shard_main
from retina_io.verify import DatasetError, verify
from tests.conftest import write_synfundus_folder


def _pack_src(images: Path, labels: Path, **kw):
    return pack(PackConfig(images=images, labels=labels, preset="synfundus", progress=False, **kw))


def _pack(ds, out: Path, **kw):
    cfg = PackConfig(
        images=ds.images,
        labels=ds.labels,
        preset="synfundus",
        out=out,
        progress=False,
        shard_samples=kw.pop("shard_samples", 7),
        folds=kw.pop("folds", 3),
        **kw,
    )
    return pack(cfg)


@pytest.fixture(scope="module")
def packed(messy, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "ds"
    result = _pack(messy, out, workers=2)
    return messy, out, result


def test_every_input_accounted_for(packed):
    ds, out, result = packed
    assert result.complete
    index = pl.read_parquet(out / "index.parquet")
    rejects = pl.read_parquet(out / "rejects.parquet")
    assert index.height + rejects.height == ds.n_label_rows + ds.n_strays
    reasons = dict(zip(rejects["id"].to_list(), rejects["reason"].to_list(), strict=True))
    for name, reason in ds.expected_reject.items():
        assert reasons.get(name) == reason, (name, reasons.get(name), rejects.filter(pl.col("id") == name))
    stray = rejects.filter(pl.col("reason") == "no_label_row")
    assert stray["path"].to_list() == ["Fundus/stray.jpg"]
    by_reason = Counter(rejects["reason"].to_list())
    assert by_reason["duplicate_id"] == 3  # one repeat of dup_same + both conflicting rows
    assert all(d for d in rejects["detail"].to_list()), "every reject has a reason in words"
    # every good input is packed, exactly once
    assert sorted(index["id"].to_list()) == sorted(ds.reference)
    assert index["key"].n_unique() == index.height
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["accepted"] == index.height
    assert manifest["counts"]["rejected_by_reason"] == dict(sorted(by_reason.items()))


def test_conversions_recorded(packed):
    ds, out, _ = packed
    index = pl.read_parquet(out / "index.parquet")
    conv = dict(zip(index["id"].to_list(), index["conversion"].to_list(), strict=True))
    for name, expected in ds.expected_conversion.items():
        if expected:
            assert conv[name] is not None and conv[name].startswith(expected), (name, conv[name])
        else:
            assert conv[name] is None, (name, conv[name])
    fmt = dict(zip(index["id"].to_list(), index["format"].to_list(), strict=True))
    assert fmt["really_png.jpg"] == "png" and fmt["plain.png"] == "png"
    assert fmt["sixteen.png"] == "png" and fmt["scan.tif"] == "png" and fmt["alpha.png"] == "png"
    assert fmt["cmyk.jpg"] == "jpeg" and fmt["rotated.jpg"] == "jpeg"


def _check_sample(ds, doc: dict, pixels: np.ndarray, labels: np.ndarray, tol_lossless: float = 0.0):
    name = doc["id"]
    ref = ds.reference[name]
    assert pixels.shape == ref.shape, (name, pixels.shape, ref.shape)
    diff = np.abs(pixels.astype(np.int16) - ref.astype(np.int16)).mean()
    limit = 4.0 if name in ds.lossy else tol_lossless
    assert diff <= limit, (name, diff)
    assert labels.tolist() == ds.labels_by_id[name], name


def test_roundtrip_webdataset(packed):
    import webdataset as wds

    ds, out, _ = packed
    tars = sorted(glob.glob(str(out / "fold*" / "*.tar")))
    seen = set()
    for sample in wds.WebDataset(tars, shardshuffle=False):
        doc = json.loads(sample["json"])
        assert doc["key"] == sample["__key__"]
        img_bytes = sample.get("jpg") or sample.get("png")
        pixels = np.asarray(Image.open(io.BytesIO(img_bytes)).convert("RGB"))
        labels = np.frombuffer(sample["labels"], np.uint8)
        _check_sample(ds, doc, pixels, labels)
        if not doc["conversion"]:
            src = (ds.images / "Fundus" / doc["id"]).read_bytes()
            assert img_bytes == src, f"{doc['id']}: stored bytes differ from the source"
        seen.add(doc["id"])
    assert seen == set(ds.reference)


def test_roundtrip_dali_cpu(packed):
    from nvidia.dali import fn, pipeline_def, types

    ds, out, _ = packed
    tars = sorted(glob.glob(str(out / "fold*" / "*.tar")))
    idxs = [t[:-4] + ".idx" for t in tars]

    @pipeline_def(batch_size=8, num_threads=2, device_id=None)
    def pipe():
        img, lab, meta = fn.readers.webdataset(
            paths=tars,
            index_paths=idxs,
            ext=["jpg;png", "labels", "json"],
            missing_component_behavior="error",
            name="reader",
        )
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), lab, meta

    p = pipe()
    p.build()
    n = p.epoch_size()["reader"]
    assert n == len(ds.reference)
    seen = []
    while len(seen) < n:
        imgs, labs, metas = p.run()
        for i in range(len(imgs)):
            if len(seen) == n:
                break
            doc = json.loads(bytes(np.array(metas[i])))
            # DALI's CPU JPEG decoder may round differently from PIL's: allow a small mean difference
            _check_sample(ds, doc, np.array(imgs[i]), np.array(labs[i]), tol_lossless=1.5)
            seen.append(doc["id"])
    assert sorted(seen) == sorted(ds.reference)


def test_idx_matches_wds2idx(packed, tmp_path):
    _, out, _ = packed
    wds2idx = Path(sys.executable).parent / "wds2idx"
    if not wds2idx.exists():
        pytest.skip("DALI's wds2idx is not installed beside this Python")
    for tar in sorted(glob.glob(str(out / "fold*" / "*.tar")))[:3]:
        ref = tmp_path / "ref.idx"
        subprocess.run([str(wds2idx), tar, str(ref)], check=True, capture_output=True)
        assert ref.read_bytes() == Path(tar[:-4] + ".idx").read_bytes()


def test_shards_equal_size_and_folds_shuffled(packed):
    _, out, _ = packed
    manifest = json.loads((out / "manifest.json").read_text())
    for fold in range(manifest["k"]):
        sizes = [s["samples"] for s in manifest["shards"] if s["fold"] == fold]
        assert all(s == 7 for s in sizes[:-1]) and 1 <= sizes[-1] <= 7
    index = pl.read_parquet(out / "index.parquet")
    for fold, df in index.group_by("fold"):
        keys = df["key"].to_list()
        assert keys != sorted(keys), f"fold {fold} is not shuffled"
        assert df["shard"].to_list() == sorted(df["shard"].to_list())


def test_deterministic_across_workers(packed, tmp_path):
    ds, out, _ = packed
    other = tmp_path / "again"
    _pack(ds, other, workers=1)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and ".work" not in p.parts)
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file() and ".work" not in p.parts)
    for rel in files:
        assert (out / rel).read_bytes() == (other / rel).read_bytes(), rel


def test_verify_ok_and_names_bad_shard(packed, tmp_path):
    import shutil

    ds, out, _ = packed
    rep = verify(out, progress=False)
    assert rep.samples == len(ds.reference)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = sorted(copy.glob("fold1/*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="fold1/000000.tar"):
        verify(copy, progress=False)
    assert shard_main(["verify", str(copy), "--no-progress"]) != 0


def test_verify_hashes_and_parses_in_one_pass(packed, tmp_path):
    import hashlib
    import shutil

    from retina_io.tario import iter_tar, sha256_file

    _, out, _ = packed
    for tar in sorted(out.glob("fold*/*.tar")):
        sha = hashlib.sha256()
        n = sum(1 for _ in iter_tar(tar, sha=sha))
        assert n > 0 and sha.hexdigest() == sha256_file(tar), tar
    # a damaged header stops the parse part-way: still reported as the checksum mismatch it is
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = sorted(copy.glob("fold0/*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF  # inside the first member's name
    victim.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"fold0/000000.tar does not match its sha256"):
        verify(copy, progress=False)


def test_verify_refuses_non_dataset(tmp_path):
    with pytest.raises(DatasetError, match="retina-shard pack"):
        verify(tmp_path, progress=False)


def test_multi_node_equals_single(tmp_path):
    images, labels = write_synfundus_folder(tmp_path / "src", 40)
    single = tmp_path / "single"
    _pack_src(images, labels, out=single, folds=3, shard_samples=4, workers=1)
    multi = tmp_path / "multi"
    kw = dict(
        images=images,
        labels=labels,
        preset="synfundus",
        out=multi,
        folds=3,
        shard_samples=4,
        workers=1,
        progress=False,
        num_nodes=2,
    )
    first = pack(PackConfig(node_rank=0, **kw))
    assert not first.complete and not (multi / "manifest.json").exists()
    second = pack(PackConfig(node_rank=1, **kw))
    assert second.complete and second.shards_written + first.shards_written == second.shards
    for name in [
        "manifest.json",
        "index.parquet",
        "rejects.parquet",
        *[str(p.relative_to(single)) for p in single.glob("fold*/*")],
    ]:
        assert (single / name).read_bytes() == (multi / name).read_bytes(), name


def test_resume_after_sigkill(tmp_path):
    images, labels = write_synfundus_folder(tmp_path / "src", 240, size=(96, 80))
    ref = tmp_path / "ref"
    _pack_src(images, labels, out=ref, folds=3, shard_samples=2, workers=1)
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "retina_io.shard_cli",
        "pack",
        "--images",
        str(images),
        "--labels",
        str(labels),
        "--preset",
        "synfundus",
        "--out",
        str(out),
        "--folds",
        "3",
        "--shard-samples",
        "2",
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (out / ".work").is_dir() and len(list((out / ".work").glob("*.json"))) >= 5:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / ".work").glob("*.json")))
    assert not (out / "manifest.json").exists(), "the run was killed before it finished (make the test data larger)"
    assert done_before >= 5
    result = _pack_src(images, labels, out=out, folds=3, shard_samples=2, workers=2)
    assert result.complete and result.shards_written <= result.shards - done_before
    assert not list(out.rglob("*.tmp-*")), "no temporary file survives a completed run"
    for p in ref.rglob("*"):
        if p.is_file() and ".work" not in p.parts:
            assert (out / p.relative_to(ref)).read_bytes() == p.read_bytes(), p.relative_to(ref)


def test_resize_keeps_aspect_and_quality(tmp_path):
    images, labels = write_synfundus_folder(tmp_path / "src", 12, size=(160, 120))
    out = tmp_path / "small"
    _pack_src(images, labels, out=out, folds=2, resize=60, quality=95, workers=1)
    index = pl.read_parquet(out / "index.parquet")
    assert set(zip(index["width"].to_list(), index["height"].to_list(), strict=True)) == {(80, 60)}
    assert set(index["conversion"].to_list()) == {"resize=60"}
    import webdataset as wds

    for sample in wds.WebDataset(sorted(glob.glob(str(out / "fold*" / "*.tar"))), shardshuffle=False):
        doc = json.loads(sample["json"])
        small = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).astype(np.float64)
        src = Image.open(images / doc["source"]["path"]).convert("RGB")
        ref = np.asarray(src.resize((80, 60), Image.Resampling.LANCZOS)).astype(np.float64)
        psnr = 10 * np.log10(255**2 / np.mean((small - ref) ** 2))
        assert psnr > 30, (doc["id"], psnr)


def test_strict_and_nothing_packed(messy, tmp_path, capsys):
    def args(out: str) -> list[str]:
        return [
            "pack",
            "--images",
            str(messy.images),
            "--labels",
            str(messy.labels),
            "--preset",
            "synfundus",
            "--out",
            str(tmp_path / out),
            "--folds",
            "2",
            "--workers",
            "1",
            "--no-progress",
        ]

    assert shard_main(args("s")) == 0
    assert shard_main([*args("s2"), "--strict"]) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PackError, match="nothing could be packed"):
        pack(PackConfig(images=empty, labels=messy.labels, preset="synfundus", out=tmp_path / "s3", progress=False))
    assert (
        shard_main(
            [
                "pack",
                "--images",
                str(messy.images),
                "--labels",
                str(messy.labels),
                "--preset",
                "aptos",
                "--out",
                str(tmp_path / "s4"),
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "missing column(s) id_code, diagnosis" in err


def test_labels_line_up_with_index(packed):
    ds, out, _ = packed
    index = pl.read_parquet(out / "index.parquet")
    for row in index.iter_rows(named=True):
        assert [row[c] for c in CLASSES] == ds.labels_by_id[row["id"]]
