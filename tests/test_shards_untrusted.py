"""Shards are untrusted input: hostile manifests, tars, indexes and links give one clear DatasetError, in every reader.

Each test copies a small packed dataset and breaks one thing the way a hand-edited, damaged or malicious copy would.
A tar edited here gets its new size and sha256 recorded in the manifest (and, where DALI is tested, a matching
``.idx``), so that it is the rule under test that refuses it, not the checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from retina_io.dataset import DatasetError, PackedDataset
from retina_io.loader import LoaderConfig, LoaderSettings, build_loader
from retina_io.pack import PackConfig, pack
from retina_io.preview import write_batch_preview
from retina_io.shard_cli import main as shard_main
from retina_io.tario import BLOCK, idx_bytes, idx_text, iter_tar, scan_indexed, scan_members, sha256_file
from retina_io.verify import verify
from tests.conftest import write_synfundus_folder

SHARD = "fold0/000000.tar"  # the shard the tests break
IDX = "fold0/000000.idx"


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("untrusted")
    images, labels = write_synfundus_folder(root / "src", 40, size=(48, 40))
    out = root / "shards"
    pack(PackConfig(images=images, labels=labels, preset="synfundus", out=out, folds=3, shard_samples=6, workers=1,
                    progress=False))  # fmt: skip
    return out


@pytest.fixture
def ds(packed, tmp_path) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(packed, copy, symlinks=True)
    return copy


def _manifest(ds: Path) -> dict:
    return json.loads((ds / "manifest.json").read_text())


def _write_manifest(ds: Path, m: dict) -> None:
    (ds / "manifest.json").write_text(json.dumps(m, indent=1))


def _load(ds: Path, backend: str, **kw):
    threads = 0 if backend == "wds" else 1  # the fallback's workers (0: in this process); DALI threads
    cfg = dict(data=ds, folds=(0,), mode="eval", image_size=16, batch_size=4, backend=backend, num_threads=threads)
    cfg.update(kw)
    loader = build_loader(LoaderConfig(**cfg))
    return [k for batch in loader.iter_epoch(0) for k in batch.keys.tolist()]


def _cli_verify_fails(ds: Path, capsys, *names: str) -> str:
    """``retina-shard verify`` exits 2 with one line naming ``names``, no traceback."""
    capsys.readouterr()
    assert shard_main(["verify", str(ds), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("retina-shard: error: ") and "\n" not in err and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


def _members(tar: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(tar) as t:
        return [(m, t.extractfile(m).read() if m.isfile() else b"") for m in t.getmembers()]


def _rewrite_shard(ds: Path, members: list[tuple[tarfile.TarInfo, bytes]], *, rel: str = SHARD,
                   samples: int | None = None, fmt: int = tarfile.USTAR_FORMAT) -> None:  # fmt: skip
    """Write ``members`` as the tar ``rel`` (in tar format ``fmt``), its ``.idx`` as wds2idx would, and its size and
    sha256 (and, given, its sample count) into the manifest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            t.addfile(info, io.BytesIO(data) if info.isfile() else None)
    (ds / rel).write_bytes(buf.getvalue())
    groups: dict[str, list] = {}
    with tarfile.open(ds / rel) as t:
        for m in t.getmembers():
            if m.isfile():
                groups.setdefault(m.name.rsplit(".", 1)[0], []).append((m.name, m.offset_data, m.size))
    (ds / rel).with_suffix(".idx").write_text(idx_text(list(groups.values())))
    m = _manifest(ds)
    entry = next(s for s in m["shards"] if s["path"] == rel)
    entry["bytes"], entry["sha256"] = len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()
    if samples is not None:
        m["counts"]["per_fold"][entry["fold"]] += samples - entry["samples"]
        m["counts"]["accepted"] += samples - entry["samples"]
        entry["samples"] = samples
    _write_manifest(ds, m)


def _renamed(members, old: str, new: str):
    out = []
    for info, data in members:
        if info.name == old:
            info = tarfile.TarInfo(new)
        out.append((info, data))
    return out


# --- the manifest's paths stay inside the dataset folder -----------------------------------------------------------


def _outside_copy(ds: Path, name: str) -> Path:
    """A real shard (and its idx) outside the dataset folder: a manifest pointing there must not be followed."""
    target = ds.parent / "elsewhere" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ds / SHARD, target)
    shutil.copy(ds / IDX, target.with_suffix(".idx"))
    return target


