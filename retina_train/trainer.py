"""k-fold training of one backbone with DeepSpeed: :func:`run_folds` over the folds, a :class:`Trainer` per fold.

Per fold k, :meth:`Trainer.fit` reads top to bottom: set up (model, loaders, DeepSpeed engine, resume from the last
checkpoint), then every epoch train on the other folds' shards, validate on fold k (macro-AUC, per-class AUC, F1),
keep the best weights by macro-AUC (``best.safetensors``: a plain state dict, usable without DeepSpeed) and
checkpoint; finally predict fold k with the best weights into ``oof-rank{R}.parquet`` (docs/contracts.md, contract 3).
DeepSpeed checkpoints are written every ``train.checkpoint_every`` optimizer steps and at every epoch's end; a fold
with a checkpoint resumes from it, mid-epoch included, and still ends with exactly-once OOF. A fold with
``done.json`` is skipped.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from retina_io.dataset import PackedDataset
from retina_io.fsutil import atomic_path, write_atomic
from retina_io.loader import build_loader
from retina_io.schema import CLASSES
from retina_train.backbones import create_backbone, param_groups
from retina_train.config import ConfigError, RunConfig, config_differences, to_dict
from retina_train.distributed import barrier, gather_arrays, init_distributed, rank_world, resolve_device
from retina_train.ds_config import build_ds_config
from retina_train.inference import autocast_dtype, predict
from retina_train.oof import write_oof
from retina_train.preflight import check_options, check_out, check_plan
from retina_train.settings import RunSettings, loader_config, resolve_settings

log = logging.getLogger(__name__)


class _SchedulerNotStartedFilter(logging.Filter):
    """DeepSpeed warns once per engine that the lr "scheduler before it has started" was read (its own
    ``initialize`` reads it): not actionable, and 30 lines in a 6-backbone x 5-fold demo."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "before it has started" not in record.getMessage()


logging.getLogger("DeepSpeed").addFilter(_SchedulerNotStartedFilter())


# ----------------------------------------------------------------------------------------------- the run
def run_folds(cfg: RunConfig) -> dict:
    """Train ``cfg.model.backbone`` on every requested fold; returns a summary (per-fold best macro-AUC).

    Every option is checked (:mod:`retina_train.preflight`) before anything is written, on every rank alike."""
    check_options(cfg)
    device = resolve_device(cfg.train.device)
    init_distributed(device)
    rank, world = rank_world()
    settings = resolve_settings(cfg, device)
    dataset = PackedDataset.open(Path(cfg.data.dataset))
    folds = parse_folds(cfg.train.folds, dataset.k)
    check_plan(cfg, dataset, folds, world=world, image_size=settings.image_size)
    check_out(cfg)
    model_dir = Path(cfg.out) / cfg.model.backbone
    if cfg.train.resume:
        _require_resumable(model_dir, folds)
    _check_or_write_config(model_dir, cfg, settings, rank)
    summary = {"backbone": cfg.model.backbone, "folds": {}}
    for k in folds:
        fold_dir = model_dir / f"fold{k}"
        done = fold_dir / "done.json"
        if done.is_file():
            log.info("fold %d is done already (%s); skipping", k, done)
            summary["folds"][k] = json.loads(done.read_text())
            continue
        result = Trainer(cfg, settings, dataset, fold=k, fold_dir=fold_dir, rank=rank, world=world).fit()
        barrier()
        if rank == 0:
            done.write_text(json.dumps(result, indent=1))
        summary["folds"][k] = result
    return summary


def parse_folds(spec: str, k: int) -> list[int]:
    if spec == "all":
        return list(range(k))
    try:
        folds = sorted({int(x) for x in str(spec).split(",") if x.strip() != ""})
    except ValueError as exc:
        raise ConfigError(f"--folds must be 'all' or a list like 0,2; got {spec!r}") from exc
    bad = [f for f in folds if not 0 <= f < k]
    if bad or not folds:
        raise ConfigError(f"--folds {spec}: the dataset has folds 0..{k - 1}")
    return folds


def _require_resumable(model_dir: Path, folds: list[int]) -> None:
    """``--resume`` means: continue an earlier run. Refuse when none of its requested folds has a checkpoint or is
    done (a mistyped ``--out`` would otherwise silently start from scratch)."""
    found = [k for k in folds if (model_dir / f"fold{k}" / "checkpoints" / "latest").is_file()
             or (model_dir / f"fold{k}" / "done.json").is_file()]  # fmt: skip
    if not found:
        raise ConfigError(f"--resume: {model_dir} holds no checkpoint (fold*/checkpoints/latest) or finished fold of "
                          f"folds {','.join(map(str, folds))} to resume; run without --resume to start")  # fmt: skip


