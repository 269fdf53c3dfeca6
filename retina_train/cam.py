"""Class activation maps for ``retina-predict --cam``: why the ensemble called a disease, per backbone and combined.

For each photograph and each class the meta-learner predicts positive, every backbone gets a Grad-CAM map (the
``grad-cam`` package, ``pytorch_grad_cam.GradCAM``) for that class's logit, averaged over its fold models (each map
scaled to [0, 1] by the library first). The layer and the reshape differ per family (:func:`cam_candidates`; the
deepest candidate whose map is at least 2x2 at the backbone's input size, :func:`cam_layer`):

- CNNs: the last residual block (ResNet), the head convolution's BN+activation (EfficientNet), the last stage
  (ConvNeXt), or an earlier one — feature maps ``N×C×h×w`` as they are;
- ViT and RETFound: the last block's ``norm1`` tokens, prefix (class) tokens dropped, reshaped to the patch grid
  ``N×C×gh×gw``;
- Swin V2: the last stage's output (or an earlier one), which timm keeps channels-last (``N×h×w×C``), permuted to
  ``N×C×h×w``.

The combined map is the sum of the backbones' maps weighted by the meta-learner's importance of each backbone for
that class (XGBoost gain summed per backbone, :meth:`~retina_train.stack.meta.MetaLearner.importance`), scaled to
[0, 1]. Maps are drawn over the photograph as the models saw it (short side resized, centre crop).

Outputs under ``OUT/cam/``: one PNG per (photograph, class) — the photograph, each backbone's overlay with its
weight, the combined overlay — and ``contact_sheet.png`` with every combined overlay; ``cams.csv`` lists them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

log = logging.getLogger(__name__)


@dataclass
class CamConfig:
    out: Path
    max_images: int = 32  # photographs with a positive class that get maps (in id order)
    display_size: int = 224  # pixels of each overlay
    sheet_max: int = 64  # tiles on the contact sheet
    batch_size: int = 16


MIN_GRID = 4  # a coarser map (a tiny backbone's 1x1 or 2x2 last stage) says little about where: a finer layer is used


def cam_candidates(model: torch.nn.Module, family: str):
    """``(layers deepest first, reshape transform or None)`` for Grad-CAM on a timm model of ``family``."""
    if family == "resnet":
        return [model.layer4[-1], model.layer3[-1]], None
    if family == "efficientnet":
        return [model.bn2, *reversed(model.blocks)], None
    if family == "convnext":
        return list(reversed(model.stages)), None
    if family in ("vit", "retfound"):
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        gh, gw = model.patch_embed.grid_size

        def tokens_to_grid(t: torch.Tensor) -> torch.Tensor:
            return t[:, prefix:, :].reshape(t.size(0), gh, gw, t.size(2)).permute(0, 3, 1, 2)

        return [model.blocks[-1].norm1], tokens_to_grid
    if family == "swinv2":
        return list(reversed(model.layers)), lambda t: t.permute(0, 3, 1, 2)
    raise ValueError(f"no Grad-CAM layer for backbone family {family!r}")


@torch.no_grad()
def cam_layer(model: torch.nn.Module, family: str, image_size: int):
    """``([layer], reshape)``: the deepest candidate layer whose map is at least :data:`MIN_GRID` on a side for
    ``image_size`` inputs (a tiny backbone's last stage can be 1x1)."""
    layers, reshape = cam_candidates(model, family)
    device = next(model.parameters()).device
    shapes: dict[int, tuple] = {}
    to_grid = reshape or (lambda t: t)

    def record(j: int):
        def hook(_module, _inputs, output) -> None:
            shapes.setdefault(j, tuple(to_grid(output).shape))

        return hook

    hooks = [layer.register_forward_hook(record(j)) for j, layer in enumerate(layers)]
    try:
        was = model.training
        model.eval()
        model(torch.zeros(1, 3, image_size, image_size, device=device))
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    for j, layer in enumerate(layers):
        if min(shapes[j][-2:]) >= MIN_GRID:
            return [layer], reshape
    return [layers[-1]], reshape


def backbone_maps(models: list[torch.nn.Module], family: str, images: torch.Tensor, classes: list[int],
                  size: int) -> np.ndarray:  # fmt: skip
    """``(n, size, size)``: Grad-CAM of class ``classes[i]`` on ``images[i]``, the mean over ``models`` (one
    backbone's fold models, of backbone family ``family``)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    device = next(models[0].parameters()).device
    x = images.to(device)
    total = np.zeros((len(images), size, size), np.float64)
    for model in models:
        layers, reshape = cam_layer(model, family, x.shape[-1])
        with torch.enable_grad(), GradCAM(model=model, target_layers=layers, reshape_transform=reshape) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
        maps = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))[:, None]
        total += torch.nn.functional.interpolate(maps, size=(size, size), mode="bilinear")[:, 0].numpy()
    return (total / len(models)).astype(np.float32)


def combine(maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(n, H, W)`` from per-backbone ``(backbones, n, H, W)`` and per-row weights ``(n, backbones)``, scaled so
    each map's maximum is 1 (a map that is zero everywhere stays zero)."""
    out = np.einsum("bnhw,nb->nhw", maps.astype(np.float64), weights.astype(np.float64))
    peak = out.reshape(len(out), -1).max(axis=1)
    return (out / np.where(peak > 0, peak, 1.0)[:, None, None]).astype(np.float32)


def display_image(pil, size: int, eval_crop: float = 1.0) -> np.ndarray:
    """The photograph as the models saw it, at ``size`` pixels: short side resized, centre crop; RGB in [0, 1]."""
    from torchvision.transforms import v2 as T

    im = T.CenterCrop(size)(T.Resize(round(size / eval_crop), antialias=True)(pil))
    return np.asarray(im, dtype=np.float32) / 255.0


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-80:]


