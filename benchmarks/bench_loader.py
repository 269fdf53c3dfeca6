"""``retina-bench loader``: training-batch throughput of the DALI pipeline vs. the usual torchvision loader.

(a) the DALI pipeline in train mode (CPU decode here, ``device_id=None``), (b) the webdataset + PIL fallback,
(c) torchvision ``ImageFolder`` + PIL in a DataLoader over the same images as loose files. All three apply the same
train augmentations (random resized crop, flips, rotation, colour jitter, normalisation), 512 px JPEG -> 224, with
the same number of threads/workers. ``ratio`` = (a) / (c); goal >= 2.0 on a 2-core CPU machine.

On a GPU (``torch.cuda.is_available()``), also DALI ``mixed`` (nvJPEG) at 224 and 384 px, with the hardware
decoder's share at 0 and 0.65 (goal: >= 20,000 images/s on one H100 at 224).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import BenchResult, Row, ensure_images, ensure_packed
from retina_io.loader import LoaderConfig, build_loader
from retina_io.wds_loader import build_transform

GOAL = 2.0


def _time_loader(cfg: LoaderConfig, epochs: int) -> tuple[float, int]:
    loader = build_loader(cfg)
    for _ in loader.iter_epoch(0):  # warm-up epoch: pipeline build, worker start, page cache
        pass
    n, t0 = 0, time.perf_counter()
    for e in range(1, epochs + 1):
        for batch in loader.iter_epoch(e):
            n += int((batch.keys >= 0).sum())
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def _time_imagefolder(images: Path, cfg: LoaderConfig, epochs: int) -> tuple[float, int]:
    from torchvision.datasets import ImageFolder

    loose = images.parent / f"{images.name}-imagefolder"
    cls = loose / "all"
    if not cls.is_dir():
        cls.mkdir(parents=True)
        for p in sorted((images / "Fundus").glob("*.jpg")):
            (cls / p.name).symlink_to(p.resolve())
    ds = ImageFolder(str(loose), transform=build_transform(cfg))
    dl = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_threads,
                                     prefetch_factor=cfg.prefetch_queue_depth, persistent_workers=True)  # fmt: skip
    for _ in dl:  # warm-up epoch
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _y in dl:
            n += len(x)
    return time.perf_counter() - t0, n


def run(*, quick: bool = False, workers: int = 2, cache: Path | None = None) -> BenchResult:
    n = 256 if quick else 2000
    epochs = 1 if quick else 2
    cache = cache or Path(tempfile.gettempdir()) / "retina-bench-cache"
    images, labels = ensure_images(cache, n=n)
    data = ensure_packed(cache, images, labels)
    logging.getLogger("retina_io").setLevel(logging.WARNING)
    base = dict(data=data, folds=range(5), mode="train", image_size=224, batch_size=64, num_threads=workers)

    t_dali, n_dali = _time_loader(LoaderConfig(backend="dali", **base), epochs)
    t_wds, n_wds = _time_loader(LoaderConfig(backend="wds", **base), epochs)
    t_if, n_if = _time_imagefolder(images, LoaderConfig(backend="wds", **base), epochs)
    rows = [
        Row(f"torchvision ImageFolder + PIL, {workers} workers (baseline)", t_if, n_if),
        Row(f"retina DALI pipeline, CPU decode, {workers} threads", t_dali, n_dali,
            note=f"ratio {(n_dali / t_dali) / (n_if / t_if):.2f}"),
        Row(f"retina fallback (webdataset + PIL), {workers} workers", t_wds, n_wds,
            note=f"ratio {(n_wds / t_wds) / (n_if / t_if):.2f}"),
    ]  # fmt: skip
    extra = {"images": n, "epochs_timed": epochs, "image_size": 224, "source_px": 512, "workers": workers}
    if torch.cuda.is_available():
        gpu_rows = []
        for size in (224, 384):
            for hw in (0.0, 0.65):
                cfg = LoaderConfig(backend="dali", device="cuda", decode_device="mixed", hw_decoder_load=hw,
                                   **{**base, "image_size": size, "batch_size": 256, "num_threads": 8})  # fmt: skip
                t, k = _time_loader(cfg, epochs * 3)
                gpu_rows.append(Row(f"DALI mixed, {size} px, hw_decoder_load={hw}", t, k))
                extra[f"gpu_{size}_hw{hw}_images_per_s"] = round(k / t, 1)
        extra["gpu"] = torch.cuda.get_device_name()
        rows += gpu_rows
    return BenchResult(benchmark="loader", ratio=(n_dali / t_dali) / (n_if / t_if), goal=GOAL, rows=rows, extra=extra)