@pytest.mark.parametrize("field", ["path", "index"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "inner_dotdot"])
def test_manifest_shard_paths_stay_inside(ds, capsys, field, how):
    target = _outside_copy(ds, "x.tar")
    rel = {"dotdot": "../elsewhere/x.tar", "absolute": str(target), "inner_dotdot": "fold0/../../elsewhere/x.tar"}
    value = rel[how] if field == "path" else rel[how].removesuffix(".tar") + ".idx"
    m = _manifest(ds)
    m["shards"][0][field] = value
    _write_manifest(ds, m)
    with pytest.raises(DatasetError, match=r"manifest\.json: shards\[0\]\." + field + r" .* leads outside"):
        PackedDataset.open(ds)
    for backend in ("wds", "dali"):
        with pytest.raises(DatasetError, match="leads outside"):
            _load(ds, backend)
    with pytest.raises(DatasetError, match="leads outside"):
        write_batch_preview(
            ds, ds.parent / "p.png", mode="eval", image_size=16, n=2, settings=LoaderSettings(backend="wds")
        )
    assert not (ds.parent / "p.png").exists()
    _cli_verify_fails(ds, capsys, "manifest.json", value)


@pytest.mark.parametrize("name", ["../rejects.parquet", "/etc/hostname", "fold0/../../x"])
def test_manifest_files_entries_stay_inside(ds, capsys, name):
    m = _manifest(ds)
    m["files"][name] = "0" * 64
    _write_manifest(ds, m)
    with pytest.raises(DatasetError, match=r"manifest\.json: files entry .* leads outside"):
        PackedDataset.open(ds)
    _cli_verify_fails(ds, capsys, "manifest.json", name)


def test_symlinked_shard_leading_outside(ds, capsys):
    target = _outside_copy(ds, "x.tar")
    (ds / SHARD).unlink()
    (ds / SHARD).symlink_to(target)
    with pytest.raises(DatasetError, match=r"shards\[0\]\.path 'fold0/000000.tar' is a link leading outside"):
        PackedDataset.open(ds)
    with pytest.raises(DatasetError, match="link leading outside"):
        _load(ds, "wds")
    _cli_verify_fails(ds, capsys, "manifest.json", SHARD, "link leading outside")


def test_symlinked_fold_folder_leading_outside(ds):
    shutil.move(ds / "fold1", ds.parent / "fold1")
    (ds / "fold1").symlink_to(ds.parent / "fold1")
    with pytest.raises(DatasetError, match=r"fold1/000000.tar' is a link leading outside"):
        PackedDataset.open(ds)


def test_link_loop(ds, capsys):
    (ds / SHARD).unlink()
    (ds / SHARD).symlink_to(SHARD.split("/")[1])  # itself
    with pytest.raises(DatasetError, match=r"shards\[0\]\.path 'fold0/000000.tar' cannot be resolved"):
        PackedDataset.open(ds)
    _cli_verify_fails(ds, capsys, SHARD)


def test_links_inside_the_folder_are_fine(ds, tmp_path):
    """A linked dataset folder, or a shard linked to a file inside the folder, reads and verifies as before."""
    (ds / "store").mkdir()
    shutil.move(ds / SHARD, ds / "store" / "a.tar")
    (ds / SHARD).symlink_to(Path("..") / "store" / "a.tar")
    link = tmp_path / "linked"
    link.symlink_to(ds)
    assert verify(link, progress=False).samples == 40
    keys = [k for k in _load(link, "wds") if k >= 0]
    assert sorted(keys) == sorted(int(k) for k in PackedDataset.open(ds).index((0,))["key"])


# --- k, fold lists and counts agree -------------------------------------------------------------------------------


def _edit_k_down(m):
    m["k"] = 2
    m["counts"]["per_fold"] = m["counts"]["per_fold"][:2]
    m["counts"]["accepted"] = sum(m["counts"]["per_fold"])


def _edit_k_up(m):
    m["k"] = 4
    m["counts"]["per_fold"].append(5)
    m["counts"]["accepted"] += 5


def _move_shard(m):
    next(s for s in m["shards"] if s["fold"] == 0)["fold"] = 1


def _drop_shard(m):
    m["shards"] = [s for s in m["shards"] if s["path"] != SHARD]


def _alias_shard(m):
    m["shards"][1].update(path=f"fold0/./{Path(SHARD).name}", samples=m["shards"][0]["samples"])


def _bump_accepted(m):
    m["counts"]["accepted"] += 1


def _bump_samples(m):
    m["shards"][0]["samples"] += 1


