"""The work one packer process does: check a chunk of images (and keep what it will store), or write one whole shard.

Kept free of polars and of the planner so that worker processes start fast and hold little memory. A shard is
written under a temporary name and renamed into place only when complete (``.idx`` first, then ``.tar``, then the
done-marker in ``.work/``), so a killed run leaves either a whole shard or nothing that counts.

Reading (:func:`read_image_file`): only regular files are opened (a named pipe would block, a device would never
end), without blocking; a file whose size or time differs from what the scan saw, or that changes while it is read,
is rejected; a file larger than any image within the pixel limit is rejected before it is read.

Each image is read once (:func:`probe_chunk`): its bytes are checked, hashed (sha256: the image's identity),
converted if they need to be, and what the shard will hold is appended to this process's spool file
(``OUT/.work/spool-nodeR/PID.bin``). The shard writer (:func:`write_shard`) copies from the spools, so what is stored
is exactly what was checked, without reading (or hashing) any source file a second time. The spool is the price of
the one read: the plan (keys, folds, shards) needs every image's hash first (content duplicates), so no shard can be
written while the images are read; it holds about the dataset's size until the pack completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from retina_io.fsutil import tmp_path, write_atomic
from retina_io.imaging import ImageRejected, max_file_bytes, plan_image, prepare_image
from retina_io.schema import CLASSES
from retina_io.tario import TarShardWriter


@dataclass(frozen=True)
class ProbeOptions:
    resize: int | None
    check: str
    max_pixels: int
    quality: int
    spool_dir: str  # where each process appends the bytes it will store


# The columns :func:`probe_chunk` returns, one value per file (``reason`` null: accepted).
PROBE_COLUMNS = ("probe", "reason", "detail", "size", "mtime_ns", "sha256", "source_format", "width", "height",
                 "conversion", "ext", "out_width", "out_height", "offset", "length")  # fmt: skip

_spool: dict = {}  # this process's spool: {"path": str, "file": open file}


def _spool_file(spool_dir: str):
    if _spool.get("dir") != spool_dir or _spool.get("pid") != os.getpid():
        os.makedirs(spool_dir, exist_ok=True)
        path = os.path.join(spool_dir, f"{os.getpid()}.bin")
        _spool.update(dir=spool_dir, pid=os.getpid(), path=path, file=open(path, "ab", buffering=1 << 20))  # noqa: SIM115
    return _spool["path"], _spool["file"]


def close_spool() -> None:
    """Close this process's spool file (the planner's own, when it checked images itself)."""
    f = _spool.pop("file", None)
    if f is not None:
        f.close()
    _spool.clear()


def read_image_file(path: str, rel: str, *, max_bytes: int, expect: tuple[int, int] | None = None):
    """The bytes of the regular file ``path`` and its ``os.stat_result``, read once; :class:`ImageRejected` when it is
    no regular file, differs from ``expect`` (size, mtime in ns), changes while read, is over ``max_bytes`` or cannot
    be read."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = file_kind(st.st_mode)
            raise ImageRejected("not_a_regular_file", f"{rel} is a {kind}; only regular files are read")
        _unchanged(rel, expect, st)
        if st.st_size > max_bytes:
            raise ImageRejected("image_too_large", f"{rel} has {st.st_size} bytes, more than an image within "
                                                   f"--max-pixels can need ({max_bytes}); not read")  # fmt: skip
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # never blocks, even on a FIFO
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise ImageRejected("not_a_regular_file", f"{rel} became a {file_kind(before.st_mode)} while packing")
            _unchanged(rel, (st.st_size, st.st_mtime_ns), before)
            with open(fd, "rb", closefd=False) as f:
                data = f.read(st.st_size + 1)
            after = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ImageRejected("unreadable_file", f"{rel}: {exc.strerror or exc}") from exc
    if len(data) != st.st_size or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise ImageRejected("file_changed", f"{rel} changed while it was read ({st.st_size} -> {len(data)} bytes)")
    return data, st


def file_kind(mode: int) -> str:
    """A file type in words, for reject details."""
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):  # fmt: skip
        if test(mode):
            return name
    return "special file"


def _unchanged(rel: str, expect: tuple[int, int] | None, st: os.stat_result) -> None:
    if expect is not None and (st.st_size, st.st_mtime_ns) != tuple(expect):
        raise ImageRejected(
            "file_changed",
            f"{rel} changed after --images was scanned (size {expect[0]} -> {st.st_size} bytes, or a new "
            "modification time); rerun to pack its new contents",
        )


def probe_chunk(root: str, start: int, relpaths: list[str], expect: list[tuple[int, int]], options: ProbeOptions):
    """Read, check, hash and (if needed) convert files ``start, start + 1, …`` under ``root``; append what will be
    stored to this process's spool. Returns ``(spool path, columns)`` with :data:`PROBE_COLUMNS`; a bad image
    becomes a reject, never an exception."""
    cols: dict[str, list] = {c: [] for c in PROBE_COLUMNS}
    max_bytes = max_file_bytes(options.max_pixels)
    spool_path, spool = _spool_file(options.spool_dir)
    offset = spool.tell()
    for i, (rel, exp) in enumerate(zip(relpaths, expect, strict=True)):
        row = dict.fromkeys(PROBE_COLUMNS)
        row["probe"] = start + i
        try:
            data, st = read_image_file(os.path.join(root, rel), rel, max_bytes=max_bytes, expect=exp)
            row["size"], row["mtime_ns"] = st.st_size, st.st_mtime_ns
            plan = plan_image(data, resize=options.resize, check=options.check, max_pixels=options.max_pixels)
            try:
                body, width, height = prepare_image(data, plan, resize=options.resize, quality=options.quality)
            except Exception as exc:
                raise ImageRejected("corrupt_image", f"checked, but converting it failed ({exc})") from exc
        except ImageRejected as exc:
            row["reason"], row["detail"] = exc.reason, exc.detail
        else:
            row.update(
                sha256=hashlib.sha256(data).digest(),
                source_format=plan.source_format,
                width=plan.width,
                height=plan.height,
                conversion=",".join(plan.conversions) or None,
                ext=plan.ext,
                out_width=width,
                out_height=height,
                offset=offset,
                length=len(body),
            )
            spool.write(body)
            offset += len(body)
        for c in PROBE_COLUMNS:
            cols[c].append(row[c])
    spool.flush()
    return spool_path, cols


