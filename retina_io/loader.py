"""Batches for training and prediction: one config, two backends with the same interface.

``build_loader(LoaderConfig(...))`` returns a loader with ``steps_per_epoch``, ``num_samples`` (this rank's real
samples) and ``iter_epoch(epoch, start_step=0)``, which yields :class:`Batch` ``(images, labels, keys)``:

- ``images``: float32/bfloat16/float16, ``N×C×H×W``; with ``layout="NHWC"`` the same shape in channels-last memory
  (what ``model.to(memory_format=torch.channels_last)`` wants), normalised with the backbone's mean/std;
- ``labels``: float ``N×11`` on the device (read as ``uint8[11]`` from the shard, converted on the device);
- ``keys``: int64 ``N``, the sample keys of shard format v1 as integers; **-1 marks a padded row** (every rank runs
  the same number of full batches; padded rows must not reach a loss, a metric or an OOF file: ``keys >= 0``).

Backends: ``dali`` (NVIDIA DALI, one pipeline per loader: the folds' tars read at their ``.idx`` offsets and fed
through ``fn.external_source``, decoded on the GPU with ``decode_device="mixed"`` or on the CPU with ``"cpu"``; one
resampling for crop, resize, rotation and flips; colour on the batch in torch: :mod:`retina_io.augment`) and
``wds`` (the stock ``webdataset`` library + PIL + a torch DataLoader, for machines without DALI). Both yield the same
keys in the same order with the same labels.

Ranks: ``rank``/``world_size`` split each epoch's samples into equal contiguous parts; parts are padded to the same
number of batches. Train mode reshuffles every epoch (the epoch number is part of the seed): the order of the tars is
permuted, then a shuffle buffer mixes the rank's part (the packer already shuffled each fold globally). Eval mode
reads in manifest order, deterministically. Threads (``num_threads=None``): the cores per local rank.

Resume: ``iter_epoch(epoch, start_step=N)`` yields exactly the batches an uninterrupted epoch yields from step N on
(DALI: without decoding the first N; a batch's augmentation depends on (seed, epoch, rank, step) only).
"""

from __future__ import annotations

from retina_io.loader_base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    Batch,
    EpochPlan,
    Loader,
    LoaderConfig,
    LoaderSettings,
    epoch_seed,
    epoch_shards,
    rank_range,
    steps_per_epoch,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "Batch",
    "EpochPlan",
    "Loader",
    "LoaderConfig",
    "LoaderSettings",
    "epoch_seed",
    "epoch_shards",
    "rank_range",
    "steps_per_epoch",
    "build_loader",
]


def build_loader(cfg: LoaderConfig) -> Loader:
    """The loader for ``cfg.backend``."""
    if cfg.backend == "dali":
        from retina_io.dali_loader import DaliLoader

        return DaliLoader(cfg)
    from retina_io.wds_loader import WdsLoader

    return WdsLoader(cfg)
