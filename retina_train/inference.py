"""Inference, one path for all of it: validation, OOF writing, ``retina-eval`` and ``retina-predict``.

- :func:`predict` — ``(keys, probabilities, labels)`` of one model over a loader (one eval pass of ``iter_epoch``) or
  any iterable of batches (:class:`retina_io.loader.Batch`, or bare image tensors); padded rows (key -1) dropped.
  Validation and OOF writing (:mod:`retina_train.trainer`) predict through it.
- :class:`BackboneRun` — a trained backbone's folder ``runs/EXP/MODEL``: its resolved ``config.json``, its settings on
  this device, its fold models ``fold{k}/best.safetensors`` and those of its k folds that are missing (k as training
  recorded it in ``fold*/done.json``, else the k of the dataset it trained on).
- :func:`open_backbones` — every backbone of a run, refusing in one line naming every missing fold model unless
  ``allow_partial`` (no silent partial ensemble: issue 11; docs/architecture.md, "Errors and command lines").
- :class:`Ensemble` — the fold models of one or more backbones, grouped by preprocessing (input size, mean/std, local
  contrast, eval crop): each batch is decoded once per group and every fold model of every backbone of the group
  predicts it. A backbone's probability is the mean over its fold models (a float64 sum of each fold model's
  probabilities, divided by their count; with test-time augmentation each fold model first averages its views).
  ``retina-predict`` (:mod:`retina_train.predict`) and ``retina-eval`` (:func:`predict_runs`) both predict through it.
- :func:`fold_mean` / :func:`predict_backbone` / :func:`predict_runs` — every fold model of one backbone over a batch
  source / over a packed dataset, and of every backbone of a run over a packed dataset: one row per sample with the
  ``MODEL__CLASS`` columns the meta-learner was trained on.

How a model runs here (the run's :class:`~retina_train.settings.RunSettings`; docs/architecture.md, "Inference"):
under ``torch.inference_mode``; on a GPU in autocast to the precision the run trained in (bf16/fp16; the CPU runs
fp32); model and batches channels-last where training used it (CNNs on a GPU); batches of ``data.eval_batch_size``
(by default 4x the training micro-batch up to 256, never under 2x: nothing is kept for a backward pass). Results are
collected on the device and copied to the host once per pass, not once per batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Sequence
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


# ----------------------------------------------------------------------------------------------- the pass
def autocast_dtype(settings: RunSettings) -> torch.dtype | None:
    """The autocast dtype of inference for a run: its training precision on a GPU; None (fp32) on the CPU."""
    if settings.device == "cpu" or settings.precision == "fp32":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[settings.precision]


def _autocast(device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.inference_mode()
def _collect(forward: Callable[[torch.Tensor], torch.Tensor], batches, device) -> tuple:
    """``(keys, outputs, labels)`` of ``forward`` over ``batches`` (see :func:`predict`), padded rows dropped.
    Every batch's output stays on the device until the end: one host transfer per pass, no sync per batch."""
    if hasattr(batches, "iter_epoch"):
        batches = batches.iter_epoch(0)
    keys, outs, labels, seen = [], [], [], 0
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            batch = Batch(batch, None, torch.arange(seen, seen + len(batch)))
        outs.append(forward(batch.images.to(device, non_blocking=True)))
        keys.append(batch.keys)
        if batch.labels is not None:
            labels.append(batch.labels)
        seen += len(batch.keys)
    if not keys:
        return np.empty(0, np.int64), None, None
    k = torch.cat([x.cpu() for x in keys]).numpy()
    keep = k >= 0
    out = torch.cat(outs).cpu().numpy()[keep]
    return k[keep], out, torch.cat([y.cpu() for y in labels]).numpy()[keep] if labels else None


