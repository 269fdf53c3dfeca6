"""``retina-shard pack``: images + a label table -> a packed dataset in shard format v1 (docs/contracts.md, contract 2).

The steps, each a function:

1. :func:`read_labels` (presets) validates every label row; :class:`ImageFolder` (sources) finds each row's file and
   every file that no row names. ``--out`` is locked (one pack at a time) and, when inside ``--images``, not scanned.
2. Every named file is read once and checked in parallel (:func:`probe_chunk`): a truncated, empty, non-image,
   non-regular or too large file is a reject; what DALI cannot decode as is gets a conversion plan; the checked bytes
   are hashed.
3. An image's identity is its content (:mod:`retina_io.identity`): rows whose files have the same bytes keep one row
   (the first id) when their labels agree and lose all when they conflict, so no image reaches two folds.
4. Accepted samples get keys (their rank by id), multilabel-stratified folds, a seeded global shuffle within each fold,
   and shards of ``shard_samples`` (the last shard of each fold may be shorter).
5. Worker processes write whole shards (:func:`write_shard`), storing only bytes with the checked hash; shards already
   complete from an earlier run with the same plan are kept, so rerunning a killed command resumes it.
   ``num_nodes``/``node_rank`` split the shards between machines on a shared filesystem. A file that changed after it
   was checked is rejected and the plan made again.
6. When every shard exists: ``index.parquet``, ``rejects.parquet`` and ``manifest.json`` (with per-shard sha256).

Nothing in the outputs depends on time, worker count or node count: the same inputs give byte-identical files.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image
from tqdm.auto import tqdm

from retina_io.dataset import FORMAT_VERSION
from retina_io.errors import RetinaError
from retina_io.folds import assign_folds, shuffle_within_folds
from retina_io.fsutil import TMP_MARK, require_out_folder
from retina_io.identity import split_duplicates
from retina_io.imaging import DEFAULT_MAX_PIXELS
from retina_io.pack_outputs import conversion_counts, write_outputs
from retina_io.pack_worker import (
    ProbeItem,
    ProbeOptions,
    ProbeResult,
    SampleSpec,
    ShardTask,
    marker_path,
    probe_chunk,
    write_shard,
)
from retina_io.presets import LabelTable, get_preset, read_labels
from retina_io.schema import CLASSES, encode_labels, format_keys
from retina_io.sources import ImageFolder

log = logging.getLogger(__name__)

PROBE_CHUNK = 256
MAX_PLANS = 3  # plans made when files change after their check, before giving up


class PackError(RetinaError, RuntimeError):
    """Packing cannot go on; the message names the input and what to do."""


@dataclass
class PackConfig:
    """Options of ``retina-shard pack`` (see its ``--help``)."""

    images: Path
    labels: Path
    preset: str
    out: Path
    folds: int = 5
    seed: int = 0
    workers: int | None = None
    shard_samples: int = 1000
    resize: int | None = None
    quality: int = 95
    group_column: str | None = None
    strict: bool = False
    check: str = "decode"
    max_pixels: int = DEFAULT_MAX_PIXELS
    id_column: str | None = None
    label_columns: tuple[str, ...] = ()
    path_column: str | None = None
    num_nodes: int = 1
    node_rank: int = 0
    progress: bool = True


@dataclass
class PackResult:
    out: Path
    complete: bool  # False while other nodes still write their shards
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    converted_by_reason: dict[str, int]
    samples_per_fold: list[int]
    shards: int
    shards_written: int  # by this run (the rest were complete already or belong to other nodes)
    bytes: int
    seconds: float
    manifest: dict = field(default_factory=dict)


def _validate(cfg: PackConfig) -> None:
    if cfg.folds < 2:
        raise PackError(f"--folds must be at least 2; got {cfg.folds}")
    if cfg.shard_samples < 1:
        raise PackError(f"--shard-samples must be at least 1; got {cfg.shard_samples}")
    if cfg.resize is not None and cfg.resize < 8:
        raise PackError(f"--resize is the short side in pixels (e.g. 512); got {cfg.resize}")
    if not 1 <= cfg.quality <= 100:
        raise PackError(f"--quality must be in 1..100; got {cfg.quality}")
    if not 1 <= cfg.max_pixels <= Image.MAX_IMAGE_PIXELS:
        raise PackError(f"--max-pixels must be in 1..{Image.MAX_IMAGE_PIXELS}; got {cfg.max_pixels}")
    if cfg.num_nodes < 1:
        raise PackError(f"--num-nodes must be >= 1; got {cfg.num_nodes}")
    if not 0 <= cfg.node_rank < cfg.num_nodes:
        raise PackError(f"--node-rank must be in 0..{cfg.num_nodes - 1} (--num-nodes {cfg.num_nodes}); "
                        f"got {cfg.node_rank}")  # fmt: skip
    if cfg.workers is not None and cfg.workers < 1:
        raise PackError(f"--workers must be >= 1; got {cfg.workers}")
    if not Path(cfg.images).is_dir():
        raise PackError(f"--images {cfg.images} is not a folder")
    out = Path(cfg.out)
    require_out_folder(out, PackError)
    if out.is_dir():
        ours = {"manifest.json", "index.parquet", "rejects.parquet", ".work"}
        foreign = [
            p.name for p in out.iterdir() if p.name not in ours and not (p.is_dir() and p.name.startswith("fold"))
        ]
        if foreign:
            raise PackError(
                f"--out {out} holds files that are not a packed dataset ({', '.join(sorted(foreign)[:5])}); "
                "choose an empty or new folder"
            )


def _pool(workers: int) -> ProcessPoolExecutor | None:
    """Worker processes, started now by ``fork``: they inherit the imported modules, so they start in milliseconds.

    ``spawn``/``forkserver`` would re-import the caller's main module (the console script, hence polars, sklearn and
    the planner: about 2 s) in every worker. The workers run only :mod:`retina_io.pack_worker` (PIL, numpy, hashlib,
    tarfile) and never polars; they are all started here, before this process runs any polars query.
    """
    if workers <= 1:
        return None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
    list(pool.map(_noop, range(workers)))  # start every worker now
    return pool


def _noop(x: int) -> int:
    return x


def _probe(
    folder: ImageFolder, items: list[ProbeItem], cfg: PackConfig, pool: ProcessPoolExecutor | None
) -> list[ProbeResult]:
    chunks = [items[i : i + PROBE_CHUNK] for i in range(0, len(items), PROBE_CHUNK)]
    root = str(folder.root)
    options = ProbeOptions(resize=cfg.resize, check=cfg.check, max_pixels=cfg.max_pixels)
    results: list[ProbeResult] = []
    with tqdm(total=len(items), desc="check images", unit="img", disable=not cfg.progress, smoothing=0.1) as bar:
        if pool is None:
            outs = (probe_chunk(root, c, options) for c in chunks)
        else:
            outs = pool.map(probe_chunk, [root] * len(chunks), chunks, [options] * len(chunks))
        for out in outs:
            results.extend(out)
            bar.update(len(out))
    results.sort(key=lambda r: r.index)
    return results


def _sample_json(row: dict, key: str, fold: int, plan, meta_cols: tuple[str, ...], present: tuple[str, ...]) -> str:
    doc = {
        "key": key,
        "id": row["id"],
        "fold": fold,
        "labels": {c: (row[c] if c in present else None) for c in CLASSES},
        "meta": {c: row[c] for c in meta_cols},
        "source": {"path": row["relpath"], "format": plan.source_format, "width": plan.width, "height": plan.height},
        "conversion": list(plan.conversions),
    }
    if row.get("group") is not None:
        doc["group"] = row["group"]
    return json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _reject(source: str, row: int | None, id_: str | None, path: str | None, reason: str, detail: str) -> dict:
    return {"source": source, "row": row, "id": id_, "path": _text(path), "reason": reason, "detail": _text(detail)}


def _text(s: str | None) -> str | None:
    """``s`` as UTF-8 text: a file name that is not UTF-8 (Python keeps its bytes as surrogates) shows them as
    ``\\xff`` escapes instead of failing the rejects table."""
    if s is None or s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def pack(cfg: PackConfig) -> PackResult:
    """Pack ``cfg.images`` + ``cfg.labels`` into ``cfg.out``; see the module docstring."""
    t0 = time.perf_counter()
    _validate(cfg)
    out = Path(cfg.out)
    pool = _pool(cfg.workers or os.cpu_count() or 1)  # forked before any polars query runs here
    try:
        return _pack(cfg, out, pool, t0)
    finally:
        if pool is not None:
            pool.shutdown()


@contextmanager
def out_lock(out: Path, *, num_nodes: int = 1, node_rank: int = 0) -> Iterator[None]:
    """Hold ``OUT/.work/lock`` while packing, so that a second pack into the same folder is refused instead of both
    writing. A single-node pack locks it exclusively; the nodes of a multi-node pack share it and each locks its own
    ``lock-node{R}``. ``--out`` is created here (an unwritable one fails now, naming it); when it was new and the
    pack fails before writing anything, it is removed again."""
    created = not out.exists()
    work = out / ".work"
    names = ["lock"] + ([f"lock-node{node_rank}"] if num_nodes > 1 else [])
    fds: list[int] = []
    try:
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            fds.append(os.open(work / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise PackError(f"--out {out} cannot be written ({exc.filename}: {exc.strerror or exc})") from exc
    finished = False
    try:
        try:
            fcntl.flock(fds[0], (fcntl.LOCK_EX if num_nodes == 1 else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            if num_nodes > 1:
                fcntl.flock(fds[1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = "another retina-shard pack" + (f" (node {node_rank})" if num_nodes > 1 else "")
            raise PackError(f"--out {out} is being written by {who} right now ({work / names[-1]} is locked); "
                            "wait for it to finish or choose another --out") from None  # fmt: skip
        yield
        finished = True
    finally:
        for fd in fds:
            os.close(fd)
        if created and not finished:
            for name in names:
                (work / name).unlink(missing_ok=True)
            for d in (work, out):
                try:
                    d.rmdir()  # only when empty: nothing was written
                except OSError:
                    break


def _pack(cfg: PackConfig, out: Path, pool: ProcessPoolExecutor | None, t0: float) -> PackResult:
    preset = get_preset(
        cfg.preset, id_column=cfg.id_column, label_columns=cfg.label_columns, path_column=cfg.path_column
    )
    table: LabelTable = read_labels(Path(cfg.labels), preset, group_column=cfg.group_column)
    with out_lock(out, num_nodes=cfg.num_nodes, node_rank=cfg.node_rank):
        folder = ImageFolder(Path(cfg.images), exclude=(Path(cfg.labels),), exclude_dirs=(out,))
        candidates, rejects, strays = _resolve_rows(table.frame, folder, preset)
        checked = _check_files(folder, candidates, cfg, pool, rejects)
        return _plan_and_write(cfg, out, pool, t0, preset, table, folder, checked, rejects, strays)


def _resolve_rows(frame: pl.DataFrame, folder: ImageFolder, preset) -> tuple[list[dict], list[dict], list[str]]:
    """Each label row that fits, with its file under --images; the rejected rows; the files no row names."""
    rejects: list[dict] = []
    claimed: set[str] = set()
    candidates: list[dict] = []
    for row in frame.to_dicts():
        # A file named by a row counts as labelled even when the row itself is rejected (it is not a stray).
        res = folder.resolve(row["relpath"], preset) if row["reason"] != "unsafe_path" else None
        if res is not None and res.claimed is not None:
            claimed.add(res.claimed)
        if row["reason"] is not None:
            rejects.append(_reject("label_row", row["row"], row["id"], row["relpath"], row["reason"], row["detail"]))
            continue
        if res.relpath is None:
            rejects.append(_reject("label_row", row["row"], row["id"], row["relpath"], res.reason, res.detail))
            continue
        row["relpath"] = res.relpath
        candidates.append(row)
    strays = [rel for rel in folder.files if rel not in claimed]
    for rel in strays:
        rejects.append(_reject("image_file", None, None, rel, "no_label_row", "no label row names this file"))
    return candidates, rejects, strays


def _check_files(folder: ImageFolder, candidates: list[dict], cfg: PackConfig, pool, rejects: list[dict]) -> list:
    """Read and check every file the rows name, each file once (rows naming the same file, through another spelling
    or a link, share its result). Returns ``(row, probe, file)`` for the rows whose image passed; rejects the rest."""
    index: dict = {}  # file identity -> probe index
    items: list[ProbeItem] = []
    row_file: list[int] = []
    for row in candidates:
        st = folder.files[row["relpath"]]
        ident = st.identity or row["relpath"]
        if ident not in index:
            index[ident] = len(items)
            items.append(ProbeItem(len(items), row["relpath"], st.size, st.mtime_ns))
        row_file.append(index[ident])
    probes = _probe(folder, items, cfg, pool)
    checked = []
    for row, i in zip(candidates, row_file, strict=True):
        pr = probes[i]
        if pr.plan is None:
            rejects.append(_reject("label_row", row["row"], row["id"], row["relpath"], pr.reason, pr.detail))
        else:
            checked.append((row, pr, i))
    return checked


def _plan_and_write(cfg, out, pool, t0, preset, table, folder, checked, rejects, strays) -> PackResult:
    """Keys, folds and shards for the checked rows, then the shards; made again without files that changed after
    their check (at most :data:`MAX_PLANS` plans)."""
    label_rows = table.frame.height
    for _ in range(MAX_PLANS):
        accepted, duplicates = split_duplicates([(row, pr) for row, pr, _ in checked])
        dup_rejects = [_reject("label_row", r["row"], r["id"], r["relpath"], *why) for r, *why in duplicates]
        if not accepted:
            reasons = Counter(r["reason"] for r in rejects + dup_rejects)
            raise PackError(
                f"nothing could be packed from {cfg.labels} and {cfg.images}: {label_rows} label rows, "
                f"{len(strays)} unlabelled files; rejected: {dict(sorted(reasons.items()))}. "
                f"Check --preset (now {cfg.preset!r}) and --images."
            )
        result = _write_plan(cfg, out, pool, t0, preset, table, folder, accepted, rejects + dup_rejects, strays)
        if isinstance(result, PackResult):
            return result
        changed = dict(result)  # relpath -> detail
        files = {i: changed[row["relpath"]] for row, _, i in checked if row["relpath"] in changed}  # file -> detail
        log.warning("%d files changed after they were checked: rejected, planning again", len(files))
        for row, _, i in checked:
            if i in files:
                rejects.append(_reject("label_row", row["row"], row["id"], row["relpath"], "file_changed", files[i]))
        checked = [c for c in checked if c[2] not in files]
    raise PackError(
        f"files under --images {cfg.images} kept changing while they were packed ({MAX_PLANS} plans made); "
        "pack a copy that nothing writes to"
    )


def _write_plan(cfg, out, pool, t0, preset, table, folder, accepted, rejects, strays) -> PackResult | list:
    """One plan: keys by id, folds, shuffled shards, written. A :class:`PackResult`, or the files that changed."""
    label_rows = table.frame.height
    accepted.sort(key=lambda rp: rp[0]["id"])
    n = len(accepted)
    present = preset.classes_present
    y = np.array([[row[c] or 0 for c in CLASSES] for row, _ in accepted], dtype=np.uint8)
    groups = None
    if any(row["group"] is not None for row, _ in accepted):
        groups = np.array([row["group"] if row["group"] is not None else f"\0{row['id']}" for row, _ in accepted])
    try:
        folds = assign_folds(y, k=cfg.folds, seed=cfg.seed, groups=groups)
    except ValueError as exc:
        raise PackError(f"fold assignment for {cfg.labels}: {exc}") from exc
    order = shuffle_within_folds(folds, seed=cfg.seed)
    keys = format_keys(range(n))

    shards: list[tuple[str, int, np.ndarray]] = []  # (relative tar path, fold, sample indices)
    for fold, idx in enumerate(order):
        for j, start in enumerate(range(0, len(idx), cfg.shard_samples)):
            shards.append((f"fold{fold}/{j:06d}.tar", fold, idx[start : start + cfg.shard_samples]))

    tasks = _plan_tasks(cfg, folder, accepted, keys, shards, table.metadata_columns, present)
    _remove_stale(out, {s for s, _, _ in shards})
    done, written, changed = _write_shards(cfg, tasks, pool)
    if changed:
        return changed

    missing = [s for s, _, _ in shards if s not in done]
    base = dict(
        out=out,
        accepted=n,
        rejected=len(rejects),
        rejected_by_reason=dict(sorted(Counter(r["reason"] for r in rejects).items())),
        converted_by_reason=conversion_counts(accepted),
        samples_per_fold=[int((folds == f).sum()) for f in range(cfg.folds)],
        shards=len(shards),
        shards_written=written,
    )
    if missing:
        log.info(
            "%d of %d shards are still being written by other nodes; the last node writes the manifest",
            len(missing),
            len(shards),
        )
        return PackResult(
            complete=False, bytes=sum(m["bytes"] for m in done.values()), seconds=time.perf_counter() - t0, **base
        )

    assert n + len(rejects) == label_rows + len(strays), "every input is accounted for"
    manifest = write_outputs(cfg, preset, table, accepted, keys, folds, shards, done, rejects, label_rows, strays)
    return PackResult(
        complete=True,
        bytes=sum(m["bytes"] for m in done.values()),
        seconds=time.perf_counter() - t0,
        manifest=manifest,
        **base,
    )


def _plan_tasks(cfg, folder, accepted, keys, shards, meta_cols, present):
    tasks = []
    for shard, fold, idx in shards:
        specs = []
        for i in idx:
            row, pr = accepted[i]
            labels = encode_labels([int(row[c] or 0) for c in CLASSES])
            meta = _sample_json(row, keys[i], fold, pr.plan, meta_cols, present)
            specs.append(SampleSpec(keys[i], row["relpath"], pr.plan, labels, meta, pr.sha256, pr.size))
        h = hashlib.sha256()
        h.update(json.dumps([FORMAT_VERSION, cfg.resize, cfg.quality]).encode())
        for s, i in zip(specs, idx, strict=True):
            pr = accepted[i][1]
            h.update(json.dumps([s.key, s.relpath, pr.size, pr.mtime_ns, pr.sha256, s.labels.hex(), s.meta]).encode())
        tasks.append(
            ShardTask(
                out=str(cfg.out),
                shard=shard,
                root=str(folder.root),
                samples=tuple(specs),
                resize=cfg.resize,
                quality=cfg.quality,
                plan_hash=h.hexdigest(),
                tmp_suffix=f"node{cfg.node_rank}",
            )
        )
    return tasks


def _read_marker(out: Path, task: ShardTask) -> dict | None:
    """A shard's done-marker if the shard is complete and was written from the same plan."""
    mpath = marker_path(out, task.shard)
    try:
        marker = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    tar = out / task.shard
    if marker.get("plan_hash") != task.plan_hash or not tar.is_file() or not tar.with_suffix(".idx").is_file():
        return None
    if tar.stat().st_size != marker.get("bytes"):
        return None
    return marker


