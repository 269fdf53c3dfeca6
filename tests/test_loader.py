"""Loaders: keys and labels round-trip, equal batches per rank, eval covered exactly once, reshuffle, resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from retina_io.dataset import DatasetError
from retina_io.loader import LoaderConfig, build_loader
from retina_io.pack import PackConfig, pack
from retina_io.schema import CLASSES
from tests.conftest import write_synfundus_folder

BACKENDS = ["dali", "wds"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    images, labels = write_synfundus_folder(root / "src", 83, size=(72, 60))
    out = root / "shards"
    pack(PackConfig(images=images, labels=labels, preset="synfundus", out=out, folds=3, shard_samples=6, workers=1,
                    progress=False))  # fmt: skip
    return out


def _cfg(data: Path, backend: str, **kw) -> LoaderConfig:
    base = dict(data=data, folds=(0, 1, 2), mode="eval", image_size=32, batch_size=8, backend=backend, num_threads=1)
    base.update(kw)
    return LoaderConfig(**base)


def _epoch(loader, epoch=0, start_step=0):
    keys, labels, images, steps = [], [], [], 0
    for batch in loader.iter_epoch(epoch, start_step=start_step):
        steps += 1
        keys += batch.keys.tolist()
        labels.append(batch.labels.numpy())
        images.append(batch.images.float().numpy())
    return keys, np.concatenate(labels), np.concatenate(images), steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_and_labels_roundtrip(packed, backend):
    index = pl.read_parquet(packed / "index.parquet")
    truth = {
        int(k): [row[c] for c in CLASSES] for k, row in zip(index["key"], index.iter_rows(named=True), strict=True)
    }
    loader = build_loader(_cfg(packed, backend))
    keys, labels, images, steps = _epoch(loader)
    assert steps == loader.steps_per_epoch == -(-83 // 8)
    real = [i for i, k in enumerate(keys) if k >= 0]
    assert sorted(keys[i] for i in real) == sorted(truth)
    for i in real:
        assert labels[i].tolist() == truth[keys[i]]
    assert images.shape[1:] == (3, 32, 32) and labels.dtype == np.float32
    assert abs(images[real].mean()) < 1.5, "normalised with mean/std"


def test_both_loaders_agree_in_eval(packed):
    dali_keys, dali_labels, dali_images, _ = _epoch(build_loader(_cfg(packed, "dali")))
    wds_keys, wds_labels, wds_images, _ = _epoch(build_loader(_cfg(packed, "wds")))
    assert dali_keys == wds_keys
    assert np.array_equal(dali_labels, wds_labels)
    real = [i for i, k in enumerate(dali_keys) if k >= 0]
    # different JPEG decoders and resamplers: the same pictures, not the same bits
    assert np.abs(dali_images[real] - wds_images[real]).mean() < 0.15


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_contrast_is_grahams_formula(packed, backend):
    """local_contrast on == clip(4 * (x - blur(x)) + 0.5) of the plain eval image, then the same mean/std."""
    from retina_io.wds_loader import local_contrast

    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    plain = next(iter(build_loader(_cfg(packed, backend, folds=(0,))).iter_epoch(0)))
    on = next(iter(build_loader(_cfg(packed, backend, folds=(0,), local_contrast=0.06)).iter_epoch(0)))
    assert torch.equal(plain.keys, on.keys)
    want = (local_contrast(plain.images * std + mean, 0.06 * 32) - mean) / std
    r = 6  # the kernel radius, ceil(3 sigma): nearer the edge, the blur saw pixels the eval crop removed
    assert (on.images - want)[..., r:-r, r:-r].abs().max() < 0.02
    assert (on.images - plain.images).abs().mean() > 0.3, "it changes the picture"
    # illumination is gone: the local mean of the corrected image is mid-grey wherever the field is smooth
    assert abs(float((on.images * std + mean).mean()) - 0.5) < 0.1


def test_local_contrast_both_backends_agree_and_bad_values_refused(packed):
    dali = _epoch(build_loader(_cfg(packed, "dali", local_contrast=0.05)))
    wds = _epoch(build_loader(_cfg(packed, "wds", local_contrast=0.05)))
    assert dali[0] == wds[0]
    real = [i for i, k in enumerate(dali[0]) if k >= 0]
    assert np.abs(dali[2][real] - wds[2][real]).mean() < 0.15
    with pytest.raises(ValueError, match="local_contrast"):
        _cfg(packed, "dali", local_contrast=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_reshuffles_order_not_content(packed, backend):
    loader = build_loader(_cfg(packed, backend, mode="train", shuffle_buffer=16))
    k0 = [k for k in _epoch(loader, 0)[0] if k >= 0]
    k1 = [k for k in _epoch(loader, 1)[0] if k >= 0]
    assert k0 != k1 and sorted(k0) == sorted(k1) and len(k0) == 83
    again = [k for k in _epoch(loader, 0)[0] if k >= 0]
    assert again == k0, "an epoch is deterministic"


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_yields_exactly_the_remaining_batches(packed, backend):
    loader = build_loader(_cfg(packed, backend, mode="train", shuffle_buffer=16))
    keys, labels, images, steps = _epoch(loader, 2)
    rkeys, rlabels, rimages, rsteps = _epoch(loader, 2, start_step=4)
    assert rsteps == steps - 4
    assert rkeys == keys[4 * 8 :]
    assert np.array_equal(rlabels, labels[4 * 8 :])
    assert np.allclose(rimages, images[4 * 8 :]), "same samples with the same augmentation"


@pytest.fixture(scope="module")
def square(tmp_path_factory) -> Path:
    """Square images: a crop of the whole image then is the eval path's resize + center crop."""
    root = tmp_path_factory.mktemp("square")
    images, labels = write_synfundus_folder(root / "src", 12, seed=1, size=(48, 48))
    pack(PackConfig(images=images, labels=labels, preset="synfundus", out=root / "shards", folds=2, shard_samples=6,
                    workers=1, progress=False))  # fmt: skip
    return root / "shards"


