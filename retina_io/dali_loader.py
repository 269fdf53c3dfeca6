"""The DALI backend of :mod:`retina_io.loader`: tars read by offset → DALI decode + geometry → torch colour, mean/std.

**One pipeline per loader**, built on first use and kept across epochs (decoder and hardware-decoder setup happen
once). Python reads the epoch's samples straight from the tars at the offsets of their ``.idx`` files and hands
them to the pipeline through ``fn.external_source``, batch after batch, with each batch's augmentation parameters
(:mod:`retina_io.augment`); at the epoch's end the source stops, the pipeline drains and is ``reset()``. So an epoch
is read in :meth:`EpochPlan.epoch_order` (the order the fallback backend reads too: the epoch's shard order, this
rank's contiguous part, a ``shuffle_buffer`` seeded with (seed, epoch) in train mode) and augmented as
:func:`retina_io.augment.batch_rng` says, whatever ran before: any epoch, from any step, without replaying batches.
Padded rows (every rank runs the same number of whole batches) are copies of the part's last sample, key -1.

Shards are read memory-mapped, or with plain reads when ``dont_use_mmap`` is set (network filesystems). The
``.idx`` files are checked when the loader is built (:meth:`retina_io.dataset.PackedDataset.check_dali_indexes`), the
crop is drawn from ``index.parquet``'s ``width``/``height`` (train mode), and a bad key is a :class:`DatasetError`.
On a GPU (``decode_device="mixed"``) the pipeline runs on torch's current CUDA stream and its output is copied on it.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from retina_io.augment import Photometric, batch_rng, draw_geometry, draw_photometric, model_input, warp_batch
from retina_io.dataset import DatasetError
from retina_io.loader_base import Batch, EpochPlan, LoaderConfig, epoch_seed
from retina_io.schema import KEY_WIDTH, NUM_CLASSES

# A forked child (a DataLoader worker of the fallback backend, a process pool) inherits the parent's DALI pipelines
# but not their threads; destroying one there (its garbage collected in the child) waits forever on those threads.
# The child keeps them, never destroyed: such children leave through os._exit, without finalizing objects.
# The strong references are taken in the parent just before the fork, not in the child after it: the child's
# after-fork handlers run in registration order, and one registered before this module (filelock's, imported by
# torch and timm, allocates and so may run the cyclic collector) would otherwise collect a pipeline first.
_PIPELINES: weakref.WeakSet = weakref.WeakSet()
_FORKING: list = []  # strong references held across a fork: in the parent until it returns, in the child for good
_INHERITED: list = []


def _hold_pipelines_for_fork() -> None:
    _FORKING[:] = list(_PIPELINES)


def _release_pipelines_after_fork() -> None:
    _FORKING.clear()


def _keep_inherited_pipelines() -> None:
    _INHERITED.extend(_FORKING)
    _FORKING.clear()


os.register_at_fork(
    before=_hold_pipelines_for_fork,
    after_in_parent=_release_pipelines_after_fork,
    after_in_child=_keep_inherited_pipelines,
)

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def host_warp(cfg: LoaderConfig) -> bool:
    """Whether the train-mode warp runs on the host after the pipeline (OpenCV, :func:`retina_io.augment.warp_batch`):
    rotation on and CPU decoding, where DALI's CPU ``warp_affine`` is the loader's bottleneck."""
    return cfg.mode == "train" and cfg.augment.rotate_degrees > 0 and cfg.resolved_decode_device == "cpu"


def build_pipeline(cfg: LoaderConfig, source):
    """The DALI pipeline of ``cfg``, fed by ``source`` (a callable returning one batch of inputs per call): encoded
    images in eval mode; in train mode also the crop (relative anchor and shape) and either the ``warp_affine``
    matrices (rotation on) or the resize regions (rotation off). Its one output: ``size × size`` RGB, HWC, on
    0..255 (uint8, or float with local contrast in eval mode); with :func:`host_warp`, the decoded crops (any size),
    which the loader warps."""
    from nvidia.dali import fn, pipeline_def, types

    decode_device = cfg.resolved_decode_device
    device_id = (torch.device(cfg.device).index or 0) if decode_device == "mixed" else None
    decoder_kw = {"hw_decoder_load": cfg.hw_decoder_load} if decode_device == "mixed" else {}
    size = cfg.image_size

    @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.threads), device_id=device_id,
                  seed=epoch_seed(cfg.seed, 0), prefetch_queue_depth=cfg.prefetch_queue_depth)  # fmt: skip
    def pipe():
        if cfg.mode != "train":
            encoded = fn.external_source(source=source, batch=True, name="encoded")
            images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, **decoder_kw)
            images = fn.resize(images, resize_shorter=size / cfg.eval_crop)
            if cfg.local_contrast > 0:  # on the resized image, before the crop, like the fallback
                images = _local_contrast(fn, images, cfg.local_contrast_sigma)
            return fn.crop(images, crop=[size, size])
        warp = cfg.augment.rotate_degrees > 0
        outputs = 3 if host_warp(cfg) else 4 if warp else 5
        encoded, anchor, shape, *region = fn.external_source(source=source, batch=True, num_outputs=outputs)
        images = fn.decoders.image_slice(encoded, anchor, shape, device=decode_device, output_type=types.RGB,
                                         normalized_anchor=True, normalized_shape=True, **decoder_kw)  # fmt: skip
        if host_warp(cfg):
            return images
        if warp:  # one resampling: scale, rotation and flips in one matrix
            return fn.warp_affine(images, matrix=region[0], size=[size, size], fill_value=0,
                                  interp_type=types.INTERP_LINEAR)  # fmt: skip
        return fn.resize(images, size=[size, size], roi_start=region[0], roi_end=region[1], roi_relative=True)

    return pipe()


def _local_contrast(fn, images, sigma: float):
    """Graham's local contrast normalisation on 0..255 images: clip(4 * (x - blur(x)) + 128, 0, 255), float."""
    from nvidia.dali import math as dmath
    from nvidia.dali import types

    x = fn.cast(images, dtype=types.FLOAT)
    return dmath.clamp(4.0 * (x - fn.gaussian_blur(x, sigma=sigma)) + 128.0, 0.0, 255.0)


