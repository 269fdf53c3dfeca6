"""The training engine: k-fold training of one backbone with DeepSpeed, validation, checkpoints, OOF prediction.

Read it top to bottom: :func:`run_folds` sets up the process group and, for each fold, :func:`train_fold` trains on
the other folds' shards, validates on fold k every epoch (macro-AUC, per-class AUC, F1), keeps the best weights by
macro-AUC (``best.safetensors``: a plain state dict, usable without DeepSpeed), checkpoints with DeepSpeed every
``checkpoint_every`` optimizer steps and at every epoch's end, and finally predicts fold k with the best weights into
``oof-rank{R}.parquet``. A fold with ``done.json`` is skipped; a fold with a checkpoint resumes from it, mid-epoch
included, and still ends with exactly-once OOF.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from retina_io.dataset import PackedDataset
from retina_io.fsutil import atomic_path
from retina_io.loader import LoaderConfig, build_loader
from retina_io.schema import CLASSES
from retina_train.backbones import create_backbone, get_spec, param_groups
from retina_train.config import ConfigError, RunConfig, config_differences, to_dict
from retina_train.ds_config import build_ds_config
from retina_train.oof import write_oof

log = logging.getLogger(__name__)


class _SchedulerNotStartedFilter(logging.Filter):
    """DeepSpeed warns once per engine that the lr "scheduler before it has started" was read (its own
    ``initialize`` reads it): not actionable, and 30 lines in a 6-backbone x 5-fold demo."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "before it has started" not in record.getMessage()


logging.getLogger("DeepSpeed").addFilter(_SchedulerNotStartedFilter())
CNN_FAMILIES = {"resnet", "efficientnet", "convnext"}


# ----------------------------------------------------------------------------------------------- process group
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_world() -> tuple[int, int]:
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def barrier() -> None:
    if (d := _dist()) is not None:
        d.barrier()


def init_distributed(device: str) -> None:
    """Join the launcher's process group (gloo on the CPU, nccl on GPUs); a plain ``python run.py`` is one process."""
    if _dist() is not None:
        return
    import deepspeed

    if "WORLD_SIZE" not in os.environ:  # no launcher: a group of one (DeepSpeed would otherwise look for MPI)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no GPU is visible; use --device cpu")
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda; got {requested!r}")
    return requested


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


# ----------------------------------------------------------------------------------------------- the run
def run_folds(cfg: RunConfig) -> dict:
    """Train ``cfg.model.backbone`` on every requested fold; returns a summary (per-fold best macro-AUC)."""
    device = resolve_device(cfg.train.device)
    init_distributed(device)
    rank, world = rank_world()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    spec = get_spec(cfg.model.backbone)
    if not cfg.data.image_size:
        cfg.data.image_size = spec.image_size
    dataset = PackedDataset.open(Path(cfg.data.data))
    folds = parse_folds(cfg.train.folds, dataset.k)
    model_dir = Path(cfg.out) / cfg.model.backbone
    _check_or_write_config(model_dir, cfg, rank)
    summary = {"backbone": cfg.model.backbone, "folds": {}}
    for k in folds:
        fold_dir = model_dir / f"fold{k}"
        done = fold_dir / "done.json"
        if done.is_file():
            log.info("fold %d is done already (%s); skipping", k, done)
            summary["folds"][k] = json.loads(done.read_text())
            continue
        result = train_fold(cfg, dataset, fold=k, fold_dir=fold_dir, device=device, rank=rank, world=world)
        barrier()
        if rank == 0:
            done.write_text(json.dumps(result, indent=1))
        summary["folds"][k] = result
    return summary


def _check_or_write_config(model_dir: Path, cfg: RunConfig, rank: int) -> None:
    path = model_dir / "config.json"
    current = to_dict(cfg)
    if path.is_file():
        previous = json.loads(path.read_text())
        diff = config_differences(previous, current)
        if diff:
            shown = ", ".join(f"{k}: {_get(previous, k)!r} -> {_get(current, k)!r}" for k in diff[:6])
            raise ConfigError(f"{model_dir} holds a run with a different config ({shown}); use another --out, or "
                              "the same options to resume it")  # fmt: skip
    barrier()
    if rank == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=1))
        import yaml

        (model_dir / "config.yaml").write_text(yaml.safe_dump(current, sort_keys=False))
    barrier()


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else None
    return d


