"""``retina-predict``: a trained ensemble (a ``retina-export`` bundle) over new photographs or a packed dataset.

    retina-predict --bundle NAME.retina (--images DIR | --data shards/NAME) --out OUT
                   [--tta] [--cam] [--device auto|cpu|cuda] [--batch-size N] [--workers 2]

- ``--images DIR``: every file under DIR, in any format the packer accepts, with the packer's checks and conversions
  (:mod:`retina_io.photos`); a file the packer would reject is listed in ``OUT/rejects.parquet``/``.csv`` with its
  reason and the rest are predicted. ``--data``: every sample of a packed dataset through the loader (``--backend``,
  by default the one the backbones trained with).
- Preprocessing is the training loader's: each backbone's eval-mode :class:`~retina_io.loader.LoaderConfig` is built
  by :func:`retina_train.settings.loader_config` with the size, mean/std, local contrast and eval crop the bundle
  recorded. An image is decoded once; backbones with the same preprocessing share one transformed batch, and every
  fold model of every backbone predicts it (all fold models are held in memory; ``--data``: one loader pass per
  preprocessing group). Inference is :class:`retina_train.inference.Ensemble`'s, as ``retina-eval``'s:
  ``inference_mode``, autocast to the training precision on a GPU, channels-last CNNs on a GPU, batches of the
  backbones' ``data.eval_batch_size`` unless ``--batch-size`` says otherwise.
- A backbone's probability is the mean over its fold models (a float64 sum divided by their count); ``--tta``
  first averages each fold model over the image and its mirror images (horizontal flip; vertical flip too for a
  backbone that trained with vertical flips).
- Outputs: ``OUT/predictions.parquet`` and ``.csv``: ``id`` and ``path`` (``--data``: also ``key``); per class
  ``CLASS`` (the meta-learner's probability) and ``CLASS_positive`` (0/1 at the bundle's threshold, chosen on the
  meta-OOF); ``MODEL__CLASS`` (each backbone's probability); ``rejects.*``; ``summary.json``. ``--cam``: Grad-CAM
  overlays under ``OUT/cam/`` (:mod:`retina_train.cam`).

Exit codes: 0 when every input was predicted; 3 when some inputs were rejected (as ``retina-shard pack --strict``);
2 for a user error (nothing could be predicted, a damaged bundle, ...).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from retina_io.cli import config_from_args, console_main, setup_logging
from retina_io.errors import RetinaError, at_least, check_rules
from retina_io.fsutil import atomic_path, require_out_folder
from retina_io.schema import format_keys
from retina_train import inference
from retina_train.bundle import Bundle

log = logging.getLogger(__name__)

EXIT_REJECTS = 3  # some inputs rejected, the rest predicted (retina-shard pack --strict uses 3 too)
REJECT_SCHEMA = {"id": pl.String, "path": pl.String, "reason": pl.String, "detail": pl.String}
POSITIVE = "_positive"  # CLASS_positive: the 0/1 decision at the bundle's threshold


class PredictError(RetinaError, RuntimeError):
    """A prediction that cannot be made as asked; the message names the input and the fix."""


@dataclass
class PredictConfig:
    bundle: Path
    out: Path
    images: Path | None = None
    data: Path | None = None
    tta: bool = False
    cam: bool = False
    device: str = "cpu"
    batch_size: int | None = None  # None: the backbones' smallest data.eval_batch_size
    workers: int = 2  # processes preparing photographs (--images) / loader threads (--data)
    backend: str | None = None  # loader backend for --data ("dali", "wds"); None: the one the backbones trained with
    progress: bool = True


@dataclass
class Ensemble(inference.Ensemble):
    """A bundle's fold models on a device, grouped by preprocessing (:class:`retina_train.inference.Ensemble`: each
    batch is decoded once per group and every fold model of every backbone of the group predicts it)."""

    bundle: Bundle | None = None

    @classmethod
    def load(cls, bundle: Bundle, device: str = "cpu", *, tta: bool = False) -> Ensemble:
        """Every fold model of ``bundle`` on ``device``, with the preprocessing the bundle recorded."""
        runs = [b.run(device) for b in bundle.backbones]
        ens = inference.Ensemble.from_runs(runs, tta=tta, loader_fields=[b.loader_fields() for b in bundle.backbones])
        return cls(ens.device, ens.members, ens.configs, ens.groups, bundle)


# ------------------------------------------------------------------------------------------------ inputs
def _predict_images(ens: Ensemble, cfg: PredictConfig) -> tuple[pl.DataFrame, dict, list[dict], object]:
    """(id/path frame of the predicted photos, features, rejects, the photo dataset) for ``--images``."""
    from retina_io.photos import PhotoDataset, PhotoOptions, photo_loader, scan_photos

    root = Path(cfg.images)
    if not root.is_dir():
        raise PredictError(f"--images {root} is not a folder")
    photos = scan_photos(root)
    if not photos:
        raise PredictError(f"--images {root} holds no files")
    pack = ens.bundle.pack_options
    options = PhotoOptions(resize=pack.get("resize"), quality=int(pack.get("quality") or 95))
    dataset = PhotoDataset(root, photos, ens.configs, options)
    loader = photo_loader(dataset, batch_size=cfg.batch_size or ens.eval_batch_size(), num_workers=cfg.workers)
    index, rejects, parts = [], [], [[] for _ in ens.configs]
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not cfg.progress):
        rejects += [{"id": photos[i].relpath, "path": str(root / photos[i].relpath), "reason": r, "detail": d}
                    for i, r, d in batch.rejects]  # fmt: skip
        if not len(batch.index):
            continue
        index.append(batch.index.numpy())
        for g, x in enumerate(batch.views):
            parts[g].append(ens.predict_group(g, x))
    if not index:
        return pl.DataFrame({"id": [], "path": []}, schema={"id": pl.String, "path": pl.String}), {}, rejects, dataset
    pos = np.concatenate(index)
    ids = [photos[i].relpath for i in pos]
    frame = pl.DataFrame({"id": ids, "path": [str(root / i) for i in ids]})
    return frame, ens.features([np.concatenate(p) for p in parts]), rejects, dataset


def _predict_data(ens: Ensemble, cfg: PredictConfig) -> tuple[pl.DataFrame, dict, list[dict], None]:
    """(key/id/path frame, features, no rejects) for ``--data``: one loader pass per preprocessing group."""
    from retina_io.dataset import PackedDataset

    index = PackedDataset.open(cfg.data).index().select("key", "id", "path").sort("key")
    keys, per_group = ens.predict_data(Path(cfg.data), batch_size=cfg.batch_size, backend=cfg.backend,
                                       num_threads=cfg.workers, progress=cfg.progress)  # fmt: skip
    frame = pl.DataFrame({"key": format_keys(keys)}).join(index, on="key", how="left", maintain_order="left")
    if frame.height != index.height or frame["id"].null_count():
        raise PredictError(f"predictions cover {frame.height} samples, {cfg.data} has {index.height}; "
                           f"run `retina-shard verify {cfg.data}`")  # fmt: skip
    return frame, ens.features(per_group), [], None


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class PredictResult:
    out: Path
    predictions: pl.DataFrame
    rejects: pl.DataFrame
    seconds: float
    cam_files: list[Path] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_REJECTS if self.rejects.height else 0


def predict_bundle(cfg: PredictConfig) -> PredictResult:
    """Predict ``cfg.images`` or ``cfg.data`` with the bundle ``cfg.bundle``; write ``cfg.out``."""
    t0 = time.perf_counter()
    if (cfg.images is None) == (cfg.data is None):
        raise PredictError("give exactly one of --images DIR and --data shards/NAME")
    if cfg.cam and cfg.images is None:
        raise PredictError("--cam draws over photographs: use it with --images DIR (not --data)")
    check_rules([at_least("--batch-size", cfg.batch_size, 1), at_least("--workers", cfg.workers, 0)], PredictError)
    out = Path(cfg.out)
    require_out_folder(out, PredictError)
    bundle = Bundle.open(cfg.bundle)
    meta = bundle.meta_learner()
    ens = Ensemble.load(bundle, cfg.device, tta=cfg.tta)
    run = _predict_images if cfg.images is not None else _predict_data
    frame, features, rejects, dataset = run(ens, cfg)
    out.mkdir(parents=True, exist_ok=True)
    reject_frame = pl.DataFrame(rejects, schema=REJECT_SCHEMA)
    _write_table(out / "rejects", reject_frame)
    if frame.height == 0:
        raise PredictError(f"nothing to predict: every one of the {reject_frame.height} files under {cfg.images} was "
                           f"rejected (reasons in {out / 'rejects.csv'})")  # fmt: skip
    feats = pl.DataFrame(features)
    probs = meta.predict_proba(feats)  # checks the feature order against meta.json
    columns = {}
    for j, c in enumerate(meta.classes):
        columns[c] = probs[:, j]
        columns[c + POSITIVE] = (probs[:, j] >= meta.thresholds.get(c, 0.5)).astype(np.uint8)
    predictions = pl.concat([frame, pl.DataFrame(columns), feats], how="horizontal")
    _write_table(out / "predictions", predictions)
    result = PredictResult(out, predictions, reject_frame, 0.0)
    if cfg.cam:
        from retina_train.cam import CamConfig, write_cams

        result.cam_files = write_cams(ens, meta, predictions, dataset, CamConfig(out=out / "cam"))
    result.seconds = time.perf_counter() - t0
    summary = {
        "bundle": str(cfg.bundle), "input": str(cfg.images or cfg.data), "predicted": predictions.height,
        "rejected": reject_frame.height,
        "rejected_by_reason": {r: int(n) for r, n in reject_frame["reason"].value_counts().iter_rows()},
        "positives": {c: int(predictions[c + POSITIVE].sum()) for c in meta.classes},
        "tta": cfg.tta, "device": cfg.device, "seconds": round(result.seconds, 2),
        "cam": [str(f.relative_to(out)) for f in result.cam_files],
    }  # fmt: skip
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return result


def _write_table(stem: Path, frame: pl.DataFrame) -> None:
    with atomic_path(stem.with_suffix(".parquet")) as tmp:
        frame.write_parquet(tmp)
    with atomic_path(stem.with_suffix(".csv")) as tmp:
        frame.write_csv(tmp)


def main(argv: list[str] | None = None) -> int:
    return console_main("retina-predict", _run, argv)


def _run(argv: list[str] | None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="retina-predict", description=__doc__.split("\n")[0],
                                epilog="Exit codes: 0 all predicted; 3 some inputs rejected (see OUT/rejects.csv), "
                                       "the rest predicted; 2 a user error.")  # fmt: skip
    p.add_argument("--bundle", type=Path, required=True, help="a bundle folder written by retina-export")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="a folder of photographs (any format the packer accepts)")
    src.add_argument("--data", type=Path, help="a packed dataset (retina-shard pack)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--tta", action="store_true", help="average each fold model over the image and its mirror image "
                   "(twice the model time; no gain measured on the demo, see the README)")  # fmt: skip
    p.add_argument("--cam", action="store_true", help="Grad-CAM overlays per predicted-positive class (OUT/cam/)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: the backbones' data.eval_batch_size, the smallest)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="processes preparing photographs / loader threads")
    p.add_argument("--backend", default=None, choices=("dali", "wds"),
                   help="loader backend for --data (default: the one the backbones trained with)")  # fmt: skip
    args = p.parse_args(argv)
    setup_logging()
    from retina_train.distributed import resolve_device

    cfg = config_from_args(PredictConfig, args, device=resolve_device(args.device))
    result = predict_bundle(cfg)
    print(json.dumps({"predictions": str(result.out / "predictions.parquet"), "predicted": result.predictions.height,
                      "rejected": result.rejects.height, "seconds": round(result.seconds, 1)}))  # fmt: skip
    return result.exit_code