class ShardReader:
    """The samples of ``shards`` (manifest order) by position: image bytes, labels, key; memory-mapped or read.
    ``tables``: each shard's ``.idx`` as columns, checked (``PackedDataset.check_dali_indexes``)."""

    def __init__(self, shards: list, tables: list, *, use_mmap: bool = True):
        self.tar = np.repeat(np.arange(len(shards), dtype=np.int32), [len(t.keys) for t in tables])
        self.image = np.concatenate([t.image for t in tables]) if tables else np.zeros((0, 2), np.int64)
        self.labels = np.concatenate([t.labels for t in tables]) if tables else np.zeros(0, np.int64)
        self.keys = np.concatenate([t.keys for t in tables]) if tables else np.zeros(0, np.int64)
        self._files = [open(s.tar, "rb") for s in shards]  # noqa: SIM115 - open for the loader's lifetime
        self._maps = [mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for f in self._files] if use_mmap else None

    def _read(self, t: int, offset: int, size: int) -> np.ndarray:
        if self._maps is not None:
            return np.frombuffer(self._maps[t], np.uint8, size, offset)
        return np.frombuffer(os.pread(self._files[t].fileno(), size, offset), np.uint8)

    def images(self, rows: np.ndarray) -> list[np.ndarray]:
        return [self._read(int(self.tar[i]), int(self.image[i, 0]), int(self.image[i, 1])) for i in rows]

    def label_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([self._read(int(self.tar[i]), int(self.labels[i]), NUM_CLASSES) for i in rows])