MANIFEST_EDITS = {
    "k_only": (lambda m: m.update(k=4), r"counts\.per_fold .* k=4"),
    "k_down": (_edit_k_down, r"shards\[\d+\] \(fold2/000000.tar\) is in fold 2, outside the folds 0..1 of k=2"),
    "k_up": (_edit_k_up, "fold 3 has no shards, but counts.per_fold says 5"),
    "k_not_int": (lambda m: m.update(k="3"), "k is '3', not a fold count"),
    "shard_moved_fold": (_move_shard, r"fold 0 has shards holding \d+ samples, but counts.per_fold says"),
    "shard_dropped": (_drop_shard, r"fold 0 has shards holding \d+ samples, but counts.per_fold says"),
    "accepted": (_bump_accepted, "counts.accepted .* is not the sum of counts.per_fold"),
    "samples": (_bump_samples, r"fold 0 has shards holding \d+ samples"),
    "empty_fold": (lambda m: m["counts"]["per_fold"].__setitem__(2, 0), r"counts\.per_fold .* not one sample count"),
    "shard_twice": (lambda m: m["shards"].append(dict(m["shards"][0])), "names a file named before"),
    "shard_twice_spelled_otherwise": (_alias_shard, "names a file named before"),
    "shard_not_tar": (lambda m: m["shards"][0].update(path="index.parquet"), r"does not end in \.tar"),
    "missing_k": (lambda m: m.pop("k"), "k is None"),
    "missing_shards": (lambda m: m.pop("shards"), "shards is not a list"),
    "missing_counts": (lambda m: m.pop("counts"), "counts.per_fold None"),
    "missing_preset": (lambda m: m.pop("preset"), "preset is missing"),
    "missing_present": (lambda m: m.pop("classes_present"), "classes_present None"),
    "bad_present": (lambda m: m.update(classes_present=["DR", ["GC"]]), "classes_present"),
    "bad_classes": (lambda m: m.update(classes=7), "classes 7 differ"),
    "shard_lacks_index": (lambda m: m["shards"][0].pop("index"), r"shards\[0\] is not an object with path"),
    "shard_not_object": (lambda m: m["shards"].__setitem__(0, "fold0/000000.tar"), r"shards\[0\] is not an object"),
    "path_not_string": (lambda m: m["shards"][0].update(path=7), r"shards\[0\]\.path 7 is not a relative path"),
    "path_nul": (lambda m: m["shards"][0].update(path="fold0/\x00.tar"), "is not a relative path"),
    "files_not_map": (lambda m: m.update(files=["index.parquet"]), "files is not a map"),
}


