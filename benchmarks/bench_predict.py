"""``retina-bench predict``: images/s of ``retina-predict`` on a folder of photographs vs. a plain loop.

Set up once (cached): a bundle of random-weight tiny backbones — the demo's six stand-ins at 64 px with 5 fold models
each, 30 fold models (``--quick``: two backbones x 2 folds) — with a real meta-learner stacked on their out-of-fold
predictions over a small synthetic set; and a folder of procedural 512 px fundus JPEGs, the photographs.

(a) ``retina-predict --images DIR`` (:func:`retina_train.predict.predict_bundle`, the real code path, defaults but
    ``--device cpu``): the bundle opened and every checksum read, every fold model loaded, the packer's checks on every
    file, one decode per photograph and the eval transform once per preprocessing group (in ``--workers`` processes),
    every fold model of every backbone on each batch, the meta-learner, predictions, rejects and summary written.
(b) the baseline, a plain loop as a naive user writes it: load every fold model (timm, via
    :func:`retina_train.backbones.create_backbone`, weights from the bundle's safetensors); for each photograph,
    PIL open -> RGB -> resize to the backbone's input -> tensor -> normalise with its mean/std, then each fold model of
    each backbone on it, one image at a time (batch 1, ``torch.no_grad``), and the mean per backbone. It does less
    than (a): no checks, no local contrast, no meta-learner, no files.
(c) the same plain loop, batched (:data:`PLAIN_BATCH` photographs per forward): reported for reference.

Same photographs, same models, same torch threads (``torch.get_num_threads()``, one process for (b) and (c); (a)
prepares photographs in ``--workers`` processes as ``retina-predict`` does). ``repeats`` rounds, each running every
side once in turn; each side's fastest run counts (model loading included on both sides).
``ratio`` = (a) / (b); goal >= 3 on the CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import BenchResult, Row, ensure_images
from retina_train.backbones import TINY_BACKBONES, create_backbone

GOAL = 3.0
PLAIN_BATCH = 32


# ----------------------------------------------------------------------------------------------- the bundle
def fake_run(runs: Path, data: Path, backbones, *, image_size: int = 64) -> None:
    """What training leaves behind, without the training: each backbone's config, random-weight fold models and
    their real out-of-fold predictions (through the eval loader), as ``retina-stack`` and ``retina-export`` read."""
    from safetensors.torch import save_file

    from retina_io.dataset import PackedDataset
    from retina_io.loader import build_loader
    from retina_train.config import resolve_config, to_dict
    from retina_train.inference import BackboneRun, predict
    from retina_train.oof import write_oof

    k = PackedDataset.open(data).k
    for b, name in enumerate(backbones):
        cfg = resolve_config(name, overrides={"data": {"dataset": str(data), "image_size": image_size},
                                              "out": str(runs)})  # fmt: skip
        model_dir = runs / name
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text(json.dumps(to_dict(cfg)))
        for fold in range(k):
            torch.manual_seed(100 * b + fold)
            state = create_backbone(name, image_size=image_size).state_dict()
            (model_dir / f"fold{fold}").mkdir()
            weights = model_dir / f"fold{fold}" / "best.safetensors"
            save_file({n: t.contiguous() for n, t in state.items()}, str(weights))
        run = BackboneRun.open(model_dir)
        for fold, w in enumerate(run.weights):
            model = run.load(w)
            loader = build_loader(run.loader_config(model, folds=[fold], mode="eval", backend="wds", num_threads=1))
            keys, probs, _ = predict(model, loader, "cpu")
            write_oof(w.parent / "oof-rank0.parquet", keys, probs, fold=fold)


def ensure_bundle(cache: Path, backbones, *, folds: int, n_train: int) -> Path:
    """A bundle of random-weight ``backbones`` x ``folds`` fold models and a stacked meta-learner, on first use."""
    from retina_io.pack import PackConfig, pack
    from retina_io.synth import generate_dataset
    from retina_train.bundle import ExportConfig, export_bundle
    from retina_train.stack import StackConfig, run_stack

    root = cache / f"predict-bundle-{'-'.join(backbones)}-{folds}-{n_train}"
    bundle = root / "ens.retina"
    if (bundle / "manifest.json").is_file():
        return bundle
    shutil.rmtree(root, ignore_errors=True)
    labels = generate_dataset(root / "synfundus", n=n_train, size=96, seed=5, workers=1, progress=False)
    data = root / "shards"
    pack(PackConfig(images=root / "synfundus", labels=labels, preset="synfundus", out=data, folds=folds, workers=1,
                    progress=False))  # fmt: skip
    fake_run(root / "runs", data, backbones)
    run_stack(StackConfig(runs=root / "runs", data=data, out=root / "runs" / "stack", bootstrap=0, progress=False,
                          control_max_rows=n_train))  # fmt: skip
    export_bundle(ExportConfig(runs=root / "runs", out=bundle))
    return bundle


# ----------------------------------------------------------------------------------------------- the two sides
def plain_loop(bundle: Path, photos: list[Path], *, batch: int = 1) -> np.ndarray:
    """(photos, backbones, classes): the baseline (see the module docstring), ``batch`` photographs per forward."""
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision.transforms.functional import normalize, to_tensor

    info = json.loads((bundle / "bundle.json").read_text())
    backbones = []
    for b in info["backbones"]:
        p = b["preprocess"]
        models = []
        for f in b["folds"]:
            model = create_backbone(b["backbone"], image_size=p["image_size"])
            model.load_state_dict(load_file(str(bundle / f)))
            models.append(model.eval())
        backbones.append((models, p))
    out = []
    with torch.no_grad():
        for s in range(0, len(photos), batch):
            images = [Image.open(p).convert("RGB") for p in photos[s : s + batch]]
            per_backbone = []
            for models, p in backbones:
                size = (p["image_size"], p["image_size"])
                x = torch.stack([normalize(to_tensor(im.resize(size, Image.BILINEAR)), p["mean"], p["std"])
                                 for im in images])  # fmt: skip
                per_backbone.append(torch.stack([torch.sigmoid(m(x)) for m in models]).mean(0))
            out.append(torch.stack(per_backbone, dim=1).numpy())
    return np.concatenate(out)


def retina_predict(bundle: Path, images: Path, out: Path, *, workers: int) -> int:
    """``retina-predict --bundle BUNDLE --images IMAGES --out OUT --device cpu --workers W``; photographs predicted."""
    from retina_train.predict import PredictConfig, predict_bundle

    shutil.rmtree(out, ignore_errors=True)
    result = predict_bundle(PredictConfig(bundle=bundle, images=images, out=out, device="cpu", workers=workers,
                                          progress=False))  # fmt: skip
    return result.predictions.height


def _fastest(fns: dict, repeats: int) -> dict:
    """``{name: (fastest seconds, value)}`` over ``repeats`` rounds; each round runs every ``fns`` entry once, in
    turn, so that a change of load on a shared machine hits every side alike."""
    best = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            value = fn()
            best[name] = (min(best[name][0], time.perf_counter() - t0), value)
    return best


def run(*, quick: bool = False, workers: int = 2, cache: Path | None = None, n: int | None = None,
        repeats: int | None = None) -> BenchResult:  # fmt: skip
    cache = cache or Path(tempfile.gettempdir()) / "retina-bench-cache"
    backbones = ("tiny_resnet", "tiny_vit") if quick else TINY_BACKBONES
    folds = 2 if quick else 5
    n = n or (16 if quick else 128)
    repeats = repeats or (1 if quick else 2)
    logging.getLogger("retina_io").setLevel(logging.WARNING)
    logging.getLogger("retina_train").setLevel(logging.WARNING)
    bundle = ensure_bundle(cache, backbones, folds=folds, n_train=60 if quick else 100)
    folder, _ = ensure_images(cache, n=n, size=512, seed=3)
    images = folder / "Fundus"
    photos = sorted(images.glob("*.jpg"))
    out = cache / "predict-out"

    timed = _fastest({"ours": lambda: retina_predict(bundle, images, out, workers=workers),
                      "plain": lambda: plain_loop(bundle, photos, batch=1),
                      "batched": lambda: plain_loop(bundle, photos, batch=PLAIN_BATCH)}, repeats)  # fmt: skip
    (t_ours, predicted), (t_plain, probs), (t_batched, probs_batched) = timed.values()
    assert predicted == len(photos) == len(probs) == len(probs_batched), (predicted, len(photos), len(probs))
    fold_models = len(backbones) * folds
    threads = torch.get_num_threads()
    ratio = t_plain / t_ours
    rows = [
        Row(f"plain loop: PIL decode + resize/normalise, each of {fold_models} fold models, batch 1 (baseline)",
            t_plain, len(photos)),
        Row(f"plain loop, batch {PLAIN_BATCH}", t_batched, len(photos), note=f"ratio {t_plain / t_batched:.2f}"),
        Row(f"retina-predict --images, --workers {workers} (checks, meta-learner, files)", t_ours, predicted,
            note=f"ratio {ratio:.2f}"),
    ]  # fmt: skip
    extra = {"images": len(photos), "photo_px": 512, "backbones": list(backbones), "fold_models": fold_models,
             "image_size": 64, "torch_threads": threads, "workers": workers, "repeats": repeats,
             "ratio_vs_plain_batched": round(t_batched / t_ours, 3)}  # fmt: skip
    return BenchResult(benchmark="predict", ratio=ratio, goal=GOAL, rows=rows, extra=extra)
