"""``retina-bench scale``: packing, verifying, loading and stacking from 10k to 1M images (issue 14).

Data: a pool of 1,000 procedural 128 px fundus JPEGs (:mod:`retina_io.synth`), placed under N names in the SynFundus
layout (``Fundus/synf_NNNNNNN.jpg`` + ``labels.csv`` of N rows from :func:`retina_io.synth.sample_labels`); N = 10k,
100k and 1M (``--quick``: 10k and 50k). Name ``i`` is pool image ``i mod 1000`` with a 16-byte JPEG comment (a COM
segment) naming ``i``: the pixels repeat, the files do not, because the packer rejects byte-identical files as
duplicates (:mod:`retina_io.identity`), hard links included. The files are in the page cache when timed, so this
measures the software, not the disk. Per N:

- ``retina-shard pack`` (``--check decode``, ``--workers``) in a child process: seconds inside :func:`pack`, img/s,
  and the peak memory of the child and its workers together (psutil; RSS polled every 20 ms, PSS every 0.2 s,
  since reading it costs the kernel a walk over every mapped page): the sum of their
  proportional set sizes (PSS: a page shared by k processes counts 1/k in each, so the forked workers' shared pages
  count once), which the goal is measured in; the plain RSS sum (shared pages once per process) and the main
  process's RSS are reported beside it. Peers, in this process, on the same files: a single-process
  ``webdataset.ShardWriter`` loop (1,000 samples a tar, image + labels + json) with PIL's draft decode as the check
  (what ``--check decode`` does for a JPEG) and with no check at all.
- ``retina-shard verify`` MB/s (seconds inside ``verify``, in a child process like the pack); peer: ``sha256sum`` of
  the same tars (one process).
- The loaders over the packed set (train mode, 128 px, batch 64, ``--workers`` threads): first-batch latency and
  img/s over a bounded number of batches, DALI (CPU) and the webdataset fallback.
- The stack table (:func:`retina_train.stack.build_feature_table`) on synthetic OOF shards of N rows, 6 backbones.

Goals (issue 14): pack peak memory (PSS summed) <= 1 GB at 1M (``--quick``: extrapolated linearly from the two
largest N); pack
cost per image flat within 15% over the sizes; at 100k (``--quick``: the largest N) on 2 workers pack >= 2x the
ShardWriter loop with the decode check and >= 1x the one without; verify >= 500 MB/s at every N from 100k on
(``--quick``: the largest N; every N's figure is in the table). ``ratio`` is the worst goal's
fraction (1.0: every goal met); each goal's own figure is in ``goals``. A log-log plot of the cost per image against
N is written to ``bench-out/scale.png`` (``RETINA_BENCH_OUT`` moves it). The pool is rendered once into the benchmark
cache; everything else lives in a temporary folder under ``--work`` (default: the system's temporary folder), removed
at the end.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import BenchResult, Row, ensure_images, warm_cache

SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 50_000)
POOL = 1000
POOL_PX = 128
SHARD_SAMPLES = 1000
RSS_GOAL_GB = 1.0  # at 1M images
FLAT_GOAL = 1.15  # largest / smallest pack cost per image
CHECK_GOAL = 2.0  # pack / ShardWriter with the decode check, at 100k
NOCHECK_GOAL = 1.0  # pack / ShardWriter without checks, at 100k
VERIFY_GOAL_MB_S = 500.0
PSS_EVERY = 10  # memory polls (every 20 ms) per PSS reading: PSS every 0.2 s, RSS every 20 ms
OUT = Path(os.environ.get("RETINA_BENCH_OUT", "bench-out"))
CACHE = Path(tempfile.gettempdir()) / "retina-bench-cache"  # the pool, kept between runs
ROOT = Path(__file__).resolve().parents[1]


def make_pool(cache: Path, *, n: int = POOL, size: int = POOL_PX) -> list[bytes]:
    """``n`` procedural fundus JPEGs, as bytes (rendered once into ``cache``, like the other benchmarks' images)."""
    images, _ = ensure_images(cache, n=n, size=size)
    return [p.read_bytes() for p in sorted((images / "Fundus").glob("*.jpg"))]


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """``jpeg`` with a COM segment holding ``text`` right after SOI: the same pixels, other bytes."""
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def place_names(folder: Path, pool: list[bytes], n: int) -> Path:
    """``n`` images in the SynFundus layout under ``folder`` (name ``i`` is pool image ``i mod len(pool)`` with a
    comment naming ``i``); returns the labels file."""
    from retina_io.synth import sample_labels

    table = sample_labels(n, seed=1)
    images = folder / "Fundus"
    images.mkdir(parents=True)
    for i, name in enumerate(table["file_name"].to_list()):
        (images / name).write_bytes(with_comment(pool[i % len(pool)], b"%016d" % i))
    table.write_csv(folder / "labels.csv")
    return folder / "labels.csv"


def pack_child() -> None:
    """The child process: ``argv[1]`` is the PackConfig as JSON; prints one JSON line with the outcome."""
    from retina_io.pack import PackConfig, pack

    fields = json.loads(sys.argv[1])
    cfg = PackConfig(**{k: Path(v) if k in ("images", "labels", "out") else v for k, v in fields.items()})
    r = pack(cfg)
    print(json.dumps({"seconds": r.seconds, "accepted": r.accepted, "rejected": r.rejected, "bytes": r.bytes}))


def _child_env() -> dict:
    """The environment of the benchmark's child processes: this checkout importable (``benchmarks``, ``retina_io``)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def verify_child() -> None:
    """The child process: ``argv[1]`` the packed folder, ``argv[2]`` the workers; prints the seconds inside
    :func:`retina_io.verify.verify` (a fresh process, as ``retina-shard verify`` runs: its forked workers do not
    inherit this benchmark's torch and DALI)."""
    from retina_io.verify import verify

    t0 = time.perf_counter()
    verify(Path(sys.argv[1]), progress=False, workers=int(sys.argv[2]))
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def run_verify(out: Path, workers: int) -> float:
    """Seconds of ``retina-shard verify`` of ``out`` (:func:`verify_child` in a child process)."""
    code = "from benchmarks.bench_scale import verify_child; verify_child()"
    done = subprocess.run([sys.executable, "-c", code, str(out), str(workers)], capture_output=True, text=True,
                          env=_child_env(), check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"verify of {out} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def run_pack(images: Path, labels: Path, out: Path, workers: int) -> dict:
    """Pack in a child process, polling the resident memory of it and its workers; the child's JSON plus the peaks."""
    import psutil

    cfg = {"images": str(images), "labels": str(labels), "preset": "synfundus", "out": str(out),
           "workers": workers, "shard_samples": SHARD_SAMPLES, "check": "decode", "progress": False}  # fmt: skip
    code = "from benchmarks.bench_scale import pack_child; pack_child()"
    child = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(cfg)], stdout=subprocess.PIPE, env=_child_env(), text=True
    )
    peak = peak_main = peak_pss = 0
    proc = psutil.Process(child.pid)
    polls = 0
    while child.poll() is None:
        total = pss = 0
        try:
            procs = [proc, *proc.children(recursive=True)]
            main = proc.memory_info().rss
            total = main + sum(_mem(p, "rss") for p in procs[1:])
            if polls % PSS_EVERY == 0:  # the kernel walks every mapped page for it: not every 20 ms
                pss = sum(_mem(p, "pss") for p in procs)
            peak_main = max(peak_main, main)
        except psutil.NoSuchProcess:
            pass
        peak, peak_pss = max(peak, total), max(peak_pss, pss)
        polls += 1
        time.sleep(0.02)
    stdout = child.stdout.read()
    if child.returncode != 0:
        raise RuntimeError(f"pack of {images} failed (exit {child.returncode})")
    outcome = json.loads(stdout.strip().splitlines()[-1])
    return {**outcome, "peak_rss": peak, "peak_rss_main": peak_main, "peak_pss": peak_pss}


def _mem(p, field: str) -> int:
    """``p``'s resident (``rss``) or proportional (``pss``: each shared page divided among the processes sharing it,
    so that a sum over processes counts it once) memory in bytes; 0 once it has ended."""
    import psutil

    try:
        return p.memory_info().rss if field == "rss" else p.memory_full_info().pss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def shardwriter_loop(images: Path, labels: Path, out: Path, *, check: bool) -> float:
    """The peer: one process, ``webdataset.ShardWriter``, every row's image + labels + json; seconds."""
    import webdataset as wds
    from PIL import Image

    from retina_io.presets import get_preset, read_labels
    from retina_io.schema import CLASSES

    t0 = time.perf_counter()
    rows = read_labels(labels, get_preset("synfundus")).accepted
    y = rows.select(CLASSES).fill_null(0).to_numpy().astype(np.uint8)
    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=SHARD_SAMPLES, verbose=0) as sink:
        for i, (rel, id_) in enumerate(zip(rows["relpath"].to_list(), rows["id"].to_list(), strict=True)):
            data = (images / rel).read_bytes()
            if check:
                im = Image.open(io.BytesIO(data))
                im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                im.load()
            key = f"{i:09d}"
            sink.write({"__key__": key, "jpg": data, "labels": y[i].tobytes(),
                        "json": json.dumps({"key": key, "id": id_}).encode()})  # fmt: skip
    return time.perf_counter() - t0