def _image_sizes(dataset, folds, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``width``, ``height`` of each of ``keys`` from ``index.parquet`` (the crop is drawn before decoding)."""
    index = dataset.index(folds)
    hint = f"run `retina-shard verify {dataset.root}`"
    if "width" not in index.columns or "height" not in index.columns:
        raise DatasetError(f"{dataset.root / 'index.parquet'} has no width/height columns; {hint}")
    k = index["key"].cast(int).to_numpy()
    w, h = index["width"].to_numpy(), index["height"].to_numpy()
    order = np.argsort(k)
    pos = np.searchsorted(k, keys, sorter=order).clip(0, len(k) - 1)
    found = order[pos]
    w, h = w[found].astype(np.float64), h[found].astype(np.float64)  # nulls: NaN
    bad = (k[found] != keys) | ~(w >= 1) | ~(h >= 1)
    if bad.any():
        raise DatasetError(f"{dataset.root / 'index.parquet'}: no usable width/height for key {keys[bad][0]}; {hint}")
    return w, h


class _Feed:
    """The pipeline's external source: the batches of the epoch being read, then StopIteration (the epoch's end).

    Each call also queues what the consumer needs with that batch (keys, labels, colour parameters): DALI returns
    batches in the order it asked for them."""

    def __init__(self):
        self.batches: Iterator = iter(())
        self.pending: deque = deque()

    def __call__(self):
        inputs, extra = next(self.batches)
        self.pending.append(extra)
        return inputs


class DaliLoader(EpochPlan):
    """See :mod:`retina_io.loader`."""

    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg)
        tables = self.dataset.check_dali_indexes(self.shards)
        self.reader = ShardReader(self.shards, tables, use_mmap=not cfg.dont_use_mmap)
        self.sizes = _image_sizes(self.dataset, cfg.folds, self.reader.keys) if cfg.mode == "train" else None
        self._mean = torch.tensor(cfg.mean, device=self.device)[:, None, None]
        self._std = torch.tensor(cfg.std, device=self.device)[:, None, None]
        self._feed = _Feed()
        self._warp_pool = ThreadPoolExecutor(max(1, cfg.threads), "retina-warp") if host_warp(cfg) else None
        self._pipe = None
        self._open = False  # an epoch started and not drained
        self._producer: tuple[threading.Thread, threading.Event] | None = None  # CPU: the thread making batches

    def _batches(self, epoch: int, start_step: int) -> Iterator:
        """(pipeline inputs, (keys, labels, colour parameters)) of each batch of ``epoch`` from ``start_step``."""
        cfg, reader = self.cfg, self.reader
        order, padded = self.epoch_order(epoch)
        for step in range(start_step, self.steps_per_epoch):
            rows = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            keys = np.where(padded[step * cfg.batch_size : (step + 1) * cfg.batch_size], -1, reader.keys[rows])
            encoded = reader.images(rows)
            if cfg.mode != "train":
                yield encoded, (keys, reader.label_rows(rows), None, None)
                continue
            rng = batch_rng(cfg.seed, epoch, cfg.rank, step)
            geo = draw_geometry(rng, self.sizes[0][rows], self.sizes[1][rows], cfg.augment, cfg.image_size)
            if self._warp_pool is not None:
                region = ()  # warped on the host
            else:
                region = (geo.matrix,) if cfg.augment.rotate_degrees > 0 else (geo.roi_start, geo.roi_end)
            photo = draw_photometric(rng, len(rows), cfg.augment)
            yield (encoded, geo.anchor, geo.shape, *region), (keys, reader.label_rows(rows), photo, geo.matrix)

    def _start(self, epoch: int, start_step: int) -> None:
        """Point the pipeline at ``epoch`` from ``start_step``: build it once, or drain and reset it."""
        if self._pipe is None:
            self._pipe = build_pipeline(self.cfg, self._feed)
            _PIPELINES.add(self._pipe)
            self._pipe.build()
        elif self._open:  # the previous epoch was left early: stop feeding, drain what is queued, reset
            self._feed.batches = iter(())
            try:
                while True:
                    self._pipe.run()
            except StopIteration:
                pass
            self._pipe.reset()
            self._feed.pending.clear()
        self._feed.batches = self._batches(epoch, start_step)
        self._open = True

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch``, from ``start_step`` on.

        On the CPU the pixels are made one batch ahead in a background thread (the pipeline's run and OpenCV's host
        warp, neither of which uses torch's thread pool), overlapping the consumer's model step; the torch stages
        (colour, local contrast, mean/std, layout) run in the consumer's thread (:meth:`_finish`). A torch operation in
        a second thread starts an OpenMP team of its own next to the model's, and on a small CPU the two teams spin
        against each other: the demo's ResNet trained 1.6x slower per epoch with them in the background thread
        (benchmarks/RESULTS.md, "torch in the loader thread"). On a GPU they are a few kernels on the consumer's
        stream, made in its thread."""
        self.epoch_shards(epoch, start_step)  # checks start_step
        self._stop_producer()
        self._start(epoch, start_step)
        raw = self._produce(start_step) if self.device.type == "cuda" else self._ahead(start_step)
        try:
            for item in raw:
                yield self._finish(*item)
        finally:
            raw.close()  # a consumer that leaves early stops the producer now, not when the generator is collected

    def _ahead(self, start_step: int) -> Iterator[tuple]:
        """:meth:`_produce` run in a background thread, one batch ahead; stopped when the consumer stops."""
        out: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for batch in self._produce(start_step):
                    if not put(("batch", batch)):
                        return  # the consumer left: the epoch stays open, the next _start drains the pipeline
                put(("end", None))
            except BaseException as exc:  # handed to the consumer, raised there
                put(("error", exc))

        thread = threading.Thread(target=work, name="retina-dali-batches", daemon=True)
        self._producer = (thread, stop)
        thread.start()
        try:
            while True:
                kind, value = out.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            self._stop_producer()

    def _stop_producer(self) -> None:
        if self._producer is not None:
            thread, stop = self._producer
            stop.set()
            thread.join()
            self._producer = None

    def _produce(self, start_step: int) -> Iterator[tuple]:
        """The pipeline's batches of the epoch started by :meth:`_start` as ``(pixels, photometric, labels, keys)``:
        N×H×W×C 0..255 pixels on the device, the rest on the host, for :meth:`_finish` (no torch compute here)."""
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for _ in range(start_step, self.steps_per_epoch):
            try:
                (images,) = self._pipe.run(stream) if stream is not None else self._pipe.run()
            except RuntimeError as exc:  # DALI's operator errors: an image it cannot decode, above all
                raise self._failed_batch(exc) from None
            keys, labels, photo, matrix = self._feed.pending.popleft()
            if self._warp_pool is not None:  # before the next run(): ``images`` are the pipeline's buffers
                x = warp_batch(_arrays(images), matrix, self.cfg.image_size, pool=self._warp_pool)
                x = torch.from_numpy(x).to(self.device, non_blocking=True)
            else:
                x = _to_torch(images, self.device, stream)
            yield x, photo, labels, keys
        try:  # the source is spent: this ends the epoch in the pipeline (StopIteration), ready for reset()
            self._pipe.run()
        except StopIteration:
            self._pipe.reset()
            self._open = False

    def _failed_batch(self, exc: RuntimeError) -> Exception:
        """The error to raise when the pipeline fails: a :class:`DatasetError` naming the shard and sample whose image
        does not decode (the batches DALI was working on are decoded again on the host, with the packer's check), or,
        when every one of them decodes, ``exc`` itself (a DALI or device fault, not the data's)."""
        from retina_io.imaging import ImageRejected, plan_image

        keys = np.concatenate([k for k, *_ in self._feed.pending]) if self._feed.pending else np.zeros(0, np.int64)
        for key in keys[keys >= 0]:
            row = int(np.flatnonzero(self.reader.keys == key)[0])
            (data,) = self.reader.images(np.array([row]))
            try:
                plan_image(data.tobytes(), check="decode")
            except ImageRejected as bad:
                shard = self.shards[int(self.reader.tar[row])].tar
                return DatasetError(f"shard {shard}: the image of sample {key:0{KEY_WIDTH}d} does not decode "
                                    f"({bad.detail}; DALI: {_dali_reason(exc)}); the shard is damaged or was not "
                                    "written by `retina-shard pack`: run `retina-shard verify` and repack")  # fmt: skip
        return exc

    def _finish(self, x: torch.Tensor, photo: Photometric | None, labels: np.ndarray, keys: np.ndarray) -> Batch:
        """N×H×W×C pixels on 0..255 -> the colour augmentation, local contrast (train), mean/std, layout, dtype; in
        the consumer's thread (see :meth:`iter_epoch`)."""
        cfg = self.cfg
        sigma = cfg.local_contrast_sigma if cfg.mode == "train" else 0.0  # eval: done in the pipeline
        x = model_input(x, photo, self._mean, self._std, local_contrast_sigma=sigma, channels_last=cfg.layout == "NHWC")
        y = torch.from_numpy(labels).to(self.device, non_blocking=True).float()
        return Batch(x.to(_TORCH_DTYPES[cfg.dtype]), y, torch.from_numpy(keys).to(self.device, non_blocking=True))


def _dali_reason(exc: Exception) -> str:
    """DALI's many-line pipeline error in one line: the failing operator and what it encountered."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    operator = next((line.rstrip(",") for line in lines if line.startswith("Error in")), None)
    after = lines.index("encountered:") + 1 if "encountered:" in lines else len(lines)
    reason = ": ".join(x for x in (operator, lines[after] if after < len(lines) else None) if x)
    return (reason or (lines[0] if lines else type(exc).__name__))[:300]


def _arrays(tl) -> list[np.ndarray]:
    """The samples of a CPU TensorList as numpy views of its buffers (valid until the pipeline runs again)."""
    return [np.asarray(tl[i]) for i in range(len(tl))]


def _to_torch(tl, device: torch.device, stream) -> torch.Tensor:
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    if isinstance(tl, TensorListGPU):
        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
        feed_ndarray(t, out, cuda_stream=stream)
        return out
    return torch.from_numpy(tl.as_array()).to(device, non_blocking=True)