def _by_key(loader) -> dict[int, np.ndarray]:
    keys, _, images, _ = _epoch(loader)
    return {k: images[i] for i, k in enumerate(keys) if k >= 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_augmentations_off_is_the_eval_path_on_changes_the_pixels(square, backend):
    from dataclasses import replace

    from retina_io.loader import AugmentConfig

    off = AugmentConfig(random_area=(1.0, 1.0), random_aspect_ratio=(1.0, 1.0), hflip=0.0, rotate_degrees=0.0,
                        brightness=0.0, contrast=0.0, saturation=0.0, hue_degrees=0.0)  # fmt: skip

    def images(mode: str, aug: AugmentConfig = off) -> dict[int, np.ndarray]:
        return _by_key(build_loader(_cfg(square, backend, folds=(0, 1), mode=mode, augment=aug)))

    plain = images("eval")
    assert len(plain) == 12
    same = images("train")
    assert same.keys() == plain.keys()
    assert max(np.abs(same[k] - plain[k]).max() for k in plain) < 1e-5, "augmentations off: the eval pixels"
    flipped, upside_down = images("train", replace(off, hflip=1.0)), images("train", replace(off, vflip=1.0))
    for k in plain:  # C x H x W
        assert np.abs(flipped[k] - plain[k][:, :, ::-1]).max() < 1e-5
        assert np.abs(upside_down[k] - plain[k][:, ::-1, :]).max() < 1e-5
    on = images("train", AugmentConfig(vflip=0.5, gamma=(0.8, 1.25), blur_probability=0.5))
    assert on.keys() == plain.keys()
    changed = [float(np.abs(on[k] - plain[k]).mean()) for k in plain]
    assert min(changed) > 0.05, changed
    assert all(np.isfinite(v).all() for v in on.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_and_dtype(packed, backend):
    loader = build_loader(_cfg(packed, backend, layout="NHWC", dtype="bfloat16", folds=(1,)))
    batch = next(iter(loader.iter_epoch(0)))
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.bfloat16
    assert batch.images.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.dtype == torch.float32 and batch.keys.dtype == torch.int64


def test_cpu_torch_stages_run_in_the_consumers_thread(packed, monkeypatch):
    """On the CPU the DALI loader's background thread makes only the pixels; colour, local contrast and mean/std (torch)
    run in the thread that takes the batch. In the background thread they started a second OpenMP team next to the
    model's, and the two spun against each other on a small CPU (the demo's ResNet: 1.6x slower per epoch)."""
    import threading

    from retina_io import dali_loader

    threads, real = [], dali_loader.model_input
    monkeypatch.setattr(
        dali_loader, "model_input", lambda *a, **k: threads.append(threading.get_ident()) or real(*a, **k)
    )
    loader = build_loader(_cfg(packed, "dali", mode="train", local_contrast=0.05, folds=(1,)))
    keys = [k for b in loader.iter_epoch(0) for k in b.keys.tolist()]
    assert keys and threads, "an epoch of batches, each finished"
    assert set(threads) == {threading.get_ident()}, "every batch finished in the consumer's thread"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, data: str, backend: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loader = build_loader(_cfg(Path(data), backend, rank=rank, world_size=world, batch_size=6))
    keys, steps = [], 0
    for batch in loader.iter_epoch(0):
        dist.all_reduce(torch.ones(1))  # lockstep: a rank with fewer batches would hang the other here
        keys += batch.keys.tolist()
        steps += 1
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"keys": keys, "steps": steps})
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_equal_batches_cover_eval_once(packed, backend, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "ranks.json"
    ctx = mp.start_processes(_rank_main, args=(2, _free_port(), str(packed), backend, str(out)), nprocs=2,
                             join=False, start_method="spawn")  # fmt: skip
    deadline = 120
    import time

    t0 = time.time()
    while not ctx.join(timeout=5):
        assert time.time() - t0 < deadline, "ranks hang at the end of the epoch"
    ranks = json.loads(out.read_text())
    assert ranks[0]["steps"] == ranks[1]["steps"] == -(-42 // 6)  # 83 samples: parts of 41 and 42
    real = [k for r in ranks for k in r["keys"] if k >= 0]
    assert len(real) == 83 and len(set(real)) == 83


def test_clear_errors(packed, tmp_path):
    import shutil

    with pytest.raises(DatasetError, match="retina-shard pack"):
        build_loader(_cfg(tmp_path, "dali"))
    with pytest.raises(DatasetError, match="folds 0..2"):
        build_loader(_cfg(packed, "dali", folds=(3,)))
    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    next(copy.glob("fold1/*.idx")).unlink()
    with pytest.raises(DatasetError, match=r"\.idx is missing; run `retina-shard verify"):
        build_loader(_cfg(copy, "dali"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["fold"] != 2]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="fold 2 has no shards"):
        build_loader(_cfg(copy, "wds", folds=(2,)))
    manifest["version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="shard format v2"):
        build_loader(_cfg(copy, "dali"))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_an_image_dali_cannot_decode_is_a_dataset_error_naming_shard_and_sample(packed, tmp_path, mode):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    idx = sorted(copy.glob("fold1/*.idx"))[0]
    ext, offset, size, name = idx.read_text().splitlines()[2].split()[:4]  # the shard's second sample
    assert ext == "jpg"
    with open(idx.with_suffix(".tar"), "r+b") as f:  # the same length, the JPEG start marker kept, the rest garbage
        f.seek(int(offset) + 2)
        f.write(bytes((i * 37 + 11) % 256 for i in range(int(size) - 2)))
    loader = build_loader(_cfg(copy, "dali", mode=mode, folds=(1,)))
    with pytest.raises(DatasetError) as caught:
        _epoch(loader)
    message = str(caught.value)
    assert f"shard {idx.with_suffix('.tar')}" in message and f"sample {name.split('.')[0]}" in message, message
    assert "does not decode" in message and "retina-shard verify" in message and "\n" not in message, message


def test_batch_preview_draws_what_the_loader_yields(packed, tmp_path):
    from PIL import Image

    from retina_io.preview import write_batch_preview
    from retina_io.shard_cli import main as shard_main

    out = write_batch_preview(packed, tmp_path / "b.png", mode="eval", image_size=32, n=4, folds=(0,))
    sheet = np.asarray(Image.open(out).convert("RGB"))
    tile, text_h = 96, 12  # tiles are at least 96 px, captions 96 // 9 -> 12 px
    assert sheet.shape == (text_h + 2 * (tile + 2 * text_h), 2 * tile, 3)
    batch = next(iter(build_loader(_cfg(packed, "dali", folds=(0,), batch_size=4, mean=(0.0,) * 3,
                                        std=(1.0,) * 3)).iter_epoch(0)))  # fmt: skip
    first = (batch.images[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    drawn = sheet[text_h : text_h + tile : 3, 0:tile:3]  # nearest-neighbour x3 back to 32 px
    assert np.abs(drawn.astype(int) - first.astype(int)).max() <= 1
    assert shard_main(["preview", str(packed), "--out", str(tmp_path / "c.png"), "--n", "2", "--image-size", "32",
                       "--local-contrast", "0.05", "--backend", "wds"]) == 0  # fmt: skip
    sheet = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    assert sheet.shape == (text_h + tile + 2 * text_h, 2 * tile, 3), "two tiles in one row"
    batch = next(iter(build_loader(_cfg(packed, "wds", mode="train", batch_size=2, local_contrast=0.05,
                                        num_threads=2, mean=(0.0,) * 3, std=(1.0,) * 3)).iter_epoch(0)))  # fmt: skip
    for i in range(2):  # the train batch the CLI's settings give, augmentations and local contrast included
        want = (batch.images[i].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        drawn = sheet[text_h : text_h + tile : 3, i * tile : (i + 1) * tile : 3]
        assert np.abs(drawn.astype(int) - want.astype(int)).max() <= 1


def test_batch_preview_of_a_run_uses_its_loader_settings(packed, tmp_path, capsys):
    from PIL import Image

    from retina_io.loader import AugmentConfig
    from retina_io.shard_cli import main as shard_main
    from retina_train.config import resolve_config, to_dict

    run = tmp_path / "runs" / "tiny_resnet"
    run.mkdir(parents=True)
    over = {"data": {"image_size": 48, "local_contrast": 0.08, "backend": "wds", "augment": {"hflip": 1.0}}}
    (run / "config.json").write_text(json.dumps(to_dict(resolve_config("tiny_resnet", overrides=over))))
    for mode in ("eval", "train"):
        out = tmp_path / f"{mode}.png"
        assert shard_main(["preview", str(packed), "--run", str(run), "--mode", mode, "--n", "2", "--folds", "0",
                           "--out", str(out)]) == 0  # fmt: skip
        sheet = np.asarray(Image.open(out).convert("RGB"))
        tile, text_h = 96, 12
        aug = AugmentConfig(random_area=(0.7, 1.0), rotate_degrees=0.0, hflip=1.0)  # tiny_resnet.yaml + the override
        batch = next(iter(build_loader(_cfg(packed, "wds", folds=(0,), mode=mode, batch_size=2, image_size=48,
                                            local_contrast=0.08, augment=aug, num_threads=2, mean=(0.0,) * 3,
                                            std=(1.0,) * 3)).iter_epoch(0)))  # fmt: skip
        want = (batch.images[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        drawn = sheet[text_h : text_h + tile : 2, 0:tile:2]  # nearest-neighbour x2 back to 48 px
        assert np.abs(drawn.astype(int) - want.astype(int)).max() <= 1, mode
    assert shard_main(["preview", str(packed), "--run", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_dali_pipeline_built_once_epochs_reshuffle_deterministically(packed, monkeypatch):
    """One pipeline for 3 epochs; each epoch a different order of every sample, the fallback's order for that
    (seed, epoch), and the same batches whatever ran before (a fresh loader, an epoch left early)."""
    import retina_io.dali_loader as dl

    builds = []
    real = dl.build_pipeline
    monkeypatch.setattr(dl, "build_pipeline", lambda *a, **k: builds.append(1) or real(*a, **k))
    cfg = dict(mode="train", shuffle_buffer=16, seed=3)
    loader = build_loader(_cfg(packed, "dali", **cfg))
    epochs = [_epoch(loader, e) for e in range(3)]
    assert len(builds) == 1, "the pipeline is built once per loader"
    orders = [[k for k in keys if k >= 0] for keys, *_ in epochs]
    assert all(sorted(o) == sorted(orders[0]) and len(set(o)) == 83 for o in orders)
    assert len({tuple(o) for o in orders}) == 3, "every epoch reshuffles"
    wds = build_loader(_cfg(packed, "wds", **cfg))
    for e in range(3):
        assert _epoch(wds, e)[0] == epochs[e][0], "the fallback's order"
    fresh = build_loader(_cfg(packed, "dali", **cfg))
    next(iter(fresh.iter_epoch(0)))  # an epoch left after one batch
    keys, labels, images, _ = _epoch(fresh, 2)
    assert keys == epochs[2][0] and np.array_equal(labels, epochs[2][1])
    assert np.array_equal(images, epochs[2][2]), "augmentation depends on (seed, epoch, step) only"
    assert _epoch(loader, 1)[0] == epochs[1][0]


def _old_dali_train_images(encoded: list, cfg: LoaderConfig, batches: int) -> np.ndarray:
    """The train pipeline as it was before it was built once (decode random crop, resize, rotate, vflip,
    color_twist, normalise with hflip), on ``encoded`` cycled: the reference augmentation distribution."""
    from nvidia.dali import fn, pipeline_def, types

    aug, size, n = cfg.augment, cfg.image_size, cfg.batch_size

    def u(lo, hi):
        return fn.random.uniform(range=[lo, hi])

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=7)
    def pipe():
        images = fn.decoders.image_random_crop(
            fn.external_source(source=lambda i: [encoded[(i.iteration * n + j) % len(encoded)] for j in range(n)],
                               batch=True, batch_info=True),
            output_type=types.RGB, random_area=list(aug.random_area), random_aspect_ratio=list(aug.random_aspect_ratio),
        )  # fmt: skip
        images = fn.resize(images, size=[size, size])
        images = fn.rotate(images, angle=u(-aug.rotate_degrees, aug.rotate_degrees), keep_size=True, fill_value=0)
        images = fn.color_twist(images, brightness=u(1 - aug.brightness, 1 + aug.brightness),
                                contrast=u(1 - aug.contrast, 1 + aug.contrast),
                                saturation=u(1 - aug.saturation, 1 + aug.saturation),
                                hue=u(-aug.hue_degrees, aug.hue_degrees))  # fmt: skip
        return fn.crop_mirror_normalize(images, mean=[0.0] * 3, std=[255.0] * 3, output_layout="CHW",
                                        mirror=fn.random.coin_flip(probability=aug.hflip))  # fmt: skip

    p = pipe()
    p.build()
    return np.concatenate([p.run()[0].as_array() for _ in range(batches)])


def test_dali_augmentation_distribution_matches_the_former_pipeline(square):
    """Brightness and contrast of augmented images (default AugmentConfig) match the former per-image DALI operators
    statistically; flips occur with their probability."""
    from dataclasses import replace

    from retina_io.dataset import PackedDataset
    from retina_io.loader import AugmentConfig

    cfg = _cfg(square, "dali", folds=(0, 1), mode="train", batch_size=12, mean=(0.0,) * 3, std=(1.0,) * 3)
    loader = build_loader(cfg)
    new = np.concatenate([_epoch(loader, e)[2] for e in range(40)])  # 480 augmented images, [0, 1]
    tars = PackedDataset.open(square).shards((0, 1))
    import webdataset as wds

    encoded = [np.frombuffer(s["jpg"], np.uint8) for t in tars for s in wds.WebDataset(str(t.tar), shardshuffle=False)]
    old = _old_dali_train_images(encoded, cfg, 40)
    for stat in (lambda x: x.mean(axis=(1, 2, 3)), lambda x: x.std(axis=(1, 2, 3))):
        a, b = stat(new), stat(old)
        assert abs(a.mean() - b.mean()) < 0.1 * b.std() + 0.01, (a.mean(), b.mean())
        assert 0.8 < a.std() / b.std() < 1.25, (a.std(), b.std())
    off = AugmentConfig(random_area=(1.0, 1.0), random_aspect_ratio=(1.0, 1.0), hflip=0.5, vflip=0.5,
                        rotate_degrees=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue_degrees=0.0)  # fmt: skip
    plain = _by_key(build_loader(replace(cfg, mode="eval")))
    flips = build_loader(replace(cfg, augment=off))
    h = v = total = 0
    for e in range(20):
        keys, _, images, _ = _epoch(flips, e)
        for k, x in zip(keys, images, strict=True):
            p = plain[k]  # C x H x W
            h_ = any(np.abs(x - f).max() < 1e-5 for f in (p[:, :, ::-1], p[:, ::-1, ::-1]))
            v_ = any(np.abs(x - f).max() < 1e-5 for f in (p[:, ::-1, :], p[:, ::-1, ::-1]))
            assert h_ or v_ or np.abs(x - plain[k]).max() < 1e-5
            h, v, total = h + h_, v + v_, total + 1
    assert 0.4 < h / total < 0.6 and 0.4 < v / total < 0.6, (h, v, total)


def test_threads_default_from_cores_per_local_rank(monkeypatch, packed):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for var in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    assert _cfg(packed, "dali", num_threads=None).threads == cores
    assert _cfg(packed, "dali", num_threads=3).threads == 3
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", f"{cores * 2}(x2)")
    assert _cfg(packed, "dali", num_threads=None).threads == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert _cfg(packed, "dali", num_threads=None).threads == cores


def test_dont_use_mmap_reads_the_same_batches(packed):
    a = _epoch(build_loader(_cfg(packed, "dali", mode="train", folds=(0,))), 1)
    b = _epoch(build_loader(_cfg(packed, "dali", mode="train", folds=(0,), dont_use_mmap=True)), 1)
    assert a[0] == b[0] and np.array_equal(a[2], b[2])


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("rotate", [15.0, 0.0])
def test_dali_gpu_graph_constructs(packed, mode, rotate):
    """The ``mixed`` pipeline's graph (the same code as the CPU one, decode device as a parameter) is defined without
    a GPU; building it needs CUDA, so running it is left to a GPU machine (``retina-bench loader``)."""
    from retina_io.dali_loader import build_pipeline
    from retina_io.loader import AugmentConfig

    cfg = _cfg(packed, "dali", mode=mode, device="cuda", decode_device="mixed", local_contrast=0.05,
               augment=AugmentConfig(rotate_degrees=rotate))  # fmt: skip
    pipe = build_pipeline(cfg, lambda: None)
    assert pipe.device_id == 0
    assert [node.device for node in pipe._graph_out] == ["gpu"]


@pytest.mark.parametrize("sigma", [0.5, 1.1, 3.0, 5.3])
def test_separable_gaussian_blur_is_torchvisions(sigma):
    """The loader's blur and local contrast (two 1-D passes of shifted multiply-adds) equal torchvision's 2-D
    ``gaussian_blur`` with the same kernel and reflect borders, for batches and single images."""
    import math

    from torchvision.transforms.v2 import functional as TF

    from retina_io.augment import gaussian_blur

    k = 2 * math.ceil(3 * sigma) + 1
    gen = torch.Generator().manual_seed(0)
    for shape in [(4, 3, 40, 33), (3, 37, 41)]:
        x = torch.rand(shape, generator=gen)
        expected = TF.gaussian_blur(x, [k, k], [sigma, sigma])
        assert torch.allclose(gaussian_blur(x, sigma), expected, atol=1e-5)
    x = torch.rand(2, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    assert torch.allclose(gaussian_blur(x, sigma), TF.gaussian_blur(x, [k, k], [sigma, sigma]), atol=1e-5)


_FORK_CHILD = """
import gc, os, sys, time
from pathlib import Path

if sys.argv[2] == "collector-first":  # as filelock's handler, registered on import before retina_io's: it collects
    os.register_at_fork(after_in_child=gc.collect)
from retina_io.loader import LoaderConfig, build_loader

loader = build_loader(LoaderConfig(data=Path(sys.argv[1]), folds=(0,), mode="eval", image_size=32, batch_size=8,
                                   backend="dali", num_threads=1))
next(iter(loader.iter_epoch(0)))
cycle = [loader]
cycle.append(cycle)  # garbage only the cyclic collector frees: as it was when a DataLoader worker forked
del loader, cycle
gc.disable()
pid = os.fork()
if pid == 0:  # the child: collect the inherited garbage, then leave as DataLoader workers do
    gc.collect()
    os._exit(0)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.1)
os.kill(pid, 9)
sys.exit("the forked child hung destroying an inherited DALI pipeline")
"""


@pytest.mark.parametrize("order", ["collector-first", "collector-in-child"])
def test_forked_child_survives_an_inherited_dali_pipeline(packed, order):
    """A DALI pipeline that is garbage when a process forks (a fallback DataLoader worker, a pool) must not be
    destroyed in the child: its threads are not there, and the destructor waited on them forever (a hung test run).
    Also when another library's after-fork handler, registered first, runs the collector in the child (filelock's
    did, and CI hung 90 minutes in a fallback loader's worker)."""
    r = subprocess.run([sys.executable, "-c", _FORK_CHILD, str(packed), order], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]


def test_host_warp_is_dalis_warp_affine():
    """The CPU path's OpenCV warp (:func:`retina_io.augment.warp_batch`) computes what DALI's ``warp_affine`` computes
    with the same matrices (scale, rotation, flips; bilinear, black fill): crops of several sizes, the loader's own
    geometry draws, within one grey level on nearly every pixel."""
    from nvidia.dali import fn, pipeline_def, types

    from retina_io.augment import batch_rng, draw_geometry, warp_batch
    from retina_io.loader import AugmentConfig

    rng = np.random.default_rng(0)
    n, size = 16, 48
    base = rng.integers(0, 256, (n, 12, 12, 3)).astype(np.float32)
    # blocky images (smooth enough that bilinear rounding differences stay small), crops of several sizes
    blocks = [np.kron(b, np.ones((6, 5, 1))).astype(np.uint8) for b in base]
    crops = [np.ascontiguousarray(b[: 60 + 3 * i, : 55 + 2 * i]) for i, b in enumerate(blocks)]
    h = np.array([c.shape[0] for c in crops], np.float64)
    w = np.array([c.shape[1] for c in crops], np.float64)
    aug = AugmentConfig(random_area=(1.0, 1.0), random_aspect_ratio=(0.5, 2.0), hflip=0.5, vflip=0.5)
    matrix = draw_geometry(batch_rng(0, 0, 0, 0), w, h, aug, size).matrix

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        images, m = fn.external_source(source=lambda: (crops, list(matrix)), batch=True, num_outputs=2)
        return fn.warp_affine(images, matrix=m, size=[size, size], fill_value=0, interp_type=types.INTERP_LINEAR)

    p = pipe()
    p.build()
    expected = p.run()[0].as_array().astype(int)
    got = warp_batch(crops, matrix, size).astype(int)
    diff = np.abs(got - expected)
    assert got.shape == expected.shape == (n, size, size, 3)
    assert np.mean(diff <= 1) > 0.99 and diff.mean() < 0.3, (np.mean(diff <= 1), diff.mean(), diff.max())
    assert not np.array_equal(got[:, :, ::-1], expected), "the flips are not mirrored"
