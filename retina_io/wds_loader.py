"""The fallback backend of :mod:`retina_io.loader`: the stock ``webdataset`` library + PIL + a torch DataLoader.

For machines without DALI. The same epoch plan as the DALI backend: the epoch's shard order, each rank's contiguous
part of the samples, a seeded shuffle buffer in train mode, padding with copies of the part's last sample (key -1) up
to the same number of batches on every rank. Batch ``j`` is decoded by DataLoader worker ``(j - start_step) %
workers``, so batches arrive in order; every worker reads the rank's stream (cheap: bytes, not pixels) and decodes
only its own batches. Augmentations are torchvision's, with the parameters of :class:`AugmentConfig`.

Shards are untrusted: every shard read must deliver exactly the samples the manifest records, each ``KEY.jpg|png`` +
``KEY.labels`` (+ ``KEY.json``) with the format's key; anything else is a :class:`DatasetError` naming the shard
(raised in the main process, never a worker's traceback), not a shorter epoch.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from retina_io.augment import local_contrast
from retina_io.dataset import DatasetError
from retina_io.loader_base import Batch, EpochPlan, LoaderConfig, buffer_shuffle, epoch_seed, rank_range
from retina_io.schema import decode_labels, parse_key
from retina_io.tario import MemberError, split_member

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_transform(cfg: LoaderConfig):
    """torchvision transforms equivalent to the DALI pipeline's (PIL image in, normalised float CHW tensor out)."""
    from torchvision.transforms import v2 as T

    size, aug = cfg.image_size, cfg.augment
    steps: list = []
    if cfg.mode == "train":
        steps.append(T.RandomResizedCrop(size, scale=aug.random_area, ratio=aug.random_aspect_ratio, antialias=True))
        if aug.hflip > 0:
            steps.append(T.RandomHorizontalFlip(aug.hflip))
        if aug.vflip > 0:
            steps.append(T.RandomVerticalFlip(aug.vflip))
        if aug.rotate_degrees > 0:
            steps.append(T.RandomRotation(aug.rotate_degrees, fill=0))
        steps.append(T.ColorJitter(brightness=aug.brightness, contrast=aug.contrast, saturation=aug.saturation,
                                   hue=aug.hue_degrees / 360.0))  # fmt: skip
        if aug.gamma is not None:
            lo, hi = aug.gamma
            steps.append(T.Lambda(lambda im: T.functional.adjust_gamma(im, random.uniform(lo, hi))))
        if aug.blur_probability > 0:
            k = 2 * int(3 * aug.blur_sigma[1]) + 1
            steps.append(T.RandomApply([T.GaussianBlur(k, sigma=aug.blur_sigma)], p=aug.blur_probability))
    else:
        steps.append(T.Resize(round(size / cfg.eval_crop), antialias=True))
    steps += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True)]
    if cfg.local_contrast > 0:  # on the resized image, before the eval crop, like the DALI pipeline
        sigma = cfg.local_contrast_sigma
        steps.append(T.Lambda(lambda x: local_contrast(x, sigma)))
    if cfg.mode != "train":
        steps.append(T.CenterCrop(size))
    steps.append(T.Normalize(cfg.mean, cfg.std))
    return T.Compose(steps)