@dataclass(frozen=True)
class ShardTask:
    out: str  # dataset folder
    shard: str  # e.g. "fold0/000003.tar"
    fold: int
    samples: dict  # column -> one value per sample, in tar order (see write_shard)
    spools: tuple[str, ...]  # spool file paths, by the samples' "spool" number
    present: tuple[str, ...]  # classes the dataset labels
    meta_columns: tuple[str, ...]
    resize: int | None
    quality: int
    format_version: int
    write: bool  # this node writes it; otherwise only look for its done-marker
    tmp_suffix: str  # unique per node, so nodes on a shared filesystem never write the same temporary file


def marker_path(out: str | Path, shard: str) -> Path:
    return Path(out) / ".work" / (shard.replace("/", "-").removesuffix(".tar") + ".json")


def _sample_json(s: dict, j: int, fold: int, present, meta_cols) -> str:
    doc = {
        "key": s["key"][j],
        "id": s["id"][j],
        "fold": fold,
        "labels": {c: (s[c][j] if c in present else None) for c in CLASSES},
        "meta": {c: s[c][j] for c in meta_cols},
        "source": {
            "path": s["relpath"][j],
            "format": s["source_format"][j],
            "width": s["width"][j],
            "height": s["height"][j],
        },  # fmt: skip
        "conversion": s["conversion"][j].split(",") if s["conversion"][j] else [],
    }
    if s["group"][j] is not None:
        doc["group"] = s["group"][j]
    return json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _plan_hash(task: ShardTask, metas: list[str], labels: list[bytes]) -> str:
    """What the shard is made from: a complete shard with the same hash is kept (resume)."""
    s = task.samples
    h = hashlib.sha256()
    h.update(json.dumps([task.format_version, task.resize, task.quality]).encode())
    for j, meta in enumerate(metas):
        doc = [s["key"][j], s["relpath"][j], s["size"][j], s["mtime_ns"][j], s["sha256"][j].hex(), labels[j].hex()]
        h.update(json.dumps([*doc, meta]).encode())
    return h.hexdigest()


def read_marker(out: str | Path, shard: str, plan_hash: str) -> dict | None:
    """A shard's done-marker if the shard is complete and was written from the same plan."""
    try:
        marker = json.loads(marker_path(out, shard).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tar = Path(out) / shard
    if not isinstance(marker, dict) or marker.get("plan_hash") != plan_hash:
        return None
    if not tar.is_file() or not tar.with_suffix(".idx").is_file() or tar.stat().st_size != marker.get("bytes"):
        return None
    return marker


def write_shard(task: ShardTask) -> dict:
    """Write one shard and its ``.idx`` from the spools; return (and persist) its done-marker. A shard complete from
    an earlier run of the same plan is kept (its marker is returned with ``"kept": True``); a shard another node
    writes and that is not complete yet gives ``{"shard", "plan_hash", "missing": True}``."""
    s = task.samples
    n = len(s["key"])
    labels = [bytes(s[c][j] or 0 for c in CLASSES) for j in range(n)]
    metas = [_sample_json(s, j, task.fold, task.present, task.meta_columns) for j in range(n)]
    plan_hash = _plan_hash(task, metas, labels)
    marker = read_marker(task.out, task.shard, plan_hash)
    if marker is not None:
        return {**marker, "kept": True}
    if not task.write:
        return {"shard": task.shard, "plan_hash": plan_hash, "missing": True}
    tar_path = Path(task.out) / task.shard
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_tar = tmp_path(tar_path, task.tmp_suffix)
    fds = [os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) for p in task.spools]
    writer = TarShardWriter(tmp_tar)
    try:
        for j in range(n):
            body = os.pread(fds[s["spool"][j]], s["length"][j], s["offset"][j])
            if len(body) != s["length"][j]:
                raise RuntimeError(f"spool {task.spools[s['spool'][j]]} ends early: the pack's .work folder changed")
            writer.add(s["key"][j], [(s["ext"][j], body), ("json", metas[j].encode("utf-8")), ("labels", labels[j])])
        stats = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        for fd in fds:
            os.close(fd)
    write_atomic(tar_path.with_suffix(".idx"), stats.idx, suffix=task.tmp_suffix)
    os.replace(tmp_tar, tar_path)
    marker = {"shard": task.shard, "plan_hash": plan_hash, "samples": stats.samples, "bytes": stats.bytes,
              "sha256": stats.sha256}  # fmt: skip
    write_atomic(marker_path(task.out, task.shard), json.dumps(marker, separators=(",", ":")), suffix=task.tmp_suffix)
    return marker