@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_manifest_edits_refused_at_open_and_by_verify(ds, capsys, edit):
    change, message = MANIFEST_EDITS[edit]
    m = _manifest(ds)
    change(m)
    _write_manifest(ds, m)
    with pytest.raises(DatasetError, match=message) as info:
        PackedDataset.open(ds)
    assert str(ds / "manifest.json") in str(info.value)
    with pytest.raises(DatasetError, match=message):
        _load(ds, "wds", folds=(1,))
    _cli_verify_fails(ds, capsys, "manifest.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "is not valid JSON"),
        ("[1, 2]", "is not a retina shard manifest"),
        ('"retina-shards"', "is not a retina shard manifest"),
        ("\udcff", "is not valid JSON"),
        ("[" * 100_000, "is not valid JSON"),
    ],
)
def test_manifest_not_json_or_not_an_object(ds, capsys, text, message):
    (ds / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(DatasetError, match=message):
        PackedDataset.open(ds)
    _cli_verify_fails(ds, capsys, "manifest.json")


def test_manifest_without_files_refused_by_verify(ds, capsys):
    m = _manifest(ds)
    del m["files"]
    _write_manifest(ds, m)
    PackedDataset.open(ds)  # readers do not need the checksums
    _cli_verify_fails(ds, capsys, "manifest.json", "no sha256 of ['index.parquet', 'rejects.parquet']")


# --- the index agrees with the manifest ---------------------------------------------------------------------------


def _edit_index(ds: Path, change) -> None:
    path = ds / "index.parquet"
    change(pl.read_parquet(path)).write_parquet(path)
    m = _manifest(ds)
    m["files"]["index.parquet"] = sha256_file(path)
    _write_manifest(ds, m)


def _swap_two_folds(df):
    a = df["fold"].to_list().index(0)
    b = df["fold"].to_list().index(1)
    folds = df["fold"].to_list()
    folds[a], folds[b] = 1, 0
    return df.with_columns(pl.Series("fold", folds, dtype=pl.Int32))


INDEX_EDITS = {
    "fold_out_of_range": (lambda df: df.with_columns(pl.col("fold") * 3), "folds are not all in 0..2"),
    "fold_counts": (lambda df: df.with_columns(pl.lit(0, pl.Int32).alias("fold")), "samples per fold .* differ"),
    "duplicate_key": (lambda df: df.with_columns(pl.lit("000000001").alias("key")), "duplicate keys"),
    "short_key": (lambda df: df.with_columns(pl.col("key").str.slice(1)), "not every key is 9 decimal digits"),
    "no_fold": (lambda df: df.drop("fold"), r"lacks the columns \['fold'\]"),
}


@pytest.mark.parametrize("edit", sorted(INDEX_EDITS))
def test_index_edits_refused_when_read_and_by_verify(ds, capsys, edit):
    change, message = INDEX_EDITS[edit]
    _edit_index(ds, change)
    with pytest.raises(DatasetError, match=message):
        PackedDataset.open(ds).index()
    _cli_verify_fails(ds, capsys, "index.parquet")


def test_index_row_in_another_fold_than_its_shard(ds, capsys):
    _edit_index(ds, _swap_two_folds)  # per-fold counts unchanged
    PackedDataset.open(ds).index()
    _cli_verify_fails(ds, capsys, "fold0/000000.tar is in fold 0, but index.parquet puts some of its rows elsewhere")


def test_index_naming_an_unlisted_shard(ds, capsys):
    _edit_index(ds, lambda df: df.with_columns(pl.lit("../x.tar").alias("shard")))
    _cli_verify_fails(ds, capsys, "index.parquet names shard '../x.tar'")


# --- tar members are KEY.ext, regular files ------------------------------------------------------------------------


def _first_key(ds: Path) -> str:
    return _members(ds / SHARD)[0][0].name.split(".")[0]


def _member_edit(kind: str, key: str):
    """(members -> members, the member name the error must show) for each hostile kind."""

    def rename(new):
        return lambda ms: _renamed(ms, f"{key}.jpg", new)

    def symlink(ms):
        out = []
        for info, data in ms:
            if info.name == f"{key}.jpg":
                info = tarfile.TarInfo(info.name)
                info.type, info.linkname, data = tarfile.SYMTYPE, "/etc/passwd", b""
            out.append((info, data))
        return out

    def directory(ms):
        d = tarfile.TarInfo("fold0")
        d.type = tarfile.DIRTYPE
        return [(d, b""), *ms]

    def extra(ms):
        return [*ms[:3], (tarfile.TarInfo(f"{key}.txt"), b"hello"), *ms[3:]]

    def short_key(ms):
        return [(tarfile.TarInfo(i.name[1:]) if i.name.startswith(key) else i, d) for i, d in ms]

    return {
        "dotdot": (rename(f"../../etc/{key}.jpg"), f"../../etc/{key}.jpg"),
        "absolute": (rename(f"/tmp/{key}.jpg"), f"/tmp/{key}.jpg"),
        "subfolder": (rename(f"fold0/{key}.jpg"), f"fold0/{key}.jpg"),
        "unknown_ext": (extra, f"{key}.txt"),
        "two_dots": (rename(f"{key}.jpg.jpg"), f"{key}.jpg.jpg"),
        "key_8_digits": (short_key, f"{key[1:]}."),
        "symlink": (symlink, f"{key}.jpg"),
        "directory": (directory, "'fold0'"),
    }[kind]


MEMBER_KINDS = ["dotdot", "absolute", "subfolder", "unknown_ext", "two_dots", "key_8_digits", "symlink", "directory"]


@pytest.mark.parametrize("kind", MEMBER_KINDS)
def test_tar_members_refused_by_verify(ds, capsys, kind):
    change, shown = _member_edit(kind, _first_key(ds))
    _rewrite_shard(ds, change(_members(ds / SHARD)))
    with pytest.raises(DatasetError, match="member") as info:
        verify(ds, progress=False)
    assert SHARD in str(info.value) and shown in str(info.value), str(info.value)
    _cli_verify_fails(ds, capsys, SHARD, shown)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "unknown_ext", "two_dots", "key_8_digits", "symlink"])
def test_tar_members_refused_by_the_fallback_loader(ds, kind, workers):
    """A clean DatasetError naming the shard, from the main process or a DataLoader worker alike."""
    change, _ = _member_edit(kind, _first_key(ds))
    _rewrite_shard(ds, change(_members(ds / SHARD)))
    with pytest.raises(DatasetError, match=f"shard {ds / SHARD}: ") as info:
        _load(ds, "wds", num_threads=workers)
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "unknown_ext", "key_8_digits"])
def test_idx_members_refused_by_the_dali_loader(ds, kind):
    change, shown = _member_edit(kind, _first_key(ds))
    _rewrite_shard(ds, change(_members(ds / SHARD)))  # the .idx follows the tar, as wds2idx would write it
    with pytest.raises(DatasetError, match=f"DALI index {ds / IDX}: ") as info:
        _load(ds, "dali")
    assert shown in str(info.value), str(info.value)