def time_loader(data: Path, backend: str, workers: int, batches: int) -> tuple[float, float, int]:
    """(first-batch seconds from building the loader, img/s over the next ``batches`` batches, images counted)."""
    from retina_io.dataset import PackedDataset
    from retina_io.loader import LoaderConfig, build_loader

    k = PackedDataset.open(data).k
    t0 = time.perf_counter()
    loader = build_loader(LoaderConfig(data=data, folds=range(k), mode="train", image_size=POOL_PX, batch_size=64,
                                       num_threads=workers, backend=backend))  # fmt: skip
    it = iter(loader.iter_epoch(0))
    next(it)
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for _, batch in zip(range(batches), it, strict=False):
        n += int((batch.keys >= 0).sum())
    seconds = time.perf_counter() - t1
    del it, loader
    return first, n / seconds if seconds > 0 else 0.0, n


def time_stack_table(root: Path, n: int) -> float:
    from benchmarks.bench_stack import make_oof_inputs
    from retina_train.stack import build_feature_table

    runs, data = make_oof_inputs(root, n=n)
    warm_cache(sorted(runs.glob("*/fold*/oof-rank*.parquet")))
    t0 = time.perf_counter()
    build_feature_table(runs, data)
    return time.perf_counter() - t0


def measure(work: Path, pool: list[bytes], n: int, workers: int, batches: int) -> dict:
    """Every figure for one N; the folder is removed afterwards."""
    src, out = work / "src", work / "packed"
    labels = place_names(src, pool, n)
    files = sorted((src / "Fundus").iterdir())
    warm_cache(files)
    packed = run_pack(src / "Fundus", labels, out, workers)
    if packed["accepted"] != n:
        raise RuntimeError(f"pack accepted {packed['accepted']} of {n} images ({packed['rejected']} rejected)")
    t_check = shardwriter_loop(src / "Fundus", labels, work / "sw-check", check=True)
    t_nocheck = shardwriter_loop(src / "Fundus", labels, work / "sw-nocheck", check=False)
    shutil.rmtree(work / "sw-check")
    shutil.rmtree(work / "sw-nocheck")
    tars = sorted(out.glob("fold*/*.tar"))
    nbytes = warm_cache(tars)
    t_verify = run_verify(out, workers)
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, tars)], check=True, stdout=subprocess.DEVNULL)
    t_sha = time.perf_counter() - t0
    loaders = {b: time_loader(out, b, workers, batches) for b in ("dali", "wds")}
    shutil.rmtree(src)
    t_stack = time_stack_table(work / "oof", n)
    shutil.rmtree(work)
    fig = {
        "n": n,
        "pack_seconds": packed["seconds"],
        "pack_images_per_s": n / packed["seconds"],
        "pack_us_per_image": packed["seconds"] / n * 1e6,
        "pack_peak_pss_mb": packed["peak_pss"] / 1e6,
        "pack_peak_rss_mb": packed["peak_rss"] / 1e6,
        "pack_peak_rss_main_mb": packed["peak_rss_main"] / 1e6,
        "shardwriter_check_images_per_s": n / t_check,
        "shardwriter_nocheck_images_per_s": n / t_nocheck,
        "pack_vs_shardwriter_check": t_check / packed["seconds"],
        "pack_vs_shardwriter_nocheck": t_nocheck / packed["seconds"],
        "shard_bytes": nbytes,
        "verify_mb_per_s": nbytes / 1e6 / t_verify,
        "sha256sum_mb_per_s": nbytes / 1e6 / t_sha,
        "stack_table_seconds": t_stack,
    }
    for b, (first, ips, counted) in loaders.items():
        fig |= {f"{b}_first_batch_s": first, f"{b}_images_per_s": ips, f"{b}_images_timed": counted}
    return {k: _sig(v) if isinstance(v, float) else v for k, v in fig.items()}