def _remove_stale(out: Path, planned: set[str]) -> None:
    """Remove leftovers of a killed run (temporary files) and shards that the current plan does not have."""
    if not out.is_dir():
        return
    for d in sorted(out.glob("fold*")):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            rel = f"{d.name}/{p.name}"
            if TMP_MARK in p.name:
                continue  # may belong to another node still writing; replaced when that shard is rewritten
            if p.suffix in (".tar", ".idx") and f"{d.name}/{p.stem}.tar" not in planned:
                log.warning("removing %s: not part of this pack's plan (left from an earlier pack)", rel)
                p.unlink()


def _write_shards(cfg: PackConfig, tasks: list[ShardTask], pool) -> tuple[dict[str, dict], int, list]:
    """Write this node's shards that are not complete yet; the done-markers by shard, how many were written, and the
    ``(relpath, detail)`` of source files that changed after their check (their shards are not written)."""
    out = Path(cfg.out)
    done: dict[str, dict] = {}
    changed: list = []
    todo: list[ShardTask] = []
    for gi, task in enumerate(tasks):
        marker = _read_marker(out, task)
        if marker is not None:
            done[task.shard] = marker
        elif gi % cfg.num_nodes == cfg.node_rank:
            todo.append(task)
    if done:
        log.info("resuming: %d of %d shards are complete already", len(done), len(tasks))
    total = sum(len(t.samples) for t in todo)
    t0, nbytes = time.perf_counter(), 0
    with tqdm(total=total, desc="write shards", unit="img", disable=not cfg.progress, smoothing=0.1) as bar:
        results = (write_shard(t) for t in todo) if pool is None else pool.map(write_shard, todo)
        for marker in results:
            if "changed" in marker:
                changed += [tuple(c) for c in marker["changed"]]
                bar.update(sum(1 for t in todo if t.shard == marker["shard"] for _ in t.samples))
                continue
            done[marker["shard"]] = marker
            nbytes += marker["bytes"]
            bar.update(marker["samples"])
            bar.set_postfix_str(f"{nbytes / 1e6 / max(time.perf_counter() - t0, 1e-9):.1f} MB/s")
    # Shards other nodes finished meanwhile.
    for task in tasks:
        if task.shard not in done and (marker := _read_marker(out, task)) is not None:
            done[task.shard] = marker
    return done, len(todo), changed
