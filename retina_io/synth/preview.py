"""The contact sheet of every class's sign (``retina-synth --preview``), and the caption font other sheets share.

:func:`write_preview` renders a healthy row and one row per class with the same seeds column by column, so each row
differs from the healthy one only by its class's sign: the quickest check of what the renderer draws.
:func:`caption_font` is also used by ``retina-shard preview`` (:mod:`retina_io.preview`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from retina_io.schema import CLASS_DESCRIPTIONS, CLASSES
from retina_io.synth.errors import check_int
from retina_io.synth.render import render_fundus

logger = logging.getLogger(__name__)


def caption_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` px (the fixed bitmap font where Pillow cannot scale it)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - very old Pillow / no FreeType
        return ImageFont.load_default()


def write_preview(path: Path, *, size: int, seed: int, n_examples: int = 4) -> Path:
    """Write a PNG contact sheet: a healthy row, then one row per class, ``n_examples`` images each.

    Column ``j`` uses the same seed (and eye) in every row, so each row differs from the healthy row only by its
    class's sign. The DR row shows grades 1-4.
    """
    check_int("size", size, 32)
    check_int("seed", seed, 0)
    path = Path(path)
    rows: list[tuple[str, list[dict[str, Any]]]] = []
    sides = ["right", "left"]
    base = [{"eye_side": sides[j % 2]} for j in range(n_examples)]
    rows.append(("healthy", [dict(b) for b in base]))
    for c in CLASSES:
        if c == "DR":
            rows.append((f"DR - {CLASS_DESCRIPTIONS[c]} (grades 1-4)",
                         [{**b, "dr_grade": 1 + j % 4} for j, b in enumerate(base)]))  # fmt: skip
        else:
            rows.append((f"{c} - {CLASS_DESCRIPTIONS[c]}", [{**b, c: 1} for b in base]))
    title_h = max(14, size // 10)
    font = caption_font(max(10, title_h * 3 // 4))
    sheet = Image.new("RGB", (n_examples * size, len(rows) * (size + title_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (title, labs) in enumerate(rows):
        y = r * (size + title_h)
        draw.text((4, y + 1), title, fill=(0, 0, 0), font=font)
        for j, lab in enumerate(labs):
            sheet.paste(render_fundus(lab, size=size, seed=seed + j), (j * size, y + title_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, "PNG", optimize=False)
    logger.info("wrote preview %s", path)
    return path
