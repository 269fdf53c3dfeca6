"""Train one backbone over k folds and write its out-of-fold predictions.

    deepspeed [--num_gpus N | --hostfile H] retina_train/run.py --backbone NAME --data shards/NAME --out runs/EXP \\
        [--folds all|0,2] [--config FILE.yaml] [--epochs E] [--batch-size B] [--image-size PX] [--lr LR] \\
        [--device auto|cpu|cuda] [--pretrained timm|none] [--pretrained-file PATH] [--set section.key=value ...]

``srun``, ``mpirun`` and ``torchrun`` start it too (:mod:`retina_train.launchers` reads the world from their variables);
``python retina_train/run.py ...`` without a launcher runs one process. The launcher runs this file as a script,
so the project must be installed (``pip install -e .``, as ``scripts/test.sh`` does) for its packages to import.
The config resolves as dataclass defaults <- ``retina_train/configs/BACKBONE.yaml`` <- ``--config`` <- the flags
here, and is written beside the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from retina_io.cli import console_main, setup_logging
from retina_train.backbones import BACKBONES
from retina_train.config import ConfigError, resolve_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True, help=f"one of: {', '.join(BACKBONES)}")
    p.add_argument("--data", required=True, help="packed dataset folder (retina-shard pack)")
    p.add_argument("--out", required=True, help="run folder, e.g. runs/EXP (the backbone gets runs/EXP/BACKBONE)")
    p.add_argument("--folds", default=None, help="'all' (default) or a list like 0,2")
    p.add_argument("--config", type=Path, default=None, help="YAML overriding the backbone's defaults")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="micro batch per rank")
    p.add_argument("--image-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", choices=("dali", "wds"), help="data loader (wds: no DALI)")
    p.add_argument("--pretrained", choices=("timm", "none"))
    p.add_argument("--pretrained-file", help="local weights (RETFound: its MAE checkpoint .pth)")
    p.add_argument("--deepspeed-config", help="a DeepSpeed JSON to use instead of the generated one")
    p.add_argument("--resume", action="store_true",
                   help="require an earlier run to continue: refuse when --out holds no checkpoint or finished fold "
                   "(without it a folder holding a checkpoint resumes too)")  # fmt: skip
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config field, e.g. --set optim.pos_weight=true --set data.augment.rotate_degrees=0",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    return p.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict:
    o: dict = {"model": {}, "data": {"dataset": args.data}, "optim": {}, "train": {}, "out": args.out}
    flat = {("train", "folds"): args.folds, ("train", "epochs"): args.epochs, ("data", "batch_size"): args.batch_size,
            ("data", "image_size"): args.image_size, ("optim", "lr"): args.lr, ("train", "device"): args.device,
            ("data", "backend"): args.backend, ("model", "pretrained"): args.pretrained,
            ("model", "pretrained_file"): args.pretrained_file, ("train", "deepspeed_config"): args.deepspeed_config,
            ("train", "seed"): args.seed, ("train", "resume"): True if args.resume else None}  # fmt: skip
    for (section, key), value in flat.items():
        if value is not None:
            o[section][key] = value
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE; got {item!r}")
        node = o
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return o


def main(argv: list[str] | None = None) -> int:
    return console_main("run.py", _run, argv)


def _run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    setup_logging(fmt="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = resolve_config(args.backbone, config_file=args.config, overrides=overrides_from(args))
    from retina_train.distributed import rank_world
    from retina_train.trainer import run_folds

    summary = run_folds(cfg)

    if rank_world()[0] == 0:
        best = {k: v["best_macro_auc"] for k, v in summary["folds"].items()}
        print(json.dumps({"backbone": summary["backbone"], "best_macro_auc": best}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
