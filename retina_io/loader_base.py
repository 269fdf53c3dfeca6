"""What both loader backends build on: the settings and config a loader is asked for, the batch it yields, the
epoch plan (this rank's part, batches per epoch, shard order). :mod:`retina_io.loader` (the documented entry point,
``build_loader``) re-exports all of it; the backends import it from here, so no module imports its importer.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """Train-mode augmentation, chosen for fundus photographs (a circular field on black; no strong geometry)."""

    random_area: tuple[float, float] = (0.55, 1.0)  # random resized crop: fraction of the image area kept
    random_aspect_ratio: tuple[float, float] = (0.85, 1.18)
    hflip: float = 0.5  # probability; a flipped right eye looks like a left eye
    vflip: float = 0.0
    rotate_degrees: float = 15.0  # uniform in ±degrees, black fill like the surround
    brightness: float = 0.2  # factor uniform in 1 ± brightness
    contrast: float = 0.2
    saturation: float = 0.2
    hue_degrees: float = 4.0  # shift uniform in ± degrees
    gamma: tuple[float, float] | None = None  # e.g. (0.8, 1.25): pixel ** gamma on [0, 1]
    blur_probability: float = 0.0  # Gaussian blur with sigma uniform in blur_sigma
    blur_sigma: tuple[float, float] = (0.1, 1.5)


@dataclass(kw_only=True)
class LoaderSettings:
    """The loader settings a run chooses: a run's config holds them (its ``data`` section, ``DataConfig`` in
    :mod:`retina_train.config`, is one), and every :class:`LoaderConfig` built for the run starts from them
    (:meth:`LoaderConfig.from_settings`), so training, validation, prediction and ``retina-shard preview --run`` see
    the same batches."""

    batch_size: int = 64  # per rank
    backend: str = "dali"  # "dali" or "wds"
    # DALI CPU threads / fallback DataLoader workers (0: in the main process); None: the cores per local rank
    num_threads: int | None = None
    prefetch_queue_depth: int = 2  # batches prepared ahead (DALI pipeline queue; fallback: per worker)
    shuffle_buffer: int = 1024  # samples in the train-mode shuffle buffer (DALI initial_fill)
    # Ben Graham's local contrast normalisation (Kaggle DR 2015), train and eval alike, before mean/std:
    # x <- clip(4 * (x - GaussianBlur(x, sigma)) + 128, 0, 255) with sigma = local_contrast * image_size; 0: off.
    # Flattens illumination and colour casts and lifts small lesions; a from-scratch model learns them sooner.
    local_contrast: float = 0.0
    # read shards with plain reads instead of memory-mapping them: for network filesystems (NFS, Lustre, GPFS), where
    # a page fault per image stalls the reading thread and mapped pages count against the job's memory
    dont_use_mmap: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(kw_only=True)
class LoaderConfig(LoaderSettings):
    """Everything a loader needs: a run's :class:`LoaderSettings` plus what it reads and how it delivers batches.
    The defaults are documented in the README (host memory and prefetch)."""

    data: Path  # a packed dataset folder (shard format v1)
    folds: Sequence[int]
    mode: str = "train"  # "train" or "eval"
    image_size: int = 224  # the backbone's input size (square)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # on [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD
    layout: str = "NCHW"  # "NCHW" or "NHWC" (channels-last memory, NCHW shape)
    dtype: str = "float32"  # "float32", "bfloat16" or "float16"
    device: str = "cpu"  # where batches are delivered: "cpu" or "cuda[:N]"
    decode_device: str = "auto"  # DALI: "mixed" (nvJPEG on the GPU), "cpu", or "auto" (mixed when device is cuda)
    hw_decoder_load: float = 0.65  # DALI mixed: share of JPEGs sent to the hardware decoder (A100/H100)
    eval_crop: float = 1.0  # eval: resize the short side to image_size / eval_crop, center-crop image_size
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_settings(cls, settings: LoaderSettings, **fields) -> LoaderConfig:
        """A loader config with the :class:`LoaderSettings` fields of ``settings`` (e.g. a run's ``data`` section);
        ``fields`` set the rest and may replace any of them (e.g. ``batch_size`` at prediction)."""
        shared = {f.name: getattr(settings, f.name) for f in dataclasses.fields(LoaderSettings)}
        return cls(**{**shared, **fields})

    def __post_init__(self) -> None:
        if self.mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval'; got {self.mode!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC' (channels-last); got {self.layout!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16; got {self.dtype!r}")
        if self.backend not in ("dali", "wds"):
            raise ValueError(f"backend must be 'dali' or 'wds'; got {self.backend!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}; got {self.rank}")
        if not 0.0 <= self.local_contrast <= 0.5:
            raise ValueError(f"local_contrast is sigma / image_size, in [0, 0.5] (0: off); got {self.local_contrast}")
        if self.batch_size < 1 or self.image_size < 8:
            raise ValueError(f"batch_size >= 1 and image_size >= 8 needed; got {self.batch_size}, {self.image_size}")
        self.data = Path(self.data)
        self.folds = tuple(int(f) for f in self.folds)

    @property
    def local_contrast_sigma(self) -> float:
        """Gaussian sigma in output pixels for :attr:`local_contrast` (0.0: off)."""
        return self.local_contrast * self.image_size

    @property
    def threads(self) -> int:
        """DALI CPU threads / fallback workers: :attr:`num_threads`, or for None the cores per local rank."""
        return self.num_threads if self.num_threads is not None else default_threads()

    @property
    def resolved_decode_device(self) -> str:
        if self.decode_device == "auto":
            return "mixed" if self.device.startswith("cuda") else "cpu"
        if self.decode_device not in ("mixed", "cpu"):
            raise ValueError(f"decode_device must be 'mixed', 'cpu' or 'auto'; got {self.decode_device!r}")
        return self.decode_device


class Batch(NamedTuple):
    images: object  # torch.Tensor
    labels: object  # torch.Tensor, float N×11
    keys: object  # torch.Tensor, int64 N; -1 = padded


class Loader(Protocol):
    steps_per_epoch: int
    num_samples: int

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


def rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part ``[start, end)`` of ``n`` samples (DALI's ``shard_id``/``num_shards`` rule)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def steps_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """Batches every rank runs per epoch: the largest part, padded up to whole batches."""
    largest_part = math.ceil(n / world_size)
    return math.ceil(largest_part / batch_size)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 31-bit seed from the run's seed and the epoch (DALI seeds are int32)."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**31 - 1)


def local_world_size() -> int:
    """Ranks on this node, from the launcher's variables (torchrun/DeepSpeed, Open MPI, MPICH/PMI, Slurm); 1 if none."""
    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "").split("(")[0].split(",")[0]  # Slurm: "4(x2)" or "4,2"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def default_threads() -> int:
    """The CPU cores this process may run on, shared among the ranks of its node (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size())


def buffer_shuffle(items: Iterator, buffer: int, rng) -> Iterator:
    """A shuffle buffer like DALI's reader: fill ``buffer`` items, then emit a random one for each new item."""
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) >= buffer:
            yield buf.pop(int(rng.integers(len(buf))))
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


