"""Each class's visible sign, drawn into one image: the lesion painters of the renderer.

:class:`Lesions` is the part of :class:`~retina_io.synth.render.Renderer` that paints lesions (haemorrhages, exudates,
drusen, scars, atrophy, staphyloma, tessellation, membranes, the swollen or pale disc overlay); the renderer in
:mod:`retina_io.synth.render` calls them in a fixed order and itself draws the signs that change the disc (cupping,
tilt, atrophy ring, swelling) and the vessels (narrow arteries, dilated tortuous veins). Each sign draws from its
class's own stream (:meth:`Lesions.crng`, see :mod:`retina_io.synth.streams`), so toggling one class changes only its
sign. Sizes are relative to the image and the disc diameter, with a floor of about one output pixel (``px``) so signs
survive downsampling to 64-128 px.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from retina_io.schema import CLASSES
from retina_io.synth.labels import sigmoid
from retina_io.synth.scene import (
    ATROPHY,
    COTTON,
    DRUSEN,
    DRUSEN_HI,
    EXUDATE,
    EXUDATE_HI,
    HEM,
    HEM_DARK,
    PIGMENT,
    SCAR,
    Scene,
    Shape,
    ellipse_poly,
    mix,
    paint,
)
from retina_io.synth.streams import S_CLASS, stream_rng
from retina_io.synth.vessels import Vessels


class Lesions:
    """Lesion painters; the renderer that inherits them sets the attributes below."""

    lab: dict[str, Any]  # normalised labels (class -> 0/1, dr_grade, eye_side, readability flags)
    size: int
    key: tuple[int, ...]  # the image's seed key
    ss: int  # supersampling of every drawn mask
    sc: Scene
    px: float  # one output pixel
    fovea_reflex: bool
    _aon_state: tuple[bool, bool, float, float, float, np.ndarray]  # set by the renderer's disc

    def crng(self, cls: str) -> np.random.Generator:
        """The stream of class ``cls``'s sign."""
        return stream_rng(self.key, S_CLASS + CLASSES.index(cls))

    # -- background signs (drawn into the low-resolution reflectance) ------------------------------------------------
    def _staphyloma(self, refl: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        """PM: posterior staphyloma, a darker ring around the posterior pole."""
        sc, rng = self.sc, self.crng("PM")
        cx = sc.fx + (sc.dx - sc.fx) * rng.uniform(0.35, 0.65)
        cy = sc.fy + rng.normal(0.0, 0.2) * sc.dd
        rad = rng.uniform(1.9, 2.5) * sc.dd
        width = rng.uniform(0.16, 0.26) * sc.dd
        d = np.sqrt((x - cx) ** 2 + ((y - cy) * 1.15) ** 2)
        ring = np.exp(-((d - rad) ** 2) / (2 * width**2))
        inside = sigmoid((rad - d) / (0.15 * sc.dd))
        dark = rng.uniform(0.3, 0.42)
        theta = np.arctan2(y - cy, x - cx)
        ring *= 0.55 + 0.45 * np.cos(theta - rng.uniform(0, 2 * math.pi))  # the edge is sharper on one side
        refl *= (1.0 - dark * ring - 0.1 * inside)[:, :, None] * np.array([1.0, 0.95, 0.95], dtype=np.float32)

    def _tessellation(self, canvas: Image.Image, strength: float, rng: np.random.Generator) -> None:
        """Tigroid fundus: large choroidal vessels (orange bands) radiating outward between dark interspaces."""
        sc, s = self.sc, self.size
        nv, k = 80, 12
        c = np.array([sc.fx + (sc.dx - sc.fx) * 0.4, sc.fy])
        ang = rng.uniform(0, 2 * math.pi, nv)
        r0 = rng.uniform(0.0, 0.5, nv) * sc.R
        head = (ang + rng.normal(0.0, 0.35, nv))[:, None] + np.cumsum(rng.normal(0.0, 0.12, (nv, k)), axis=1)
        step = (rng.uniform(0.5, 1.0, nv) * sc.R / k)[:, None, None]
        width = np.maximum(1.5, rng.uniform(0.011, 0.02, nv) * s)
        p0 = c + r0[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)
        pts = p0[:, None, :] + np.cumsum(np.stack([np.cos(head), np.sin(head)], 2) * step, axis=1)
        pts = np.concatenate([p0[:, None, :], pts], axis=1).tolist()
        mask = Image.new("L", (s, s), 0)
        line = ImageDraw.Draw(mask).line
        for i in range(nv):
            line(pts[i], fill=255, width=int(round(width[i])), joint="curve")
        mask = mask.filter(ImageFilter.GaussianBlur(0.004 * s + 0.4))
        inter = ImageChops.invert(mask).point(lambda v: int(v * strength))
        canvas.paste((104, 42, 26), (0, 0, s, s), inter)
        canvas.paste((234, 122, 60), (0, 0, s, s), mask.point(lambda v: int(v * 0.3 * strength)))

    # -- disc ------------------------------------------------------------------------------------------------------

    def _disc_overlay(self, canvas: Image.Image) -> None:
        """AON after the vessels: swollen margins hide the vessel roots; a pale disc veils its capillaries."""
        sc, ss = self.sc, self.ss
        swollen, pale, rx, ry, angle, rim = self._aon_state
        rng = self.crng("AON")
        if swollen:
            ring = ellipse_poly(sc.dx, sc.dy, rx * 1.05, ry * 1.05, angle, k=24)
            paint(canvas, mix(rim, (245, 170, 130), 0.4), [("p", ring, 0.7)], ss=ss, blur=0.35 * sc.rd)
            k = 5
            a = rng.uniform(0, 2 * math.pi, k)
            shapes = [
                ("p", ellipse_poly(sc.dx + 1.3 * rx * math.cos(t), sc.dy + 1.3 * ry * math.sin(t),
                                    max(self.px, 0.35 * sc.rd), max(self.px * 0.6, 0.1 * sc.rd), t), 0.9)
                for t in a
            ]  # fmt: skip
            paint(canvas, HEM, shapes, ss=ss, blur=0.3)
        elif pale:
            disc = ellipse_poly(sc.dx, sc.dy, rx * 0.95, ry * 0.95, angle, k=24)
            paint(canvas, (250, 238, 210), [("p", disc, 0.45)], ss=ss, blur=0.08 * sc.rd)

    # -- lesions ---------------------------------------------------------------------------------------------------
    def _posterior_points(self, rng: np.random.Generator, k: int, spread: float) -> np.ndarray:
        """Points scattered over the posterior pole, avoiding the disc."""
        sc = self.sc
        r = np.sqrt(rng.uniform(0.0, 1.0, k)) * spread * sc.R
        a = rng.uniform(0.0, 2 * math.pi, k)
        pts = np.stack([sc.fx + 0.25 * sc.dd + r * np.cos(a), sc.fy + r * np.sin(a) * 0.9], axis=1)
        d = np.hypot(pts[:, 0] - sc.dx, pts[:, 1] - sc.dy)
        push = np.clip(1.3 * sc.rd - d, 0, None)[:, None] * (pts - [sc.dx, sc.dy]) / np.maximum(d, 1e-3)[:, None]
        return pts + push

    def _blobs(
        self, rng: np.random.Generator, pts: np.ndarray, r: np.ndarray, alpha: float, jitter: float = 0.2
    ) -> list[Shape]:
        out: list[Shape] = []
        jit = rng.normal(size=(len(pts), 12))
        jit = 1.0 + jitter * 1.4 * (jit + np.roll(jit, 1, axis=1) + np.roll(jit, -1, axis=1)) / 3.0  # smooth outline
        asp = rng.uniform(0.75, 1.0, len(pts))
        ang = rng.uniform(0, math.pi, len(pts))
        for i, (p, rr) in enumerate(zip(pts, r, strict=True)):
            out.append(("p", ellipse_poly(p[0], p[1], rr, rr * asp[i], ang[i], np.clip(jit[i], 0.5, 1.6), k=12), alpha))
        return out

    def _dr_under(self, canvas: Image.Image) -> None:
        """DR: microaneurysms, dot/blot haemorrhages (count and size grow with grade), hard exudates."""
        g = self.lab["dr_grade"]
        rng = self.crng("DR")
        s, ss, px = self.size, self.ss, self.px
        n_ma = (0, rng.integers(10, 18), rng.integers(12, 20), rng.integers(12, 20), rng.integers(12, 20))[g]
        n_hem = (0, rng.integers(2, 5), rng.integers(10, 18), rng.integers(22, 36), rng.integers(18, 30))[g]
        pts = self._posterior_points(rng, int(n_ma), 0.75)
        r = np.maximum(0.8 * px, rng.uniform(0.0035, 0.0055, len(pts)) * s)
        paint(canvas, HEM_DARK, [("e", p[0], p[1], rr, rr, 0.95) for p, rr in zip(pts, r, strict=True)], ss=ss)
        pts = self._posterior_points(rng, int(n_hem), 0.8)
        r = np.maximum(0.9 * px, rng.uniform(0.007, 0.013, len(pts)) * s * (1.0 + 0.18 * (g - 2)))
        half = len(pts) // 2
        paint(canvas, HEM, self._blobs(rng, pts[:half], r[:half], 0.95), ss=ss, blur=0.25)
        paint(canvas, HEM_DARK, self._blobs(rng, pts[half:], r[half:], 0.95), ss=ss, blur=0.25)
        if g >= 2:
            pts = self._posterior_points(rng, int(rng.integers(2, 6 + 2 * g)), 0.6)
            r = np.maximum(0.6 * px, rng.uniform(0.003, 0.006, len(pts)) * s)
            paint(canvas, EXUDATE, [("e", p[0], p[1], rr, rr, 0.9) for p, rr in zip(pts, r, strict=True)], ss=ss)

    def _dr_over(self, canvas: Image.Image, vs: Vessels) -> None:
        """DR grade 3-4: cotton-wool spots; grade 4: neovascular tufts, pre-retinal haemorrhage."""
        g = self.lab["dr_grade"]
        if g < 3:
            return
        rng = stream_rng(self.key, S_CLASS + 50)  # a separate stream so grades 1-2 keep their draws
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        k = int(rng.integers(3, 7))
        pts = self._near_arcades(rng, vs, k)
        r = np.maximum(1.2 * px, rng.uniform(0.014, 0.024, k) * s)
        paint(canvas, COTTON, self._blobs(rng, pts, r, 0.85, 0.3), ss=ss, blur=0.3 * float(r.mean()))
        if g < 4:
            return
        tufts = []
        centres = [np.array([sc.dx, sc.dy]) + rng.normal(0, 0.4, 2) * sc.rd]
        centres += list(self._near_arcades(rng, vs, int(rng.integers(1, 3))))
        for c in centres:
            for _ in range(9):
                h = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, 0.9, 6))
                step = rng.uniform(0.08, 0.16) * sc.dd
                p = c + rng.normal(0, 0.2, 2) * sc.dd
                pts = p + np.concatenate([[[0, 0]], np.cumsum(np.stack([np.cos(h), np.sin(h)], 1) * step, 0)])
                tufts.append(("l", pts, max(0.9 * px, 0.0035 * s), 0.95))
        paint(canvas, (150, 26, 30), tufts, ss=ss, blur=0.3)
        if rng.random() < 0.6:  # boat-shaped pre-retinal haemorrhage
            c = self._near_arcades(rng, vs, 1)[0]
            w, h = rng.uniform(0.6, 1.0) * sc.dd, rng.uniform(0.45, 0.7) * sc.dd
            t = np.linspace(0, math.pi, 12)
            boat = np.stack([c[0] + w * np.cos(t), c[1] + h * np.sin(t)], 1)
            paint(canvas, (120, 12, 12), [("p", boat, 0.95)], ss=ss, blur=0.5)

    def _near_arcades(self, rng: np.random.Generator, vs: Vessels, k: int) -> np.ndarray:
        pts = vs.pts[0][:4].reshape(-1, 2)  # the two temporal arcades
        pts = pts[(np.hypot(pts[:, 0] - self.sc.dx, pts[:, 1] - self.sc.dy) > 1.5 * self.sc.dd)]
        pick = pts[rng.integers(0, len(pts), k)]
        return pick + rng.normal(0.0, 0.35, (k, 2)) * self.sc.dd

    def _amd(self, canvas: Image.Image) -> None:
        """AMD: drusen clustered around the macula (size by stage); pigment clumps; some geographic atrophy."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = self.crng("AMD")
        stage = rng.choice(3, p=[0.35, 0.45, 0.2])
        k = int(rng.integers(18, 40))
        r = np.sqrt(rng.uniform(0, 1, k)) * rng.uniform(1.0, 1.5) * sc.dd
        a = rng.uniform(0, 2 * math.pi, k)
        pts = np.stack([sc.fx + r * np.cos(a), sc.fy + r * np.sin(a) * 0.85], 1)
        lo, hi = ((0.005, 0.009), (0.008, 0.016), (0.009, 0.018))[stage]
        rr = np.maximum(0.8 * px, rng.uniform(lo, hi, k) * s)
        half = k // 2
        blur = 0.25 * float(rr.mean())
        paint(canvas, DRUSEN, [("e", p[0], p[1], q, q, 0.9) for p, q in zip(pts[:half], rr[:half], strict=True)],
               ss=ss, blur=blur)  # fmt: skip
        paint(canvas, DRUSEN_HI, [("e", p[0], p[1], q, q, 0.9) for p, q in zip(pts[half:], rr[half:], strict=True)],
               ss=ss, blur=blur)  # fmt: skip
        if stage >= 1:
            kp = int(rng.integers(2, 7))
            pp = np.stack([sc.fx, sc.fy]) + rng.normal(0, 0.5, (kp, 2)) * sc.dd
            paint(canvas, PIGMENT, self._blobs(rng, pp, np.full(kp, max(0.7 * px, 0.006 * s)), 0.8), ss=ss)
        if stage == 2:
            jit = np.clip(1.0 + 0.2 * rng.normal(size=12), 0.6, 1.4)
            ga = ellipse_poly(sc.fx, sc.fy, 0.45 * sc.dd, 0.4 * sc.dd, rng.uniform(0, math.pi), jit, k=12)
            paint(canvas, (228, 184, 140), [("p", ga, 0.95)], ss=ss, blur=0.5)
            self.fovea_reflex = False

    def _dme(self, canvas: Image.Image) -> None:
        """DME: a circinate ring of hard exudates around the macula."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = self.crng("DME")
        c = np.array([sc.fx, sc.fy]) + rng.normal(0, 0.2, 2) * sc.dd
        ring_r = rng.uniform(0.65, 1.05) * sc.dd
        span = rng.uniform(1.3, 2.0) * math.pi
        a0 = rng.uniform(0, 2 * math.pi)
        nc = int(rng.integers(12, 22))
        ca = a0 + rng.uniform(0, span, nc)
        cr = ring_r * (1 + rng.normal(0, 0.1, nc))
        cent = c + np.stack([np.cos(ca), np.sin(ca)], 1) * cr[:, None]
        per = rng.integers(2, 5, nc)
        pts = np.repeat(cent, per, axis=0) + rng.normal(0, 0.09, (int(per.sum()), 2)) * sc.dd
        r = np.maximum(0.7 * px, rng.uniform(0.004, 0.008, len(pts)) * s)
        shapes = [("e", p[0], p[1], q, q, 1.0) for p, q in zip(pts, r, strict=True)]
        paint(canvas, (230, 190, 150), [("e", c[0], c[1], ring_r * 1.2, ring_r * 1.1, 0.18)], ss=1, blur=0.3 * sc.dd)
        paint(canvas, EXUDATE, shapes, ss=ss, blur=0.2)
        paint(canvas, EXUDATE_HI, shapes[::3], ss=ss)

    def _crp(self, canvas: Image.Image) -> None:
        """CRP: scattered chorioretinal scars in the periphery (white atrophic cores, pigmented borders)."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = self.crng("CRP")
        k = int(rng.integers(3, 8))
        a = rng.uniform(0, 2 * math.pi, k)
        d = rng.uniform(0.55, 0.85, k) * sc.R
        pts = np.stack([sc.cx + d * np.cos(a), sc.cy + d * np.sin(a)], 1)
        dd = np.hypot(pts[:, 0] - sc.dx, pts[:, 1] - sc.dy)
        near = dd < 1.8 * sc.dd  # keep the scars off the disc: swing them round the field centre
        pts[near] = np.stack(
            [sc.cx + d[near] * np.cos(a[near] + math.pi / 2), sc.cy + d[near] * np.sin(a[near] + math.pi / 2)], 1
        )
        r = np.maximum(2.0 * px, rng.uniform(0.03, 0.065, k) * s)
        white = rng.random(k) < 0.7
        cores = self._blobs(rng, pts, r, 0.95, 0.28)
        paint(canvas, SCAR, [c for c, w in zip(cores, white, strict=True) if w], ss=ss, blur=0.15 * float(r.mean()))
        paint(canvas, PIGMENT, [c for c, w in zip(cores, white, strict=True) if not w], ss=ss, blur=0.5)
        clumps = []
        for p, rr in zip(pts, r, strict=True):
            m = int(rng.integers(3, 7))
            t = rng.uniform(0, 2 * math.pi, m)
            cp = p + np.stack([np.cos(t), np.sin(t)], 1) * rr * rng.uniform(0.7, 1.05, (m, 1))
            clumps += self._blobs(rng, cp, np.maximum(0.8 * px, rr * rng.uniform(0.2, 0.38, m)), 0.9, 0.3)
        paint(canvas, PIGMENT, clumps, ss=ss, blur=0.4)

    def _dm_patches(self, canvas: Image.Image) -> None:
        """DM: large patches of chorioretinal atrophy at the posterior pole."""
        sc, ss, px = self.sc, self.ss, self.px
        rng = stream_rng(self.key, S_CLASS + 60)
        k = int(rng.integers(1, 4))
        pts = np.stack([sc.fx + rng.uniform(-0.8, 1.2, k) * sc.dd, sc.fy + rng.uniform(-1.0, 1.0, k) * sc.dd], 1)
        r = rng.uniform(0.45, 0.95, k) * sc.dd
        patches = self._blobs(rng, pts, r, 0.93, 0.22)
        paint(canvas, ATROPHY, patches, ss=ss, blur=0.025 * sc.dd)  # sharply demarcated
        outline = [("l", np.vstack([p[1], p[1][:1]]), max(px, 0.05 * sc.dd), 0.5) for p in patches]
        paint(canvas, PIGMENT, outline, ss=ss, blur=0.025 * sc.dd)
        if rng.random() < 0.5:  # Fuchs spot: a pigmented scar at the fovea
            spot = self._blobs(rng, np.array([[sc.fx, sc.fy]]), np.array([max(px, 0.2 * sc.dd)]), 0.85, 0.3)
            paint(canvas, (46, 30, 24), spot, ss=ss, blur=0.06 * sc.dd)
            self.fovea_reflex = False

    def _rvo(self, canvas: Image.Image, vs: Vessels, target: tuple[int, int, np.ndarray]) -> None:
        """RVO: flame haemorrhages along the occluded branch vein (drawn over the vessels), a few cotton-wool spots."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = self.crng("RVO")
        v, i0, kids = target
        path = np.concatenate([vs.pts[0][v][i0:], *vs.pts[1][kids]])
        head = np.concatenate([vs.heading[0][v][i0:], *vs.heading[1][kids]])
        inside = np.hypot(path[:, 0] - sc.cx, path[:, 1] - sc.cy) < 0.92 * sc.R
        if inside.sum() >= 4:  # haemorrhages where the photograph can show them
            path, head = path[inside], head[inside]
        k = int(rng.integers(40, 70))
        j = rng.integers(0, len(path), k)
        perp = head[j] + math.pi / 2
        off = rng.normal(0, 0.4, k) * sc.dd
        c = path[j] + np.stack([np.cos(perp), np.sin(perp)], 1) * off[:, None]
        ln = np.maximum(1.2 * px, rng.uniform(0.1, 0.26, k) * sc.dd)
        wd = np.maximum(0.6 * px, rng.uniform(0.03, 0.065, k) * sc.dd)
        ang = head[j] + rng.normal(0, 0.25, k)
        flames = [("p", ellipse_poly(c[i, 0], c[i, 1], ln[i], wd[i], ang[i], k=10), 0.92) for i in range(k)]
        half = k // 2
        paint(canvas, HEM, flames[:half], ss=ss, blur=0.3 + 0.03 * sc.dd)  # feathery edges
        paint(canvas, HEM_DARK, flames[half:], ss=ss, blur=0.3 + 0.02 * sc.dd)
        kc = int(rng.integers(0, 3))
        if kc:
            cc = path[rng.integers(0, len(path), kc)] + rng.normal(0, 0.5, (kc, 2)) * sc.dd
            r = np.maximum(1.2 * px, rng.uniform(0.012, 0.02, kc) * s)
            paint(canvas, COTTON, self._blobs(rng, cc, r, 0.8, 0.3), ss=ss, blur=0.3 * float(r.mean()))

    def _em(self, canvas: Image.Image) -> None:
        """EM: a glistening cellophane sheen over the macula with fine, wavy, bright wrinkles (striae)."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = self.crng("EM")
        c = np.array([sc.fx, sc.fy]) + rng.normal(0, 0.2, 2) * sc.dd
        rad = rng.uniform(1.1, 1.5) * sc.dd
        jit = np.clip(1.0 + 0.22 * rng.normal(size=14), 0.5, 1.5)
        sheen = ellipse_poly(c[0], c[1], rad, rad * 0.85, rng.uniform(0, math.pi), jit)
        paint(canvas, (228, 226, 208), [("p", sheen, rng.uniform(0.3, 0.42))], ss=1, blur=0.25 * sc.dd)
        k = int(rng.integers(16, 26))
        t = np.linspace(0.0, 1.0, 12)
        lines = []
        for i in range(k):
            # Wrinkles: wavy arcs, some radial (pulled towards the contraction centre), some tangential.
            a = rng.uniform(0, 2 * math.pi)
            r0 = rng.uniform(0.15, 0.85) * rad
            ln = rng.uniform(0.35, 0.8) * rad
            wob = np.sin(t * rng.uniform(8, 16) + rng.uniform(0, 6)) * rng.uniform(0.03, 0.06) * rad
            if i % 2:
                rr = r0 + ln * t * 0.8
                aa = a + wob / np.maximum(rr, 1e-3) + rng.normal(0, 0.3) * t
            else:
                rr = r0 + wob
                aa = a + ln * (t - 0.5) / max(r0, 1e-3)
            pts = c + np.stack([np.cos(aa), np.sin(aa)], 1) * rr[:, None]
            lines.append(("l", pts, max(0.7 * px, 0.0028 * s), 0.5))
        paint(canvas, (248, 244, 230), lines, ss=ss, blur=0.3)

    def _htr_extra(self, canvas: Image.Image, vs: Vessels) -> None:
        """HtR: AV nicking at artery-over-vein crossings (veins tapered to a gap under the artery)."""
        sc, ss = self.sc, self.ss
        a = np.concatenate([vs.pts[lv][~vs.vein[lv]].reshape(-1, 2) for lv in (0, 1)])
        v = np.concatenate([vs.pts[lv][vs.vein[lv]].reshape(-1, 2) for lv in (0, 1)])
        vw = np.concatenate([vs.width[lv][vs.vein[lv]].reshape(-1) for lv in (0, 1)])
        d = np.hypot(a[:, None, 0] - v[None, :, 0], a[:, None, 1] - v[None, :, 1])
        ia, iv = np.nonzero(d < np.maximum(vw[None, :], 1.0) * 1.2)
        keep: list[int] = []
        for j in iv:
            p = v[j]
            if np.hypot(p[0] - sc.dx, p[1] - sc.dy) < 1.5 * sc.dd:
                continue
            if all(np.hypot(*(p - v[q])) > 0.5 * sc.dd for q in keep):
                keep.append(int(j))
            if len(keep) >= 8:
                break
        vh = np.concatenate([vs.heading[lv][vs.vein[lv]].reshape(-1) for lv in (0, 1)])
        size = self.size
        for j in keep:
            # Fill the vein either side of the artery with the retina next to it: the vein seems to taper away.
            h, w = float(vh[j]), float(vw[j])
            off = np.array([-math.sin(h), math.cos(h)]) * (1.5 * w + 1.5)
            samples = [canvas.getpixel((int(min(size - 1, max(0, q[0]))), int(min(size - 1, max(0, q[1])))))
                       for q in (v[j] + off, v[j] - off)]  # fmt: skip
            colour = np.mean(np.array(samples, dtype=float), axis=0)
            gap = ("p", ellipse_poly(v[j][0], v[j][1], 1.8 * w + 0.5, 0.7 * w + 0.5, h, k=12), 0.95)
            paint(canvas, colour, [gap], ss=ss, blur=0.3)

    def _htr_retinopathy(self, canvas: Image.Image, vs: Vessels) -> None:
        """HtR grade III-IV (most cases here): flame haemorrhages and cotton-wool spots near the arcades, and in the
        most severe cases a macular star of exudates radiating from the fovea."""
        sc, s, ss, px = self.sc, self.size, self.ss, self.px
        rng = stream_rng(self.key, S_CLASS + 80)
        severity = rng.random()
        if severity < 0.25:  # grade I-II: the vessel changes only
            return
        k = int(rng.integers(3, 8))
        c = self._near_arcades(rng, vs, k)
        ang = np.arctan2(c[:, 1] - sc.dy, c[:, 0] - sc.dx) + rng.normal(0, 0.2, k)  # along the nerve fibres
        ln = np.maximum(1.2 * px, rng.uniform(0.15, 0.3, k) * sc.dd)
        wd = np.maximum(0.6 * px, rng.uniform(0.05, 0.08, k) * sc.dd)
        flames = [("p", ellipse_poly(c[i, 0], c[i, 1], ln[i], wd[i], ang[i], k=10), 0.9) for i in range(k)]
        paint(canvas, HEM, flames, ss=ss, blur=0.3)
        k = int(rng.integers(2, 5))
        pts = self._near_arcades(rng, vs, k)
        r = np.maximum(1.2 * px, rng.uniform(0.012, 0.02, k) * s)
        paint(canvas, COTTON, self._blobs(rng, pts, r, 0.8, 0.3), ss=ss, blur=0.3 * float(r.mean()))
        if severity > 0.82:  # grade IV: macular star (streaks of exudate radiating from the fovea, Henle layer)
            rays = int(rng.integers(7, 13))
            a = rng.uniform(0, 2 * math.pi) + np.arange(rays) * 2 * math.pi / rays + rng.normal(0, 0.2, rays)
            dots = []
            for t in a:
                m = int(rng.integers(2, 6))
                rr = np.sort(rng.uniform(0.3, 1.2, m)) * sc.dd
                tt = t + rng.normal(0, 0.08, m)
                for q, u in zip(rr, tt, strict=True):
                    ln = max(0.7 * px, rng.uniform(0.004, 0.009) * s)
                    c0 = (sc.fx + q * math.cos(u), sc.fy + q * math.sin(u))
                    dots.append(("p", ellipse_poly(c0[0], c0[1], ln, max(0.5 * px, 0.4 * ln), u, k=8), 0.9))
            paint(canvas, EXUDATE, dots, ss=ss, blur=0.2)
