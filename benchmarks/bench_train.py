"""``retina-bench train``: is training fed fast enough, and what does DeepSpeed cost?

Per backbone (the tiny stand-ins on a CPU; ``--backbones paper`` on a GPU): training images/s of the DeepSpeed engine
with one batch already on the device (the model's ceiling) vs. fed by the DALI pipeline from the shards (512 px
JPEGs decoded, augmented and resized to the backbone's input). ``ratio`` = fed / ceiling, the worst backbone's
(saturation; goal >= 0.97 on a GPU; on this CPU the decoder competes with the model for the same two cores).
Each backbone runs as its training would (:func:`bench_setup`): the micro-batch of its config
(``retina_train/configs/NAME.yaml``: e.g. 128 for ResNet-50, 48 for EfficientNetV2-M at 384 px, 16 for RETFound),
its precision (bf16 autocast on a GPU) and, for CNNs on a GPU, channels-last model and batches (the ceiling's batch
too). Between backbones the engine is destroyed and the CUDA cache emptied. On a GPU also the model FLOP
utilisation (MFU: training FLOPs, 3x the forward's counted by ``torch.utils.flop_counter``, over the GPU's dense bf16
peak, :data:`PEAK_BF16_FLOPS`).
Also the DeepSpeed engine vs. a plain PyTorch loop (AdamW, same model, same batch): overhead goal <= 5%.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import BenchResult, Row, ensure_images, ensure_packed
from retina_io.loader import build_loader
from retina_train.backbones import PAPER_BACKBONES, TINY_BACKBONES, create_backbone
from retina_train.config import RunConfig, resolve_config
from retina_train.distributed import init_distributed
from retina_train.ds_config import build_ds_config
from retina_train.settings import RunSettings, loader_config, resolve_settings
from retina_train.trainer import to_channels_last

GOAL = 0.97
# dense bf16 tensor-core peak (FLOP/s) by GPU name: the MFU's denominator (NVIDIA's data sheets, SXM parts)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12}


def bench_setup(name: str, device: str) -> tuple[RunConfig, RunSettings]:
    """Backbone ``name`` as its training runs it on ``device``: its config (micro-batch, loader settings) and the
    resolved settings (image size, precision, channels-last)."""
    cfg = resolve_config(name)
    return cfg, resolve_settings(cfg, device)


def _engine(cfg: RunConfig, s: RunSettings):
    import deepspeed

    model = create_backbone(s.backbone, image_size=s.image_size)
    ds = build_ds_config(cfg, world_size=1, total_steps=10_000, warmup_steps=10, device=s.device,
                         precision=s.precision)  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    if s.channels_last:  # after initialize, as training does (DeepSpeed refuses channels-last weights there)
        to_channels_last(engine, cfg.train.zero_stage)
    return engine


def free(*engines) -> None:
    """Release engines (DeepSpeed's references, the optimizer state) and, on a GPU, the cached memory, so the next
    backbone starts with the whole card."""
    for engine in engines:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
    del engines
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _step(engine, x, y) -> None:
    loss = F.binary_cross_entropy_with_logits(engine(x).float(), y)
    engine.backward(loss)
    engine.step()


def _ceiling(engine, *, batch: int, size: int, device: str, steps: int, channels_last: bool = False) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:  # as the loader delivers batches for a channels-last model (NHWC memory)
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 11, device=device) > 0.8).float()
    for _ in range(3):
        _step(engine, x, y)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(engine, x, y)
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def _fed(engine, loader, device: str, epochs: int = 1) -> float:
    """Training images/s fed by ``loader`` over ``epochs`` epochs (the first 2 batches are warm-up, untimed)."""
    it = loader.iter_epoch(0)
    for _ in range(2):  # warm-up batches (pipeline build, first decode)
        b = next(it)
        _step(engine, b.images, b.labels)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    for e in range(epochs):
        for b in it if e == 0 else loader.iter_epoch(e):
            _step(engine, b.images, b.labels)
            n += len(b.keys)
    _sync(device)
    return n / (time.perf_counter() - t0)


def train_flops_per_image(name: str, image_size: int) -> float:
    """FLOPs of one training step per image: 3x the forward's (backward ~2x), counted on PyTorch's meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_backbone(name, image_size=image_size)
        x = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return 3.0 * counter.get_total_flops()


def peak_flops(device: str) -> float | None:
    """The GPU's dense bf16 peak (FLOP/s) from :data:`PEAK_BF16_FLOPS`; None on the CPU or an unlisted GPU."""
    if device != "cuda":
        return None
    gpu = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), None)