def has_progress(model_dir: Path) -> bool:
    """Whether a backbone folder holds anything a run computed: a fold's checkpoint, best weights, OOF or done.json."""
    marks = ("checkpoints/latest", "best.safetensors", "oof-rank*.parquet", "done.json")
    return any(next(Path(model_dir).glob(f"fold*/{m}"), None) is not None for m in marks)


def _check_or_write_config(model_dir: Path, cfg: RunConfig, settings: RunSettings, rank: int) -> None:
    """Refuse a folder holding a run with another config; write this run's (image size resolved) beside it.

    A config binds its folder once the folder holds progress (:func:`has_progress`); the config.json of a start that
    failed before computing anything (killed in setup, say) is replaced, so it never blocks the corrected rerun."""
    path = model_dir / "config.json"
    current = to_dict(cfg)
    current["data"]["image_size"] = settings.image_size  # the run as resolved: inference reads it from here
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
            if not isinstance(previous, dict):
                raise ValueError("not a JSON object")
            diff = config_differences(previous, current)
        except (OSError, ValueError) as exc:
            previous, diff = None, [f"{path} cannot be read ({' '.join(str(exc).split())})"]
        if diff and has_progress(model_dir):
            if previous is None:
                raise ConfigError(f"{diff[0]}; it holds the config of the run in {model_dir}")
            shown = ", ".join(f"{k}: {_get(previous, k)!r} -> {_get(current, k)!r}" for k in diff[:6])
            raise ConfigError(f"{model_dir} holds a run with a different config ({shown}); use another --out, or "
                              "the same options to resume it")  # fmt: skip
        if diff:
            log.info("%s: replacing the config of an earlier start that computed nothing", path)
    barrier()
    if rank == 0:
        import yaml

        write_atomic(path, json.dumps(current, indent=1))
        write_atomic(model_dir / "config.yaml", yaml.safe_dump(current, sort_keys=False))
    barrier()


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else None
    return d


def to_channels_last(engine, zero_stage: int) -> None:
    """Channels-last weights for a CNN on a GPU, after ``deepspeed.initialize``, never before: DeepSpeed's initial
    broadcast views every parameter as bytes (``p.data.view(torch.uint8)``), which a channels-last conv weight refuses
    ("stride(-1) must be 1"), so a model converted before ``initialize`` never starts. At ZeRO stage 0 the optimizer
    holds the parameters themselves and ``Module.to(memory_format=...)`` keeps them (it replaces their ``.data``). At
    stages 1-2 they are views into ZeRO's flat buffers, which a conversion would cut off from the updates: the weights
    stay NCHW there (the batches are still channels-last, and convolutions follow their input's layout)."""
    if zero_stage == 0:
        engine.module.to(memory_format=torch.channels_last)
    else:
        log.info("ZeRO stage %d: weights stay NCHW (channels-last batches only)", zero_stage)


# ----------------------------------------------------------------------------------------------- one fold
@dataclass
class FoldState:
    """Where a fold's training stands; saved with every checkpoint (DeepSpeed's ``client_state``)."""

    epoch: int = 0  # the epoch to run next (or the one a mid-epoch checkpoint is in)
    step: int = 0  # the loader step of ``epoch`` to continue from (micro-batches)
    best_auc: float = -1.0
    history: list = field(default_factory=list)  # validation scores per epoch


