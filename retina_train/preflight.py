"""What a training run checks before it writes anything (issue 11: a bad option must not poison the run folder).

- :func:`check_options` — every option of a resolved :class:`~retina_train.config.RunConfig` in its range (epochs,
  batch, image size, learning rate, warmup, gradient accumulation, seeds, augmentations, ...) and the files it names;
  needs neither the dataset nor the process group, so ``retina-demo`` checks every backbone's options with it too.
- :func:`check_plan` — the options against the dataset and the ranks: every requested fold has samples to validate
  on, every rank gets training samples, an epoch has at least one optimizer step; the backbone takes the image size.
- :func:`check_out` — ``--out`` can be a folder: neither it nor a folder above it is a file, and it can be written.

Each raises a :class:`~retina_train.config.ConfigError` whose one line names the option (its flag where it has one)
and the value; :func:`retina_train.trainer.run_folds` calls all three before it creates a folder or writes
``config.json``, so the corrected command runs into the same ``--out``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from retina_io.fsutil import folder_problem
from retina_io.loader import steps_per_epoch
from retina_train.config import ConfigError, RunConfig
from retina_train.ds_config import read_user_config

# The command-line flag of a config key, where it has one; other keys are set with --set KEY=VALUE (or a YAML).
FLAGS = {"train.epochs": "--epochs", "data.batch_size": "--batch-size", "data.image_size": "--image-size",
         "optim.lr": "--lr", "train.seed": "--seed", "model.pretrained_file": "--pretrained-file",
         "train.deepspeed_config": "--deepspeed-config"}  # fmt: skip
MIN_IMAGE_SIZE = 8  # the loader's smallest input
log = logging.getLogger(__name__)


def option(key: str) -> str:
    """How a user names config key ``key``: ``--epochs (train.epochs)`` or ``data.grad_accum``."""
    return f"{FLAGS[key]} ({key})" if key in FLAGS else key


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    def ok(x) -> bool:
        return _finite(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)

    text = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return ok, text


def _pair(lo: float, hi: float | None = None):
    """An ordered pair (a, b) with lo < a <= b (<= hi)."""

    def ok(v) -> bool:
        return (len(v) == 2 and all(_finite(x) for x in v) and lo < v[0] <= v[1]
                and (hi is None or v[1] <= hi))  # fmt: skip

    return ok, f"a pair (a, b) with {lo:g} < a <= b" + (f" <= {hi:g}" if hi is not None else "")


AT_LEAST_1 = (lambda x: isinstance(x, int) and x >= 1, ">= 1")
AT_LEAST_0 = (lambda x: _finite(x) and x >= 0, ">= 0")
POSITIVE = (lambda x: _finite(x) and x > 0, "> 0 (and finite)")
PROBABILITY = _range(0, 1)
FRACTION = _range(0, 1, hi_open=True)

RULES: dict[str, tuple] = {
    "train.epochs": AT_LEAST_1,
    "data.batch_size": AT_LEAST_1,
    "data.eval_batch_size": (lambda x: isinstance(x, int) and x >= 0, ">= 0 (0: from data.batch_size)"),
    "data.image_size": (lambda x: x == 0 or x >= MIN_IMAGE_SIZE, f"0 (the backbone's) or >= {MIN_IMAGE_SIZE} pixels"),
    "data.grad_accum": AT_LEAST_1,
    "data.num_threads": (lambda x: x is None or AT_LEAST_1[0](x), "null (the cores per local rank) or >= 1"),
    "data.prefetch_queue_depth": AT_LEAST_1,
    "data.shuffle_buffer": AT_LEAST_1,
    "data.local_contrast": _range(0, 0.5),
    "data.augment.random_area": _pair(0, 1),
    "data.augment.random_aspect_ratio": _pair(0),
    "data.augment.hflip": PROBABILITY,
    "data.augment.vflip": PROBABILITY,
    "data.augment.rotate_degrees": _range(0, 180),
    "data.augment.brightness": AT_LEAST_0,
    "data.augment.contrast": AT_LEAST_0,
    "data.augment.saturation": AT_LEAST_0,
    "data.augment.hue_degrees": _range(0, 180),
    "data.augment.gamma": (lambda v: v is None or _pair(0)[0](v), "null (off) or a pair (a, b) with 0 < a <= b"),
    "data.augment.blur_probability": PROBABILITY,
    "data.augment.blur_sigma": _pair(0),
    "optim.lr": POSITIVE,
    "optim.weight_decay": AT_LEAST_0,
    "optim.betas": (lambda v: all(FRACTION[0](b) for b in v), "two values in [0, 1)"),
    "optim.warmup_epochs": (lambda x: _finite(x) and x >= 0, ">= 0 epochs"),
    "optim.min_lr_ratio": PROBABILITY,
    "optim.grad_clip": (lambda x: _finite(x) and x >= 0, ">= 0 (0: no clipping)"),
    "model.drop_rate": FRACTION,
    "model.drop_path_rate": FRACTION,
    "model.layer_decay": (lambda x: x is None or _range(0, 1, lo_open=True)[0](x), "null or in (0, 1]"),
    "train.seed": (lambda x: isinstance(x, int) and x >= 0, ">= 0"),
    "train.zero_stage": (lambda x: x in (0, 1, 2), "0, 1 or 2 (stage 3 partitions the weights the OOF reads whole)"),
    "train.checkpoint_every": (lambda x: isinstance(x, int) and x >= 0, ">= 0 (0: at each epoch's end only)"),
    "train.log_interval": AT_LEAST_1,
}


def _get(cfg: RunConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check_options(cfg: RunConfig) -> None:
    """Every option in its range and every file it names readable; a ConfigError naming the first that is not."""
    for key, (ok, text) in RULES.items():
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{option(key)} must be {text}; got {value!r}")
    if cfg.model.pretrained_file and not Path(cfg.model.pretrained_file).is_file():
        raise ConfigError(f"{option('model.pretrained_file')} {cfg.model.pretrained_file}: no such file")
    if cfg.train.overlap_comm and cfg.train.zero_stage == 0:
        raise ConfigError("train.overlap_comm needs train.zero_stage 1 or 2 (stage 0 all-reduces after backward)")
    if cfg.train.deepspeed_config:
        read_user_config(Path(cfg.train.deepspeed_config))
    if not cfg.data.dataset:
        raise ConfigError("--data (data.dataset) is not set: name a packed dataset folder (retina-shard pack)")


def check_out(cfg: RunConfig) -> None:
    """``--out`` (and its backbone folder) can be a folder this process writes."""
    problem = folder_problem(Path(cfg.out) / cfg.model.backbone)
    if problem:
        raise ConfigError(f"--out {cfg.out}: {problem}")


def check_plan(cfg: RunConfig, dataset, folds: Sequence[int], *, world: int, image_size: int) -> None:
    """The options against the dataset and the ranks, for every requested fold (see the module docstring)."""
    from retina_train.backbones import check_input_size

    try:
        check_input_size(cfg.model.backbone, image_size)
    except ValueError as exc:
        raise ConfigError(f"{option('data.image_size')} {image_size}: {exc}") from exc
    per_fold = [sum(s.samples for s in dataset.shards([f])) for f in range(dataset.k)]
    batch, accum = cfg.data.batch_size, cfg.data.grad_accum
    for k in folds:
        n_val, n_train = per_fold[k], sum(per_fold) - per_fold[k]
        if n_val == 0:
            raise ConfigError(f"{cfg.data.dataset}: fold {k} holds no samples, so there is nothing to validate on; "
                              "pack it with fewer --folds")  # fmt: skip
        if n_train < world:
            raise ConfigError(f"{cfg.data.dataset}: the training folds of fold {k} hold {n_train} samples, fewer "
                              f"than the {world} ranks; use fewer ranks or more data")  # fmt: skip
        micro = steps_per_epoch(n_train, batch, world)
        if accum > micro:
            raise ConfigError(f"{option('data.grad_accum')} {accum} is more than the {micro} batches of an epoch of "
                              f"fold {k} ({n_train} training samples, batch {batch} x {world} ranks): no optimizer "
                              "step would complete within an epoch; lower it")  # fmt: skip
        optimizer_steps = math.ceil(micro / accum) * cfg.train.epochs
        if optimizer_steps <= 2:
            log.warning("fold %d: %d optimizer step(s) in all; DeepSpeed's WarmupCosineLR gives the first two a "
                        "learning rate of 0, so only BatchNorm statistics will change: train more epochs or use "
                        "a smaller batch", k, optimizer_steps)  # fmt: skip
