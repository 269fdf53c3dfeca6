"""The scene of one image and the primitives every sign is drawn with.

:class:`Scene` draws one image's geometry, anatomy and nuisance parameters (field, disc, macula, pigmentation,
illumination, optics, sensor) from its seed streams, in right-eye coordinates; :class:`FundusLandmarks` is where that
anatomy lands in the output image (left eyes mirrored). :func:`paint` blends a colour through an antialiased,
optionally blurred mask of ellipses, polygons and lines (:data:`Shape`); :func:`ellipse_poly` makes the (irregular)
ellipse polygons most lesions are. The reflectance colours below are before illumination, colour cast and gamma.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from retina_io.synth.streams import S_ANATOMY, S_NUISANCE, stream_rng

# Reflectance colours (before illumination, colour cast and gamma), 0-255 RGB.
VEIN = (128, 26, 28)
ARTERY = (182, 58, 42)
ARTERY_HTR = (198, 84, 50)
HEM_DARK = (112, 14, 12)
HEM = (140, 24, 16)
EXUDATE = (252, 236, 150)
EXUDATE_HI = (255, 250, 205)
DRUSEN = (236, 200, 112)
DRUSEN_HI = (248, 226, 150)
PIGMENT = (52, 26, 14)
ATROPHY = (240, 214, 168)
COTTON = (246, 238, 222)
SCAR = (242, 228, 196)


@dataclass(frozen=True)
class FundusLandmarks:
    """Where the anatomy of one rendered image lies, in pixel coordinates (x right, y down) of the output image."""

    size: int
    eye_side: str
    field_center: tuple[float, float]
    field_radius: float
    fovea: tuple[float, float]
    disc_center: tuple[float, float]
    disc_radius: float


class Scene:
    """Per-image geometry, anatomy and nuisance parameters, in right-eye coordinates (disc right of the macula)."""

    def __init__(self, size: int, key: tuple[int, ...]) -> None:
        s = float(size)
        self.size = size
        nz = stream_rng(key, S_NUISANCE)
        an = stream_rng(key, S_ANATOMY)
        # Nuisance: field, illumination, colour, optics, sensor.
        self.R = s * nz.uniform(0.44, 0.495)
        self.cx = s / 2 + nz.normal(0.0, 0.012) * s
        self.cy = s / 2 + nz.normal(0.0, 0.012) * s
        crop = nz.random() < 0.3
        crop_h = self.R * nz.uniform(0.8, 0.93)
        self.crop_h = crop_h if crop else None
        self.vig_k = nz.uniform(0.3, 0.65)
        self.vig_p = nz.uniform(2.0, 3.5)
        self.grad_amp = nz.uniform(0.0, 0.25)
        self.grad_ang = nz.uniform(0.0, 2 * math.pi)
        self.gain = nz.uniform(0.85, 1.12)
        self.gamma = nz.uniform(0.8, 1.2)
        self.cast = nz.uniform((0.93, 0.88, 0.78), (1.05, 1.1, 1.1))
        self.blur = s * nz.uniform(0.0005, 0.0025)
        self.noise_sigma = nz.uniform(1.5, 6.0)
        self.heavy_blur = s * nz.uniform(0.012, 0.03)
        self.heavy_dark = nz.uniform(0.25, 0.5)
        # Anatomy.
        self.pigment = an.beta(2.0, 2.0)
        self.dd = self.R * an.uniform(0.27, 0.32)  # disc diameter
        self.rd = self.dd / 2
        off = an.normal(0.0, 0.035, 2) * self.R
        self.fx = self.cx - 0.07 * self.R + off[0]
        self.fy = self.cy + off[1]
        df = an.uniform(2.3, 2.6) * self.dd
        ang = an.uniform(-10.0, -2.0) * math.pi / 180
        self.dx = self.fx + df * math.cos(ang)
        self.dy = self.fy + df * math.sin(ang)
        self.macula_depth = an.uniform(0.2, 0.35)
        self.macula_sigma = an.uniform(0.55, 0.8) * self.dd
        self.cdr = an.uniform(0.3, 0.4)
        self.disc_aspect = an.uniform(1.03, 1.14)
        self.cup_dx = an.uniform(-0.15, 0.02) * self.rd
        self.rim_jitter = an.uniform(-12, 12, 3)
        self.reflex = an.uniform(0.35, 0.9)
        self.mottle = an.normal(size=(9, 9)).astype(np.float32)
        self.mottle_amp = an.uniform(0.03, 0.08)
        self.grain = an.normal(size=(64, 64)).astype(np.float32)
        self.grain_amp = an.uniform(0.015, 0.035)
        self.glow = an.uniform(0.04, 0.12)
        blond = np.array([206.0, 100.0, 46.0])
        dark = np.array([160.0, 60.0, 28.0])
        self.base = blond + (dark - blond) * self.pigment + an.normal(0.0, 5.0, 3)

    def landmarks(self, eye_side: str) -> FundusLandmarks:
        def fx(x: float) -> float:
            return self.size - x if eye_side == "left" else x

        return FundusLandmarks(
            size=self.size,
            eye_side=eye_side,
            field_center=(fx(self.cx), self.cy),
            field_radius=self.R,
            fovea=(fx(self.fx), self.fy),
            disc_center=(fx(self.dx), self.dy),
            disc_radius=self.rd,
        )


def ellipse_poly(
    cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, jitter: np.ndarray | None = None, k: int = 14
) -> np.ndarray:
    """Polygon (k, 2) of a rotated ellipse; ``jitter`` (k,) scales the radius per vertex for irregular blobs."""
    t = np.linspace(0.0, 2 * math.pi, k, endpoint=False)
    r = 1.0 if jitter is None else jitter
    x, y = rx * np.cos(t) * r, ry * np.sin(t) * r
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cx + x * ca - y * sa, cy + x * sa + y * ca], axis=1)


# A shape: ("e", cx, cy, rx, ry, alpha) ellipse, ("p", pts(k,2), alpha) polygon, ("l", pts(k,2), width, alpha) line.
Shape = tuple[Any, ...]


def _shape_extent(shape: Shape) -> tuple[float, float, float, float]:
    if shape[0] == "e":
        _, cx, cy, rx, ry, _a = shape
        return cx - rx, cy - ry, cx + rx, cy + ry
    pts = shape[1]
    pad = shape[2] / 2 if shape[0] == "l" else 0.0
    return pts[:, 0].min() - pad, pts[:, 1].min() - pad, pts[:, 0].max() + pad, pts[:, 1].max() + pad


def paint(canvas: Image.Image, colour: Sequence[float], shapes: Sequence[Shape], *, ss: int, blur: float = 0.0) -> None:
    """Blend ``colour`` into ``canvas`` through an antialiased (``ss``x supersampled), optionally blurred mask."""
    if not shapes:
        return
    ext = np.array([_shape_extent(s) for s in shapes])
    pad = 2.0 + 3.0 * blur
    size = canvas.size[0]
    x0, y0 = max(0, math.floor(ext[:, 0].min() - pad)), max(0, math.floor(ext[:, 1].min() - pad))
    x1, y1 = min(size, math.ceil(ext[:, 2].max() + pad)), min(size, math.ceil(ext[:, 3].max() + pad))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(mask)
    off = np.array([x0, y0], dtype=float)
    for shape in shapes:
        kind = shape[0]
        fill = int(round(255 * min(1.0, max(0.0, shape[-1]))))
        if kind == "e":
            _, cx, cy, rx, ry, _a = shape
            rx, ry = max(rx * ss, 0.5), max(ry * ss, 0.5)
            px, py = (cx - x0) * ss, (cy - y0) * ss
            draw.ellipse((px - rx, py - ry, px + rx, py + ry), fill=fill)
        elif kind == "p":
            pts = ((shape[1] - off) * ss).ravel().tolist()
            draw.polygon(pts, fill=fill)
        else:
            pts = ((shape[1] - off) * ss).ravel().tolist()
            draw.line(pts, fill=fill, width=max(1, int(round(shape[2] * ss))), joint="curve")
    if ss > 1:
        mask = mask.reduce(ss)
    if blur > 0.3:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    canvas.paste(tuple(int(round(c)) for c in colour), (x0, y0, x1, y1), mask)


def mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[float, float, float]:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)
