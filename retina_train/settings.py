"""What a run's config resolves to for its backbone on this machine, computed once: :class:`RunSettings`.

The config (:mod:`retina_train.config`) says what the user asked for (``image_size: 0`` = the backbone's, ``precision:
auto``, ``channels_last: true``); the settings say what that means here (64 px, fp32 on this CPU, NHWC for a CNN).
Training, validation, OOF prediction and ensemble inference all build their loaders through :func:`loader_config`, so
a model always sees its inputs prepared the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from retina_io.loader import IMAGENET_MEAN, IMAGENET_STD, LoaderConfig
from retina_train.backbones import BackboneSpec, get_spec
from retina_train.config import RunConfig

# Channels-last for these on a GPU (tensor cores) and on a CPU too: oneDNN's channels-last convolutions train them
# faster there as well (2-core CPU, one step: ResNet50 1.17x, EfficientNetV2-M 1.67x, ConvNeXtV2-Base 1.47x; the tiny
# stand-ins 1.1-1.3x; benchmarks/RESULTS.md, "channels-last on the CPU").
CNN_FAMILIES = {"resnet", "efficientnet", "convnext"}


@dataclass(frozen=True)
class RunSettings:
    backbone: str
    spec: BackboneSpec
    device: str  # "cpu" or "cuda"
    image_size: int  # the config's, else the backbone's input size
    precision: str  # "fp32", "bf16" or "fp16" (the config's "auto" resolved for the device)
    channels_last: bool  # model and batches in channels-last memory (CNNs, when data.channels_last)
    layer_decay: float | None  # the config's, else the backbone's (RETFound 0.65); None: no layer-wise decay
    eval_batch_size: int = 0  # validation, OOF and ensemble inference batch (data.eval_batch_size resolved)

    @property
    def layout(self) -> str:
        """The loader's memory layout of the batches."""
        return "NHWC" if self.channels_last else "NCHW"

    @property
    def loader_device(self) -> str:
        """Where the loader delivers batches: ``cpu`` or this rank's current GPU."""
        return self.device if self.device == "cpu" else f"cuda:{torch.cuda.current_device()}"


def resolve_settings(cfg: RunConfig, device: str) -> RunSettings:
    """The settings of ``cfg`` on ``device`` ("cpu" or "cuda", see :func:`retina_train.distributed.resolve_device`)."""
    spec = get_spec(cfg.model.backbone)
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    return RunSettings(
        backbone=cfg.model.backbone,
        spec=spec,
        device=device,
        image_size=cfg.data.image_size or spec.image_size,
        precision=precision,
        channels_last=spec.family in CNN_FAMILIES and cfg.data.channels_last,
        layer_decay=cfg.model.layer_decay if cfg.model.layer_decay is not None else spec.layer_decay,
        eval_batch_size=cfg.data.eval_batch_size or default_eval_batch_size(cfg.data.batch_size),
    )


def default_eval_batch_size(batch_size: int) -> int:
    """The inference batch for a training micro-batch: 4x it up to 256, never under 2x. Inference keeps no
    activations for a backward pass, so twice the micro-batch always fits where training fit."""
    return max(2 * batch_size, min(4 * batch_size, 256))


def loader_config(cfg: RunConfig, settings: RunSettings, model: torch.nn.Module, *, folds, mode: str, rank: int = 0,
                  world: int = 1, seed: int = 0, **overrides) -> LoaderConfig:  # fmt: skip
    """The loader config of run ``cfg`` for ``model`` (its mean/std): the run's loader settings (``cfg.data``), its
    dataset, the resolved image size, layout and device, and in eval mode the eval batch size
    (``settings.eval_batch_size``); ``overrides`` replace any field (e.g. ``data``, the external dataset at
    evaluation, or the batch size at prediction)."""
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    fields = dict(
        data=Path(cfg.data.dataset), folds=folds, mode=mode, image_size=settings.image_size,
        mean=tuple(pcfg.get("mean", IMAGENET_MEAN)), std=tuple(pcfg.get("std", IMAGENET_STD)),
        layout=settings.layout, device=settings.loader_device, seed=seed, rank=rank, world_size=world,
    )  # fmt: skip
    if mode == "eval" and settings.eval_batch_size:
        fields["batch_size"] = settings.eval_batch_size
    return LoaderConfig.from_settings(cfg.data, **{**fields, **overrides})