def test_idx_that_disagrees_with_the_manifest(ds):
    lines = (ds / IDX).read_text().splitlines()
    (ds / IDX).write_text("\n".join([f"v1.2 {len(lines) - 2}", *lines[1:-1]]) + "\n")
    with pytest.raises(DatasetError, match=r"000000.idx lists 5 samples, manifest.json 6"):
        _load(ds, "dali")
    parts = lines[1].split()
    parts[1] = "99999999"  # the first member's offset
    (ds / IDX).write_text("\n".join([lines[0], " ".join(parts), *lines[2:]]) + "\n")
    with pytest.raises(DatasetError, match="lies beyond the tar"):
        _load(ds, "dali")
    (ds / IDX).write_text("\n".join([*lines[:2], lines[1], *lines[3:]]) + "\n")  # one sample twice
    with pytest.raises(DatasetError, match=r"key \d{9} is also in"):
        _load(ds, "dali")
    parts = lines[1].split()
    parts[parts.index("labels") + 2] = "12"  # a labels member of 12 bytes
    (ds / IDX).write_text("\n".join([lines[0], " ".join(parts), *lines[2:]]) + "\n")
    with pytest.raises(DatasetError, match="labels are not 11 bytes"):
        _load(ds, "dali")


def test_idx_fast_reader_accepts_only_what_the_line_reader_accepts_alike(ds):
    """``scan_idx`` (one regular expression over the file) against ``read_idx`` (line by line, the reference) on the
    packer's ``.idx`` and on thousands of edits of it: whatever the fast reader accepts, the reference accepts with
    the same samples; forms only the reference accepts still load, through it."""
    import random

    from retina_io.tario import IdxColumns, read_idx, scan_idx

    def same(a: IdxColumns, b: IdxColumns) -> bool:
        return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("keys", "image", "labels"))

    idx, tar_bytes = ds / IDX, (ds / SHARD).stat().st_size
    original = idx.read_bytes()
    fast = scan_idx(original, tar_bytes)
    assert fast is not None and same(fast, IdxColumns.of_samples(read_idx(idx, tar_bytes)))
    assert scan_idx(original, int(fast.image.sum(axis=1).max()) - 1) is None, "a member beyond the tar"
    rng, accepted, checked = random.Random(7), 0, 0
    alphabet = b"0123456789 \n\t.jpgnsolabe\x00"
    for _ in range(3000):
        data = bytearray(original)
        for _ in range(rng.choice((1, 1, 2))):
            at = rng.randrange(len(data))
            edit = rng.randrange(3)
            if edit == 0:
                data[at] = rng.choice(alphabet)
            elif edit == 1:
                data.insert(at, rng.choice(alphabet))
            else:
                del data[at]
        fast = scan_idx(bytes(data), tar_bytes)
        if fast is None:
            continue
        accepted += 1
        idx.write_bytes(bytes(data))
        checked += same(fast, IdxColumns.of_samples(read_idx(idx, tar_bytes)))  # raises if the reference refuses
    assert checked == accepted and accepted > 20, (checked, accepted)  # digit edits: other offsets, sizes, keys
    idx.write_bytes(original)
    want = _load(ds, "dali")
    lines = original.decode().splitlines()
    other = [lines[0]] + ["  ".join(" ".join(p) for p in (f[8:12], f[0:4], f[4:8])) for f in map(str.split, lines[1:])]
    idx.write_text("\n".join(other))  # members reordered, two spaces, no final newline: only the reference reads it
    assert scan_idx(idx.read_bytes(), tar_bytes) is None
    assert _load(ds, "dali") == want


# --- short, long and truncated shards ------------------------------------------------------------------------------


def test_short_shard_is_not_a_shorter_epoch(ds, capsys):
    """A shard with a sample fewer (checksum and size updated, count not) stops the fallback loader, naming it."""
    _rewrite_shard(ds, _members(ds / SHARD)[:-3])
    for workers in (0, 2):
        with pytest.raises(DatasetError, match=f"shard {ds / SHARD} holds 5 samples, manifest.json says 6"):
            _load(ds, "wds", num_threads=workers)
    with pytest.raises(DatasetError, match="lists 5 samples, manifest.json 6"):
        _load(ds, "dali")
    _cli_verify_fails(ds, capsys, SHARD, "holds 5 samples; manifest says 6")


def test_long_shard(ds, capsys):
    _rewrite_shard(ds, _members(ds / SHARD), samples=5)  # the manifest promises one fewer than the tar holds
    with pytest.raises(DatasetError, match=f"shard {ds / SHARD} holds more than the 5 samples"):
        _load(ds, "wds")
    _cli_verify_fails(ds, capsys, "index.parquet: samples per fold")  # the index still has the sample


