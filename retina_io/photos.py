"""Unlabelled photographs, prepared for prediction exactly as the packer and the loader prepare training images.

No second implementation of anything: each file goes through the packer's own steps and then the loader's own
eval transform.

1. :func:`scan_photos`: every file under a folder, sorted (:class:`retina_io.sources.ImageFolder`: links that leave
   the folder are refused, nothing outside is read).
2. :func:`prepare_photo`: the file read once (:func:`retina_io.pack_worker.read_image_file`: regular files only,
   the size limit), checked (:func:`retina_io.imaging.plan_image`, full decode: truncated, corrupt, non-image,
   too-large files are rejected with the packer's reasons) and converted to the bytes the packer would store
   (:func:`retina_io.imaging.prepare_image` with the training pack's ``resize``/``quality``: EXIF orientation, CMYK,
   16-bit, palette, any format → 8-bit RGB, upright).
3. Those bytes decoded once (PIL, as the ``wds`` loader backend decodes a shard's image) and passed through the
   loader's eval transform (:func:`retina_io.wds_loader.build_transform`) once per distinct
   :class:`~retina_io.loader.LoaderConfig` asked for (backbones that share input size and normalisation share it).

:class:`PhotoDataset` is a map-style torch dataset over the files; :func:`collate_photos` makes its batches.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from retina_io.imaging import DEFAULT_MAX_PIXELS, ImageRejected, max_file_bytes, plan_image, prepare_image
from retina_io.loader_base import LoaderConfig
from retina_io.pack_worker import file_kind, read_image_file
from retina_io.sources import ImageFolder


@dataclass(frozen=True)
class PhotoOptions:
    """How the training images were packed (the bundle records it): new photographs are prepared the same way."""

    resize: int | None = None  # the short side the packer scaled to (``retina-shard pack --resize``), or None
    quality: int = 95  # JPEG quality of the packer's conversions
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Photo:
    relpath: str  # under the folder, posix separators: the photograph's id
    size: int
    mtime_ns: int
    problem: tuple[str, str] | None = None  # (reason, detail) known from the scan (a link out of the folder, ...)


def scan_photos(folder: Path) -> list[Photo]:
    """Every file under ``folder`` (sorted by relative path), with what the scan saw of it."""
    images = ImageFolder(Path(folder))
    out = []
    for rel, st, link in images.entries():
        problem = None
        if link and not images.inside(rel):
            problem = ("unsafe_path", f"{rel} is a link that leads outside --images")
        elif st.mode == 0:
            problem = ("unreadable_file", f"{rel} is a dangling link")
        elif not st.regular:
            problem = ("not_a_regular_file", f"{rel} is a {file_kind(st.mode)}; only regular files are read")
        out.append(Photo(rel, st.size, st.mtime_ns, problem))
    return out


def prepare_photo(root: Path, photo: Photo, options: PhotoOptions) -> bytes:
    """The bytes the packer would store for ``photo`` (see the module docstring); :class:`ImageRejected` if the
    packer would reject it."""
    if photo.problem is not None:
        raise ImageRejected(*photo.problem)
    path, limit = os.path.join(root, photo.relpath), max_file_bytes(options.max_pixels)
    data, _ = read_image_file(path, photo.relpath, max_bytes=limit, expect=(photo.size, photo.mtime_ns))
    plan = plan_image(data, resize=options.resize, check="decode", max_pixels=options.max_pixels)
    body, _, _ = prepare_image(data, plan, resize=options.resize, quality=options.quality)
    return body


class PhotoDataset(torch.utils.data.Dataset):
    """Item ``i``: ``(i, tensors, None)`` — one eval-transformed ``C×H×W`` tensor per loader config — or ``(i, None,
    (reason, detail))`` for a file the packer would reject. Each file is read, checked and decoded once."""

    def __init__(self, root: Path, photos: Sequence[Photo], configs: Sequence[LoaderConfig], options: PhotoOptions):
        from retina_io.wds_loader import build_transform

        for c in configs:
            if c.mode != "eval":
                raise ValueError(f"photos are predicted with eval-mode loader configs; got mode {c.mode!r}")
        self.root, self.photos, self.options = Path(root), list(photos), options
        self.transforms = [build_transform(c) for c in configs]

    def __len__(self) -> int:
        return len(self.photos)

    def __getitem__(self, i: int):
        try:
            body = prepare_photo(self.root, self.photos[i], self.options)
            image = Image.open(io.BytesIO(body)).convert("RGB")  # as the wds loader decodes a shard's image
        except ImageRejected as exc:
            return i, None, (exc.reason, exc.detail)
        return i, tuple(t(image) for t in self.transforms), None


@dataclass
class PhotoBatch:
    index: torch.Tensor  # int64: positions in the photo list of the predicted rows
    views: list[torch.Tensor]  # one N×C×H×W batch per loader config (N = len(index))
    rejects: list[tuple[int, str, str]]  # (position, reason, detail)


def collate_photos(items) -> PhotoBatch:
    ok = [(i, t) for i, t, bad in items if bad is None]
    rejects = [(i, *bad) for i, _, bad in items if bad is not None]
    views = [torch.stack([t[j] for _, t in ok]) for j in range(len(ok[0][1]))] if ok else []
    return PhotoBatch(torch.tensor([i for i, _ in ok], dtype=torch.int64), views, rejects)


def photo_loader(dataset: PhotoDataset, *, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches of ``dataset`` in file order, prepared by ``num_workers`` processes (0: in this process)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       collate_fn=collate_photos,
                                       prefetch_factor=2 if num_workers else None)  # fmt: skip
