"""Fold-model prediction: one pass of a model over a batch source, and a trained backbone's fold models as one.

- :func:`predict` — ``(keys, probabilities, labels)`` of a model over a loader (one eval pass of ``iter_epoch``) or
  any iterable of batches (:class:`retina_io.loader.Batch`, or bare image tensors); padded rows (key -1) dropped.
  Validation, OOF writing, ensemble and zero-shot evaluation all predict through it.
- :class:`BackboneRun` — a trained backbone's folder ``runs/EXP/MODEL``: its resolved ``config.json``, its settings on
  this device, its fold models ``fold{k}/best.safetensors`` and those of its k folds that are missing (k as training
  recorded it in ``fold*/done.json``, else the k of the dataset it trained on); :func:`fold_mean` averages its fold
  models' predictions (a float64 sum of each fold model's probabilities, divided by their count).
- :func:`open_backbones` — every backbone of a run, refusing in one line naming every missing fold model unless
  ``allow_partial`` (no silent partial ensemble: issue 11; docs/architecture.md, "Errors and command lines").
- :func:`predict_backbone` / :func:`predict_runs` — every fold model of one backbone / of every backbone of a run over
  a packed dataset through the eval-mode loader: one row per sample with the ``MODEL__CLASS`` columns the
  meta-learner was trained on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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
    """The fold models' weight files of a backbone folder (``fold{k}/best.safetensors``), in fold order."""
    files = [f for f in Path(model_dir).glob("fold*/best.safetensors") if _fold_number(f.parent) is not None]
    files.sort(key=lambda f: _fold_number(f.parent))
    if not files:
        raise InferenceError(f"{model_dir} has no fold models (fold*/best.safetensors); finish its training first")
    return files


def _fold_number(fold_dir: Path) -> int | None:
    digits = fold_dir.name.removeprefix("fold")
    return int(digits) if fold_dir.name.startswith("fold") and digits.isdigit() else None


def trained_k(model_dir: Path, cfg: RunConfig) -> int:
    """How many folds the backbone's ensemble has: the dataset's k as training recorded it in ``fold*/done.json``
    (:meth:`retina_train.trainer.Trainer.fit`), else the k of the dataset its config names."""
    from retina_io.dataset import load_manifest

    recorded = set()
    for done in Path(model_dir).glob("fold*/done.json"):
        try:
            k = json.loads(done.read_text()).get("k")
        except (OSError, ValueError, AttributeError) as exc:
            raise InferenceError(f"{done} cannot be read as JSON ({exc}); train that fold again") from None
        if isinstance(k, int) and k >= 2:
            recorded.add(k)
    if len(recorded) > 1:
        raise InferenceError(f"{model_dir}: its folds' done.json record different fold counts {sorted(recorded)}")
    if recorded:
        return recorded.pop()
    try:
        return int(load_manifest(Path(cfg.data.dataset))["k"])
    except (RetinaError, OSError, KeyError, TypeError, ValueError) as exc:
        raise InferenceError(f"{model_dir}: no fold*/done.json records its fold count, and the dataset it trained on "
                             f"({cfg.data.dataset}) cannot tell it ({exc}), so whether every fold model is there "
                             "cannot be checked (--allow-partial uses the fold models found)") from None  # fmt: skip


