"""Backbones: the paper's six (timm) and tiny stand-ins of each family, with their weight loaders.

``create_backbone(name, pretrained=..., ...)`` returns a timm model with an 11-class head. Weights:

- ``pretrained="timm"``: timm's pretrained weights (downloaded by timm/huggingface_hub on first use);
- ``pretrained="none"``: random initialisation;
- ``pretrained_file=PATH``: a local file — for ``retfound`` a RETFound MAE checkpoint (``torch.load(...,
  weights_only=True)``, state dict under ``model``), for the others a plain state dict (``.pth``/``.safetensors``).

RETFound is a ViT-L/16 with global average pooling and ``fc_norm`` (no final ``norm``), drop path 0.2, and layer-wise
lr decay 0.65; its MAE checkpoint holds the encoder plus ``decoder_*``, ``mask_token`` and ``norm.*`` (unused with
global pooling), and possibly a ``head.*`` for another task (dropped). The positional embedding is resampled to the
input size. Loading is ``strict=False`` and the missing/unexpected keys are checked against that layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from retina_io.errors import RetinaError
from retina_io.schema import NUM_CLASSES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    family: str  # resnet, efficientnet, convnext, vit, swinv2, retfound
    image_size: int
    kwargs: dict = field(default_factory=dict)
    takes_img_size: bool = False  # transformers take img_size; CNNs are size-agnostic
    layer_decay: float | None = None
    tiny: bool = False


BACKBONES: dict[str, BackboneSpec] = {
    # the paper's six
    "resnet50": BackboneSpec("resnet50", "resnet", 224),
    "tf_efficientnetv2_m": BackboneSpec("tf_efficientnetv2_m", "efficientnet", 384),
    "convnextv2_base": BackboneSpec("convnextv2_base", "convnext", 224),
    "vit_base_patch16_224": BackboneSpec("vit_base_patch16_224", "vit", 224, takes_img_size=True),
    "swinv2_base_window12_192": BackboneSpec("swinv2_base_window12_192", "swinv2", 192, takes_img_size=True),
    "retfound": BackboneSpec("vit_large_patch16_224", "retfound", 224, {"global_pool": "avg"}, takes_img_size=True,
                             layer_decay=0.65),
    # tiny stand-ins, one per family (timm's test_* models and small kwargs variants)
    "tiny_resnet": BackboneSpec("test_resnet", "resnet", 64, tiny=True),
    "tiny_efficientnet": BackboneSpec("test_efficientnet", "efficientnet", 64, tiny=True),
    "tiny_convnext": BackboneSpec("test_convnext2", "convnext", 64, tiny=True),
    "tiny_vit": BackboneSpec("test_vit", "vit", 64, {"patch_size": 8}, takes_img_size=True, tiny=True),
    "tiny_swinv2": BackboneSpec("swinv2_tiny_window8_256", "swinv2", 64,
                                {"embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2), "window_size": 4},
                                takes_img_size=True, tiny=True),
    "tiny_retfound": BackboneSpec("vit_large_patch16_224", "retfound", 64,
                                  {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_pool": "avg"},
                                  takes_img_size=True, layer_decay=0.65, tiny=True),
}  # fmt: skip
PAPER_BACKBONES = ("resnet50", "tf_efficientnetv2_m", "convnextv2_base", "vit_base_patch16_224",
                   "swinv2_base_window12_192", "retfound")  # fmt: skip
TINY_BACKBONES = tuple(k for k, v in BACKBONES.items() if v.tiny)


class BackboneError(RetinaError, ValueError):
    """An unknown backbone or unusable weights."""


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def create_backbone(
    name: str,
    *,
    pretrained: str = "none",
    pretrained_file: Path | None = None,
    image_size: int | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    num_classes: int = NUM_CLASSES,
) -> nn.Module:
    """A timm model for backbone ``name`` with a ``num_classes`` head; see the module docstring for weights."""
    spec = get_spec(name)
    if pretrained not in ("timm", "none"):
        raise BackboneError(f"pretrained must be 'timm' or 'none' (or give pretrained_file); got {pretrained!r}")
    if spec.tiny and pretrained == "timm":
        raise BackboneError(f"{name} is a tiny test stand-in with no pretrained weights; use --pretrained none")
    kwargs = dict(spec.kwargs)
    if spec.takes_img_size:
        kwargs["img_size"] = image_size or spec.image_size
    use_timm_weights = pretrained == "timm" and pretrained_file is None and spec.family != "retfound"
    if pretrained == "timm" and spec.family == "retfound" and pretrained_file is None:
        raise BackboneError("retfound weights are not on the timm hub: pass --pretrained-file RETFound_cfp_weights.pth")
    model = timm.create_model(spec.timm_name, pretrained=use_timm_weights, num_classes=num_classes,
                              drop_rate=drop_rate, drop_path_rate=drop_path_rate, **kwargs)  # fmt: skip
    if pretrained_file is not None:
        if spec.family == "retfound":
            load_retfound_checkpoint(model, Path(pretrained_file))
        else:
            load_state_dict_file(model, Path(pretrained_file))
    return model


def check_input_size(name: str, image_size: int) -> None:
    """Refuse an input size the backbone cannot take (a ViT's patch size must divide it, ...), before any real work:
    the model is built on PyTorch's ``meta`` device (no memory, no random numbers drawn) and run on an empty batch of
    that size. The backbone's own input size is taken as is. A BackboneError names timm's reason."""
    spec = get_spec(name)
    if image_size == spec.image_size:
        return
    try:
        with torch.device("meta"):
            model = create_backbone(name, image_size=image_size)
            model(torch.empty(1, 3, image_size, image_size))
    except NotImplementedError:  # an operation without a meta kernel: not about the size; training will tell
        return
    except (AssertionError, RuntimeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise BackboneError(f"{name} cannot take {image_size} x {image_size} inputs: {reason}") from exc


def _read_weights(path: Path) -> dict:
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"weights file {path} cannot be read as a PyTorch state dict ({exc})") from exc
    if not isinstance(obj, dict):
        raise BackboneError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_state_dict_file(model: nn.Module, path: Path) -> None:
    """Load a plain state dict (or one under ``model``/``state_dict``) into ``model``; the head may differ."""
    sd = _read_weights(path)
    for wrapper in ("model", "state_dict", "module"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    head = {k for k in sd if k.startswith(("head.", "fc.", "classifier."))}
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k in head and (k not in own or own[k].shape != v.shape))}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad_missing = [k for k in missing if not k.startswith(("head.", "fc.", "classifier."))]
    if bad_missing or unexpected:
        raise BackboneError(
            f"{path} does not fit this backbone: missing {bad_missing[:8]}, unexpected {unexpected[:8]}"
        )


RETFOUND_EXPECTED_MISSING = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def load_retfound_checkpoint(model: nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """Load a RETFound MAE checkpoint into a global-pool ViT; returns (missing, unexpected) keys after checking them."""
    from timm.layers import resample_abs_pos_embed

    ckpt = _read_weights(path)
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict) or "pos_embed" not in sd:
        raise BackboneError(f"{path} is not a RETFound checkpoint (no 'model' state dict with 'pos_embed')")
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # the pretraining task's head, if any
    own = model.state_dict()
    if sd["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        old = sd["pos_embed"]
        sd["pos_embed"] = resample_abs_pos_embed(old, new_size=list(grid), num_prefix_tokens=prefix)
        log.info("resampled RETFound pos_embed %s -> %s", tuple(old.shape), tuple(sd["pos_embed"].shape))
    for k, v in list(sd.items()):
        if k in own and own[k].shape != v.shape and k != "pos_embed":
            raise BackboneError(f"{path}: {k} has shape {tuple(v.shape)}, the model wants {tuple(own[k].shape)}; "
                                "is it a RETFound ViT-L/16 checkpoint for this backbone?")  # fmt: skip
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad_missing = set(missing) - RETFOUND_EXPECTED_MISSING
    bad_unexpected = [k for k in unexpected if not (k.startswith(("decoder_", "norm.")) or k == "mask_token")]
    if bad_missing or bad_unexpected:
        raise BackboneError(f"{path} does not match RETFound's layout: missing {sorted(bad_missing)[:8]}, "
                            f"unexpected {bad_unexpected[:8]}")  # fmt: skip
    nn.init.trunc_normal_(model.head.weight, std=2e-5)  # as RETFound's fine-tuning does
    nn.init.zeros_(model.head.bias)
    return list(missing), list(unexpected)


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """Optimizer parameter groups (timm's): no decay on norms/biases; with ``layer_decay``, lr scaled per layer.

    DeepSpeed's optimizers read each group's ``lr``, so timm's ``lr_scale`` is folded into it here.
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    if layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay)
    for g in groups:
        g["lr"] = lr * g.pop("lr_scale", 1.0)
    return groups
