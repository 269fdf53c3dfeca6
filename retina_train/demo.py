"""``retina-demo``: the whole pipeline, end to end, on procedural fundus data that ships with the code.

Stages: generate a SynFundus-layout dataset (``retina-synth``) -> pack it into 5 stratified folds (``retina-shard``)
-> train one backbone of each of the six families on all folds through the real DeepSpeed engine (tiny stand-ins by
default, the paper's six with ``--backbones paper``) -> stack the out-of-fold probabilities with XGBoost (nested CV)
-> generate a second, external dataset in the RFMiD layout (its own seed), pack it with the ``rfmid`` preset and
evaluate zero-shot -> use the ensemble as a user would: export it as a bundle (``retina-export``) and predict a
handful of the external photographs with Grad-CAM maps (``retina-predict --cam``), naming the pictures -> print the
paper's table. The last line is one JSON object with ``ensemble_macro_auc``, ``best_single_macro_auc``,
``external_macro_auc``, ``seconds``, ``bundle`` and ``predict_contact_sheet``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from retina_io.cli import console_main, setup_logging
from retina_io.errors import RetinaError, check_rules
from retina_io.fsutil import require_out_folder
from retina_train.stack.rows import CONTROL_ROW, MEAN_ROW, META_ROW

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path = Path("demo-out")
    n: int = 1500  # training images
    size: int = 0  # generated image size (px); 0: 96 for the tiny stand-ins, 512 (SynFundus-1M's) for the paper's
    image_size: int = 64  # backbone input for the tiny stand-ins
    epochs: int = 3  # tiny stand-ins; the paper's six train for their configs' epochs unless paper_epochs is set
    paper_epochs: int = 0
    backbones: str = "tiny"  # "tiny" or "paper"
    pretrained: str = ""  # paper backbones: "" (each config's: timm's ImageNet weights), "timm" or "none" (offline)
    retfound_weights: Path | None = None  # paper backbones: a RETFound MAE checkpoint (.pth) for `retfound`
    device: str = "auto"
    n_external: int = 400
    external_layout: str = "rfmid"
    folds: int = 5
    bootstrap: int = 200
    seed: int = 0
    n_predict: int = 6  # external photographs predicted with the exported bundle, with Grad-CAM maps


class _Stages:
    """Stage banners with the elapsed time (progress bars come from each stage)."""

    def __init__(self, total: int):
        self.t0, self.i, self.total = time.perf_counter(), 0, total

    def __call__(self, name: str) -> None:
        self.i += 1
        print(f"\n[{self.i}/{self.total}] {name}  (elapsed {time.perf_counter() - self.t0:.0f} s)", flush=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def run_demo(cfg: DemoConfig) -> dict:
    from retina_io.pack import PackConfig, pack
    from retina_io.synth import generate_dataset
    from retina_train.backbones import PAPER_BACKBONES, TINY_BACKBONES
    from retina_train.config import resolve_config
    from retina_train.distributed import resolve_device
    from retina_train.evaluate import EvalConfig, evaluate_external
    from retina_train.preflight import check_options
    from retina_train.stack import StackConfig, run_stack
    from retina_train.trainer import run_folds

    device = resolve_device(cfg.device)
    backbones = TINY_BACKBONES if cfg.backbones == "tiny" else PAPER_BACKBONES
    size = cfg.size or (96 if cfg.backbones == "tiny" else 512)
    out = Path(cfg.out)
    if cfg.retfound_weights is not None and not Path(cfg.retfound_weights).is_file():  # before hours of training
        raise DemoError(f"--retfound-weights {cfg.retfound_weights}: no such file")
    if cfg.backbones == "paper" and cfg.retfound_weights is None:
        log.warning("retfound will train from random initialisation: RETFound's weights are not on the timm hub; "
                    "pass --retfound-weights RETFound_cfp_weights.pth")  # fmt: skip
    check_demo(cfg)
    for name in backbones:  # every run's options, before any folder is claimed (run_folds checks them again)
        check_options(resolve_config(name, overrides=backbone_overrides(cfg, name, data=out / "shards" / "synfundus",
                                                                        runs=out / "runs", device=device)))  # fmt: skip
    _claim_out(out, {"n": cfg.n, "size": size, "seed": cfg.seed, "folds": cfg.folds, "n_external": cfg.n_external,
                     "external_layout": cfg.external_layout})  # fmt: skip
    stage = _Stages(7)

    stage(f"generate {cfg.n} procedural fundus images ({size} px, SynFundus-1M layout)")
    labels = out / "synfundus" / "labels.csv"
    if not labels.is_file():
        labels = generate_dataset(out / "synfundus", n=cfg.n, size=size, seed=cfg.seed)
    stage(f"pack into {cfg.folds} multilabel-stratified folds")
    data = out / "shards" / "synfundus"
    if not (data / "manifest.json").is_file():
        pack(PackConfig(images=out / "synfundus", labels=labels, preset="synfundus", out=data, folds=cfg.folds,
                        seed=cfg.seed, shard_samples=256))  # fmt: skip
    stage(f"train {len(backbones)} backbones x {cfg.folds} folds with DeepSpeed on {device}: {', '.join(backbones)}")
    runs = out / "runs"
    for name in backbones:
        summary = run_folds(resolve_config(name, overrides=backbone_overrides(cfg, name, data=data, runs=runs,
                                                                              device=device)))  # fmt: skip
        best = [v["best_macro_auc"] for v in summary["folds"].values()]
        print(f"  {name}: validation macro-AUC per fold {', '.join(f'{b:.3f}' for b in best)}", flush=True)
    stage("stack the out-of-fold probabilities with XGBoost (nested CV)")
    stack = run_stack(StackConfig(runs=runs, data=data, out=runs / "stack", bootstrap=cfg.bootstrap, seed=cfg.seed))
    stage(f"external dataset: {cfg.n_external} images in the {cfg.external_layout} layout (own seed), packed")
    ext_dir = out / cfg.external_layout
    ext_labels = next(iter(ext_dir.glob("*.csv")), None) if ext_dir.is_dir() else None
    if ext_labels is None:
        ext_labels = generate_dataset(ext_dir, n=cfg.n_external, size=size, seed=cfg.seed + 1000,
                                      layout=cfg.external_layout)  # fmt: skip
    ext_images = {"rfmid": "images", "airogs": "images", "aptos": "train_images", "eyepacs": "train",
                  "messidor2": "IMAGES"}[cfg.external_layout]  # fmt: skip
    ext_data = out / "shards" / cfg.external_layout
    if not (ext_data / "manifest.json").is_file():
        pack(PackConfig(images=ext_dir / ext_images, labels=ext_labels, preset=cfg.external_layout, out=ext_data,
                        folds=2, seed=cfg.seed))  # fmt: skip
    stage("zero-shot evaluation of the ensemble on the external dataset")
    ev = evaluate_external(EvalConfig(runs=runs, data=ext_data, out=runs / "eval" / cfg.external_layout,
                                      device=device, bootstrap=cfg.bootstrap))  # fmt: skip
    stage(f"use the ensemble: export it as a bundle, predict {cfg.n_predict} external photographs with Grad-CAM")
    used = use_ensemble(out, runs, ext_data, ext_dir / ext_images, device=device, n=cfg.n_predict)

    singles = {m: stack.macro(m) for m in backbones}
    table = _paper_table(stack, backbones)
    print("\n" + table)
    print(f"\nexternal ({cfg.external_layout}, classes {', '.join(ev.classes)}): macro-AUC meta-learner "
          f"{ev.macro():.3f}, mean of backbones {ev.macro(MEAN_ROW):.3f}")  # fmt: skip
    print(f"reports: {runs / 'stack' / 'report.md'} and {ev.out / 'report.md'}")
    for folder in (runs / "stack", ev.out):
        plots = sorted(p.name for p in folder.glob("*.png"))
        if plots:
            print(f"plots in {folder}: {', '.join(plots)}")
    print(f"bundle: {used.bundle} (retina-predict --bundle {used.bundle} --images DIR --out OUT [--cam])")
    print(f"predictions of {used.photos}: {used.predictions}")
    if used.sheet:
        print(f"Grad-CAM contact sheet: {used.sheet}")
        print("Grad-CAM overlays (photograph, each backbone, combined):\n" + "\n".join(f"  {f}" for f in used.overlays))
    else:
        print("Grad-CAM: the ensemble predicted no class positive on these photographs, so there are no maps")
    return {
        "ensemble_macro_auc": round(stack.macro(META_ROW), 4),
        "best_single_macro_auc": round(max(singles.values()), 4),
        "best_single": max(singles, key=singles.get),
        "mean_of_backbones_macro_auc": round(stack.macro(MEAN_ROW), 4),
        "control_macro_auc": round(stack.macro(CONTROL_ROW), 4),
        "external_macro_auc": round(ev.macro(), 4),
        "external_classes": ev.classes,
        "seconds": round(stage.seconds, 1),
        "report": str(runs / "stack" / "report.md"),
        "bundle": str(used.bundle),
        "predict_contact_sheet": str(used.sheet) if used.sheet else None,
    }


@dataclass
class UsedEnsemble:
    bundle: Path
    photos: Path
    predictions: Path
    sheet: Path | None
    overlays: list[Path]


def use_ensemble(out: Path, runs: Path, ext_data: Path, ext_images: Path, *, device: str, n: int) -> UsedEnsemble:
    """``retina-export`` the run as ``OUT/demo.retina`` (afresh: a rerun restacks), copy ``n`` external photographs
    with a labelled disease (in id order) to ``OUT/new-photos/`` and ``retina-predict --cam`` them into
    ``OUT/predict/``."""
    import shutil

    import polars as pl

    from retina_io.dataset import PackedDataset
    from retina_train.bundle import ExportConfig, export_bundle
    from retina_train.predict import PredictConfig, predict_bundle

    bundle = out / "demo.retina"
    shutil.rmtree(bundle, ignore_errors=True)
    export_bundle(ExportConfig(runs=runs, out=bundle))
    ds = PackedDataset.open(ext_data)
    index = ds.index().sort("id")
    labelled = index.filter(pl.any_horizontal([pl.col(c).fill_null(0) > 0 for c in ds.classes_present]))
    chosen = pl.concat([labelled, index]).unique("id", keep="first", maintain_order=True).head(n)
    photos = out / "new-photos"
    shutil.rmtree(photos, ignore_errors=True)
    photos.mkdir(parents=True)
    for rel in chosen["path"]:
        shutil.copyfile(ext_images / rel, photos / Path(rel).name)
    predicted = out / "predict"
    shutil.rmtree(predicted, ignore_errors=True)
    result = predict_bundle(PredictConfig(bundle=bundle, images=photos, out=predicted, cam=True, device=device,
                                          workers=0, progress=False))  # fmt: skip
    sheet = next((f for f in result.cam_files if f.name == "contact_sheet.png"), None)
    overlays = [f for f in result.cam_files if f != sheet]
    return UsedEnsemble(bundle, photos, predicted / "predictions.csv", sheet, overlays)


class DemoError(RetinaError, ValueError):
    """Settings the demo refuses before any work: a missing weights file, an --out made with other data."""


def check_demo(cfg: DemoConfig) -> None:
    """The demo's own options in their ranges (a DemoError naming the first that is not), before anything is written:
    a refused start leaves no ``demo.json`` to block the corrected command."""
    rules = [
        (cfg.folds >= 2, f"folds must be >= 2; got {cfg.folds}"),
        (cfg.n >= cfg.folds, f"--n must be at least the {cfg.folds} folds; got {cfg.n}"),
        (cfg.size == 0 or cfg.size >= 32, f"--size must be 0 (the backbones' default) or >= 32 pixels; got {cfg.size}"),
        (cfg.epochs >= 1, f"--epochs must be >= 1; got {cfg.epochs}"),
        (cfg.paper_epochs >= 0, f"--paper-epochs must be >= 0 (0: each config's); got {cfg.paper_epochs}"),
        (cfg.n_external >= 2, f"--n-external must be >= 2 (it is packed into 2 folds); got {cfg.n_external}"),
        (cfg.bootstrap >= 0, f"--bootstrap must be >= 0; got {cfg.bootstrap}"),
        (cfg.image_size >= 8, f"image_size must be >= 8; got {cfg.image_size}"),
        (cfg.n_predict >= 1, f"n_predict must be >= 1; got {cfg.n_predict}"),
    ]  # fmt: skip
    check_rules(rules, DemoError)
    require_out_folder(Path(cfg.out), DemoError)


def _claim_out(out: Path, data_settings: dict) -> None:
    """A rerun into ``out`` reuses its data, shards and finished folds, so it must ask for the same data; otherwise
    it is refused naming what differs (training settings are checked by the trainer, per backbone)."""
    record = out / "demo.json"
    if record.is_file():
        before = json.loads(record.read_text())
        diff = [f"{k}: {before.get(k)} -> {v}" for k, v in data_settings.items() if before.get(k) != v]
        if diff:
            raise DemoError(f"{out} holds a demo made with other data settings ({'; '.join(diff)}); use another "
                            "--out, or delete it to start over")  # fmt: skip
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(data_settings, indent=1) + "\n")


def backbone_overrides(cfg: DemoConfig, name: str, *, data: Path, runs: Path, device: str) -> dict:
    """The demo's settings for one backbone's run, over its ``retina_train/configs/NAME.yaml``."""
    o: dict = {"model": {}, "data": {"dataset": str(data)}, "train": {"device": device, "seed": cfg.seed},
               "out": str(runs)}  # fmt: skip
    if cfg.backbones == "tiny":
        o["data"]["image_size"] = cfg.image_size
        o["train"]["epochs"] = cfg.epochs
        return o
    if cfg.paper_epochs:
        o["train"]["epochs"] = cfg.paper_epochs
    if cfg.pretrained:
        o["model"]["pretrained"] = "none" if name == "retfound" and cfg.pretrained == "timm" else cfg.pretrained
    if name == "retfound" and cfg.retfound_weights is not None:
        o["model"]["pretrained_file"] = str(cfg.retfound_weights)
    return o


def _paper_table(stack, backbones) -> str:
    import polars as pl

    rows = [*backbones, MEAN_ROW, META_ROW, CONTROL_ROW]
    lines = ["| model | macro-AUC [95% CI] | macro-F1 [95% CI] |", "| --- | ---: | ---: |"]
    for r in rows:
        cells = []
        for metric in ("auc", "f1"):
            row = stack.scores.filter(
                (pl.col("model") == r) & (pl.col("class") == "macro") & (pl.col("metric") == metric)
            )
            v, lo, hi = row["value"].item(), row["lo"].item(), row["hi"].item()
            cells.append(f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""))
        lines.append(f"| {r} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return console_main("retina-demo", _run, argv)


def _run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="retina-demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DemoConfig.out)
    p.add_argument("--n", type=int, default=DemoConfig.n, help="training images to generate")
    p.add_argument(
        "--size",
        type=int,
        default=DemoConfig.size,
        help="generated image size in px (default: 96 with tiny backbones, 512 with the paper's)",
    )
    p.add_argument("--epochs", type=int, default=DemoConfig.epochs, help="epochs per fold (tiny backbones)")
    p.add_argument("--backbones", choices=("tiny", "paper"), default="tiny")
    p.add_argument(
        "--paper-epochs",
        type=int,
        default=0,
        help="epochs per fold for the paper's backbones (default: their configs', 20)",
    )
    p.add_argument(
        "--pretrained",
        choices=("timm", "none"),
        default="",
        help="paper backbones: timm's ImageNet weights (the configs' default) or random init (offline)",
    )
    p.add_argument(
        "--retfound-weights",
        type=Path,
        default=None,
        help="paper backbones: RETFound's MAE checkpoint (e.g. RETFound_cfp_weights.pth) for `retfound`",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--n-external", type=int, default=DemoConfig.n_external)
    p.add_argument("--bootstrap", type=int, default=DemoConfig.bootstrap)
    args = p.parse_args(argv)
    setup_logging(logging.WARNING)
    if args.backbones == "tiny" and (args.pretrained or args.retfound_weights or args.paper_epochs):
        p.error("--pretrained, --retfound-weights and --paper-epochs apply to --backbones paper")
    cfg = DemoConfig(out=args.out, n=args.n, size=args.size, epochs=args.epochs, backbones=args.backbones,
                     device=args.device, n_external=args.n_external, bootstrap=args.bootstrap,
                     paper_epochs=args.paper_epochs, pretrained=args.pretrained,
                     retfound_weights=args.retfound_weights)  # fmt: skip
    print(json.dumps(run_demo(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