def predict(model: torch.nn.Module, batches, device, *,
            dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
    """``(keys, probabilities, labels)`` of ``model`` over ``batches``, padded rows (key < 0) dropped.

    ``batches``: a loader (one pass of ``iter_epoch(0)``; this rank's part), or an iterable of :class:`Batch`
    (``labels`` may be None) or of image tensors (keys 0, 1, 2, ... in order). ``labels`` is None when no batch had
    labels. ``dtype``: autocast dtype (:func:`autocast_dtype`; None: as the model's weights). The model is in eval
    mode for the pass and back in its former mode afterwards."""
    was_training = model.training
    model.eval()

    def forward(x):
        with _autocast(device, dtype):
            return torch.sigmoid(model(x).float())

    try:
        keys, probs, labels = _collect(forward, batches, device)
    finally:
        model.train(was_training)
    return keys, probs if probs is not None else np.empty((0, NUM_CLASSES), np.float32), labels


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
        """One fold model with its best weights, in eval mode on the settings' device (channels-last where the run
        trains so); an InferenceError naming ``weights`` when the file is not a safetensors state dict of this
        backbone (damaged, truncated, another model's)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        model = create_backbone(self.cfg.model.backbone, image_size=self.cfg.data.image_size)
        try:
            model.load_state_dict(load_file(str(weights), device="cpu"))
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise InferenceError(f"{weights} is not usable weights of {self.cfg.model.backbone} ({reason}); train that "
                                 "fold again or copy the file whole") from None  # fmt: skip
        if self.settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.to(self.settings.device).eval()

    def loader_config(self, model: torch.nn.Module | None = None, **fields) -> LoaderConfig:
        """The run's loader config for ``model`` (its mean/std; None: the backbone's, read from a weightless copy on
        PyTorch's ``meta`` device), see :func:`retina_train.settings.loader_config`."""
        if model is None:
            try:
                with torch.device("meta"):
                    model = create_backbone(self.cfg.model.backbone, image_size=self.cfg.data.image_size)
            except NotImplementedError:  # an operation without a meta kernel: build it for real (only read here)
                model = create_backbone(self.cfg.model.backbone, image_size=self.cfg.data.image_size)
        return loader_config(self.cfg, self.settings, model, **fields)


@dataclass
class Member:
    """One backbone of an ensemble: its fold models (once loaded), the views it averages, its preprocessing group."""

    name: str
    run: BackboneRun
    flips: list[tuple[int, ...]] = field(default_factory=lambda: [()])  # dims to flip per view; () = the image
    group: int = 0
    models: list[torch.nn.Module] = field(default_factory=list)

    def load(self) -> None:
        if not self.models:
            self.models = [self.run.load(w) for w in self.run.weights]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, classes)`` float64 on the device: the mean over the fold models (and views) of the probabilities."""
        if self.run.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        total = None
        with _autocast(x.device, autocast_dtype(self.run.settings)):
            for model in self.models:
                views = [torch.sigmoid(model(x.flip(d) if d else x).float()).double() for d in self.flips]
                p = views[0] if len(views) == 1 else torch.stack(views).mean(0)
                total = p if total is None else total + p
        return total / len(self.models)


def _group_key(c: LoaderConfig) -> tuple:
    """What makes two backbones' inputs differ (the memory layout does not: each member converts its batches)."""
    return c.image_size, c.mean, c.std, c.local_contrast, c.eval_crop