@dataclass
class BackboneRun:
    """A trained backbone's folder: its config (as resolved when it trained), settings here, fold model files and,
    once :meth:`check_folds` has looked, the fold model files of its k folds that are missing."""

    name: str
    cfg: RunConfig
    settings: RunSettings
    weights: list[Path]
    missing: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, model_dir: Path, device: str = "cpu") -> BackboneRun:
        """The backbone folder ``model_dir`` with the fold models it holds (refused when it holds none); whether
        they are all its folds' is :meth:`check_folds`'s question (:func:`open_backbones` asks it)."""
        model_dir = Path(model_dir)
        cfg = read_run_config(model_dir)
        return cls(model_dir.name, cfg, resolve_settings(cfg, device), fold_models(model_dir))

    def check_folds(self, k: int | None = None) -> list[Path]:
        """Set and return :attr:`missing`: the absent ``fold{f}/best.safetensors`` of ``k`` folds (default: the
        backbone's own k, :func:`trained_k`)."""
        model_dir = self.weights[0].parent.parent
        k = trained_k(model_dir, self.cfg) if k is None else k
        have = {_fold_number(w.parent) for w in self.weights}
        self.missing = [model_dir / f"fold{f}" / "best.safetensors" for f in range(k) if f not in have]
        return self.missing

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    def load(self, weights: Path) -> torch.nn.Module:
        """One fold model with its best weights, on the settings' device; an InferenceError naming ``weights`` when
        the file is not a safetensors state dict of this backbone (damaged, truncated, another model's)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        model = create_backbone(self.cfg.model.backbone, image_size=self.cfg.data.image_size)
        try:
            model.load_state_dict(load_file(str(weights), device="cpu"))
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise InferenceError(f"{weights} is not usable weights of {self.cfg.model.backbone} ({reason}); train that "
                                 "fold again or copy the file whole") from None  # fmt: skip
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


def open_backbones(runs: Path, device: str = "cpu", *, allow_partial: bool = False) -> list[BackboneRun]:
    """Every backbone of run ``runs`` with all its fold models; an InferenceError naming every missing fold model
    (one line) unless ``allow_partial``, which logs a warning per partial backbone instead."""
    opened = [BackboneRun.open(d, device) for d in backbone_dirs(runs)]
    for r in opened:
        try:
            r.check_folds()
        except InferenceError as exc:  # the fold count is unknown: only an explicit opt-in goes on
            if not allow_partial:
                raise
            log.warning("%s; going on with its %d fold models (--allow-partial)", exc, len(r.weights))
    missing = [str(m) for r in opened for m in r.missing]
    if missing and not allow_partial:
        raise InferenceError(f"fold model(s) missing: {', '.join(missing)}; a backbone's probability is the mean of "
                             "all its fold models, so finish training those folds (or pass --allow-partial to use "
                             "the fold models present, reported as a partial ensemble)")  # fmt: skip
    for r in opened:
        if r.partial:
            log.warning("partial ensemble: %s uses %d of its %d fold models; missing %s", r.name, len(r.weights),
                        len(r.weights) + len(r.missing), ", ".join(map(str, r.missing)))  # fmt: skip
    return opened


def predict_backbone(model_dir: Path | BackboneRun, data: Path, *, device: str = "cpu", batch_size: int = 64,
                     backend: str = "dali", num_threads: int = 2) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(keys, mean probability over the fold models) for every sample of ``data``, keys sorted. A folder is opened
    with :meth:`BackboneRun.open` and must hold all its fold models; a :class:`BackboneRun` is used as it is."""
    run = model_dir if isinstance(model_dir, BackboneRun) else BackboneRun.open(model_dir, device)
    if not isinstance(model_dir, BackboneRun) and run.check_folds():
        raise InferenceError(f"fold model(s) missing: {', '.join(map(str, run.missing))}")
    ds = PackedDataset.open(data)

    def batches_for(model):
        lcfg = run.loader_config(model, folds=range(ds.k), mode="eval", data=Path(data), batch_size=batch_size,
                                 backend=backend, num_threads=num_threads)  # fmt: skip
        return build_loader(lcfg)

    return fold_mean(run, batches_for)


def predict_runs(runs: Path | list[BackboneRun], data: Path, *, device: str = "cpu", batch_size: int = 64,
                 backend: str = "dali", num_threads: int = 2) -> pl.DataFrame:  # fmt: skip
    """One row per sample of ``data``: ``key`` then ``MODEL__CLASS`` mean fold-model probabilities. ``runs``: a run
    folder (every fold model of every backbone required, :func:`open_backbones`) or its opened backbones."""
    frame = None
    opened = open_backbones(runs, device) if isinstance(runs, str | Path) else runs
    for run in opened:
        keys, probs = predict_backbone(run, data, device=device, batch_size=batch_size, backend=backend,
                                       num_threads=num_threads)  # fmt: skip
        columns = {feature_name(run.name, c): probs[:, j] for j, c in enumerate(CLASSES)}
        part = pl.DataFrame({"key": format_keys(keys), **columns})
        frame = part if frame is None else frame.join(part, on="key", how="full", coalesce=True)
    return frame.sort("key")