class Trainer:
    """Trains one fold of one backbone: train on the other folds, validate on fold ``fold``, write its OOF."""

    def __init__(self, cfg: RunConfig, settings: RunSettings, dataset: PackedDataset, *, fold: int, fold_dir: Path,
                 rank: int = 0, world: int = 1):  # fmt: skip
        self.cfg, self.settings, self.dataset = cfg, settings, dataset
        self.fold, self.fold_dir, self.rank, self.world = fold, Path(fold_dir), rank, world
        self.train_folds = [f for f in range(dataset.k) if f != fold]
        self.ckpt_dir = self.fold_dir / "checkpoints"
        self.log_file = self.fold_dir / "train_log.jsonl"
        self.state = FoldState()

    def fit(self) -> dict:
        """Set up, train ``train.epochs`` epochs (validate, keep the best, checkpoint after each), write the OOF."""
        self.setup()
        for epoch in range(self.state.epoch, self.cfg.train.epochs):
            self.train_epoch(epoch, start_step=self.state.step)
            scores = self.validate()
            self.end_epoch(epoch, scores)
        barrier()
        self.write_oof()
        # "k": the dataset's fold count, so that inference knows the whole ensemble without the dataset
        return {"fold": self.fold, "k": self.dataset.k, "best_macro_auc": self.state.best_auc,
                "epochs": self.cfg.train.epochs, "world_size": self.world, "history": self.state.history}  # fmt: skip

    def setup(self) -> None:
        """Model, loaders, the DeepSpeed engine (optimizer, lr schedule, precision), the loss's class weights; then
        resume from the fold's last checkpoint, if any."""
        import deepspeed

        cfg, s = self.cfg, self.settings
        # Classes the dataset does not label are unknown, not negative (their label bytes are 0): out of the loss.
        known = [c in self.dataset.classes_present for c in CLASSES]
        if not any(known):
            raise ConfigError(f"{cfg.data.dataset} labels none of the classes; nothing to train")
        torch.manual_seed(cfg.train.seed + self.fold)
        model = create_backbone(
            cfg.model.backbone, pretrained=cfg.model.pretrained, image_size=s.image_size,
            pretrained_file=Path(cfg.model.pretrained_file) if cfg.model.pretrained_file else None,
            drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate,
        )  # fmt: skip
        loaders = dict(rank=self.rank, world=self.world)
        self.train_loader = build_loader(loader_config(cfg, s, model, folds=self.train_folds, mode="train",
                                                       seed=cfg.train.seed + 1000 * self.fold, **loaders))  # fmt: skip
        self.val_loader = build_loader(loader_config(cfg, s, model, folds=[self.fold], mode="eval", seed=0, **loaders))
        steps_per_epoch = math.ceil(self.train_loader.steps_per_epoch / cfg.data.grad_accum)  # optimizer steps
        total = steps_per_epoch * cfg.train.epochs
        ds_config = build_ds_config(cfg, world_size=self.world, total_steps=total, device=s.device,
                                    warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch),
                                    precision=s.precision)  # fmt: skip
        groups = param_groups(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, layer_decay=s.layer_decay)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
        if cfg.train.compile:  # on the CPU too: 1.2-1.5x per step measured there (benchmarks/RESULTS.md)
            self.engine.compile()
        if s.channels_last:  # after initialize (see to_channels_last); compile traces at the first forward
            to_channels_last(self.engine, cfg.train.zero_stage)
        device = self.engine.device
        self.pos_weight = _pos_weight(self.dataset, self.train_folds).to(device) if cfg.optim.pos_weight else None
        self.known = torch.tensor(known, dtype=torch.float32, device=device)
        self.all_known = all(known)  # once, not per step (on a GPU, bool() of a tensor waits for the device)
        self.resume()
        self.fold_dir.mkdir(parents=True, exist_ok=True)

    def resume(self) -> None:
        if not (self.ckpt_dir / "latest").is_file():
            return
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir))
        if client:
            self.state = FoldState(**{k: client[k] for k in asdict(self.state) if k in client})
            log.info("fold %d: resuming at epoch %d step %d", self.fold, self.state.epoch, self.state.step)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy over the known classes, averaged over the real (not padded) rows."""
        mask = (keys >= 0).to(torch.float32)
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels, pos_weight=self.pos_weight, reduction="none")
        per_sample = bce.mean(1) if self.all_known else (bce * self.known).sum(1) / self.known.sum()
        return (per_sample * mask).sum() / mask.sum().clamp(min=1.0)

    def train_epoch(self, epoch: int, start_step: int = 0) -> None:
        """One epoch from loader step ``start_step``; logs every ``log_interval`` steps and checkpoints every
        ``checkpoint_every`` optimizer steps (with ``grad_accum`` micro-batches per optimizer step)."""
        cfg, engine, loader = self.cfg, self.engine, self.train_loader
        engine.train()
        bar = tqdm(total=loader.steps_per_epoch, initial=start_step, desc=f"fold {self.fold} epoch {epoch}",
                   unit="batch", disable=self.rank != 0, leave=False)  # fmt: skip
        # images counted on the batches' device and read (one host sync) only when a log line is written
        t_last, wait, images_seen = time.perf_counter(), 0.0, None
        t_fetch = time.perf_counter()
        for step, batch in enumerate(loader.iter_epoch(epoch, start_step=start_step), start=start_step):
            wait += time.perf_counter() - t_fetch
            loss = self.loss(engine(batch.images), batch.labels, batch.keys)
            engine.backward(loss)
            optimizer_steps = engine.global_steps
            engine.step()
            real = (batch.keys >= 0).sum()
            images_seen = real if images_seen is None else images_seen.add_(real)
            bar.update(1)
            if self.rank == 0 and (step + 1) % cfg.train.log_interval == 0:
                now = time.perf_counter()
                rec = {"fold": self.fold, "epoch": epoch, "step": step + 1,
                       "global_step": epoch * loader.steps_per_epoch + step + 1,
                       "loss": round(loss.item(), 5), "lr": engine.get_lr()[0],
                       "images_per_s": round(int(images_seen) * self.world / (now - t_last), 1),
                       "data_wait": round(wait / (now - t_last), 3)}  # fmt: skip
                self._log(rec)
                bar.set_postfix(loss=rec["loss"], ips=rec["images_per_s"], wait=rec["data_wait"])
                t_last, wait, images_seen = now, 0.0, None
            every = cfg.train.checkpoint_every
            if every and engine.global_steps > optimizer_steps and engine.global_steps % every == 0:
                self.state.epoch, self.state.step = epoch, step + 1
                self.checkpoint(f"epoch{epoch}-step{step + 1}")
            t_fetch = time.perf_counter()
        bar.close()

    def validate(self) -> dict:
        """Scores on fold k over all ranks: macro-AUC, per-class AUC, macro-F1 at 0.5 (classes with both labels)."""
        keys, probs, labels = gather_arrays(*predict(self.engine.module, self.val_loader, self.engine.device,
                                                     dtype=autocast_dtype(self.settings)))  # fmt: skip
        return validation_scores(keys, probs, labels)

    def end_epoch(self, epoch: int, scores: dict) -> None:
        """Record the validation, keep the best weights, checkpoint the finished epoch (only the newest is kept)."""
        self.state.history.append({"epoch": epoch, **scores})
        if self.rank == 0:
            self._log({"fold": self.fold, "epoch": epoch, "validation": scores})
            log.info("fold %d epoch %d: val macro-AUC %.4f F1 %.4f", self.fold, epoch, scores["macro_auc"],
                     scores["macro_f1"])  # fmt: skip
        best = self.fold_dir / "best.safetensors"
        if scores["macro_auc"] > self.state.best_auc or not best.is_file():
            self.state.best_auc = scores["macro_auc"]
            if self.rank == 0:
                _save_safetensors(self.engine.module, best)
        self.state.epoch, self.state.step = epoch + 1, 0
        self.checkpoint(f"epoch{epoch + 1}")

    def checkpoint(self, tag: str) -> None:
        """Save a DeepSpeed checkpoint ``tag`` (every rank), then keep only it: mid-epoch saves too, so that
        ``checkpoint_every`` never piles up checkpoints (a big model's are gigabytes each)."""
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=asdict(self.state))
        self._keep_latest_checkpoint()

    def write_oof(self) -> None:
        """Fold k predicted with the best weights, every rank its own part; stale shards of an earlier run go first."""
        from safetensors.torch import load_file

        self.engine.module.load_state_dict(load_file(str(self.fold_dir / "best.safetensors"), device="cpu"))
        if self.rank == 0:
            for old in self.fold_dir.glob("oof-rank*.parquet"):
                old.unlink()
        barrier()
        dtype = autocast_dtype(self.settings)  # the run's precision on a GPU, fp32 on the CPU
        keys, probs, _ = predict(self.engine.module, self.val_loader, self.engine.device, dtype=dtype)
        write_oof(self.fold_dir / f"oof-rank{self.rank}.parquet", keys, probs, fold=self.fold)
        barrier()

    def _keep_latest_checkpoint(self) -> None:
        """Keep only the newest checkpoint tag (the one ``latest`` names): after a barrier, so that every rank has
        finished writing its part, rank 0 removes the other tags' folders."""
        barrier()
        if self.rank != 0 or not (self.ckpt_dir / "latest").is_file():
            return
        latest = (self.ckpt_dir / "latest").read_text().strip()
        for p in self.ckpt_dir.iterdir():
            if p.is_dir() and p.name != latest:
                shutil.rmtree(p, ignore_errors=True)

    def _log(self, record: dict) -> None:
        with open(self.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")


def validation_scores(keys: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> dict:
    """Macro-AUC, per-class AUC and macro-F1 at 0.5 over the classes with both label values."""
    from sklearn.metrics import f1_score, roc_auc_score

    per_class, f1s = {}, []
    for j, c in enumerate(CLASSES):
        y = labels[:, j]
        if 0 < y.sum() < len(y):
            per_class[c] = float(roc_auc_score(y, probs[:, j]))
            f1s.append(float(f1_score(y, probs[:, j] >= 0.5, zero_division=0)))
    macro = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"macro_auc": macro, "macro_f1": float(np.mean(f1s)) if f1s else float("nan"), "auc": per_class,
            "samples": int(len(keys))}  # fmt: skip


def _pos_weight(dataset: PackedDataset, folds: list[int]) -> torch.Tensor:
    labels = dataset.index(folds).select(CLASSES).fill_null(0).to_numpy().astype(np.float64)
    pos = labels.sum(0)
    return torch.tensor(np.clip((len(labels) - pos) / np.maximum(pos, 1), 1.0, 100.0), dtype=torch.float32)


def _save_safetensors(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp))
