"""``retina-shard pack``: images + a label table -> a packed dataset in shard format v1 (docs/contracts.md, contract 2).

The steps, each a function; the planner (this process) holds only columns (polars/numpy), never a Python object per
image, and does no per-image work when there are worker processes:

1. :func:`read_labels` (presets) validates every label row; :class:`ImageFolder` (sources) scans ``--images`` into a
   table and finds each row's file and every file that no row names. ``--out`` is locked (one pack at a time) and,
   when inside ``--images``, not scanned.
2. Every named file is read once, in parallel (:func:`probe_chunk`): a truncated, empty, non-image, non-regular or
   too large file is a reject; what DALI cannot decode as is is converted; the checked bytes are hashed, and what the
   shard will hold is appended to the worker's spool file (``OUT/.work/spool-nodeR/``).
3. An image's identity is its content (:mod:`retina_io.identity`): rows whose files have the same bytes keep one row
   (the first id) when their labels agree and lose all when they conflict, so no image reaches two folds.
4. Accepted samples get keys (their rank by id), multilabel-stratified folds, a seeded global shuffle within each fold,
   and shards of ``shard_samples`` (the last shard of each fold may be shorter).
5. Worker processes write whole shards (:func:`write_shard`) from the spools, so what is stored is what was checked
   without a second read of any image; a bounded number of shard tasks is in flight at a time. Shards already
   complete from an earlier run with the same plan are kept, so rerunning a killed command resumes it.
   ``num_nodes``/``node_rank`` split the shards between machines on a shared filesystem.
6. When every shard exists: ``index.parquet``, ``rejects.parquet`` and ``manifest.json`` (with per-shard sha256).

Nothing in the outputs depends on time, worker count or node count: the same inputs give byte-identical files.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import shutil
import time
from collections import deque
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
from retina_io.pack_outputs import PROBE_SCHEMA, conversion_counts, write_outputs
from retina_io.pack_worker import ProbeOptions, ShardTask, close_spool, probe_chunk, read_marker, write_shard
from retina_io.presets import LabelTable, get_preset, read_labels
from retina_io.schema import CLASSES, KEY_WIDTH
from retina_io.sources import ImageFolder

log = logging.getLogger(__name__)

PROBE_CHUNK = 256


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
        spool_dir = out / ".work" / f"spool-node{cfg.node_rank}"
        shutil.rmtree(spool_dir, ignore_errors=True)  # left by a killed run
        try:
            folder = ImageFolder(Path(cfg.images), exclude=(Path(cfg.labels),), exclude_dirs=(out,))
            candidates, rejects, n_strays = _resolve_rows(table, folder, preset)
            label_rows = table.frame.height
            table = LabelTable(table.preset, table.frame.clear(), table.metadata_columns)  # the rows: in candidates
            checked, spools = _check_files(folder, candidates, cfg, pool, spool_dir, rejects)
            del folder, candidates
            accepted, duplicates = split_duplicates(checked)
            del checked
            rejects.append(_rejects(duplicates, "label_row"))
            work = {"accepted": accepted}  # handed over, so that only the callee holds it (and frees it)
            del accepted
            return _plan_and_write(cfg, out, pool, t0, preset, table, label_rows, work, spools, rejects, n_strays)
        finally:
            close_spool()
            shutil.rmtree(spool_dir, ignore_errors=True)


def _rejects(frame: pl.DataFrame, source: str, *, reason: str = "reason", detail: str = "detail") -> pl.DataFrame:
    """Rows of ``frame`` (``row``, ``id``, ``relpath``) as rejects of ``source`` (REJECT_SCHEMA)."""
    return frame.select(
        source=pl.lit(source, dtype=pl.String),
        row=pl.col("row").cast(pl.Int64),
        id=pl.col("id"),
        path=pl.col("relpath"),
        reason=pl.col(reason),
        detail=pl.col(detail),
    )


def _resolve_rows(table: LabelTable, folder: ImageFolder, preset) -> tuple[pl.DataFrame, list[pl.DataFrame], int]:
    """Each label row that fits, with its file under --images (``relpath`` replaced by the file's, ``file`` and
    ``ident`` its scan row and identity); the rejects; the number of files no row names (rejected as strays)."""
    frame = table.frame
    # A file named by a row counts as labelled even when the row itself is rejected (it is not a stray).
    active = (frame["reason"] != "unsafe_path").fill_null(True)
    res = folder.resolve_rows(frame["relpath"], active, preset)
    frame = frame.with_columns(res.select(file="file", _claimed="claimed", _reason="reason", _detail="detail"))
    ok = pl.col("reason").is_null()
    rejects = [
        _rejects(frame.filter(~ok), "label_row"),
        _rejects(frame.filter(ok & pl.col("_reason").is_not_null()), "label_row", reason="_reason", detail="_detail"),
    ]
    files = folder.table.select("file", "ident", _path="relpath")
    candidates = (
        frame.filter(ok & pl.col("_reason").is_null())
        .drop("_claimed", "_reason", "_detail", "reason", "detail")
        .join(files, on="file", how="left", maintain_order="left")
        .with_columns(relpath=pl.col("_path"))
        .drop("_path")
    )
    strays = folder.table.filter(~pl.col("file").is_in(frame["_claimed"].drop_nulls().implode()))
    rejects.append(
        strays.select(
            source=pl.lit("image_file"),
            row=pl.lit(None, dtype=pl.Int64),
            id=pl.lit(None, dtype=pl.String),
            path=pl.col("relpath"),
            reason=pl.lit("no_label_row"),
            detail=pl.lit("no label row names this file"),
        )
    )
    return candidates, rejects, strays.height


def _check_files(folder: ImageFolder, candidates: pl.DataFrame, cfg: PackConfig, pool, spool_dir: Path, rejects):
    """Read and check every file the rows name, each file once (rows naming the same file, through another spelling
    or a link, share its result). Returns the rows whose image passed, with the check's columns; rejects the rest."""
    files = candidates.unique("ident", keep="first", maintain_order=True).select("ident", "relpath")
    files = files.join(folder.table.select("file", "size", "mtime_ns"), left_on="ident", right_on="file", how="left",
                       maintain_order="left").with_row_index("probe")  # fmt: skip
    probes, spools = _probe(folder, files, cfg, pool, spool_dir)
    rows = candidates.join(files.select("ident", "probe"), on="ident", how="left", maintain_order="left")
    rows = rows.join(probes, on="probe", how="left", maintain_order="left")
    rejects.append(_rejects(rows.filter(pl.col("reason").is_not_null()), "label_row"))
    return rows.filter(pl.col("reason").is_null()).drop("reason", "detail", "probe", "file", "ident"), spools