def epoch_shards(shards: list, cfg: LoaderConfig, epoch: int) -> list:
    """The shards in this epoch's reading order: manifest order in eval mode, a seeded permutation in train mode."""
    if cfg.mode == "eval":
        return list(shards)
    import numpy as np

    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(shards))
    return [shards[i] for i in order]


class EpochPlan:
    """What both backends share: the folds' shards, this rank's part, the batches per epoch, the epoch's shard order."""

    def __init__(self, cfg: LoaderConfig):
        import torch

        from retina_io.dataset import PackedDataset

        self.cfg = cfg
        self.dataset = PackedDataset.open(cfg.data)
        self.shards = self.dataset.shards(cfg.folds)
        self.total = sum(s.samples for s in self.shards)
        start, end = rank_range(self.total, cfg.rank, cfg.world_size)
        self.num_samples = end - start
        self.steps_per_epoch = steps_per_epoch(self.total, cfg.batch_size, cfg.world_size)
        self.device = torch.device(cfg.device)

    def epoch_shards(self, epoch: int, start_step: int) -> list:
        """This epoch's shard order, after checking ``start_step``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in 0..{self.steps_per_epoch}; got {start_step}")
        return epoch_shards(self.shards, self.cfg, epoch)

    def epoch_order(self, epoch: int):
        """This rank's samples of ``epoch`` in reading order, as positions in the manifest-order concatenation of
        :attr:`shards`, padded to ``steps_per_epoch`` whole batches with copies of the last (the int64 array, and a
        bool mask of the padded rows). The order both backends read: the epoch's shard order, this rank's contiguous
        part of it, in train mode mixed by a ``shuffle_buffer`` seeded with (seed, epoch)."""
        import numpy as np

        cfg = self.cfg
        first = np.cumsum([0] + [s.samples for s in self.shards])
        where = {id(s): i for i, s in enumerate(self.shards)}
        stream = np.concatenate([np.arange(first[where[id(s)]], first[where[id(s)] + 1])
                                 for s in epoch_shards(self.shards, cfg, epoch)])  # fmt: skip
        start, end = rank_range(self.total, cfg.rank, cfg.world_size)
        part = stream[start:end]
        if cfg.mode == "train":
            rng = np.random.default_rng(epoch_seed(cfg.seed, epoch))
            part = np.fromiter(buffer_shuffle(iter(part.tolist()), cfg.shuffle_buffer, rng), np.int64, len(part))
        pad = self.steps_per_epoch * cfg.batch_size - len(part)
        order = np.concatenate([part, np.full(pad, part[-1] if len(part) else 0, dtype=np.int64)])
        return order, np.arange(len(order)) >= len(part)