def write_cams(ens, meta, predictions: pl.DataFrame, dataset, cfg: CamConfig) -> list[Path]:
    """Grad-CAM overlays of the predicted-positive classes of ``predictions`` (rows of ``dataset``, a
    :class:`retina_io.photos.PhotoDataset`); returns the PNG files written."""
    import io

    from PIL import Image

    from retina_io.photos import prepare_photo
    from retina_io.schema import CLASSES

    positions = {p.relpath: i for i, p in enumerate(dataset.photos)}
    pairs = []  # (photo position, id, class, probability)
    for row in predictions.iter_rows(named=True):
        hits = [c for c in meta.classes if row[f"{c}_positive"]]
        if hits and len({p[0] for p in pairs}) < cfg.max_images:
            pairs += [(positions[row["id"]], row["id"], c, float(row[c])) for c in hits]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if not pairs:
        log.info("--cam: no photograph has a predicted-positive class; no maps drawn")
        return []
    names = [m.name for m in ens.members]
    importance = meta.importance(names)  # (meta classes, members)
    weights = np.stack([importance[meta.classes.index(c)] for _, _, c, _ in pairs])
    photos = sorted({p[0] for p in pairs})
    views = {i: dataset[i][1] for i in photos}
    shown = {}
    for i in photos:
        body = prepare_photo(dataset.root, dataset.photos[i], dataset.options)
        shown[i] = display_image(Image.open(io.BytesIO(body)).convert("RGB"), cfg.display_size,
                                 ens.configs[0].eval_crop)  # fmt: skip
    maps = np.zeros((len(names), len(pairs), cfg.display_size, cfg.display_size), np.float32)
    for b, member in enumerate(ens.members):
        for s in range(0, len(pairs), cfg.batch_size):
            chunk = pairs[s : s + cfg.batch_size]
            x = torch.stack([views[i][member.group] for i, _, _, _ in chunk])
            family = member.run.settings.spec.family
            classes = [CLASSES.index(c) for _, _, c, _ in chunk]
            maps[b, s : s + len(chunk)] = backbone_maps(member.models, family, x, classes, cfg.display_size)
    combined = combine(maps, weights)
    files = []
    for k, (i, ident, c, p) in enumerate(pairs):
        path = out / f"{i:05d}_{_safe(ident)}__{c}.png"
        _panel(path, shown[i], maps[:, k], combined[k], names, weights[k], f"{ident}: {c} p={p:.2f}")
        files.append(path)
    sheet = out / "contact_sheet.png"
    _sheet(sheet, [(shown[i], combined[k], f"{ident}\n{c} p={p:.2f}") for k, (i, ident, c, p) in enumerate(pairs)],
           cfg.sheet_max)  # fmt: skip
    pl.DataFrame({"id": [p[1] for p in pairs], "class": [p[2] for p in pairs], "probability": [p[3] for p in pairs],
                  "file": [f.name for f in files], **{f"weight_{n}": weights[:, b] for b, n in enumerate(names)}},
                 ).write_csv(out / "cams.csv")  # fmt: skip
    return [*files, sheet]


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image, np.clip(mask, 0.0, 1.0), use_rgb=True, image_weight=0.55)


def _panel(path: Path, image, maps, combined, names, weights, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = [(image, "photograph")]
    tiles += [(_overlay(image, m), f"{n} (w={w:.2f})") for m, n, w in zip(maps, names, weights, strict=True)]
    tiles.append((_overlay(image, combined), "combined"))
    fig, axes = plt.subplots(1, len(tiles), figsize=(2.2 * len(tiles), 2.6))
    for ax, (im, label) in zip(np.atleast_1d(axes), tiles, strict=True):
        ax.imshow(im)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _sheet(path: Path, tiles: list, most: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = tiles[:most]
    cols = min(8, len(tiles))
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (image, mask, label) in zip(axes.ravel(), tiles, strict=False):
        ax.imshow(_overlay(image, mask))
        ax.set_title(label, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