@dataclass
class Ensemble:
    """Fold models of backbones on ``device``, grouped by preprocessing: one decoded batch per group feeds them all."""

    device: str
    members: list[Member]
    configs: list[LoaderConfig]  # one eval-mode loader config per preprocessing group (data: a placeholder)
    groups: list[list[int]] = field(default_factory=list)  # group -> member positions

    @classmethod
    def from_runs(cls, runs: Sequence[BackboneRun], *, tta: bool = False, loader_fields: Sequence[dict] | None = None,
                  load: bool = True) -> Ensemble:  # fmt: skip
        """The ensemble of ``runs`` (on their settings' device). ``loader_fields``: per run, the LoaderConfig fields
        that fix its preprocessing (a bundle's record); ``tta``: also the mirror images (horizontal flip; vertical
        too for a backbone that trained with vertical flips); ``load``: load every fold model now (else
        :meth:`predict_data` loads one group at a time)."""
        members, configs, keys = [], [], []
        for i, run in enumerate(runs):
            flips = [()]
            if tta:
                flips.append((-1,))  # every training config mirrors horizontally (augment.hflip)
                if run.cfg.data.augment.vflip > 0:
                    flips.append((-2,))
            # the placeholder data path is never read: these configs only describe the eval transform
            fields = dict(loader_fields[i]) if loader_fields else {}
            lcfg = run.loader_config(data=Path("."), folds=[0], mode="eval", **fields)
            key = _group_key(lcfg)
            if key not in keys:
                keys.append(key)
                configs.append(lcfg)
            members.append(Member(run.name, run, flips, keys.index(key)))
        groups = [[i for i, m in enumerate(members) if m.group == g] for g in range(len(configs))]
        device = runs[0].settings.device if runs else "cpu"
        ens = cls(device, members, configs, groups)
        if load:
            for m in members:
                m.load()
        return ens

    def eval_batch_size(self, g: int | None = None) -> int:
        """The batch of group ``g`` (None: of all groups): its backbones' smallest ``data.eval_batch_size``."""
        members = self.members if g is None else [self.members[i] for i in self.groups[g]]
        return min(m.run.settings.eval_batch_size for m in members)

    def forward_group(self, g: int, x: torch.Tensor) -> torch.Tensor:
        """``(n, members of group g, classes)`` float64 on the device for a batch ``x`` of group ``g``'s inputs."""
        return torch.stack([self.members[i].predict(x) for i in self.groups[g]], dim=1)

    @torch.inference_mode()
    def predict_group(self, g: int, images: torch.Tensor) -> np.ndarray:
        """``(n, members of group g, classes)`` float32: each member's mean over fold models (and views)."""
        return self.forward_group(g, images.to(self.device, non_blocking=True)).float().cpu().numpy()

    def predict_data(self, data: Path, *, batch_size: int | None = None, backend: str | None = None,
                     num_threads: int = 2, progress: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:  # fmt: skip
        """``(keys sorted, per group (n, members, classes) float32)`` over every sample of the packed dataset
        ``data``: one loader pass per preprocessing group. ``batch_size`` None: :meth:`eval_batch_size`; ``backend``
        None: the one the group's first backbone trained with. Fold models not loaded yet are loaded for their
        group's pass and released after it."""
        ds = PackedDataset.open(data)
        keys_ref, per_group = None, []
        for g, base in enumerate(self.configs):
            fields = dict(data=Path(data), folds=range(ds.k), num_threads=num_threads,
                          batch_size=batch_size or self.eval_batch_size(g))  # fmt: skip
            if backend:
                fields["backend"] = backend
            loader = build_loader(dataclasses.replace(base, **fields))
            members = [self.members[i] for i in self.groups[g]]
            loaded = [m for m in members if not m.models]
            for m in loaded:
                m.load()
            bar = tqdm(loader.iter_epoch(0), total=loader.steps_per_epoch, unit="batch", disable=not progress,
                       desc=f"predict {'+'.join(m.name for m in members)} ({sum(len(m.models) for m in members)} "
                            "fold models)")  # fmt: skip
            keys, probs, _ = _collect(lambda x, g=g: self.forward_group(g, x).float(), bar, self.device)
            for m in loaded:
                m.models = []
            order = np.argsort(keys)
            keys, probs = keys[order], probs[order]
            if keys_ref is not None and not np.array_equal(keys, keys_ref):
                raise InferenceError(f"{data}: the loader delivered other samples for another preprocessing group")
            keys_ref = keys
            per_group.append(probs)
        return keys_ref, per_group

    def features(self, per_group: list[np.ndarray]) -> dict[str, np.ndarray]:
        """``MODEL__CLASS`` columns (members in order) from each group's ``(n, members, classes)`` array."""
        cols = {}
        for g, probs in enumerate(per_group):
            for j, i in enumerate(self.groups[g]):
                for c, cls_name in enumerate(CLASSES):
                    cols[feature_name(self.members[i].name, cls_name)] = probs[:, j, c]
        return {name: cols[name] for m in self.members for name in (feature_name(m.name, c) for c in CLASSES)}


# ----------------------------------------------------------------------------------------------- runs on datasets
def fold_mean(run: BackboneRun, batches_for: Callable[[torch.nn.Module], Iterable]) -> tuple[np.ndarray, np.ndarray]:
    """(keys sorted, mean probability over the fold models) of every fold model of ``run`` over the batches
    ``batches_for(model)`` gives for its first fold model (a backbone's fold models share their preprocessing): each
    batch is made once and every fold model predicts it."""
    member = Member(run.name, run)
    member.load()
    keys, probs, _ = _collect(member.predict, batches_for(member.models[0]), torch.device(run.settings.device))
    if probs is None:
        return keys, np.empty((0, NUM_CLASSES), np.float32)
    order = np.argsort(keys)
    return keys[order], probs[order].astype(np.float32)


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


def predict_backbone(model_dir: Path | BackboneRun, data: Path, *, device: str = "cpu", batch_size: int | None = None,
                     backend: str = "dali", num_threads: int = 2) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(keys, mean probability over the fold models) for every sample of ``data``, keys sorted. A folder is opened
    with :meth:`BackboneRun.open` and must hold all its fold models; a :class:`BackboneRun` is used as it is."""
    run = model_dir if isinstance(model_dir, BackboneRun) else BackboneRun.open(model_dir, device)
    if not isinstance(model_dir, BackboneRun) and run.check_folds():
        raise InferenceError(f"fold model(s) missing: {', '.join(map(str, run.missing))}")
    ens = Ensemble.from_runs([run], load=False)
    keys, (probs,) = ens.predict_data(Path(data), batch_size=batch_size, backend=backend, num_threads=num_threads,
                                      progress=False)  # fmt: skip
    return keys, probs[:, 0]


def predict_runs(runs: Path | list[BackboneRun], data: Path, *, device: str = "cpu", batch_size: int | None = None,
                 backend: str = "dali", num_threads: int = 2, progress: bool = True) -> pl.DataFrame:  # fmt: skip
    """One row per sample of ``data``: ``key`` then ``MODEL__CLASS`` mean fold-model probabilities, every backbone
    of ``runs`` (a run folder, every fold model of every backbone required (:func:`open_backbones`), or its opened
    backbones), through :class:`Ensemble`: one loader pass per preprocessing group, one group's fold models in memory
    at a time. ``batch_size`` None: the backbones' ``data.eval_batch_size``."""
    opened = open_backbones(runs, device) if isinstance(runs, str | Path) else runs
    ens = Ensemble.from_runs(opened, load=False)
    keys, per_group = ens.predict_data(Path(data), batch_size=batch_size, backend=backend, num_threads=num_threads,
                                       progress=progress)  # fmt: skip
    return pl.DataFrame({"key": format_keys(keys), **ens.features(per_group)}).sort("key")
