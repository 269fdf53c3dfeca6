"""Training configuration: dataclass defaults <- ``retina_train/configs/BACKBONE.yaml`` <- ``--config FILE`` <- CLI.

The resolved config is written beside the run (``runs/EXP/MODEL/config.yaml``); a rerun into the same folder must
resolve to the same config (up to the fields in :data:`VOLATILE`) or it is refused with the differing keys listed.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retina_io.errors import RetinaError
from retina_io.loader import LoaderSettings

CONFIG_DIR = Path(__file__).parent / "configs"
# Fields that may change between a run and its resumption without changing what is computed.
VOLATILE = {"train.folds", "train.resume", "train.log_interval", "data.num_threads", "data.prefetch_queue_depth",
            "train.checkpoint_every", "train.overlap_comm", "data.eval_batch_size", "out"}  # fmt: skip
# Keys renamed since runs were first written: old name -> new (dotted); an old config.json still reads and resumes.
RENAMED = {"data.data": "data.dataset"}


@dataclass
class ModelConfig:
    backbone: str = "tiny_resnet"
    pretrained: str = field(default="none", metadata={"choices": ("timm", "none")})  # timm's weights or random init
    pretrained_file: str | None = None  # a local weights file (RETFound: its MAE .pth)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_decay: float | None = None  # None: the backbone's default (RETFound 0.65), else no decay


@dataclass(kw_only=True)
class DataConfig(LoaderSettings):
    """The data section: the loader settings (batch size, backend, threads, prefetch, shuffle buffer, local contrast,
    augmentations: :class:`retina_io.loader.LoaderSettings`, the loader reads them from here) plus the run's own."""

    dataset: str = ""  # packed dataset folder (shard format v1); `--data`. Written as `data.data` before.
    image_size: int = 0  # 0: the backbone's input size
    batch_size: int = 32  # micro batch per rank
    # validation, OOF and ensemble inference (retina-eval, retina-predict) batch per rank; 0: 4x batch_size up to
    # 256, never under 2x (inference keeps no activations for a backward pass)
    eval_batch_size: int = 0
    grad_accum: int = 1
    backend: str = field(default="dali", metadata={"choices": ("dali", "wds")})
    channels_last: bool = True  # CNNs (GPU and CPU: both train them faster channels-last)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    grad_clip: float = 1.0
    pos_weight: bool = False  # BCE pos_weight per class from the training folds' prevalence


@dataclass
class TrainConfig:
    epochs: int = 10
    folds: str = "all"  # "all" or "0,2"
    seed: int = 0
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    # "auto": bf16 on cuda, fp32 on cpu. bf16/fp16: DeepSpeed's torch_autocast (Linear/Conv2d in that dtype, weights
    # and optimizer state fp32; fp16 with a gradient scaler); fp32: no autocast.
    precision: str = field(default="auto", metadata={"choices": ("auto", "fp32", "bf16", "fp16")})
    zero_stage: int = 0  # DeepSpeed ZeRO: 0 (all-reduce), 1 (optimizer state partitioned), 2 (gradients too)
    overlap_comm: bool = False  # ZeRO 1/2: overlap the gradient reduction with the backward pass
    compile: bool = False  # torch.compile the model (any device; its first steps compile, minutes on a CPU)
    checkpoint_every: int = 0  # DeepSpeed checkpoint every N optimizer steps (0: at each epoch's end only)
    log_interval: int = 10
    deepspeed_config: str | None = None  # a user's DeepSpeed JSON, used instead of the generated one
    resume: bool = False  # require something to resume (a folder holding a checkpoint is resumed anyway)


@dataclass
class RunConfig:
    out: str = "runs/exp"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(RetinaError, ValueError):
    """A configuration a user got wrong: an unknown key, a bad value, a conflicting earlier run."""


def _merge(obj: Any, updates: dict, where: str) -> None:
    """Set the fields of dataclass ``obj`` from a nested dict; unknown keys are an error naming them."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} must be a mapping")
            _merge(current, value, f"{where}.{key}")
        else:
            value = _coerce(value, typing.get_type_hints(type(obj))[key], f"{where}.{key}")
            choices = names[key].metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{where}.{key}: must be one of {', '.join(choices)}; got {value!r}")
            setattr(obj, key, value)


def _upgrade(d: dict) -> dict:
    """``d`` with the keys of :data:`RENAMED` under their new names (a copy; ``d`` itself is left alone)."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for old, new in RENAMED.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        section = d.get(osec)
        if isinstance(section, dict) and okey in section:
            value = section.pop(okey)
            d.setdefault(nsec, {}).setdefault(nkey, value)
    return d


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field's type, or a ConfigError naming the key. Numbers written as strings are taken (YAML
    reads ``1e-3`` as a string; ``--set optim.lr=1e-3`` must still mean 0.001); anything else of the wrong type is
    refused here rather than failing deep inside training."""
    args = typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            items = (items[0],) * len(value)
        if len(items) != len(value):
            raise ConfigError(f"{where}: expected {len(items)} values, got {value!r}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, items, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):  # `--set train.folds=0` reads as int
            return str(value)
    else:
        return value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    return data


def resolve_config(backbone: str, *, config_file: Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Defaults <- the backbone's YAML <- ``config_file`` <- ``overrides`` (nested dict, e.g. from the CLI)."""
    cfg = RunConfig()
    cfg.model.backbone = backbone
    preset = CONFIG_DIR / f"{backbone}.yaml"
    if preset.is_file():
        _merge(cfg, _upgrade(load_yaml(preset)), str(preset))
    if config_file is not None:
        _merge(cfg, _upgrade(load_yaml(config_file)), str(config_file))
    if overrides:
        _merge(cfg, _upgrade(overrides), "command line")
    cfg.model.backbone = backbone
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def from_dict(d: dict, *, where: str = "config") -> RunConfig:
    """A config from its dict (``to_dict``'s, e.g. a run's ``config.json``); keys it lacks keep their defaults and
    keys renamed since (:data:`RENAMED`) are read under their new names."""
    cfg = RunConfig()
    _merge(cfg, _upgrade(d), where)
    return cfg


def read_run_config(model_dir: Path) -> RunConfig:
    """The resolved config a backbone's run folder (``runs/EXP/MODEL``) was trained with, from its ``config.json``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no config.json (a trained backbone's folder runs/EXP/MODEL has one)")
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON: {exc}") from exc
    return from_dict(d, where=str(path))


def _with_defaults(d: dict) -> dict:
    try:
        return to_dict(from_dict(d))
    except ConfigError:  # keys this version does not know (a newer run): compare as written
        return d


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(a: dict, b: dict) -> list[str]:
    """Keys (dotted) whose values differ between two resolved configs, ignoring :data:`VOLATILE` fields.

    A key one side lacks counts as its default: a run written before an option existed ran as that option's default
    (new options default to the old behaviour), so upgrading does not stop it from resuming."""
    fa, fb = _flatten(_with_defaults(a)), _flatten(_with_defaults(b))
    return sorted(k for k in set(fa) | set(fb) if k not in VOLATILE and fa.get(k) != fb.get(k))