def _sig(x: float) -> float:
    """``x`` to 6 significant digits (the JSON stays readable; ratios of the figures stay exact to 1e-5)."""
    return float(f"{x:.6g}")


def goals(per_n: list[dict], workers: int) -> dict:
    """Each goal of issue 14: the figure, the goal, its fraction (>= 1: met) and the size it was measured at."""
    big = per_n[-1]
    at_100k = next((f for f in per_n if f["n"] == 100_000), big)
    rss_gb = big["pack_peak_pss_mb"] / 1e3
    if big["n"] < 1_000_000 and len(per_n) > 1:  # extrapolate linearly from the two largest sizes
        a = per_n[-2]
        slope = (big["pack_peak_pss_mb"] - a["pack_peak_pss_mb"]) / (big["n"] - a["n"])
        rss_gb = (big["pack_peak_pss_mb"] + max(slope, 0.0) * (1_000_000 - big["n"])) / 1e3
    costs = [f["pack_us_per_image"] for f in per_n]
    flat = max(costs) / min(costs)
    # verify: the slowest of the sizes from 100k on (the largest without one), like the pack's goals; at 10k the whole
    # verify takes about 0.2 s, of which opening the dataset, starting the workers and reading the index are a fifth
    slowest = min([f for f in per_n if f["n"] >= 100_000] or [big], key=lambda f: f["verify_mb_per_s"])
    verify_mb_s = slowest["verify_mb_per_s"]
    g = {
        "pack_peak_pss_gb_at_1m": (rss_gb, RSS_GOAL_GB, RSS_GOAL_GB / rss_gb, 1_000_000, "<="),
        "pack_cost_flatness": (flat, FLAT_GOAL, FLAT_GOAL / flat, big["n"], "<="),
        "pack_vs_shardwriter_check": (at_100k["pack_vs_shardwriter_check"], CHECK_GOAL,
                                      at_100k["pack_vs_shardwriter_check"] / CHECK_GOAL, at_100k["n"], ">="),
        "pack_vs_shardwriter_nocheck": (at_100k["pack_vs_shardwriter_nocheck"], NOCHECK_GOAL,
                                        at_100k["pack_vs_shardwriter_nocheck"] / NOCHECK_GOAL, at_100k["n"], ">="),
        "verify_mb_per_s": (verify_mb_s, VERIFY_GOAL_MB_S, verify_mb_s / VERIFY_GOAL_MB_S, slowest["n"], ">="),
    }  # fmt: skip
    return {
        name: {"value": _sig(v), "goal": goal, "direction": d, "fraction": _sig(frac), "met": frac >= 1.0,
               "at_n": at, "workers": workers}
        for name, (v, goal, frac, at, d) in g.items()
    }  # fmt: skip


