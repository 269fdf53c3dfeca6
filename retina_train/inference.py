"""Fold-model prediction: one pass of a model over a batch source, and a trained backbone's fold models as one.

- :func:`predict` — ``(keys, probabilities, labels)`` of a model over a loader (one eval pass of ``iter_epoch``) or
  any iterable of batches (:class:`retina_io.loader.Batch`, or bare image tensors); padded rows (key -1) dropped.
  Validation, OOF writing, ensemble and zero-shot evaluation all predict through it.
- :class:`BackboneRun` — a trained backbone's folder ``runs/EXP/MODEL``: its resolved ``config.json``, its settings on
  this device and its fold models ``fold*/best.safetensors``; :func:`fold_mean` averages its fold models' predictions
  (a float64 sum of each fold model's probabilities, divided by their count).
- :func:`predict_backbone` / :func:`predict_runs` — every fold model of one backbone / of every backbone of a run over
  a packed dataset through the eval-mode loader: one row per sample with the ``MODEL__CLASS`` columns the
  meta-learner was trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from retina_io.dataset import PackedDataset
from retina_io.errors import RetinaError
from retina_io.loader import Batch, LoaderConfig, build_loader
from retina_io.schema import CLASSES, NUM_CLASSES, feature_name, format_keys
from retina_train.backbones import create_backbone
from retina_train.config import RunConfig, read_run_config
from retina_train.settings import RunSettings, loader_config, resolve_settings

log = logging.getLogger(__name__)


class InferenceError(RetinaError, RuntimeError):
    """A run folder without usable fold models, or fold models that disagree on what they predicted."""


# ----------------------------------------------------------------------------------------------- one model
@torch.no_grad()
def predict(model: torch.nn.Module, batches, device) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(keys, probabilities, labels)`` of ``model`` over ``batches``, padded rows (key < 0) dropped.

    ``batches``: a loader (one pass of ``iter_epoch(0)``; this rank's part), or an iterable of :class:`Batch`
    (``labels`` may be None) or of image tensors (keys 0, 1, 2, ... in order). ``labels`` is None when no batch had
    labels. The model is in eval mode for the pass and back in its former mode afterwards."""
    if hasattr(batches, "iter_epoch"):
        batches = batches.iter_epoch(0)
    was_training = model.training
    model.eval()
    keys, probs, labels, seen = [], [], [], 0
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            batch = Batch(batch, None, torch.arange(seen, seen + len(batch)))
        keep = batch.keys >= 0
        logits = model(batch.images.to(device))
        keys.append(batch.keys[keep].cpu().numpy())
        probs.append(torch.sigmoid(logits.float())[keep].cpu().numpy())
        if batch.labels is not None:
            labels.append(batch.labels[keep].cpu().numpy())
        seen += len(batch.keys)
    model.train(was_training)
    if not keys:
        return np.empty(0, np.int64), np.empty((0, NUM_CLASSES), np.float32), None
    return np.concatenate(keys), np.concatenate(probs), np.concatenate(labels) if labels else None


# ----------------------------------------------------------------------------------------------- a backbone's folds
def backbone_dirs(runs: Path) -> list[Path]:
    """The backbone folders of a run (those with a ``config.json``), sorted by name."""
    dirs = sorted(p for p in Path(runs).iterdir() if p.is_dir() and (p / "config.json").is_file())
    if not dirs:
        raise InferenceError(f"{runs} holds no trained backbone (no MODEL/config.json); train with retina_train/run.py")
    return dirs


def fold_models(model_dir: Path) -> list[Path]:
    """The fold models' weight files of a backbone folder, in fold order."""
    files = sorted(Path(model_dir).glob("fold*/best.safetensors"))
    if not files:
        raise InferenceError(f"{model_dir} has no fold models (fold*/best.safetensors); finish its training first")
    return files


@dataclass
class BackboneRun:
    """A trained backbone's folder: its config (as resolved when it trained), settings here, fold model files."""

    name: str
    cfg: RunConfig
    settings: RunSettings
    weights: list[Path]

    @classmethod
    def open(cls, model_dir: Path, device: str = "cpu") -> BackboneRun:
        model_dir = Path(model_dir)
        cfg = read_run_config(model_dir)
        return cls(model_dir.name, cfg, resolve_settings(cfg, device), fold_models(model_dir))

    def load(self, weights: Path) -> torch.nn.Module:
        """One fold model with its best weights, on the settings' device."""
        from safetensors.torch import load_file

        model = create_backbone(self.cfg.model.backbone, image_size=self.cfg.data.image_size)
        model.load_state_dict(load_file(str(weights), device="cpu"))
        return model.to(self.settings.device)

    def loader_config(self, model: torch.nn.Module, **fields) -> LoaderConfig:
        """The run's loader config for ``model`` (see :func:`retina_train.settings.loader_config`)."""
        return loader_config(self.cfg, self.settings, model, **fields)


def fold_mean(run: BackboneRun, batches_for: Callable[[torch.nn.Module], Iterable]) -> tuple[np.ndarray, np.ndarray]:
    """(keys sorted, mean probability over the fold models): each fold model predicts ``batches_for(model)`` (one
    model in memory at a time); every fold model must predict the same keys."""
    total, keys_ref = None, None
    for f in tqdm(run.weights, desc=f"{run.name} fold models", unit="model", leave=False):
        model = run.load(f)
        keys, probs, _ = predict(model, batches_for(model), torch.device(run.settings.device))
        order = np.argsort(keys)
        keys, probs = keys[order], probs[order]
        if keys_ref is None:
            keys_ref, total = keys, probs.astype(np.float64)
        else:
            if not np.array_equal(keys, keys_ref):
                raise InferenceError(f"{f}: predicted another set of samples than the other fold models")
            total += probs
    return keys_ref, (total / len(run.weights)).astype(np.float32)


def predict_backbone(model_dir: Path, data: Path, *, device: str = "cpu", batch_size: int = 64, backend: str = "dali",
                     num_threads: int = 2) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(keys, mean probability over the fold models) for every sample of ``data``, keys sorted."""
    run = BackboneRun.open(model_dir, device)
    ds = PackedDataset.open(data)

    def batches_for(model):
        lcfg = run.loader_config(model, folds=range(ds.k), mode="eval", data=Path(data), batch_size=batch_size,
                                 backend=backend, num_threads=num_threads)  # fmt: skip
        return build_loader(lcfg)

    return fold_mean(run, batches_for)


def predict_runs(runs: Path, data: Path, *, device: str = "cpu", batch_size: int = 64, backend: str = "dali",
                 num_threads: int = 2) -> pl.DataFrame:  # fmt: skip
    """One row per sample of ``data``: ``key`` then ``MODEL__CLASS`` mean fold-model probabilities."""
    frame = None
    for model_dir in backbone_dirs(runs):
        keys, probs = predict_backbone(model_dir, data, device=device, batch_size=batch_size, backend=backend,
                                       num_threads=num_threads)  # fmt: skip
        columns = {feature_name(model_dir.name, c): probs[:, j] for j, c in enumerate(CLASSES)}
        part = pl.DataFrame({"key": format_keys(keys), **columns})
        frame = part if frame is None else frame.join(part, on="key", how="full", coalesce=True)
    return frame.sort("key")