def _imap(pool: ProcessPoolExecutor | None, fn, args: Iterator[tuple], window: int) -> Iterator:
    """``fn(*a)`` for each of ``args``, in order, at most ``window`` submitted at a time (``pool.map`` would submit,
    and hold, every task at once)."""
    if pool is None:
        yield from (fn(*a) for a in args)
        return
    pending: deque = deque()
    for a in args:
        pending.append(pool.submit(fn, *a))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _probe(folder: ImageFolder, files: pl.DataFrame, cfg: PackConfig, pool, spool_dir: Path):
    """The check's columns (:data:`PROBE_SCHEMA` and ``spool``, a number) for each file, by ``probe``, and the spool
    files by number: what will be stored of each accepted image lies in them."""
    root = str(folder.root)
    options = ProbeOptions(cfg.resize, cfg.check, cfg.max_pixels, cfg.quality, str(spool_dir))
    chunks = (
        (root, start, c["relpath"].to_list(), list(zip(c["size"].to_list(), c["mtime_ns"].to_list(), strict=True)),
         options)
        for start in range(0, files.height, PROBE_CHUNK)
        for c in (files.slice(start, PROBE_CHUNK),)
    )  # fmt: skip
    spools: dict[str, int] = {}
    frames = []
    with tqdm(total=files.height, desc="check images", unit="img", disable=not cfg.progress, smoothing=0.1) as bar:
        for spool, cols in _imap(pool, probe_chunk, chunks, window=4 * max(1, cfg.workers or os.cpu_count() or 1)):
            df = pl.DataFrame(cols, schema=PROBE_SCHEMA)
            frames.append(df.with_columns(spool=pl.lit(spools.setdefault(spool, len(spools)), dtype=pl.Int32)))
            bar.update(df.height)
    frame = pl.concat(frames, rechunk=True) if frames else pl.DataFrame(schema={**PROBE_SCHEMA, "spool": pl.Int32})
    return frame, tuple(sorted(spools, key=spools.get))