COST_SERIES = {
    "pack": lambda f: f["pack_us_per_image"],
    "ShardWriter + check": lambda f: 1e6 / f["shardwriter_check_images_per_s"],
    "ShardWriter, no check": lambda f: 1e6 / f["shardwriter_nocheck_images_per_s"],
    "verify": lambda f: f["shard_bytes"] / 1e6 / f["verify_mb_per_s"] / f["n"] * 1e6,
    "sha256sum": lambda f: f["shard_bytes"] / 1e6 / f["sha256sum_mb_per_s"] / f["n"] * 1e6,
    "stack table": lambda f: f["stack_table_seconds"] / f["n"] * 1e6,
}


def plot(per_n: list[dict], path: Path) -> Path:
    """Log-log: microseconds per image against N, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ns = [f["n"] for f in per_n]
    for name, cost in COST_SERIES.items():
        ax.loglog(ns, [cost(f) for f in per_n], marker="o", label=name)
    ax.set_xlabel("images (N)")
    ax.set_ylabel("microseconds per image")
    ax.set_title("retina-bench scale: cost per image")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def rows_of(f: dict, workers: int) -> list[Row]:
    n, nb = f["n"], f["shard_bytes"]
    sec = {b: f[f"{b}_images_timed"] / f[f"{b}_images_per_s"] if f[f"{b}_images_per_s"] else 0.0
           for b in ("dali", "wds")}  # fmt: skip
    return [
        Row(f"N={n:,}: ShardWriter loop + PIL draft decode, 1 process (baseline)",
            n / f["shardwriter_check_images_per_s"], n),
        Row(f"N={n:,}: ShardWriter loop, no check, 1 process (baseline)", n / f["shardwriter_nocheck_images_per_s"], n),
        Row(f"N={n:,}: retina-shard pack, --check decode, {workers} workers", f["pack_seconds"], n,
            note=f"peak memory {f['pack_peak_pss_mb']:,.0f} MB (PSS; RSS summed {f['pack_peak_rss_mb']:,.0f}, main "
            f"{f['pack_peak_rss_main_mb']:,.0f}); "
            f"x{f['pack_vs_shardwriter_check']:.2f} / x{f['pack_vs_shardwriter_nocheck']:.2f} of the loops"),
        Row(f"N={n:,}: sha256sum of the tars (baseline)", nb / 1e6 / f["sha256sum_mb_per_s"], n, nb),
        Row(f"N={n:,}: retina-shard verify, {workers} workers", nb / 1e6 / f["verify_mb_per_s"], n, nb,
            note=f"x{f['verify_mb_per_s'] / f['sha256sum_mb_per_s']:.2f} of sha256sum"),
        Row(f"N={n:,}: DALI loader (CPU), train, {workers} threads", sec["dali"], f["dali_images_timed"],
            note=f"first batch {f['dali_first_batch_s']:.2f} s"),
        Row(f"N={n:,}: fallback loader (webdataset + PIL), train, {workers} workers", sec["wds"],
            f["wds_images_timed"], note=f"first batch {f['wds_first_batch_s']:.2f} s"),
        Row(f"N={n:,}: stack table, 6 backbones", f["stack_table_seconds"], n),
    ]  # fmt: skip


def run(*, quick: bool = False, workers: int = 2, work: Path | None = None, sizes: tuple[int, ...] | None = None,
        pool_size: int = POOL, batches: int | None = None) -> BenchResult:  # fmt: skip
    sizes = tuple(sizes or (QUICK_SIZES if quick else SIZES))
    batches = batches or (20 if quick else 50)
    for name in ("retina_io", "retina_train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    base = Path(work) if work is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="retina-bench-scale-", dir=base))
    try:
        pool = make_pool(CACHE, n=pool_size)
        per_n = []
        for n in sizes:
            per_n.append(measure(tmp / f"n{n}", pool, n, workers, batches))
            print(f"retina-bench scale: N={n}: {json.dumps(per_n[-1])}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    g = goals(per_n, workers)
    worst = min(g, key=lambda k: g[k]["fraction"])
    chart = plot(per_n, OUT / "scale.png")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return BenchResult(
        benchmark="scale",
        ratio=g[worst]["fraction"],
        goal=1.0,
        rows=[row for f in per_n for row in rows_of(f, workers)],
        extra={"sizes": list(sizes), "pool_images": pool_size, "image_px": POOL_PX, "workers": workers,
               "worst": worst, "goals": g, "per_n": per_n, "plot": str(chart), "load_1min": load},
    )  # fmt: skip