# ----------------------------------------------------------------------------------------------- one fold
def loader_config(cfg: RunConfig, model, *, folds, mode: str, device: str, rank: int = 0, world: int = 1,
                  seed: int = 0, **overrides) -> LoaderConfig:  # fmt: skip
    """The loader settings of run ``cfg`` for ``model`` (its mean/std); ``overrides`` replace any field (e.g. the
    ``data`` of an external dataset at evaluation). Training, validation and ensemble inference all come here, so
    a model always sees its inputs prepared the same way."""
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    cnn = get_spec(cfg.model.backbone).family in CNN_FAMILIES
    kw = dict(
        data=Path(cfg.data.data), folds=folds, mode=mode, image_size=cfg.data.image_size,
        batch_size=cfg.data.batch_size, mean=tuple(pcfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(pcfg.get("std", (0.229, 0.224, 0.225))),
        layout="NHWC" if (cnn and cfg.data.channels_last and device == "cuda") else "NCHW",
        backend=cfg.data.backend, device=device if device == "cpu" else f"cuda:{torch.cuda.current_device()}",
        num_threads=cfg.data.num_threads, prefetch_queue_depth=cfg.data.prefetch_queue_depth,
        shuffle_buffer=cfg.data.shuffle_buffer, seed=seed, rank=rank, world_size=world, augment=cfg.data.augment,
        local_contrast=cfg.data.local_contrast,
    )  # fmt: skip
    kw.update(overrides)
    return LoaderConfig(**kw)


def _loader(cfg: RunConfig, model, *, folds, mode: str, device: str, rank: int, world: int, seed: int):
    return build_loader(loader_config(cfg, model, folds=folds, mode=mode, device=device, rank=rank, world=world,
                                      seed=seed))  # fmt: skip


def _pos_weight(dataset: PackedDataset, folds: list[int]) -> torch.Tensor:
    labels = dataset.index(folds).select(CLASSES).fill_null(0).to_numpy().astype(np.float64)
    pos = labels.sum(0)
    return torch.tensor(np.clip((len(labels) - pos) / np.maximum(pos, 1), 1.0, 100.0), dtype=torch.float32)


def train_fold(cfg: RunConfig, dataset: PackedDataset, *, fold: int, fold_dir: Path, device: str, rank: int,
               world: int) -> dict:  # fmt: skip
    import deepspeed

    torch.manual_seed(cfg.train.seed + fold)
    spec = get_spec(cfg.model.backbone)
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    train_folds = [f for f in range(dataset.k) if f != fold]
    model = create_backbone(
        cfg.model.backbone, pretrained=cfg.model.pretrained, image_size=cfg.data.image_size,
        pretrained_file=Path(cfg.model.pretrained_file) if cfg.model.pretrained_file else None,
        drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate,
    )  # fmt: skip
    if device == "cuda" and spec.family in CNN_FAMILIES and cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader = _loader(cfg, model, folds=train_folds, mode="train", device=device, rank=rank, world=world,
                           seed=cfg.train.seed + 1000 * fold)  # fmt: skip
    val_loader = _loader(cfg, model, folds=[fold], mode="eval", device=device, rank=rank, world=world, seed=0)
    steps_per_epoch = math.ceil(train_loader.steps_per_epoch / cfg.data.grad_accum)
    total = steps_per_epoch * cfg.train.epochs
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    ds_config = build_ds_config(cfg, world_size=world, total_steps=total, warmup_steps=warmup, device=device,
                                precision=precision)  # fmt: skip
    layer_decay = cfg.model.layer_decay if cfg.model.layer_decay is not None else spec.layer_decay
    groups = param_groups(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, layer_decay=layer_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    if cfg.train.compile and device == "cuda":
        engine.compile()
    pos_weight = _pos_weight(dataset, train_folds).to(engine.device) if cfg.optim.pos_weight else None
    # Classes the dataset does not label are unknown, not negative (their label bytes are 0): out of the loss.
    known = torch.tensor([c in dataset.classes_present for c in CLASSES], dtype=torch.float32, device=engine.device)
    if not known.any():
        raise ConfigError(f"{cfg.data.data} labels none of the classes; nothing to train")
    all_known = bool(known.all())  # once, not per step (on a GPU, bool() of a tensor waits for the device)

    ckpt_dir = fold_dir / "checkpoints"
    state = {"epoch": 0, "step": 0, "best_auc": -1.0, "history": []}
    if (ckpt_dir / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        if client:
            state.update({k: client[k] for k in state if k in client})
            log.info("fold %d: resuming at epoch %d step %d", fold, state["epoch"], state["step"])
    elif cfg.train.resume:
        log.warning("--resume: %s holds no checkpoint; starting fold %d from scratch", ckpt_dir, fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    metrics_log = fold_dir / "train_log.jsonl"

    for epoch in range(state["epoch"], cfg.train.epochs):
        engine.train()
        start = state["step"] if epoch == state["epoch"] else 0
        bar = tqdm(total=train_loader.steps_per_epoch, initial=start, desc=f"fold {fold} epoch {epoch}",
                   unit="batch", disable=rank != 0, leave=False)  # fmt: skip
        t_last, wait, images_seen = time.perf_counter(), 0.0, 0
        t_fetch = time.perf_counter()
        for step, batch in enumerate(train_loader.iter_epoch(epoch, start_step=start), start=start):
            wait += time.perf_counter() - t_fetch
            mask = (batch.keys >= 0).to(torch.float32)
            logits = engine(batch.images)
            bce = F.binary_cross_entropy_with_logits(logits.float(), batch.labels, pos_weight=pos_weight,
                                                     reduction="none")  # fmt: skip
            per_sample = bce.mean(1) if all_known else (bce * known).sum(1) / known.sum()
            loss = (per_sample * mask).sum() / mask.sum().clamp(min=1.0)
            engine.backward(loss)
            engine.step()
            images_seen += int(mask.sum())
            bar.update(1)
            gstep = epoch * train_loader.steps_per_epoch + step + 1
            if rank == 0 and (step + 1) % cfg.train.log_interval == 0:
                now = time.perf_counter()
                rec = {"fold": fold, "epoch": epoch, "step": step + 1, "global_step": gstep,
                       "loss": round(loss.item(), 5), "lr": engine.get_lr()[0],
                       "images_per_s": round(images_seen * world / (now - t_last), 1),
                       "data_wait": round(wait / (now - t_last), 3)}  # fmt: skip
                with open(metrics_log, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=rec["loss"], ips=rec["images_per_s"], wait=rec["data_wait"])
                t_last, wait, images_seen = now, 0.0, 0
            if cfg.train.checkpoint_every and gstep % cfg.train.checkpoint_every == 0:
                state.update(epoch=epoch, step=step + 1)
                engine.save_checkpoint(str(ckpt_dir), tag=f"epoch{epoch}-step{step + 1}", client_state=dict(state))
            t_fetch = time.perf_counter()
        bar.close()

        scores = evaluate(engine.module, val_loader, device=engine.device)
        state["history"].append({"epoch": epoch, **scores})
        if rank == 0:
            with open(metrics_log, "a") as f:
                f.write(json.dumps({"fold": fold, "epoch": epoch, "validation": scores}) + "\n")
            log.info("fold %d epoch %d: val macro-AUC %.4f F1 %.4f", fold, epoch, scores["macro_auc"],
                     scores["macro_f1"])  # fmt: skip
        if scores["macro_auc"] > state["best_auc"] or not (fold_dir / "best.safetensors").is_file():
            state["best_auc"] = scores["macro_auc"]
            if rank == 0:
                _save_safetensors(engine.module, fold_dir / "best.safetensors")
        state.update(epoch=epoch + 1, step=0)
        engine.save_checkpoint(str(ckpt_dir), tag=f"epoch{epoch + 1}", client_state=dict(state))
        _keep_latest_checkpoint(ckpt_dir, rank)
    barrier()

    # OOF: fold k with the best weights, every rank its own part; stale shards of an earlier run go first.
    from safetensors.torch import load_file

    engine.module.load_state_dict(load_file(str(fold_dir / "best.safetensors"), device="cpu"))
    if rank == 0:
        for old in fold_dir.glob("oof-rank*.parquet"):
            old.unlink()
    barrier()
    keys, probs, _ = predict(engine.module, val_loader, device=engine.device)
    write_oof(fold_dir / f"oof-rank{rank}.parquet", keys, probs, fold=fold)
    barrier()
    return {"fold": fold, "best_macro_auc": state["best_auc"], "epochs": cfg.train.epochs, "world_size": world,
            "history": state["history"]}  # fmt: skip


def _keep_latest_checkpoint(ckpt_dir: Path, rank: int) -> None:
    """Keep only the newest checkpoint tag (checkpoints of big models are large)."""
    barrier()
    if rank != 0 or not (ckpt_dir / "latest").is_file():
        return
    latest = (ckpt_dir / "latest").read_text().strip()
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def _save_safetensors(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp))


# ----------------------------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict(model: torch.nn.Module, loader, *, device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This rank's (keys, probabilities, labels) for one pass over an eval loader; padded rows dropped."""
    was_training = model.training
    model.eval()
    keys, probs, labels = [], [], []
    for batch in loader.iter_epoch(0):
        keep = batch.keys >= 0
        logits = model(batch.images.to(device))
        keys.append(batch.keys[keep].cpu().numpy())
        probs.append(torch.sigmoid(logits.float())[keep].cpu().numpy())
        labels.append(batch.labels[keep].cpu().numpy())
    model.train(was_training)
    return np.concatenate(keys), np.concatenate(probs), np.concatenate(labels)


def evaluate(model: torch.nn.Module, loader, *, device) -> dict:
    """Validation scores over all ranks: macro-AUC, per-class AUC, macro-F1 at 0.5 (classes with both labels)."""
    from sklearn.metrics import f1_score, roc_auc_score

    keys, probs, labels = predict(model, loader, device=device)
    if (d := _dist()) is not None:
        parts: list = [None] * d.get_world_size()
        d.all_gather_object(parts, (keys, probs, labels))
        keys = np.concatenate([p[0] for p in parts])
        probs = np.concatenate([p[1] for p in parts])
        labels = np.concatenate([p[2] for p in parts])
    per_class, f1s = {}, []
    for j, c in enumerate(CLASSES):
        y = labels[:, j]
        if 0 < y.sum() < len(y):
            per_class[c] = float(roc_auc_score(y, probs[:, j]))
            f1s.append(float(f1_score(y, probs[:, j] >= 0.5, zero_division=0)))
    macro = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return {"macro_auc": macro, "macro_f1": float(np.mean(f1s)) if f1s else float("nan"), "auc": per_class,
            "samples": int(len(keys))}  # fmt: skip
