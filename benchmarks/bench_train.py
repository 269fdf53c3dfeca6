"""``retina-bench train``: is training fed fast enough, and what does DeepSpeed cost?

Per backbone (the tiny stand-ins on a CPU; ``--backbones paper`` on a GPU): training images/s of the DeepSpeed engine
with one batch already on the device (the model's ceiling) vs. fed by the DALI pipeline from the shards (512 px
JPEGs decoded, augmented and resized to the backbone's input). ``ratio`` = fed / ceiling, the worst backbone's
(saturation; goal >= 0.97 on a GPU; on this CPU the decoder competes with the model for the same two cores).
Also the DeepSpeed engine vs. a plain PyTorch loop (AdamW, same model, same batch): overhead goal <= 5%.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import BenchResult, Row, ensure_images, ensure_packed
from retina_io.loader import LoaderConfig, build_loader
from retina_train.backbones import BACKBONES, PAPER_BACKBONES, TINY_BACKBONES, create_backbone
from retina_train.config import RunConfig
from retina_train.distributed import init_distributed
from retina_train.ds_config import build_ds_config

GOAL = 0.97


def _engine(name: str, *, batch: int, device: str, image_size: int):
    import deepspeed

    model = create_backbone(name, image_size=image_size)
    cfg = RunConfig()
    cfg.data.batch_size = batch
    ds = build_ds_config(cfg, world_size=1, total_steps=10_000, warmup_steps=10, device=device,
                         precision="bf16" if device == "cuda" else "fp32")  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    return engine


def _step(engine, x, y) -> None:
    loss = F.binary_cross_entropy_with_logits(engine(x).float(), y)
    engine.backward(loss)
    engine.step()


def _ceiling(engine, *, batch: int, size: int, device: str, steps: int) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 11, device=device) > 0.8).float()
    for _ in range(3):
        _step(engine, x, y)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(engine, x, y)
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def _fed(engine, loader, device: str) -> float:
    it = loader.iter_epoch(0)
    for _ in range(2):  # warm-up batches (pipeline build, first decode)
        b = next(it)
        _step(engine, b.images, b.labels)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    for b in it:
        _step(engine, b.images, b.labels)
        n += len(b.keys)
    _sync(device)
    return n / (time.perf_counter() - t0)


def _sweep(engine, data: Path, *, size: int, batch: int, device: str, quick: bool) -> tuple[list, dict]:
    """Fed images/s of one backbone over the loader settings a user can turn: DALI threads, prefetch depth and, on a
    GPU, the hardware JPEG decoder's share. Returns the rows and the best setting."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = sorted({1, 2, max(1, cores // 2), cores} if not quick else {1, cores})
    prefetch = [1, 2, 3] if not quick else [1, 2]
    hw = [0.0, 0.65, 0.9] if device == "cuda" else [None]
    pcfg = engine.module.pretrained_cfg
    rows, best = [], {"images_per_s": 0.0}
    for t in threads:
        for q in prefetch:
            for h in hw:
                extra = {} if h is None else {"hw_decoder_load": h}
                loader = build_loader(LoaderConfig(
                    data=data, folds=range(5), mode="train", image_size=size, batch_size=batch,
                    mean=tuple(pcfg["mean"]), std=tuple(pcfg["std"]), num_threads=t, prefetch_queue_depth=q,
                    device=device if device == "cpu" else "cuda:0", **extra))  # fmt: skip
                ips = _fed(engine, loader, device)
                label = f"threads {t}, prefetch {q}" + ("" if h is None else f", hw_decoder_load {h}")
                rows.append((label, ips))
                if ips > best["images_per_s"]:
                    best = {"images_per_s": round(ips, 1), "num_threads": t, "prefetch_queue_depth": q,
                            **({} if h is None else {"hw_decoder_load": h})}  # fmt: skip
                del loader
    return rows, best


def _loader_only(loader, device: str) -> float:
    it = loader.iter_epoch(0)
    next(it)  # warm-up (pipeline build, first decode)
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += len(b.keys)
    _sync(device)
    return n / (time.perf_counter() - t0)