def bench_backbone(name: str, data: Path, *, device: str, steps: int, epochs: int = 1, batch: int | None = None,
                   num_threads: int | None = None, loader_only: bool = True) -> dict:  # fmt: skip
    """One backbone as its training runs it: model-only (ceiling) and DALI-fed images/s, fed/model, training
    FLOPs per image and MFU (GPU), and with ``loader_only`` each loader alone at its input size. ``batch`` replaces
    the config's micro-batch (``retina-bench device --dry-run``'s tiny sizes). The engine is freed before returning."""
    cfg, s = bench_setup(name, device)
    if batch is not None:
        cfg.data.batch_size = batch
    batch, size = cfg.data.batch_size, s.image_size
    threads = {} if num_threads is None else {"num_threads": num_threads}
    engine = _engine(cfg, s)
    lcfg = loader_config(cfg, s, engine.module, folds=range(5), mode="train", data=data, **threads)
    out = {"backbone": name, "image_size": size, "batch": batch, "precision": s.precision,
           "channels_last": s.channels_last, "threads": lcfg.num_threads}  # fmt: skip
    try:
        if loader_only:  # each loader alone at this backbone's input size (no model): what it could feed
            for backend in ("dali", "wds"):
                only = _loader_only(build_loader(dataclasses.replace(lcfg, backend=backend)), device)
                out[f"{backend}_loader_images_per_s"] = round(only, 1)
        ceiling = _ceiling(engine, batch=batch, size=size, device=device, steps=steps, channels_last=s.channels_last)
        fed = _fed(engine, build_loader(lcfg), device, epochs=epochs)
    finally:
        free(engine)
    out.update(ceiling_images_per_s=round(ceiling, 1), fed_images_per_s=round(fed, 1),
               ratio=round(fed / ceiling, 3))  # fmt: skip
    try:
        flops = train_flops_per_image(name, size)
    except Exception as exc:  # noqa: BLE001 - an op the meta device or the counter cannot take: no MFU, figures kept
        out["flops_error"] = f"{type(exc).__name__}: {exc}"[:200]
        return out
    peak = peak_flops(device)
    out.update(train_gflop_per_image=round(flops / 1e9, 2), achieved_tflops_fed=round(fed * flops / 1e12, 2))
    if peak:
        out.update(mfu_model=round(ceiling * flops / peak, 4), mfu_fed=round(fed * flops / peak, 4))
    return out


def _sweep(engine, lcfg, *, device: str, quick: bool) -> tuple[list, dict]:
    """Fed images/s of one backbone over the loader settings a user can turn: DALI threads, prefetch depth and, on a
    GPU, the hardware JPEG decoder's share. Returns the rows and the best setting."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = sorted({1, 2, max(1, cores // 2), cores} if not quick else {1, cores})
    prefetch = [1, 2, 3] if not quick else [1, 2]
    hw = [0.0, 0.65, 0.9] if device == "cuda" else [None]
    rows, best = [], {"images_per_s": 0.0}
    for t in threads:
        for q in prefetch:
            for h in hw:
                extra = {} if h is None else {"hw_decoder_load": h}
                loader = build_loader(dataclasses.replace(lcfg, num_threads=t, prefetch_queue_depth=q, **extra))
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


def _plain(cfg: RunConfig, s: RunSettings, *, steps: int) -> float:
    """The same model, batch, precision and memory format in a plain PyTorch loop (AdamW, autocast, clipping)."""
    batch, size, device = cfg.data.batch_size, s.image_size, s.device
    model = create_backbone(s.backbone, image_size=size).to(device)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(batch, 3, size, size, device=device)
    if s.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 11, device=device) > 0.8).float()

    def step():
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=s.precision == "bf16"):
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
        r = bench_backbone(name, data, device=device, steps=steps, num_threads=workers)
        size, batch = r["image_size"], r["batch"]
        for backend in ("dali", "wds"):
            rows.append(Row(f"{name} @ {size}px: {backend} loader only", n / r[f"{backend}_loader_images_per_s"], n))
            extra[f"{name}_{backend}_loader_images_per_s"] = r[f"{backend}_loader_images_per_s"]
        ratios[name] = r["ratio"]
        layout = ", channels-last" if r["channels_last"] else ""
        rows.append(Row(f"{name} @ {size}px: model only (batch {batch} on device{layout})",
                        n / r["ceiling_images_per_s"], n))  # fmt: skip
        rows.append(Row(f"{name} @ {size}px: fed by DALI", n / r["fed_images_per_s"], n,
                        note=f"fed/ceiling {r['ratio']:.2f}"))  # fmt: skip
        extra[f"{name}_ceiling_images_per_s"] = r["ceiling_images_per_s"]
        extra[f"{name}_fed_images_per_s"] = r["fed_images_per_s"]
        extra[f"{name}_batch"] = batch
        if "mfu_fed" in r:
            extra[f"{name}_mfu_fed"] = r["mfu_fed"]
    # The most loader-bound backbone over the loader settings: what to set to feed it.
    worst = min(ratios, key=ratios.get)
    cfg, s = bench_setup(worst, device)
    engine = _engine(cfg, s)
    lcfg = loader_config(cfg, s, engine.module, folds=range(5), mode="train", data=data)
    try:
        sweep, best = _sweep(engine, lcfg, device=device, quick=quick)
    finally:
        free(engine)
    for label, ips in sweep:
        rows.append(Row(f"{worst} fed, {label}", n / ips, n))
    runs = [{"settings": label, "images_per_s": round(ips, 1)} for label, ips in sweep]
    extra["loader_settings_sweep"] = {"backbone": worst, "best": best, "runs": runs}
    # DeepSpeed vs plain PyTorch on the first backbone, same batch, ceiling mode
    name = names[0]
    cfg, s = bench_setup(name, device)
    batch = cfg.data.batch_size
    plain = _plain(cfg, s, steps=steps * 2)
    free()
    engine = _engine(cfg, s)
    try:
        ds = _ceiling(engine, batch=batch, size=s.image_size, device=device, steps=steps * 2,
                      channels_last=s.channels_last)  # fmt: skip
    finally:
        free(engine)
    overhead = plain / ds - 1
    rows.append(Row(f"{name}: plain PyTorch loop (AdamW)", steps * 2 * batch / plain, steps * 2 * batch))
    rows.append(Row(f"{name}: DeepSpeed engine", steps * 2 * batch / ds, steps * 2 * batch,
                    note=f"overhead {overhead * 100:+.1f}% (goal <= 5%)"))  # fmt: skip
    extra.update(deepspeed_overhead=round(overhead, 4), deepspeed_overhead_goal=0.05, worst_backbone=worst,
                 ratios={k: round(v, 3) for k, v in ratios.items()})  # fmt: skip
    return BenchResult(benchmark="train", ratio=ratios[worst], goal=GOAL, rows=rows, extra=extra)
