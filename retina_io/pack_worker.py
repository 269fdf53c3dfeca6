"""The work one packer process does: check a chunk of images, or write one whole shard.

Kept free of polars and of the planner so that worker processes start fast and hold little memory. A shard is
written under a temporary name and renamed into place only when complete (``.idx`` first, then ``.tar``, then the
done-marker in ``.work/``), so a killed run leaves either a whole shard or nothing that counts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from retina_io.fsutil import tmp_path, write_atomic
from retina_io.imaging import ImagePlan, ImageRejected, plan_image, prepare_image
from retina_io.tario import TarShardWriter


@dataclass(frozen=True)
class ProbeResult:
    index: int
    plan: ImagePlan | None
    reason: str | None = None
    detail: str | None = None
    size: int = -1
    mtime_ns: int = 0


def probe_chunk(root: str, items: list[tuple[int, str]], resize: int | None, check: str) -> list[ProbeResult]:
    """Read and check each ``(index, relpath)`` under ``root``; a bad image becomes a reject, never an exception."""
    out = []
    for index, rel in items:
        path = os.path.join(root, rel)
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            out.append(ProbeResult(index, None, "unreadable_file", f"{rel}: {exc.strerror or exc}"))
            continue
        try:
            plan = plan_image(data, resize=resize, check=check)
        except ImageRejected as exc:
            out.append(ProbeResult(index, None, exc.reason, exc.detail, st.st_size, st.st_mtime_ns))
            continue
        out.append(ProbeResult(index, plan, None, None, st.st_size, st.st_mtime_ns))
    return out


@dataclass(frozen=True)
class SampleSpec:
    key: str
    relpath: str
    plan: ImagePlan
    labels: bytes  # the 11 label bytes
    meta: str  # the sample's json text


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
    """Write one shard and its ``.idx``; return (and persist) its done-marker."""
    tar_path = Path(task.out) / task.shard
    idx_path = tar_path.with_suffix(".idx")
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_tar = tmp_path(tar_path, task.tmp_suffix)
    writer = TarShardWriter(tmp_tar)
    stored = []
    try:
        for s in task.samples:
            with open(os.path.join(task.root, s.relpath), "rb") as f:
                data = f.read()
            try:
                body, width, height = prepare_image(data, s.plan, resize=task.resize, quality=task.quality)
            except Exception as exc:
                raise RuntimeError(
                    f"{s.relpath} decoded when it was checked but failed now ({exc}); did the file change during "
                    "packing? Rerun the same command to resume."
                ) from exc
            writer.add(s.key, [(s.plan.ext, body), ("json", s.meta.encode("utf-8")), ("labels", s.labels)])
            stored.append([s.key, s.plan.ext, len(body), width, height])
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
