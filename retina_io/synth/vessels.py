"""The retinal vessel tree: artery/vein arcades leaving the optic disc, their branches and twigs.

:func:`vessel_spec` draws a tree's fixed random parameters (three generations, :class:`Level`) from the image's
vessel stream; :func:`realise_vessels` turns them into polylines with widths and headings (:class:`Vessels`), scaled
per point by tortuosity and width factors (so hypertension and vein occlusion reshape the same tree);
:func:`draw_vessel_mask` draws them as an antialiased mask that stops at the foveal avascular zone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from retina_io.synth.scene import Scene

N0, _N1, _N2 = 28, 14, 8  # points per main vessel / branch / twig
_K1, _K2 = 4, 2  # branches per main vessel / twigs per branch
# Arcades (right eye; temporal is -x): initial heading (deg), total turn (deg), length (in field radii).
_ARCADES = (
    ("ST", -78.0, -100.0, 1.35),
    ("IT", 78.0, 100.0, 1.35),
    ("SN", -50.0, 15.0, 0.75),
    ("IN", 50.0, -15.0, 0.75),
    ("N", 4.0, 0.0, 0.55),
)


@dataclass
class Level:
    """One generation of vessels: per-vessel parameters and per-step random increments (fixed draws)."""

    h0: np.ndarray  # (V,) initial heading offset (rad)
    turn: np.ndarray  # (V,) total heading change (rad)
    length: np.ndarray  # (V,) in field radii
    width: np.ndarray  # (V,) start width (main: in disc diameters; branches: fraction of parent width)
    walk: np.ndarray  # (V, n) random-walk heading increments
    wiggle: np.ndarray  # (V, n) high-frequency heading noise
    vein: np.ndarray  # (V,) bool
    parent: np.ndarray  # (V,) index into the previous level (-1 for main vessels)
    frac: np.ndarray  # (V,) spawn position along the parent (0-1)
    start: np.ndarray  # (V, 2) start offset at the disc (main only, in disc radii)
    arcade: np.ndarray  # (V,) arcade index


def vessel_spec(rng: np.random.Generator) -> list[Level]:
    n_main = 2 * len(_ARCADES)
    vein = np.tile([False, True], len(_ARCADES))
    arcade = np.repeat(np.arange(len(_ARCADES)), 2)
    base = np.array([[a[1], a[2], a[3]] for a in _ARCADES])[arcade]
    sep = np.where(vein, 1.0, -1.0) * rng.uniform(3.0, 9.0, n_main)
    main = Level(
        h0=np.deg2rad(base[:, 0] + sep + rng.normal(0.0, 6.0, n_main)),
        turn=np.deg2rad(base[:, 1] * rng.uniform(0.88, 1.12, n_main)),
        length=base[:, 2] * rng.uniform(0.88, 1.1, n_main),
        width=np.where(vein, 0.1, 0.072) * rng.uniform(0.9, 1.1, n_main) * np.where(arcade >= 2, 0.75, 1.0),
        walk=rng.normal(0.0, 1.0, (n_main, N0)),
        wiggle=rng.normal(0.0, 1.0, (n_main, N0)),
        vein=vein,
        parent=np.full(n_main, -1),
        frac=np.zeros(n_main),
        start=rng.normal(0.0, 0.18, (n_main, 2)),
        arcade=arcade,
    )
    levels = [main]
    for k, npts, (lo, hi), (llo, lhi) in ((_K1, _N1, (0.12, 0.9), (0.2, 0.5)), (_K2, _N2, (0.2, 0.85), (0.1, 0.25))):
        prev = levels[-1]
        nv = len(prev.vein) * k
        parent = np.repeat(np.arange(len(prev.vein)), k)
        levels.append(
            Level(
                h0=np.deg2rad(rng.uniform(20.0, 50.0, nv) * rng.choice([-1.0, 1.0], nv)),
                turn=np.deg2rad(rng.normal(0.0, 20.0, nv)),
                length=rng.uniform(llo, lhi, nv),
                width=rng.uniform(0.5, 0.72, nv),
                walk=rng.normal(0.0, 1.0, (nv, npts)),
                wiggle=rng.normal(0.0, 1.0, (nv, npts)),
                vein=prev.vein[parent],
                parent=parent,
                frac=rng.uniform(lo, hi, nv),
                start=np.zeros((nv, 2)),
                arcade=prev.arcade[parent],
            )
        )
    return levels


@dataclass
class Vessels:
    pts: list[np.ndarray]  # per level (V, n, 2) in px
    width: list[np.ndarray]  # per level (V, n) in px
    heading: list[np.ndarray]  # per level (V, n)
    vein: list[np.ndarray]


def realise_vessels(
    spec: list[Level],
    sc: Scene,
    *,
    tort: list[np.ndarray],
    wscale: list[np.ndarray],
) -> Vessels:
    """Turn the vessel spec into polylines; ``tort``/``wscale`` are per-level (V, n) tortuosity and width factors."""
    out = Vessels([], [], [], [])
    for lev, (lv, t_f, w_f) in enumerate(zip(spec, tort, wscale, strict=True)):
        nv, npts = lv.walk.shape
        t = np.linspace(0.0, 1.0, npts)
        amp_walk = np.where(lv.vein, 0.055, 0.045)[:, None] * (0.6 if lev == 0 else 1.0)
        amp_wig = np.where(lv.vein, 0.09, 0.07)[:, None]
        wig = lv.wiggle.copy()
        wig[:, 1:-1] = (lv.wiggle[:, :-2] + lv.wiggle[:, 1:-1] + lv.wiggle[:, 2:]) / 3.0
        dh = np.cumsum(lv.walk * amp_walk * t_f, axis=1) + wig * amp_wig * t_f
        if lev == 0:
            head0 = lv.h0
            side = np.array([-0.3, 0.3, -0.25, 0.25, 0.0])[lv.arcade]  # superior vessels leave the top of the cup
            start = np.stack([np.full(len(side), sc.dx + sc.cup_dx), sc.dy + side * sc.rd], 1)
            start = start + lv.start * sc.rd * 0.25
            w0 = lv.width * sc.dd
        else:
            ppts, pw, ph = out.pts[-1], out.width[-1], out.heading[-1]
            pidx = np.minimum((lv.frac * (ppts.shape[1] - 1)).astype(int), ppts.shape[1] - 1)
            start = ppts[lv.parent, pidx]
            head0 = ph[lv.parent, pidx] + lv.h0
            w0 = pw[lv.parent, pidx] * lv.width
        shape = 1.0 - (1.0 - t) ** 2.2 if lev == 0 else t  # main arcades bend early, then run temporally
        heading = head0[:, None] + lv.turn[:, None] * shape[None, :] + dh
        step = (lv.length * sc.R / (npts - 1))[:, None]
        d = np.stack([np.cos(heading[:, :-1]), np.sin(heading[:, :-1])], axis=2) * step[:, :, None]
        pts = np.concatenate([start[:, None, :], start[:, None, :] + np.cumsum(d, axis=1)], axis=1)
        width = w0[:, None] * (1.0 - (0.5 if lev == 0 else 0.35) * t[None, :]) * w_f
        out.pts.append(pts)
        out.width.append(width)
        out.heading.append(heading)
        out.vein.append(lv.vein)
    return out


def draw_vessel_mask(
    size: int, ss: int, levels: list[tuple[np.ndarray, np.ndarray]], fovea: tuple[float, float], faz: float
) -> Image.Image:
    """Supersampled L mask of vessel polylines, per level (points (V,n,2), widths (V,n) in px).

    Vessels stop at the foveal avascular zone (radius ``faz``); sub-pixel vessels fade via the mask value.
    """
    mask = Image.new("L", (size * ss, size * ss), 0)
    line = ImageDraw.Draw(mask).line
    f = np.asarray(fovea)
    runs: list[tuple[list[list[float]], int, int]] = []
    for pts, width in levels:
        nv, npts = width.shape
        inside = ((pts[..., 0] - f[0]) ** 2 + (pts[..., 1] - f[1]) ** 2) < faz * faz
        end = np.where(inside.any(axis=1), inside.argmax(axis=1) - 1, npts - 1)
        w = width * ss
        wq = np.maximum(1, (w + 0.5).astype(int))
        wq = np.where(wq > 6, (wq + 1) // 2 * 2, wq)  # even widths above 6 px: fewer, longer runs
        fill = np.where(w < 1.0, np.where(w < 0.5, 96, 176), 255)  # sub-pixel vessels fade (two levels: few runs)
        key = wq * 1000 + fill
        rows, cols = np.nonzero(key[:, 1:-1] != key[:, :-2])
        cols += 1
        plist = (pts * ss).tolist()
        wl, fl = wq.tolist(), fill.tolist()
        cuts: list[list[int]] = [[] for _ in range(nv)]
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            cuts[r].append(c)
        for v in range(nv):
            e = int(end[v])
            a = 0
            for b in [*cuts[v], e]:
                if b > e:
                    b = e
                if b > a:
                    runs.append((plist[v][a : b + 1], fl[v][a], wl[v][a]))
                a = b
                if a >= e:
                    break
    # Soft vessel walls: a faint wider pass under every wide run, then the cores on top.
    for seg, fill_v, w_v in runs:
        if w_v >= 3:
            line(seg, fill=fill_v * 2 // 5, width=w_v + 2 + w_v // 3)
    for seg, fill_v, w_v in runs:
        line(seg, fill=fill_v, width=w_v)
    if ss > 1:
        mask = mask.reduce(ss)
    return mask