def _plan_and_write(cfg, out, pool, t0, preset, table, label_rows, work, spools, rejects, n_strays) -> PackResult:
    """Keys by id, folds, shuffled shards for the accepted rows (``work["accepted"]``), then the shards and the
    outputs."""
    accepted = work.pop("accepted")
    rejects = pl.concat(rejects, how="vertical_relaxed")
    by_reason = dict(sorted(rejects["reason"].value_counts().iter_rows()))
    if accepted.height == 0:
        raise PackError(
            f"nothing could be packed from {cfg.labels} and {cfg.images}: {label_rows} label rows, "
            f"{n_strays} unlabelled files; rejected: {by_reason}. "
            f"Check --preset (now {cfg.preset!r}) and --images."
        )
    accepted = accepted.drop("row").sort("id", maintain_order=True)
    n = accepted.height
    y = accepted.select(CLASSES).fill_null(0).to_numpy().astype(np.uint8)
    groups = None
    if accepted["group"].is_not_null().any():
        groups = accepted.select(pl.coalesce("group", "\0" + pl.col("id")).rank("dense")).to_series().to_numpy()
    try:
        folds = assign_folds(y, k=cfg.folds, seed=cfg.seed, groups=groups)
    except ValueError as exc:
        raise PackError(f"fold assignment for {cfg.labels}: {exc}") from exc
    del y, groups
    order = shuffle_within_folds(folds, seed=cfg.seed)
    shards: list[tuple[str, int, int, int]] = []  # (relative tar path, fold, first position in tar order, samples)
    pos = 0
    for fold, idx in enumerate(order):
        for j, start in enumerate(range(0, len(idx), cfg.shard_samples)):
            count = min(cfg.shard_samples, len(idx) - start)
            shards.append((f"fold{fold}/{j:06d}.tar", fold, pos, count))
            pos += count
    # The plan: one row per sample in tar order (fold, shard, position), with its key (rank by id) and fold.
    shard_of = np.repeat(np.arange(len(shards), dtype=np.uint32), [c for *_, c in shards])
    plan = accepted.with_columns(
        key=pl.int_range(pl.len()).cast(pl.String).str.zfill(KEY_WIDTH), fold=pl.Series(folds, dtype=pl.Int32)
    )
    plan = plan.select(pl.all().gather(np.concatenate(order))).with_columns(
        shard=pl.Series([s for s, *_ in shards]).gather(shard_of)
    )
    del accepted, order, shard_of
    _remove_stale(out, {s for s, *_ in shards})
    done, written = _write_shards(cfg, plan, shards, spools, table.metadata_columns, preset.classes_present, pool)

    missing = [s for s, *_ in shards if s not in done]
    conversions = conversion_counts(plan["conversion"])
    base = dict(
        out=out,
        accepted=n,
        rejected=rejects.height,
        rejected_by_reason=by_reason,
        converted_by_reason=conversions,
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

    assert n + rejects.height == label_rows + n_strays, "every input is accounted for"
    manifest = write_outputs(cfg, preset, table, plan, shards, done, rejects, label_rows, n_strays, conversions)
    return PackResult(
        complete=True,
        bytes=sum(m["bytes"] for m in done.values()),
        seconds=time.perf_counter() - t0,
        manifest=manifest,
        **base,
    )


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


TASK_COLUMNS = ("key", "id", "group", "relpath", *CLASSES, "size", "mtime_ns", "sha256", "source_format", "width",
                "height", "conversion", "ext", "spool", "offset", "length")  # fmt: skip


def _write_shards(cfg: PackConfig, plan: pl.DataFrame, shards, spools, meta_cols, present, pool):
    """Write this node's shards that are not complete yet (the workers keep those complete from an earlier run with
    the same plan); the done-markers by shard and how many shards this run wrote."""
    out = Path(cfg.out)
    columns = [c for c in dict.fromkeys((*TASK_COLUMNS, *meta_cols))]
    tasks = (
        (
            ShardTask(
                out=str(out),
                shard=shard,
                fold=fold,
                samples=plan.slice(start, count).select(columns).to_dict(as_series=False),
                spools=spools,
                present=present,
                meta_columns=meta_cols,
                resize=cfg.resize,
                quality=cfg.quality,
                format_version=FORMAT_VERSION,
                write=gi % cfg.num_nodes == cfg.node_rank,
                tmp_suffix=f"node{cfg.node_rank}",
            ),
        )
        for gi, (shard, fold, start, count) in enumerate(shards)
    )
    done: dict[str, dict] = {}
    waiting: dict[str, str] = {}  # shard -> plan hash, for shards other nodes write
    written = kept = 0
    t0, nbytes = time.perf_counter(), 0
    window = 2 * max(1, cfg.workers or os.cpu_count() or 1)
    with tqdm(total=plan.height, desc="write shards", unit="img", disable=not cfg.progress, smoothing=0.1) as bar:
        for marker in _imap(pool, write_shard, tasks, window):
            if marker.get("missing"):
                waiting[marker["shard"]] = marker["plan_hash"]
                continue
            was_kept = bool(marker.pop("kept", False))
            kept += was_kept
            written += not was_kept
            done[marker["shard"]] = marker
            nbytes += marker["bytes"]
            bar.update(marker["samples"])
            bar.set_postfix_str(f"{nbytes / 1e6 / max(time.perf_counter() - t0, 1e-9):.1f} MB/s")
    if kept:
        log.info("resumed: %d of %d shards were complete already", kept, len(shards))
    for shard, plan_hash in waiting.items():  # shards other nodes finished meanwhile
        if (marker := read_marker(out, shard, plan_hash)) is not None:
            done[shard] = marker
    return done, written
