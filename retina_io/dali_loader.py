"""The DALI backend of :mod:`retina_io.loader`: ``fn.readers.webdataset`` → decode (+ augment) → normalise.

One pipeline per epoch (its seed includes the epoch number, so every epoch reshuffles and any epoch can be started
directly). Keys travel through DALI as the reader's *source info* of the ``labels`` component
(``"<tar>:<offset>:<KEY>.labels"``): no extra shard component and no JSON parsing per sample. With
``pad_last_batch=True`` DALI pads every rank's part to the same number of batches by repeating the part's last sample;
a repeated key within a rank's epoch is a padded row and gets key -1.

DALI takes member names and offsets from the ``.idx`` files, so those are checked when the loader is built
(:meth:`retina_io.dataset.PackedDataset.check_dali_indexes`); a bad key or a short epoch is a :class:`DatasetError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from retina_io.dataset import DatasetError
from retina_io.loader_base import Batch, EpochPlan, LoaderConfig, epoch_seed
from retina_io.schema import parse_key

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_pipeline(cfg: LoaderConfig, tars: list[str], idxs: list[str], *, epoch: int):
    """The DALI pipeline for one epoch of ``cfg`` over ``tars`` (already in this epoch's order)."""
    from nvidia.dali import fn, pipeline_def, types

    decode_device = cfg.resolved_decode_device
    device_id = None
    if decode_device == "mixed":
        device_id = torch.device(cfg.device).index or 0
    train = cfg.mode == "train"
    aug = cfg.augment
    size = cfg.image_size
    seed = epoch_seed(cfg.seed, epoch)

    @pipeline_def(
        batch_size=cfg.batch_size,
        num_threads=cfg.num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=cfg.prefetch_queue_depth,
    )
    def pipe():
        encoded, labels = fn.readers.webdataset(
            paths=tars,
            index_paths=idxs,
            ext=["jpg;png", "labels"],
            missing_component_behavior="error",
            random_shuffle=train,
            initial_fill=max(cfg.shuffle_buffer, 1),
            seed=seed,
            shard_id=cfg.rank,
            num_shards=cfg.world_size,
            pad_last_batch=True,
            stick_to_shard=True,
            name="reader",
        )
        decoder_kw = {"hw_decoder_load": cfg.hw_decoder_load} if decode_device == "mixed" else {}
        if train:
            images = fn.decoders.image_random_crop(
                encoded,
                device=decode_device,
                output_type=types.RGB,
                random_area=list(aug.random_area),
                random_aspect_ratio=list(aug.random_aspect_ratio),
                **decoder_kw,
            )
            images = fn.resize(images, size=[size, size])
            if aug.rotate_degrees > 0:
                angle = fn.random.uniform(range=[-aug.rotate_degrees, aug.rotate_degrees])
                images = fn.rotate(images, angle=angle, keep_size=True, fill_value=0)
            if aug.vflip > 0:
                images = fn.flip(images, horizontal=0, vertical=fn.random.coin_flip(probability=aug.vflip))
            if max(aug.brightness, aug.contrast, aug.saturation, aug.hue_degrees) > 0:
                images = fn.color_twist(
                    images,
                    brightness=_uniform(fn, 1 - aug.brightness, 1 + aug.brightness),
                    contrast=_uniform(fn, 1 - aug.contrast, 1 + aug.contrast),
                    saturation=_uniform(fn, 1 - aug.saturation, 1 + aug.saturation),
                    hue=_uniform(fn, -aug.hue_degrees, aug.hue_degrees),
                )
            if aug.gamma is not None:
                from nvidia.dali import math as dmath

                gamma = _uniform(fn, *aug.gamma)
                images = dmath.pow(images / 255.0, gamma) * 255.0
            if aug.blur_probability > 0:
                blurred = fn.gaussian_blur(images, sigma=_uniform(fn, *aug.blur_sigma))
                pick = fn.cast(fn.random.coin_flip(probability=aug.blur_probability), dtype=types.FLOAT)
                images = pick * blurred + (1.0 - pick) * images
            mirror = fn.random.coin_flip(probability=aug.hflip)
        else:
            images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, **decoder_kw)
            images = fn.resize(images, resize_shorter=size / cfg.eval_crop)
            mirror = 0
        if cfg.local_contrast > 0:
            images = _local_contrast(fn, images, cfg.local_contrast_sigma)
        images = fn.crop_mirror_normalize(
            images,
            crop=[size, size],
            mean=[m * 255.0 for m in cfg.mean],
            std=[s * 255.0 for s in cfg.std],
            mirror=mirror,
            dtype=types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT,
            output_layout="CHW" if cfg.layout == "NCHW" else "HWC",
        )
        return images, labels

    return pipe()


def _local_contrast(fn, images, sigma: float):
    """Graham's local contrast normalisation on 0..255 images: clip(4 * (x - blur(x)) + 128, 0, 255), float."""
    from nvidia.dali import math as dmath
    from nvidia.dali import types

    x = fn.cast(images, dtype=types.FLOAT)
    return dmath.clamp(4.0 * (x - fn.gaussian_blur(x, sigma=sigma)) + 128.0, 0.0, 255.0)


def _uniform(fn, lo: float, hi: float):
    """A per-sample uniform draw in [lo, hi], or the constant when the range is empty (DALI refuses lo == hi)."""
    return fn.random.uniform(range=[lo, hi]) if hi > lo else float(lo)


def _key_of(source_info: str) -> int:
    # "<tar path>:<offset>:<KEY>.labels" -> KEY (the tar path may itself contain ':'; the member name is last)
    tar, _, member = source_info.rpartition(":")
    try:
        return parse_key(member.split(".", 1)[0])
    except ValueError as exc:
        raise DatasetError(f"shard {tar.rpartition(':')[0]}: member {member!r}: {exc}") from None


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    if isinstance(tl, TensorListGPU):
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device=device))
        return out
    return torch.from_numpy(tl.as_array()).to(device, non_blocking=True)


class DaliLoader(EpochPlan):
    """See :mod:`retina_io.loader`."""

    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg)
        self.dataset.check_dali_indexes(self.shards)
        self._pipe = None

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch``, from ``start_step`` on (earlier steps are replayed, not returned)."""
        cfg = self.cfg
        shards = self.epoch_shards(epoch, start_step)
        self._pipe = None  # free the previous epoch's pipeline before building the next
        pipe = build_pipeline(cfg, [str(s.tar) for s in shards], [str(s.idx) for s in shards], epoch=epoch)
        pipe.build()
        self._pipe = pipe
        seen: set[int] = set()
        dtype = _TORCH_DTYPES[cfg.dtype]
        if start_step:
            log.info("resuming epoch %d at step %d: replaying %d batches", epoch, start_step, start_step)
        for step in range(self.steps_per_epoch):
            images, labels = pipe.run()
            keys = np.empty(len(labels), dtype=np.int64)
            for i in range(len(labels)):
                key = _key_of(labels[i].source_info())
                keys[i] = -1 if key in seen else key
                seen.add(key)
            if step < start_step:
                continue
            x = _to_torch(images, self.device)
            if cfg.layout == "NHWC":
                x = x.permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
            if x.dtype != dtype:
                x = x.to(dtype)
            y = torch.from_numpy(labels.as_array()).to(self.device, non_blocking=True).float()
            yield Batch(x, y, torch.from_numpy(keys).to(self.device, non_blocking=True))
        if len(seen) != self.num_samples:
            raise DatasetError(
                f"rank {cfg.rank} saw {len(seen)} distinct samples in epoch {epoch}, expected {self.num_samples}: "
                f"run `retina-shard verify {cfg.data}`"
            )