class _EpochStream(IterableDataset):
    def __init__(self, cfg: LoaderConfig, shards: list, total: int, steps: int, epoch: int, start_step: int):
        self.cfg, self.shards, self.total, self.steps = cfg, shards, total, steps
        self.epoch, self.start_step = epoch, start_step

    def _part(self) -> Iterator[tuple[int, bytes, bytes]]:
        """This rank's contiguous part of the epoch's sample stream: (key, image bytes, label bytes)."""
        import webdataset as wds

        cfg = self.cfg
        start, end = rank_range(self.total, cfg.rank, cfg.world_size)
        urls, counts, offset, first = [], [], 0, None
        for s in self.shards:  # read only the tars that overlap [start, end)
            if offset + s.samples > start and offset < end:
                first = offset if first is None else first
                urls.append(str(s.tar))
                counts.append(s.samples)
            offset += s.samples
        if not urls:
            return
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        hint = f"run `retina-shard verify {cfg.data}`"
        for i, sample in enumerate(_counted(ds, urls, counts, hint), start=first):
            if i >= end:
                break
            if i < start:
                continue
            yield _fields(sample, hint)

    def _stream(self) -> Iterator[tuple[int, bytes, bytes]]:
        """The part shuffled (train mode) and padded to whole batches with copies of its last sample (key -1)."""
        cfg = self.cfg
        items = self._part()
        if cfg.mode == "train":
            items = buffer_shuffle(items, cfg.shuffle_buffer, np.random.default_rng(epoch_seed(cfg.seed, self.epoch)))
        last, count = None, 0
        for item in items:
            yield item
            last, count = item, count + 1
        if last is not None:
            for _ in range(self.steps * cfg.batch_size - count):
                yield -1, last[1], last[2]

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        cfg = self.cfg
        transform = build_transform(cfg)
        rows: list[tuple[int, bytes, bytes]] = []
        try:
            for pos, item in enumerate(self._stream()):
                j = pos // cfg.batch_size
                if j >= self.start_step and (j - self.start_step) % nw == wid:
                    rows.append(item)
                if (pos + 1) % cfg.batch_size == 0 and rows:
                    yield self._collate(rows, j, transform)
                    rows = []
        except DatasetError as exc:
            if info is None:
                raise
            yield exc  # a worker hands its error over as data: torch would re-raise it with a traceback as message

    def _collate(self, rows, j: int, transform):
        cfg = self.cfg
        # per-batch seed: augmentations depend neither on the worker count nor on resuming
        seed = epoch_seed(cfg.seed, self.epoch) * 131 + cfg.rank * 1_000_003 + j
        random.seed(seed)
        torch.manual_seed(seed)
        images = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for _, b, _ in rows])
        labels = torch.from_numpy(np.stack([lab for _, _, lab in rows]))
        return images, labels, torch.tensor([k for k, _, _ in rows], dtype=torch.int64)


def _counted(samples: Iterator[dict], urls: list[str], counts: list[int], hint: str) -> Iterator[dict]:
    """``samples`` (the stream of ``urls``, in order) checked shard by shard against the manifest's ``counts``.

    A shard that delivers fewer samples than recorded, or more, or cannot be read is a :class:`DatasetError` naming
    it. A consumer that stops early (its part ends inside a shard) leaves the rest unchecked."""
    j, n = 0, 0  # the shard being read, its samples so far
    try:
        for sample in samples:
            while sample["__url__"] != urls[j]:
                if n != counts[j]:
                    raise DatasetError(f"shard {urls[j]} holds {n} samples, manifest.json says {counts[j]}; {hint}")
                j, n = j + 1, 0
            n += 1
            if n > counts[j]:
                raise DatasetError(f"shard {urls[j]} holds more than the {counts[j]} samples of manifest.json; {hint}")
            yield sample
    except DatasetError:
        raise
    except Exception as exc:  # webdataset re-raises the tar reader's errors with the url appended to their args
        url = next((a for a in exc.args[1:] if isinstance(a, str) and a in urls), urls[min(j, len(urls) - 1)])
        why = str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__
        raise DatasetError(f"shard {url} cannot be read ({why}); {hint}") from None
    for jj in range(j, len(urls)):
        have = n if jj == j else 0
        if have != counts[jj]:
            raise DatasetError(f"shard {urls[jj]} holds {have} samples, manifest.json says {counts[jj]}; {hint}")


def _fields(sample: dict, hint: str) -> tuple[int, bytes, np.ndarray]:
    """(key, image bytes, labels) of a webdataset sample of shard format v1; anything else names shard and member."""
    key, exts = sample["__key__"], sorted(k for k in sample if not k.startswith("__"))
    try:
        for ext in exts:
            split_member(f"{key}.{ext}")
        images = [e for e in ("jpg", "png") if e in sample]
        if len(images) != 1 or "labels" not in sample:
            raise MemberError(f"sample {key} has {exts}; a sample is one of jpg/png, labels and json")
        return parse_key(key), sample[images[0]], decode_labels(sample["labels"])
    except ValueError as exc:
        raise DatasetError(f"shard {sample['__url__']}: {exc}; {hint}") from None


class WdsLoader(EpochPlan):
    """See :mod:`retina_io.loader`."""

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        cfg = self.cfg
        shards = self.epoch_shards(epoch, start_step)
        stream = _EpochStream(cfg, shards, self.total, self.steps_per_epoch, epoch, start_step)
        workers = max(0, cfg.threads)
        loader = DataLoader(stream, batch_size=None, num_workers=workers,
                            prefetch_factor=cfg.prefetch_queue_depth if workers else None,
                            pin_memory=self.device.type == "cuda")  # fmt: skip
        dtype = _TORCH_DTYPES[cfg.dtype]
        for out in loader:
            if isinstance(out, DatasetError):
                raise out
            images, labels, keys = out
            x = images.to(self.device, non_blocking=True)
            if cfg.layout == "NHWC":
                x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(x.to(dtype), labels.to(self.device, non_blocking=True).float(), keys.to(self.device))
