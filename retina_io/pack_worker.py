"""The work one packer process does: check a chunk of images, or write one whole shard.

Kept free of polars and of the planner so that worker processes start fast and hold little memory. A shard is
written under a temporary name and renamed into place only when complete (``.idx`` first, then ``.tar``, then the
done-marker in ``.work/``), so a killed run leaves either a whole shard or nothing that counts.

Reading (:func:`read_image_file`): only regular files are opened (a named pipe would block, a device would never
end), without blocking; a file whose size or time differs from what the scan saw, or that changes while it is read,
is rejected; a file larger than any image within the pixel limit is rejected before it is read. The check reads each
file once and hashes that buffer (sha256: the image's identity); the shard writer stores only bytes with that same
hash, so what is stored is what was checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from retina_io.fsutil import tmp_path, write_atomic
from retina_io.imaging import ImagePlan, ImageRejected, max_file_bytes, plan_image, prepare_image
from retina_io.tario import TarShardWriter


@dataclass(frozen=True)
class ProbeOptions:
    resize: int | None
    check: str
    max_pixels: int


@dataclass(frozen=True)
class ProbeItem:
    """One file to check, with what the scan saw of it."""

    index: int
    relpath: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ProbeResult:
    index: int
    plan: ImagePlan | None
    reason: str | None = None
    detail: str | None = None
    size: int = -1
    mtime_ns: int = 0
    sha256: str | None = None  # of the bytes that were checked


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


def probe_chunk(root: str, items: list[ProbeItem], options: ProbeOptions) -> list[ProbeResult]:
    """Read and check each item under ``root``; a bad image becomes a reject, never an exception."""
    out = []
    max_bytes = max_file_bytes(options.max_pixels)
    for it in items:
        try:
            data, st = read_image_file(
                os.path.join(root, it.relpath), it.relpath, max_bytes=max_bytes, expect=(it.size, it.mtime_ns)
            )
        except ImageRejected as exc:
            out.append(ProbeResult(it.index, None, exc.reason, exc.detail))
            continue
        try:
            plan = plan_image(data, resize=options.resize, check=options.check, max_pixels=options.max_pixels)
        except ImageRejected as exc:
            out.append(ProbeResult(it.index, None, exc.reason, exc.detail, st.st_size, st.st_mtime_ns))
            continue
        sha = hashlib.sha256(data).hexdigest()
        out.append(ProbeResult(it.index, plan, None, None, st.st_size, st.st_mtime_ns, sha))
    return out


@dataclass(frozen=True)
class SampleSpec:
    key: str
    relpath: str
    plan: ImagePlan
    labels: bytes  # the 11 label bytes
    meta: str  # the sample's json text
    sha256: str  # of the bytes that were checked: only those bytes are stored
    size: int


@dataclass(frozen=True)
class ShardTask:
    out: str  # dataset folder
    shard: str  # e.g. "fold0/000003.tar"
    root: str  # --images
    samples: tuple[SampleSpec, ...]
    resize: int | None
    quality: int
    plan_hash: str
    tmp_suffix: str  # unique per node, so nodes on a shared filesystem never write the same temporary file


def marker_path(out: str | Path, shard: str) -> Path:
    return Path(out) / ".work" / (shard.replace("/", "-").removesuffix(".tar") + ".json")


def write_shard(task: ShardTask) -> dict:
    """Write one shard and its ``.idx``; return (and persist) its done-marker.

    A source file whose bytes are no longer those that were checked (another sha256) is not stored: the shard is not
    written and the result names every such file under ``"changed"`` (the planner rejects them and plans again).
    """
    tar_path = Path(task.out) / task.shard
    idx_path = tar_path.with_suffix(".idx")
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_tar = tmp_path(tar_path, task.tmp_suffix)
    writer = TarShardWriter(tmp_tar)
    stored, changed = [], []
    try:
        for s in task.samples:
            try:
                data, _ = read_image_file(os.path.join(task.root, s.relpath), s.relpath, max_bytes=s.size)
                if hashlib.sha256(data).hexdigest() != s.sha256:
                    raise ImageRejected("file_changed", f"{s.relpath} changed after it was checked; not stored")
            except ImageRejected as exc:
                why = exc.detail if exc.reason == "file_changed" else f"{exc.detail} (after it was checked)"
                changed.append([s.relpath, why])
                continue
            if changed:
                continue  # this shard is not written; only look for other changed files
            try:
                body, width, height = prepare_image(data, s.plan, resize=task.resize, quality=task.quality)
            except Exception as exc:
                raise RuntimeError(f"{s.relpath}: checked, but converting it failed ({exc})") from exc
            writer.add(s.key, [(s.plan.ext, body), ("json", s.meta.encode("utf-8")), ("labels", s.labels)])
            stored.append([s.key, s.plan.ext, len(body), width, height])
        if changed:
            writer.abort()
            return {"shard": task.shard, "changed": changed}
        stats = writer.close()
    except BaseException:
        writer.abort()
        raise
    write_atomic(idx_path, stats.idx, suffix=task.tmp_suffix)
    os.replace(tmp_tar, tar_path)
    marker = {
        "shard": task.shard,
        "plan_hash": task.plan_hash,
        "samples": stats.samples,
        "bytes": stats.bytes,
        "sha256": stats.sha256,
        "stored": stored,
    }
    write_atomic(marker_path(task.out, task.shard), json.dumps(marker, separators=(",", ":")), suffix=task.tmp_suffix)
    return marker