def _plain(name: str, *, batch: int, size: int, device: str, steps: int) -> float:
    model = create_backbone(name, image_size=size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 11, device=device) > 0.8).float()

    def step():
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(*, quick: bool = False, workers: int = 2, cache: Path | None = None, backbones: str = "tiny") -> BenchResult:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("retina_io").setLevel(logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = list(TINY_BACKBONES if backbones == "tiny" else PAPER_BACKBONES)
    n = 256 if quick else 1024
    steps = 8 if quick else 25
    cache = cache or Path(tempfile.gettempdir()) / "retina-bench-cache"
    images, labels = ensure_images(cache, n=n)
    data = ensure_packed(cache, images, labels)
    init_distributed(device)
    rows, ratios, extra = [], {}, {"device": device, "images": n, "source_px": 512}
    for name in names:
        size = BACKBONES[name].image_size
        batch = 32 if device == "cpu" else 128
        engine = _engine(name, batch=batch, device=device, image_size=size)
        pcfg = engine.module.pretrained_cfg
        lcfg = LoaderConfig(data=data, folds=range(5), mode="train", image_size=size, batch_size=batch,
                            mean=tuple(pcfg["mean"]), std=tuple(pcfg["std"]), num_threads=workers,
                            device=device if device == "cpu" else "cuda:0")  # fmt: skip
        loader = build_loader(lcfg)
        # each loader alone at this backbone's input size (no model): what it could feed
        for backend in ("dali", "wds"):
            only = _loader_only(build_loader(dataclasses.replace(lcfg, backend=backend)), device)
            rows.append(Row(f"{name} @ {size}px: {backend} loader only", n / only, n))
            extra[f"{name}_{backend}_loader_images_per_s"] = round(only, 1)
        ceiling = _ceiling(engine, batch=batch, size=size, device=device, steps=steps)
        fed = _fed(engine, loader, device)
        ratios[name] = fed / ceiling
        rows.append(Row(f"{name} @ {size}px: model only (batch on device)", n / ceiling, n))
        rows.append(Row(f"{name} @ {size}px: fed by DALI ({loader.__class__.__name__})", n / fed, n,
                        note=f"fed/ceiling {fed / ceiling:.2f}"))  # fmt: skip
        extra[f"{name}_ceiling_images_per_s"] = round(ceiling, 1)
        extra[f"{name}_fed_images_per_s"] = round(fed, 1)
        del engine, loader
    # The most loader-bound backbone over the loader settings: what to set to feed it.
    worst = min(ratios, key=ratios.get)
    size = BACKBONES[worst].image_size
    batch = 32 if device == "cpu" else 128
    engine = _engine(worst, batch=batch, device=device, image_size=size)
    sweep, best = _sweep(engine, data, size=size, batch=batch, device=device, quick=quick)
    for label, ips in sweep:
        rows.append(Row(f"{worst} fed, {label}", n / ips, n))
    runs = [{"settings": label, "images_per_s": round(ips, 1)} for label, ips in sweep]
    extra["loader_settings_sweep"] = {"backbone": worst, "best": best, "runs": runs}
    del engine
    # DeepSpeed vs plain PyTorch on the first tiny model, same batch, ceiling mode
    name = names[0]
    size = BACKBONES[name].image_size
    batch = 32 if device == "cpu" else 128
    plain = _plain(name, batch=batch, size=size, device=device, steps=steps * 2)
    ds = _ceiling(_engine(name, batch=batch, device=device, image_size=size), batch=batch, size=size, device=device,
                  steps=steps * 2)  # fmt: skip
    overhead = plain / ds - 1
    rows.append(Row(f"{name}: plain PyTorch loop (AdamW)", steps * 2 * batch / plain, steps * 2 * batch))
    rows.append(Row(f"{name}: DeepSpeed engine", steps * 2 * batch / ds, steps * 2 * batch,
                    note=f"overhead {overhead * 100:+.1f}% (goal <= 5%)"))  # fmt: skip
    extra.update(deepspeed_overhead=round(overhead, 4), deepspeed_overhead_goal=0.05, worst_backbone=worst,
                 ratios={k: round(v, 3) for k, v in ratios.items()})  # fmt: skip
    return BenchResult(benchmark="train", ratio=ratios[worst], goal=GOAL, rows=rows, extra=extra)
