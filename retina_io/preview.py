"""What the model sees: a contact sheet of one loader batch (``retina-shard preview``).

The batch comes from the real loader (DALI or the fallback) with the settings a run would use — train-mode
augmentations or eval resize, image size, Graham's local contrast — and is drawn back to pixels with each tile's key
and positive classes. Use it to check augmentations and preprocessing before spending GPU hours on them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from retina_io.dataset import PackedDataset
from retina_io.errors import RetinaError, at_least, check_rules
from retina_io.fsutil import require_out_file
from retina_io.loader import LoaderConfig, LoaderSettings, build_loader
from retina_io.schema import CLASSES, format_key
from retina_io.synth import caption_font


class PreviewError(RetinaError, ValueError):
    """A preview that cannot be drawn as asked (an option out of range, an unusable ``--out``)."""


def parse_folds(spec: str | None) -> tuple[int, ...] | None:
    """``--folds 0,2`` as a tuple (None: all folds); a PreviewError naming the value when it is not such a list."""
    if spec is None:
        return None
    parts = [p.strip() for p in str(spec).split(",")]
    if not all(p.isdigit() for p in parts):
        raise PreviewError(f"--folds must be a list of fold numbers like 0,2; got {spec!r}")
    return tuple(int(p) for p in parts)


def write_batch_preview(
    data: Path,
    out: Path,
    *,
    mode: str = "train",
    image_size: int = 224,
    n: int = 16,
    folds: tuple[int, ...] | None = None,
    settings: LoaderSettings | None = None,
    seed: int = 0,
) -> Path:
    """Draw the first batch of ``n`` samples the loader yields with ``settings`` (a run's ``data`` section, or the
    defaults: backend, threads, shuffle buffer, local contrast, augmentations) into the PNG ``out``. The options and
    ``out`` are checked before the dataset is read (a PreviewError naming the first that is wrong)."""
    settings = settings if settings is not None else LoaderSettings()
    contrast = settings.local_contrast
    check_rules([at_least("--n", n, 1), at_least("--image-size", image_size, 8),
                 (0 <= contrast <= 0.5, f"--local-contrast must be in [0, 0.5] (0: off); got {contrast}")],
                PreviewError)  # fmt: skip
    require_out_file(Path(out), PreviewError)
    ds = PackedDataset.open(data)
    cfg = LoaderConfig.from_settings(
        settings, data=Path(data), folds=folds if folds is not None else range(ds.k), mode=mode,
        image_size=image_size, batch_size=n, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), seed=seed,
    )  # fmt: skip
    local_contrast, backend = cfg.local_contrast, cfg.backend
    batch = next(iter(build_loader(cfg).iter_epoch(0)))
    pixels = (batch.images.float().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    captions = []
    for key, labels in zip(batch.keys.tolist(), batch.labels.numpy(), strict=True):
        found = [c for c, v in zip(CLASSES, labels, strict=True) if v > 0.5]
        captions.append((format_key(key) if key >= 0 else "(padding)", ", ".join(found) or "no finding"))
    cols = min(len(pixels), max(1, math.ceil(math.sqrt(len(pixels)))))
    rows = math.ceil(len(pixels) / cols)
    tile = max(image_size, 96)
    text_h = max(12, tile // 9)
    font = caption_font(text_h * 3 // 4)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + 2 * text_h) + text_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    title = f"{Path(data).name}: {mode} batch, {image_size} px, local_contrast={local_contrast}, backend={backend}"
    draw.text((4, 1), title, fill=(0, 0, 0), font=font)
    for i, (img, (key, found)) in enumerate(zip(pixels, captions, strict=True)):
        x, y = (i % cols) * tile, text_h + (i // cols) * (tile + 2 * text_h)
        sheet.paste(Image.fromarray(img).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        draw.text((x + 3, y + tile + 1), key, fill=(80, 80, 80), font=font)
        draw.text((x + 3, y + tile + text_h), found, fill=(0, 0, 0), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, "PNG")
    return out
