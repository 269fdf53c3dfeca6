"""Train-mode augmentation for the DALI backend, split where it is cheapest (:class:`AugmentConfig` parameters).

Every random number of a batch is drawn here, in numpy, from a generator seeded by (run seed, epoch, rank, step)
(:func:`batch_rng`): a batch's augmentation depends on nothing else, so an epoch resumed at step N yields exactly the
batches an uninterrupted epoch yields, without replaying steps 0..N-1, and the DALI pipeline is built once.

- Geometry, in DALI (:func:`draw_geometry`): the random resized crop is decoded as a region of interest, then ONE
  resampling brings it to ``size × size``: with rotation, one ``warp_affine`` whose matrix composes scale, rotation
  about the centre and both flips (bilinear, black fill like the surround); without rotation, one antialiased
  ``resize`` of the region (flips as a reversed region), which is what the eval path does to a whole image.
  The crop follows torchvision's ``RandomResizedCrop`` (and DALI's ``random_resized_crop``): area fraction uniform in
  ``random_area``, aspect ratio log-uniform in ``random_aspect_ratio``, 10 attempts, then the whole image clamped to
  the ratio range.
  On the CPU (``decode_device="cpu"``) that one resampling is OpenCV's ``warpAffine`` (:func:`warp_batch`) on the
  decoded crops, in a thread pool, instead of DALI's CPU ``warp_affine``: the same matrix, bilinear, black fill, but
  about 5x cheaper per image (DALI's CPU kernel made 410 images/s on 2 threads at 224 px, alone a third below
  ``retina-bench loader``'s goal; ``benchmarks/RESULTS.md``). On a GPU ``warp_affine`` stays in the pipeline.
- Colour, on the batch on its device, in torch (:func:`photometric`): brightness, contrast, saturation and hue are
  one 3×3 matrix plus offset per image, the matrix of DALI's ``color_twist`` (hue and saturation in YIQ space;
  ``M = b·c·YIQ→RGB·hue·sat·RGB→YIQ``, offset ``(1 - c)·b·128``, clipped to 0..255), so the distribution is the one
  the pipeline had when it ran ``color_twist`` per image; then gamma, blur, local contrast, mean/std. On a GPU this is
  a few batched kernels; on a CPU one batched matrix product instead of a per-pixel DALI operator.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from retina_io.loader_base import AugmentConfig, epoch_seed

RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
YIQ2RGB = np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.107, 1.705]])
CROP_ATTEMPTS = 10


def batch_rng(seed: int, epoch: int, rank: int, step: int) -> np.random.Generator:
    """The generator of one batch's augmentation."""
    return np.random.default_rng([epoch_seed(seed, epoch), rank, step])


class Geometry(NamedTuple):
    anchor: np.ndarray  # n × 2 (x, y), relative to the image: the crop decoded
    shape: np.ndarray  # n × 2 (w, h), relative
    matrix: np.ndarray  # n × 2 × 3, output pixel -> crop pixel (warp_affine's inverse map); rotation on
    roi_start: np.ndarray  # n × 2 (y, x), relative to the crop: resize's region, reversed = flipped; rotation off
    roi_end: np.ndarray