def test_last_shard_of_a_part_short(ds):
    """The shortfall is in the last shard the loader reads: the stream ends early, which is refused too."""
    last = [s for s in _manifest(ds)["shards"] if s["fold"] == 0][-1]
    _rewrite_shard(ds, _members(ds / last["path"])[:-3], rel=last["path"])
    with pytest.raises(DatasetError, match=f"shard {ds / last['path']} holds {last['samples'] - 1} samples"):
        _load(ds, "wds")


@pytest.mark.parametrize("record", [True, False])
def test_truncated_tar(ds, capsys, record):
    data = (ds / SHARD).read_bytes()
    image = _members(ds / SHARD)[6][0]  # the third sample's image
    cut = data[: image.offset_data + image.size // 2]
    (ds / SHARD).write_bytes(cut)
    if record:  # the manifest agrees with the truncated file: only the tar structure is wrong
        m = _manifest(ds)
        m["shards"][0]["bytes"], m["shards"][0]["sha256"] = len(cut), hashlib.sha256(cut).hexdigest()
        _write_manifest(ds, m)
    with pytest.raises(DatasetError, match=f"shard {ds / SHARD} cannot be read"):
        _load(ds, "wds")
    with pytest.raises(DatasetError, match="lies beyond the tar"):
        _load(ds, "dali")
    _cli_verify_fails(ds, capsys, SHARD)


def test_good_dataset_unchanged(packed, capsys):
    """The checks refuse nothing in a dataset the packer wrote: open, index, both loaders, verify."""
    ds = PackedDataset.open(packed)
    assert ds.index().height == 40
    for backend in ("wds", "dali"):
        keys = [k for k in _load(packed, backend, folds=(0, 1, 2)) if k >= 0]
        assert sorted(keys) == sorted(int(k) for k in ds.index()["key"])
    assert shard_main(["verify", str(packed), "--no-progress"]) == 0
    assert "ok:" in capsys.readouterr().out


# --- verify's fast path (one mmap per tar, headers from the buffer) agrees with the tarfile reader ------------------


def test_verify_reads_good_shards_without_tarfile(packed, monkeypatch, capsys):
    """A dataset the packer wrote passes on the fast path alone; ``tarfile`` is only the fallback for the unusual."""
    import retina_io.verify as verify_module

    def refuse(*_a, **_k):
        raise AssertionError("the tarfile reader was used")

    monkeypatch.setattr(verify_module, "iter_tar", refuse)
    assert verify(packed, progress=False, workers=1).samples == 40
    assert shard_main(["verify", str(packed), "--workers", "1", "--no-progress"]) == 0


def test_scan_members_reads_what_tarfile_reads(packed):
    for tar in sorted(packed.glob("fold*/*.tar")):
        scanned = scan_members(tar.read_bytes())
        assert scanned is not None, tar
        assert scanned.members() == [m for _, ms in iter_tar(tar) for m in ms]


def _forged_indexes(idx: bytes) -> list[bytes]:
    """``.idx`` texts that lie about a tar in different ways."""
    head, *lines = idx.splitlines(keepends=True)
    first = lines[0].split(b" ")
    shifted = b" ".join([first[0], b"%d" % (int(first[1]) + 512), *first[2:]])
    resized = b" ".join([first[0], first[1], b"%d" % (int(first[2]) - 1), *first[3:]])
    renamed = lines[0].replace(lines[0].split()[3][:9], b"999999999")
    return [
        head + b"".join(lines[1:] + lines[:1]),  # samples out of order
        head + shifted + b"".join(lines[1:]),  # an offset off by a block
        head + resized + b"".join(lines[1:]),  # a size off by one
        head + b"".join(lines[:-1]),  # the last sample left out
        head + b"".join(lines) + lines[-1],  # a sample twice
        head + renamed + b"".join(lines[1:]),  # another key
        head + lines[0].replace(b"labels", b"json", 1) + b"".join(lines[1:]),  # another extension
        head + lines[0].replace(b" ", b"  ", 1) + b"".join(lines[1:]),  # the same numbers, spaced differently
        b"",
        head + b"jpg -512 10 000000000.jpg\n",
        head + b"jpg 1e3 10 000000000.jpg\n",
    ]


def test_scan_indexed_is_the_header_walk_or_nothing(packed):
    """Checking the headers against the ``.idx`` gives the header walk's members when the index is true, and nothing
    (the walk decides) when it lies in any way or the tar is unusual; never another member list."""
    for tar in sorted(packed.glob("fold*/*.tar")):
        buf, idx = tar.read_bytes(), tar.with_suffix(".idx").read_bytes()
        assert scan_indexed(buf, idx) == scan_members(buf) is not None
        assert idx_bytes(scan_indexed(buf, idx), per_sample=3) == idx
        for forged in (f for f in _forged_indexes(idx) if f != idx):  # a one-sample shard's "reordering" is none
            got = scan_indexed(buf, forged)
            assert got is None or (got == scan_members(buf) and idx_bytes(got, per_sample=3) != forged), forged[:80]
    buf = (packed / SHARD).read_bytes()
    idx = (packed / IDX).read_bytes()
    for kind in HEADER_KINDS:
        data = bytes(_edit_header(kind, bytearray(buf)))
        assert scan_indexed(data, idx) is None, kind
    assert scan_indexed(buf[:-BLOCK], idx) is None or len(buf) - BLOCK >= 2 * BLOCK


def _heads_well_formed_field_by_field(h: np.ndarray) -> bool:
    """The header rule written out field by field (the former implementation): the reference for the vectorised one."""
    from retina_io.tario import _NUMBER_FIELDS

    if not ((h[:, 156] == ord("0")).all() and (h[:, 345] == 0).all()):
        return False
    octal = (h >= ord("0")) & (h <= ord("7"))
    for start, width in _NUMBER_FIELDS:
        digits = octal[:, start : start + width - 1].all(axis=1) & (h[:, start + width - 1] == 0)
        if not (digits | (h[:, start : start + width] == 0).all(axis=1)).all():
            return False
    if not (octal[:, 148:154].all() and (h[:, 154] == 0).all() and (h[:, 155] == ord(" ")).all()):
        return False
    recorded = ((h[:, 148:154].astype(np.int64) - ord("0")) * 8 ** np.arange(5, -1, -1)).sum(axis=1)
    computed = h.sum(axis=1, dtype=np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * ord(" ")
    return bool((recorded == computed).all())


def test_header_check_agrees_with_the_field_by_field_rule(packed):
    """Thousands of packer headers with bytes of their number fields, checksum, type flag or prefix changed (half of
    them with the checksum fixed up): the vectorised check says what the field-by-field rule says."""
    from retina_io.tario import _NUMBER_FIELDS, _heads_well_formed

    buf = (packed / SHARD).read_bytes()
    heads = np.frombuffer(buf, np.uint8).reshape(-1, BLOCK)[[o // BLOCK - 1 for o in _members_offsets(buf)]].copy()
    assert _heads_well_formed(heads) and _heads_well_formed_field_by_field(heads)
    rng = np.random.default_rng(3)
    columns = np.concatenate([np.arange(s, s + w) for s, w in _NUMBER_FIELDS] + [np.arange(148, 157), [345]])
    tricky = np.array([0, 32, 47, 48, 55, 56, 57, 255, 1, 128])
    verdicts = []
    for _ in range(4000):
        h = heads[rng.integers(0, len(heads), size=3)].copy()
        for _ in range(rng.integers(1, 4)):
            row, col = rng.integers(0, 3), rng.choice(columns) if rng.random() < 0.9 else rng.integers(0, BLOCK)
            h[row, col] = rng.choice(tricky) if rng.random() < 0.7 else rng.integers(0, 256)
            if rng.random() < 0.3:  # a whole number field NUL (tarfile reads 0)
                start, width = _NUMBER_FIELDS[rng.integers(0, len(_NUMBER_FIELDS))]
                h[row, start : start + width] = 0
        if rng.random() < 0.5:
            for row in range(3):
                h[row, 148:156] = 32
                h[row, 148:156] = np.frombuffer(b"%06o\x00 " % int(h[row].sum(dtype=np.int64)), np.uint8)
        verdict = _heads_well_formed_field_by_field(h)
        assert _heads_well_formed(h) == verdict, h[:, columns]
        verdicts.append(verdict)
    assert 200 < sum(verdicts) < len(verdicts) - 200, "both verdicts are exercised"


def _header_at(data: bytearray, member: int) -> int:
    """The offset of member ``member``'s header in a packed tar."""
    return _members_offsets(bytes(data))[member] - BLOCK


def _members_offsets(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [m.offset_data for m in t.getmembers()]


def _set_field(data: bytearray, head: int, start: int, value: bytes, *, fix_checksum: bool = True) -> None:
    data[head + start : head + start + len(value)] = value
    if fix_checksum:
        block = data[head : head + BLOCK]
        chksum = 256 + sum(block[:148]) + sum(block[156:])
        data[head + 148 : head + 156] = b"%06o\x00 " % chksum


def _edit_header(kind: str, data: bytearray) -> bytearray:
    """A tar ``tarfile`` reads differently from a naive header walk (or just unusually), for each ``kind``."""
    head = _header_at(data, 3)  # the second sample's first member
    if kind == "bad_checksum":  # tarfile ends the archive at a header with a bad checksum, silently
        data[head + 1] ^= 0x01
    elif kind == "mode_not_octal":  # ... and at a number field it cannot read
        _set_field(data, head, 100, b"zzzzzzz\x00")
    elif kind == "size_base256":  # the GNU binary size: tarfile reads it right
        size = int(bytes(data[head + 124 : head + 135]), 8)
        _set_field(data, head, 124, b"\x80" + size.to_bytes(11, "big"))
    elif kind == "prefix":  # a ustar prefix: tarfile reads the member as PREFIX/NAME
        _set_field(data, head, 345, b"elsewhere")
    elif kind == "no_end_block":  # tarfile takes the end of the file as the end of the archive
        end = _members_offsets(bytes(data))[-1] + BLOCK  # the last member (json) fits one block
        del data[end:]
    elif kind == "typeflag_old_regular":  # "\0": a regular file to tarfile too
        _set_field(data, head, 156, b"\x00")
    return data


HEADER_KINDS = ["bad_checksum", "mode_not_octal", "size_base256", "prefix", "no_end_block", "typeflag_old_regular"]


def _verify_outcome(ds: Path) -> str:
    try:
        verify(ds, progress=False, workers=2)
    except DatasetError as exc:
        return str(exc)
    return "ok"


def _refer_nothing(*_args):
    raise DatasetError("the shard was handed to the reference reader")


@pytest.mark.parametrize("workers", [1, 2])
def test_the_fast_path_clears_packed_shards_and_the_index_decides(ds, monkeypatch, workers):
    """Every shard the packer wrote is cleared by the fast path (none goes to the slow reference reader); one whose
    labels disagree with the index goes to it, which names the problem."""
    import retina_io.verify as verify_module

    with monkeypatch.context() as m:
        m.setattr(verify_module, "_parse_shard", _refer_nothing)
        assert verify(ds, progress=False, workers=workers).shards == len(_manifest(ds)["shards"])
    index = pl.read_parquet(ds / "index.parquet")
    first = index["shard"] == SHARD
    edited = index.with_columns(pl.when(first & (pl.int_range(pl.len()) == first.arg_true()[1])).then(1 - pl.col("DR"))
                                .otherwise(pl.col("DR")).alias("DR"))  # fmt: skip
    edited.write_parquet(ds / "index.parquet")
    m = _manifest(ds)
    m["files"]["index.parquet"] = hashlib.sha256((ds / "index.parquet").read_bytes()).hexdigest()
    _write_manifest(ds, m)
    with pytest.raises(DatasetError, match=f"{SHARD}: sample .* labels .* differ from index.parquet"):
        verify(ds, progress=False, workers=workers)


@pytest.mark.parametrize("kind", HEADER_KINDS)
def test_unusual_headers_are_left_to_tarfile(ds, monkeypatch, kind):
    """Headers outside the writer's exact form are not read by the fast path: the verdict is the tarfile reader's."""
    import retina_io.verify as verify_module

    data = _edit_header(kind, bytearray((ds / SHARD).read_bytes()))
    assert scan_members(bytes(data)) is None
    (ds / SHARD).write_bytes(data)
    m = _manifest(ds)
    m["shards"][0]["bytes"], m["shards"][0]["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    _write_manifest(ds, m)
    got = _verify_outcome(ds)
    monkeypatch.setattr(verify_module, "_fast_ok", lambda *_a: False)
    assert got == _verify_outcome(ds)
    assert (got == "ok") == (kind in ("size_base256", "no_end_block", "typeflag_old_regular")), got


def test_pax_headers_are_left_to_tarfile(ds):
    """A shard rewritten by a pax-writing tool (an extended header per member) still verifies, by tarfile."""
    members = _members(ds / SHARD)
    for info, _ in members:
        info.pax_headers = {"comment": "rewritten"}
    _rewrite_shard(ds, members, fmt=tarfile.PAX_FORMAT)
    assert scan_members((ds / SHARD).read_bytes()) is None
    assert verify(ds, progress=False, workers=2).samples == 40


def test_parallel_verify_names_the_first_bad_shard(ds, capsys):
    """Shards are checked in parallel; the error is the first bad shard's in manifest order."""
    shards = [s["path"] for s in _manifest(ds)["shards"]]
    for rel in (shards[0], shards[-1]):
        data = bytearray((ds / rel).read_bytes())
        data[700] ^= 0xFF
        (ds / rel).write_bytes(data)
    for workers in ("1", "2", "8"):
        capsys.readouterr()
        assert shard_main(["verify", str(ds), "--workers", workers, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{shards[0]} does not match its sha256" in err and shards[-1] not in err, err
