"""Ensemble inference: every fold model of every backbone of a run over a packed dataset.

For each backbone folder ``runs/EXP/MODEL`` (its resolved ``config.json`` and ``fold*/best.safetensors``), the k fold
models predict every sample of the dataset through the eval-mode loader; a backbone's probability is the mean of
its fold models. The result is one row per sample with the ``MODEL__CLASS`` columns the meta-learner was trained on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from retina_io.dataset import PackedDataset
from retina_io.errors import RetinaError
from retina_io.loader import build_loader
from retina_io.schema import CLASSES, feature_name, format_keys
from retina_train.backbones import create_backbone
from retina_train.config import from_dict
from retina_train.engine import loader_config, predict

log = logging.getLogger(__name__)


class EnsembleError(RetinaError, RuntimeError):
    """A run folder without usable fold models."""


def backbone_dirs(runs: Path) -> list[Path]:
    """The backbone folders of a run (those with a ``config.json``), sorted by name."""
    dirs = sorted(p for p in Path(runs).iterdir() if p.is_dir() and (p / "config.json").is_file())
    if not dirs:
        raise EnsembleError(f"{runs} holds no trained backbone (no MODEL/config.json); train with retina_train/run.py")
    return dirs


def fold_models(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("fold*/best.safetensors"))
    if not files:
        raise EnsembleError(f"{model_dir} has no fold models (fold*/best.safetensors); finish its training first")
    return files


def predict_backbone(model_dir: Path, data: Path, *, device: str = "cpu", batch_size: int = 64, backend: str = "dali",
                     num_threads: int = 2) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(keys, mean probability over the fold models) for every sample of ``data``, keys sorted."""
    from safetensors.torch import load_file

    cfg = from_dict(json.loads((model_dir / "config.json").read_text()))
    ds = PackedDataset.open(data)
    files = fold_models(model_dir)
    total, keys_ref = None, None
    for f in tqdm(files, desc=f"{model_dir.name} fold models", unit="model", leave=False):
        model = create_backbone(cfg.model.backbone, image_size=cfg.data.image_size)
        model.load_state_dict(load_file(str(f), device="cpu"))
        model.to(device)
        lcfg = loader_config(cfg, model, folds=range(ds.k), mode="eval", device=device, data=Path(data),
                             batch_size=batch_size, backend=backend, num_threads=num_threads)  # fmt: skip
        loader = build_loader(lcfg)
        keys, probs, _ = predict(model, loader, device=torch.device(device))
        order = np.argsort(keys)
        keys, probs = keys[order], probs[order]
        if keys_ref is None:
            keys_ref, total = keys, probs.astype(np.float64)
        else:
            if not np.array_equal(keys, keys_ref):
                raise EnsembleError(f"{f}: predicted another set of samples than the other fold models")
            total += probs
    return keys_ref, (total / len(files)).astype(np.float32)


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