def crop_windows(rng: np.random.Generator, width: np.ndarray, height: np.ndarray, aug: AugmentConfig) -> np.ndarray:
    """Random resized crops ``(x0, y0, w, h)`` in whole pixels, one per image of ``width`` × ``height``."""
    n = len(width)
    w_img, h_img = width.astype(np.float64)[:, None], height.astype(np.float64)[:, None]
    area = w_img * h_img * rng.uniform(*aug.random_area, size=(n, CROP_ATTEMPTS))
    lo, hi = np.log(aug.random_aspect_ratio)
    ratio = np.exp(rng.uniform(lo, hi, size=(n, CROP_ATTEMPTS)) if hi > lo else np.full((n, CROP_ATTEMPTS), lo))
    w, h = np.round(np.sqrt(area * ratio)), np.round(np.sqrt(area / ratio))
    ok = (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]
    # no attempt fits: the whole image, clamped to the ratio range, centred
    r_lo, r_hi = aug.random_aspect_ratio
    fw, fh = w_img[:, 0].copy(), h_img[:, 0].copy()
    narrow, wide = fw / fh < r_lo, fw / fh > r_hi
    fh[narrow] = np.round(fw[narrow] / r_lo)
    fw[wide] = np.round(fh[wide] * r_hi)
    fit = ok[rows, first]
    w, h = np.where(fit, w, fw), np.where(fit, h, fh)
    u = rng.uniform(size=(2, n))
    x0 = np.where(fit, np.floor(u[0] * (w_img[:, 0] - w + 1)), (w_img[:, 0] - w) // 2)
    y0 = np.where(fit, np.floor(u[1] * (h_img[:, 0] - h + 1)), (h_img[:, 0] - h) // 2)
    return np.stack([x0, y0, w, h], axis=1)


def draw_geometry(rng: np.random.Generator, width: np.ndarray, height: np.ndarray, aug: AugmentConfig,
                  size: int) -> Geometry:  # fmt: skip
    """One batch's crops, rotations and flips for images of ``width`` × ``height``, output ``size`` × ``size``."""
    n = len(width)
    x0, y0, w, h = crop_windows(rng, width, height, aug).T
    hflip = rng.uniform(size=n) < aug.hflip
    vflip = rng.uniform(size=n) < aug.vflip
    theta = np.deg2rad(rng.uniform(-aug.rotate_degrees, aug.rotate_degrees, size=n))
    anchor = np.stack([x0 / width, y0 / height], axis=1).astype(np.float32)
    shape = np.stack([w / width, h / height], axis=1).astype(np.float32)
    # output -> crop: undo the flips, the rotation about the centre c, the scale (continuous pixel coordinates)
    s, c = float(size), size / 2.0
    flip = np.tile(np.eye(3), (n, 1, 1))
    flip[hflip, 0, 0], flip[hflip, 0, 2] = -1.0, s
    flip[vflip, 1, 1], flip[vflip, 1, 2] = -1.0, s
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.tile(np.eye(3), (n, 1, 1))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, sin, -sin, cos
    rot[:, :2, 2] = c - rot[:, :2, :2] @ np.array([c, c])
    scale = np.zeros((n, 3, 3))
    scale[:, 0, 0], scale[:, 1, 1], scale[:, 2, 2] = w / s, h / s, 1.0
    matrix = (scale @ rot @ flip)[:, :2, :].astype(np.float32)
    roi_start = np.stack([vflip, hflip], axis=1).astype(np.float32)
    return Geometry(anchor, shape, matrix, roi_start, 1.0 - roi_start)


def warp_batch(images: list, matrix: np.ndarray, size: int, *, pool=None) -> np.ndarray:
    """``images`` (H×W×3 uint8 arrays, e.g. DALI's decoded crops) warped to one ``n × size × size × 3`` uint8 array by
    ``matrix`` (n × 2 × 3, output -> input, :attr:`Geometry.matrix`), bilinear, black outside: what DALI's
    ``warp_affine`` computes, done by OpenCV (through ``pool.map`` if given, e.g. a thread pool: OpenCV releases the
    GIL).

    DALI's coordinates are continuous (pixel centres at +0.5), OpenCV's are pixel indices, so the matrix's offset
    becomes ``t + A·(½, ½) - ½``."""
    import cv2

    a = matrix[:, :, :2].astype(np.float64)
    m = np.concatenate([a, (matrix[:, :, 2] + a.sum(axis=2) / 2 - 0.5)[:, :, None]], axis=2)
    out = np.empty((len(images), size, size, 3), np.uint8)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP

    def one(i: int) -> None:
        cv2.warpAffine(images[i], m[i], (size, size), dst=out[i], flags=flags, borderMode=cv2.BORDER_CONSTANT,
                       borderValue=(0, 0, 0))  # fmt: skip

    for _ in (pool.map if pool is not None else map)(one, range(len(images))):
        pass
    return out


class Photometric(NamedTuple):
    matrix: np.ndarray | None  # n × 3 × 3 colour matrix on [0, 1] RGB (None: colour off)
    offset: np.ndarray | None  # n × 3
    gamma: np.ndarray | None  # n (None: off)
    blur_sigma: np.ndarray | None  # n, 0 = not blurred (None: off)


def _uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return rng.uniform(lo, hi, size=n) if hi > lo else np.full(n, float(lo))


def draw_photometric(rng: np.random.Generator, n: int, aug: AugmentConfig) -> Photometric:
    """One batch's colour matrices (DALI ``color_twist``'s), gamma and blur."""
    matrix = offset = gamma = sigma = None
    if max(aug.brightness, aug.contrast, aug.saturation, aug.hue_degrees) > 0:
        b = _uniform(rng, 1 - aug.brightness, 1 + aug.brightness, n)
        c = _uniform(rng, 1 - aug.contrast, 1 + aug.contrast, n)
        s = _uniform(rng, 1 - aug.saturation, 1 + aug.saturation, n)
        hue = np.deg2rad(_uniform(rng, -aug.hue_degrees, aug.hue_degrees, n))
        rot = np.tile(np.eye(3), (n, 1, 1))  # hue: a rotation in the IQ plane; saturation: a scaling of it
        rot[:, 1, 1], rot[:, 2, 2] = np.cos(hue) * s, np.cos(hue) * s
        rot[:, 1, 2], rot[:, 2, 1] = np.sin(hue) * s, -np.sin(hue) * s
        matrix = ((b * c)[:, None, None] * (YIQ2RGB @ rot @ RGB2YIQ)).astype(np.float32)
        offset = np.repeat(((1 - c) * b * (128 / 255))[:, None], 3, axis=1).astype(np.float32)
    if aug.gamma is not None:
        gamma = _uniform(rng, *aug.gamma, n).astype(np.float32)
    if aug.blur_probability > 0:
        sigma = _uniform(rng, *aug.blur_sigma, n) * (rng.uniform(size=n) < aug.blur_probability)
    return Photometric(matrix, offset, gamma, sigma)


def local_contrast(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Graham's local contrast normalisation on [0, 1] float images (``...×C×H×W``): clip(4 (x - blur x) + 0.5).

    The kernel is DALI's ``gaussian_blur`` default (2 * ceil(3 sigma) + 1 taps, mirrored borders)."""
    return (4.0 * (x - gaussian_blur(x, sigma)) + 0.5).clamp_(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` (``...×C×H×W`` float) blurred with DALI's default Gaussian (2 * ceil(3 sigma) + 1 taps, normalised),
    mirrored borders: torchvision's ``gaussian_blur`` (reflect padding, the outer product of two 1-D kernels), computed
    as two 1-D passes: 2k multiply-adds per pixel instead of k², which matters on a CPU (k = 19 at sigma 3)."""
    k = 2 * math.ceil(3 * sigma) + 1
    half = k // 2
    taps = torch.exp(-0.5 * (torch.linspace(-half, half, k, dtype=torch.float32) / sigma) ** 2)
    taps = (taps / taps.sum()).tolist()  # host floats: no device sync per tap
    shape = x.shape
    h, w = shape[-2:]
    padded = torch.nn.functional.pad(x.reshape(-1, 1, h, w), [half, half, half, half], mode="reflect")[:, 0]
    rows = padded[..., 0:w] * taps[0]  # along W, then along H: shifted multiply-adds (no im2col, no k² work)
    for i in range(1, k):
        rows.add_(padded[..., i : i + w], alpha=taps[i])
    out = rows[..., 0:h, :] * taps[0]
    for i in range(1, k):
        out.add_(rows[..., i : i + h, :], alpha=taps[i])
    return out.reshape(shape)


def photometric(x: torch.Tensor, p: Photometric | None, *, local_contrast_sigma: float = 0.0) -> torch.Tensor:
    """``x`` (N×C×H×W float on [0, 1], any memory format) with the colour matrices, gamma, blur and local contrast
    of ``p`` (None: none of them), in the DALI pipeline's former order; returns [0, 1] floats."""
    if p is not None and p.matrix is not None:
        m = torch.from_numpy(p.matrix).to(x.device)
        t = torch.from_numpy(p.offset).to(x.device)
        x = (torch.einsum("ndc,nchw->ndhw", m, x) + t[:, :, None, None]).clamp_(0.0, 1.0)
    if p is not None and p.gamma is not None:
        x = x.pow(torch.from_numpy(p.gamma).to(x.device)[:, None, None, None])
    if p is not None and p.blur_sigma is not None:
        for i in np.flatnonzero(p.blur_sigma > 0):
            x[i] = gaussian_blur(x[i], float(p.blur_sigma[i]))
    if local_contrast_sigma > 0:
        x = local_contrast(x, local_contrast_sigma)
    return x


def model_input(x: torch.Tensor, p: Photometric | None, mean: torch.Tensor, std: torch.Tensor, *,
                local_contrast_sigma: float = 0.0, channels_last: bool = False) -> torch.Tensor:  # fmt: skip
    """A DALI batch (N×H×W×C, 0..255) -> float N×C×H×W normalised with ``mean``/``std`` (C×1×1, on [0, 1]), with
    the photometric augmentation ``p`` (train) and local contrast.

    The common case (colour jitter at most) is one pass per output channel: the colour matrix, the 1/255 and the
    mean/std fold into 3 multiply-adds per pixel, then a per-channel clip (the colour matrix's clip to [0, 1],
    normalised)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    planes = x.permute(0, 3, 1, 2)
    if (p is not None and (p.gamma is not None or p.blur_sigma is not None)) or local_contrast_sigma > 0:
        y = photometric(planes.float().div_(255.0), p, local_contrast_sigma=local_contrast_sigma)
        return ((y - mean) / std).contiguous(memory_format=fmt)
    n, c = planes.shape[:2]
    inv = 1.0 / (255.0 * std.view(1, c, 1))
    colour = p is not None and p.matrix is not None
    if colour:
        m = torch.from_numpy(p.matrix).to(x.device) * inv
        t = (torch.from_numpy(p.offset).to(x.device) - mean.view(1, c)) / std.view(1, c)
    out = torch.empty(planes.shape, dtype=torch.float32, device=x.device, memory_format=fmt)
    for d in range(c):
        o = out[:, d]
        if colour:
            torch.mul(planes[:, 0], m[:, d, 0, None, None], out=o)
            for k in range(1, c):
                o.addcmul_(planes[:, k], m[:, d, k, None, None])
            o.add_(t[:, d, None, None])
        else:
            torch.mul(planes[:, d], float(inv[0, d, 0]), out=o).sub_(float(mean[d] / std[d]))
    if colour:
        out = torch.maximum(torch.minimum(out, (1 - mean) / std, out=out), -mean / std, out=out)
    return out
