"""Rendering one colour fundus photograph: :func:`render_fundus` and :func:`fundus_landmarks`.

:class:`Renderer` composes an image in a fixed order: the low-resolution reflectance (pigmentation, macula, disc glow,
the background signs of PM/DM) under an illumination field (vignetting, gradient, readability shadows); the class
signs that lie under the vessels; the optic disc; the vessel tree (:mod:`retina_io.synth.vessels`); the signs over the
vessels; the foveal reflex; then optics and sensor (blur, circular field and crop, noise, tone curve) and the mirror
for left eyes. The lesion painters are :class:`~retina_io.synth.lesions.Lesions`; geometry and painting primitives
are :mod:`retina_io.synth.scene`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from retina_io.presets import SYNFUNDUS_READABILITY
from retina_io.schema import CLASSES
from retina_io.synth.errors import SynthError, check_int
from retina_io.synth.lesions import Lesions
from retina_io.synth.scene import (
    ARTERY,
    ARTERY_HTR,
    ATROPHY,
    HEM,
    PIGMENT,
    VEIN,
    FundusLandmarks,
    Scene,
    ellipse_poly,
    mix,
    paint,
)
from retina_io.synth.streams import S_CLASS, S_NOISE, S_READABILITY, S_VESSELS, stream_rng
from retina_io.synth.vessels import N0, Vessels, draw_vessel_mask, realise_vessels, vessel_spec


def _normalise_labels(labels: Mapping[str, Any]) -> dict[str, Any]:
    """Accept class names (``DR``, ``AMD``, ...) or ``is_*`` column names; fill defaults (healthy, right eye)."""
    out: dict[str, Any] = {}
    for c in CLASSES:
        v = labels.get(c, labels.get(f"is_{c.lower()}", 0))
        out[c] = int(bool(v))
    grade = int(labels.get("dr_grade", 0) or 0)
    if grade < 0 or grade > 4:
        raise SynthError(f"dr_grade must be 0-4; got {grade}")
    if "DR" in labels:
        grade = (grade or 2) if out["DR"] else 0
    out["dr_grade"] = grade
    out["DR"] = int(grade > 0)
    side = str(labels.get("eye_side", "right"))
    if side not in ("left", "right"):
        raise SynthError(f"eye_side must be 'left' or 'right'; got {side!r}")
    out["eye_side"] = side
    for c in SYNFUNDUS_READABILITY:
        out[c] = int(bool(labels.get(c, 1)))
    return out


class Renderer(Lesions):
    """One image: labels, size and seed key in; :meth:`render` out."""

    def __init__(self, labels: Mapping[str, Any], size: int, key: tuple[int, ...]) -> None:
        self.lab = _normalise_labels(labels)
        self.size = size
        self.key = key
        self.ss = 2  # supersampling of every drawn mask (antialiasing)
        self.sc = Scene(size, key)
        self.px = 1.0  # one output pixel, for minimum lesion sizes
        self.fovea_reflex = True  # off where a lesion covers the fovea

    # -- background -----------------------------------------------------------------------------------------------
    def _lowres(self) -> tuple[Image.Image, np.ndarray]:
        sc, s = self.sc, self.size
        n = min(s, 64)
        c = (np.arange(n, dtype=np.float32) + 0.5) * (s / n)
        x, y = c[None, :], c[:, None]
        mot = Image.fromarray(sc.mottle, "F").resize((n, n), Image.Resampling.BICUBIC)
        refl = np.ones((n, n, 3), dtype=np.float32) * sc.base.astype(np.float32)
        refl *= (1.0 + sc.mottle_amp * np.asarray(mot) + sc.grain_amp * sc.grain[:n, :n])[:, :, None]
        dm = ((x - sc.fx) ** 2 + (y - sc.fy) ** 2) / (2 * sc.macula_sigma**2)
        g = np.exp(-dm)
        depth = sc.macula_depth * np.array([0.8, 1.15, 1.15], dtype=np.float32)
        refl *= 1.0 - g[:, :, None] * depth
        gd = np.exp(-((x - sc.dx) ** 2 + (y - sc.dy) ** 2) / (2 * (1.1 * sc.dd) ** 2))
        refl *= (1.0 + sc.glow * gd)[:, :, None]
        if self.lab["PM"]:
            self._staphyloma(refl, x, y)
        if self.lab["DM"]:
            refl *= np.array([1.02, 0.92, 0.9], dtype=np.float32)  # thin, paler-orange fundus
        # Illumination (multiplies everything drawn later): vignetting, gradient, readability shadows.
        r = np.sqrt((x - sc.cx) ** 2 + (y - sc.cy) ** 2) / sc.R
        r2 = np.clip(r, 0, 1.2)[:, :, None] ** 2
        refl *= 1.0 - r2 * np.array([0.0, 0.22, 0.3], dtype=np.float32)  # the periphery is redder
        illum = (1.0 - sc.vig_k * np.clip(r, 0, 1.2) ** sc.vig_p) * (
            1.0 + sc.grad_amp * ((x - sc.cx) * math.cos(sc.grad_ang) + (y - sc.cy) * math.sin(sc.grad_ang)) / sc.R
        )
        if not self.lab["is_macular_readable"]:
            illum *= 1.0 - 0.8 * np.exp(-dm * (sc.macula_sigma / (1.4 * sc.dd)) ** 2)
        if not self.lab["is_retinal_region_readable"]:
            illum *= sc.heavy_dark
        img = Image.fromarray(np.clip(refl, 0, 255).astype(np.uint8), "RGB")
        if n != s:
            img = img.resize((s, s), Image.Resampling.BILINEAR)
        return img, np.clip(illum / 1.25, 0.0, 1.0)

    # -- disc ------------------------------------------------------------------------------------------------------
    def _disc(self, canvas: Image.Image) -> None:
        sc, lab, ss = self.sc, self.lab, self.ss
        rx, ry = sc.rd, sc.rd * sc.disc_aspect
        angle = 0.0
        rim = np.array([246.0, 176.0, 108.0]) + sc.rim_jitter
        cup = (252.0, 230.0, 176.0)
        cdr, cup_dy = sc.cdr, 1.05
        swollen = pale = False
        if lab["PM"]:
            rng = self.crng("PM")
            rx *= rng.uniform(0.6, 0.75)  # tilted, oval disc
            angle = rng.uniform(12.0, 28.0) * rng.choice([-1.0, 1.0]) * math.pi / 180
            cw = rng.uniform(0.45, 0.8) * sc.rd  # temporal crescent of peripapillary atrophy
            crescent = ellipse_poly(sc.dx - cw * 0.55, sc.dy, rx + cw, ry * 1.04, angle)
            paint(canvas, ATROPHY, [("p", crescent, 0.95)], ss=ss, blur=0.06 * sc.rd)
            paint(canvas, (178, 120, 80), [("l", crescent[4:11], max(self.px, 0.08 * sc.rd), 0.6)], ss=ss, blur=0.5)
        if lab["DM"]:
            rng = self.crng("DM")
            jit = 1.0 + 0.18 * rng.normal(size=14)
            rr = rng.uniform(1.9, 2.5)
            ring = ellipse_poly(sc.dx - 0.35 * sc.rd, sc.dy, sc.rd * rr, sc.rd * rr * 0.9, 0.0, jit)
            paint(canvas, ATROPHY, [("p", ring, 0.92)], ss=ss, blur=0.12 * sc.rd)
            paint(canvas, PIGMENT, [("l", np.vstack([ring, ring[:1]]), max(self.px, 0.1 * sc.rd), 0.55)], ss=ss,
                   blur=0.1 * sc.rd)  # fmt: skip
        if lab["GC"]:
            rng = self.crng("GC")
            cdr = rng.uniform(0.72, 0.9)
            cup_dy = rng.uniform(1.1, 1.2)
            cup = (254.0, 238.0, 196.0)
            rim = rim * np.array([1.0, 0.94, 0.94])
            if rng.random() < 0.6:  # wedge-shaped nerve-fibre-layer defect leaving the disc (infero/superotemporal)
                th = math.pi + rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.8)
                spread = rng.uniform(0.12, 0.22)
                r0, r1 = 1.1 * sc.rd, rng.uniform(2.2, 3.2) * sc.dd
                wedge = np.array([[sc.dx + r * math.cos(th + d * spread), sc.dy + r * math.sin(th + d * spread)]
                                  for r, d in ((r0, -0.6), (r1, -1.0), (r1, 1.0), (r0, 0.6))])  # fmt: skip
                paint(canvas, sc.base * 0.62, [("p", wedge, 0.55)], ss=ss, blur=0.15 * sc.dd)
            if rng.random() < 0.3:  # splinter (Drance) haemorrhage at the disc margin
                t = math.pi + rng.normal(0, 0.6)
                c = (sc.dx + rx * 1.02 * math.cos(t), sc.dy + ry * 1.02 * math.sin(t))
                flame = ellipse_poly(c[0], c[1], max(self.px, 0.22 * sc.rd), max(0.5 * self.px, 0.06 * sc.rd), t)
                paint(canvas, HEM, [("p", flame, 0.9)], ss=ss, blur=0.3)
        if lab["AON"]:
            rng = self.crng("AON")
            if rng.random() < 0.6:
                swollen = True
                rx, ry = rx * rng.uniform(1.2, 1.4), ry * rng.uniform(1.2, 1.4)
                rim = np.array([232.0, 128.0, 92.0])
                cdr = 0.12
                cup = tuple(rim * 1.04)
            else:
                pale = True
                rim = np.array([250.0, 238.0, 206.0])
                cup = (255.0, 246.0, 220.0)
        bg = sc.base
        halo = ellipse_poly(sc.dx, sc.dy, rx * 1.1, ry * 1.1, angle)
        paint(canvas, mix(bg, rim, 0.5), [("p", halo, 0.5)], ss=ss, blur=0.12 * sc.rd)
        disc = ellipse_poly(sc.dx, sc.dy, rx, ry, angle, k=24)
        paint(canvas, rim, [("p", disc, 1.0)], ss=ss, blur=(0.3 if swollen else 0.03) * sc.rd)
        cx = sc.dx + sc.cup_dx
        if not swollen:
            cup_poly = ellipse_poly(cx, sc.dy, rx * cdr, min(ry * 0.95, ry * cdr * cup_dy), angle, k=20)
            paint(canvas, cup, [("p", cup_poly, 0.95)], ss=ss, blur=0.1 * sc.rd)
            core = ellipse_poly(cx, sc.dy, rx * cdr * 0.55, ry * cdr * cup_dy * 0.55, angle)
            paint(canvas, mix(cup, (255, 255, 245), 0.5), [("p", core, 0.8)], ss=ss, blur=0.1 * sc.rd)
        self._aon_state = (swollen, pale, rx, ry, angle, rim)

    # -- vessels -----------------------------------------------------------------------------------------------------
    def _vessels(self, canvas: Image.Image) -> tuple[Vessels, tuple[int, int, np.ndarray] | None]:
        sc, lab, ss, s = self.sc, self.lab, self.ss, self.size
        spec = vessel_spec(stream_rng(self.key, S_VESSELS))
        tort = [np.ones_like(lv.walk) for lv in spec]
        wsc = [np.ones_like(lv.walk) for lv in spec]
        art_colour: tuple[float, float, float] = ARTERY
        if lab["HtR"]:
            rng = self.crng("HtR")
            narrow = rng.uniform(0.4, 0.55)
            for lv, t, w in zip(spec, tort, wsc, strict=True):
                t[~lv.vein] *= 0.15
                w[~lv.vein] *= narrow
            art_colour = ARTERY_HTR
        target = None
        if lab["RVO"]:
            rng = self.crng("RVO")
            v = int(rng.choice([1, 3]))  # superotemporal or inferotemporal vein
            i0 = int(rng.integers(3, 8))
            ramp = np.clip((np.arange(N0) - i0) / 4.0, 0, 1)
            tort[0][v] *= 1.0 + 2.5 * ramp
            wsc[0][v] *= 1.0 + 0.6 * ramp
            kids = np.flatnonzero((spec[1].parent == v) & (spec[1].frac * (N0 - 1) >= i0))
            tort[1][kids] *= 2.5
            wsc[1][kids] *= 1.5
            target = (v, i0, kids)
        vs = realise_vessels(spec, sc, tort=tort, wscale=wsc)
        faz = 0.35 * sc.dd
        fov = (sc.fx, sc.fy)
        veins = [(vs.pts[lv][vs.vein[lv]], vs.width[lv][vs.vein[lv]]) for lv in range(3)]
        arts = [(vs.pts[lv][~vs.vein[lv]], vs.width[lv][~vs.vein[lv]]) for lv in range(3)]
        vein_colour: tuple[float, float, float] = VEIN
        if lab["RVO"]:
            vein_colour = mix(VEIN, (90, 10, 20), 0.3)
        canvas.paste(tuple(int(c) for c in vein_colour), (0, 0, s, s), draw_vessel_mask(s, ss, veins, fov, faz))
        if lab["HtR"]:
            self._htr_extra(canvas, vs)
        canvas.paste(tuple(int(c) for c in art_colour), (0, 0, s, s), draw_vessel_mask(s, ss, arts, fov, faz))
        # Central light reflex on the larger arteries (broad "copper wire" reflex in HtR).
        reflex_w = 0.4 if lab["HtR"] else 0.25
        reflex = [("l", p[:-4], float(w[:-4].mean()) * reflex_w, 0.75 if lab["HtR"] else 0.5)
                  for p, w in zip(*arts[0], strict=True) if w[0] * reflex_w * ss >= 0.6]  # fmt: skip
        reflex_colour = (232, 142, 86) if lab["HtR"] else (220, 120, 90)
        if s < 384:
            paint(canvas, reflex_colour, reflex, ss=ss)
        else:  # wide enough to draw directly (cheaper than a full-size antialiased mask)
            draw = ImageDraw.Draw(canvas)
            for _, p, w, alpha in reflex:
                colour = tuple(int(round(c)) for c in mix(art_colour, reflex_colour, alpha))
                draw.line(p.tolist(), fill=colour, width=max(1, int(round(w))))
        return vs, target

    # -- compose ---------------------------------------------------------------------------------------------------
    def render(self) -> Image.Image:
        sc, lab, ss = self.sc, self.lab, self.ss
        canvas, illum = self._lowres()
        if lab["DM"] or lab["PM"]:
            cls = "DM" if lab["DM"] else "PM"
            self._tessellation(canvas, 0.55 if lab["DM"] else 0.22, stream_rng(self.key, S_CLASS + 70 + (cls == "DM")))
        if lab["CRP"]:
            self._crp(canvas)
        if lab["DM"]:
            self._dm_patches(canvas)
        if lab["AMD"]:
            self._amd(canvas)
        if lab["DME"]:
            self._dme(canvas)
        if lab["DR"]:
            self._dr_under(canvas)
        self._disc(canvas)
        vs, rvo_target = self._vessels(canvas)
        if lab["AON"]:
            self._disc_overlay(canvas)
        if rvo_target is not None:
            self._rvo(canvas, vs, rvo_target)
        if lab["DR"]:
            self._dr_over(canvas, vs)
        if lab["HtR"]:
            self._htr_retinopathy(canvas, vs)
        if lab["EM"]:
            self._em(canvas)
        if self.fovea_reflex:
            fr = max(0.6 * self.px, 0.045 * sc.dd)
            paint(canvas, (255, 226, 170), [("e", sc.fx, sc.fy, fr, fr, sc.reflex)], ss=ss, blur=0.6 * fr)
        return self._finish(canvas, illum)

    def _finish(self, canvas: Image.Image, illum_low: np.ndarray) -> Image.Image:
        sc, lab, s = self.sc, self.lab, self.size
        rrng = stream_rng(self.key, S_READABILITY)
        glare = rrng.random() < 0.5
        extreme = rrng.uniform(0.04, 0.08) * s
        if not lab["is_optic_disc_readable"]:
            colour = (255, 244, 226) if glare else (20, 10, 6)
            paint(canvas, colour, [("e", sc.dx, sc.dy, 1.3 * sc.dd, 1.3 * sc.dd, 0.92)], ss=1, blur=0.5 * sc.dd)
        if not lab["is_macular_readable"]:
            box = tuple(
                int(round(v)) for v in (sc.fx - 2 * sc.dd, sc.fy - 2 * sc.dd, sc.fx + 2 * sc.dd, sc.fy + 2 * sc.dd)
            )
            box = (max(0, box[0]), max(0, box[1]), min(s, box[2]), min(s, box[3]))
            if box[2] > box[0] and box[3] > box[1]:
                canvas.paste(canvas.crop(box).filter(ImageFilter.GaussianBlur(0.4 * sc.dd)), box)
        blur = sc.blur
        if not lab["is_retinal_region_readable"]:
            blur = max(blur, sc.heavy_blur)
        if not lab["is_fundus"]:
            blur = max(blur, extreme)
        if blur > 2.0:
            canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
        elif blur > 0.9:  # cheap ~1 px optical blur
            canvas = canvas.reduce(2).resize((s, s), Image.Resampling.BILINEAR)
        n = illum_low.shape[0]
        field = Image.fromarray((illum_low * 255.0).astype(np.uint8), "L")
        if n != s:
            field = field.resize((s, s), Image.Resampling.BILINEAR)
        mask = Image.new("L", (2 * s, 2 * s), 0)
        md = ImageDraw.Draw(mask)
        md.ellipse((2 * (sc.cx - sc.R), 2 * (sc.cy - sc.R), 2 * (sc.cx + sc.R), 2 * (sc.cy + sc.R)), fill=255)
        if sc.crop_h is not None:
            md.rectangle((0, 0, 2 * s, 2 * (sc.cy - sc.crop_h)), fill=0)
            md.rectangle((0, 2 * (sc.cy + sc.crop_h), 2 * s, 2 * s), fill=0)
        mask = mask.reduce(2)
        field = ImageChops.multiply(field, mask)
        # Sensor noise on the field, so it scales with the signal (and is faint in the black surround).
        noise = stream_rng(self.key, S_NOISE).integers(0, 256, (s, s), dtype=np.uint8)
        field = ImageChops.add(field, Image.fromarray(noise, "L").point(_noise_lut(round(sc.noise_sigma * 4) / 4)),
                               1.0, -128)  # fmt: skip
        rgb = ImageChops.multiply(canvas, field.convert("RGB"))
        if not lab["is_fundus"]:
            haze = (230, 200, 170) if glare else (8, 4, 2)
            rgb.paste(haze, (0, 0, s, s), mask.point(lambda v: int(v * 0.8)))
        rgb = rgb.point(_tone_lut(sc.gain * 1.25, tuple(float(c) for c in sc.cast), sc.gamma))
        if lab["eye_side"] == "left":
            rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return rgb


_NOISE_LUTS: dict[float, list[int]] = {}


def _noise_lut(sigma: float) -> list[int]:
    """Uniform bytes -> 128 + N(0, sigma) via the normal quantile function (cheap, deterministic Gaussian noise)."""
    lut = _NOISE_LUTS.get(sigma)
    if lut is None:
        nd = statistics.NormalDist()
        lut = [int(min(255, max(0, round(128 + sigma * nd.inv_cdf((i + 0.5) / 256))))) for i in range(256)]
        _NOISE_LUTS[sigma] = lut
    return lut


def _tone_lut(gain: float, cast: tuple[float, ...], gamma: float) -> list[int]:
    v = np.arange(256, dtype=np.float64) / 255.0
    out = []
    knee = 0.8
    for c in cast:
        y = v * gain * c
        y = np.where(y < knee, y, knee + (1 - knee) * np.tanh((y - knee) / (1 - knee)))  # soft shoulder, no hue clip
        out += np.clip(np.round(255.0 * y**gamma), 0, 255).astype(int).tolist()
    return out


def fundus_landmarks(*, size: int, seed: int, eye_side: str = "right") -> FundusLandmarks:
    """The field, fovea and optic-disc positions that :func:`render_fundus` uses for ``size`` and ``seed``."""
    check_int("size", size, 32)
    check_int("seed", seed, 0)
    return Scene(size, (seed,)).landmarks(eye_side)


def render_image(labels: Mapping[str, Any], size: int, key: tuple[int, ...]) -> Image.Image:
    """The image whose seed streams are keyed ``key`` (see :mod:`retina_io.synth.streams`); arguments unchecked."""
    return Renderer(labels, size, key).render()


def render_fundus(labels: Mapping[str, Any], *, size: int, seed: int) -> Image.Image:
    """Render one synthetic colour fundus photograph.

    Args:
        labels: class name (``"DR"``, ``"AMD"``, ... as in :data:`CLASSES`, or the ``is_*`` column names) -> 0/1,
            plus ``dr_grade`` (0-4; DR is on iff > 0, a bare ``DR: 1`` means grade 2) and ``eye_side``
            (``"left"``/``"right"``; left eyes are mirrored, disc on the left). Optional readability flags
            (:data:`retina_io.presets.SYNFUNDUS_READABILITY`, default 1) set to 0 degrade the image (heavy
            blur/darkness, a shadowed macula, glare over the disc, or no usable fundus at all). Missing keys mean 0 /
            healthy.
        size: output width and height in pixels (>= 32).
        seed: non-negative seed driving anatomy, vessel tree and nuisance; each class's lesions have their own stream,
            so toggling one class with the same seed changes only that class's sign.

    Returns:
        An RGB ``PIL.Image.Image`` of ``size`` x ``size``.

    Raises:
        SynthError: ``size``/``seed`` out of range, ``dr_grade`` outside 0-4 or an unknown ``eye_side``.
    """
    check_int("size", size, 32)
    check_int("seed", seed, 0)
    return render_image(labels, size, (seed,))
