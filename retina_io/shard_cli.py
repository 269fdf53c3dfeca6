"""``retina-shard``: the command line over :func:`retina_io.pack.pack` and :func:`retina_io.verify.verify`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from retina_io.cli import config_from_args, console_main, setup_logging
from retina_io.imaging import DEFAULT_MAX_PIXELS
from retina_io.pack import PackConfig, PackResult, pack
from retina_io.presets import PRESET_NAMES
from retina_io.verify import verify


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retina-shard", description="Pack images + labels into WebDataset shards.")
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser(
        "pack", help="pack a dataset (shard format v1)", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    pk.add_argument("--images", type=Path, required=True, help="folder holding the image files")
    pk.add_argument("--labels", type=Path, required=True, help="label table (.csv, .tsv or .parquet)")
    pk.add_argument("--preset", required=True, choices=PRESET_NAMES, help="the label table's published layout")
    pk.add_argument("--out", type=Path, required=True, help="output folder, e.g. shards/NAME")
    pk.add_argument("--folds", type=int, default=5, help="number of stratified folds")
    pk.add_argument("--seed", type=int, default=0, help="seed of fold assignment and shuffling")
    pk.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    pk.add_argument("--shard-samples", type=int, default=1000, help="samples per tar shard")
    pk.add_argument("--resize", type=int, default=None, metavar="PX", help="scale the short side to PX (no upscale)")
    pk.add_argument("--quality", type=int, default=95, help="JPEG quality of converted/resized lossy images")
    pk.add_argument(
        "--check",
        choices=("decode", "header"),
        default="decode",
        help="decode: decode every image to catch corrupt files; header: file structure and end markers only",
    )
    pk.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="reject images with more pixels (width x height, read from the header before decoding)",
    )
    pk.add_argument("--group-column", default=None, help="keep all rows sharing this column's value in one fold")
    pk.add_argument("--strict", action="store_true", help="exit non-zero when any input was rejected")
    pk.add_argument("--id-column", default=None, help="generic preset: the id / file name column")
    pk.add_argument("--label-columns", default="", help="generic preset: 'DR,AMD' or 'col:CLASS,...' (0/1 values)")
    pk.add_argument("--path-column", default=None, help="generic preset: image path relative to --images")
    pk.add_argument("--num-nodes", type=int, default=1, help="machines packing this dataset on a shared filesystem")
    pk.add_argument("--node-rank", type=int, default=0, help="this machine's rank in 0..num-nodes-1")
    pk.add_argument("--no-progress", action="store_true", help="no progress bars")
    vf = sub.add_parser("verify", help="re-read every shard against the manifest")
    vf.add_argument("folder", type=Path)
    vf.add_argument("--workers", type=int, default=None, help="processes checking shards (default: all cores)")
    vf.add_argument("--no-progress", action="store_true")
    pv = sub.add_parser("preview", help="draw one loader batch (what the model sees) into a PNG",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    pv.add_argument("folder", type=Path, help="a packed dataset")
    pv.add_argument("--out", type=Path, default=Path("batch-preview.png"))
    pv.add_argument("--mode", choices=("train", "eval"), default="train", help="train: with the augmentations")
    pv.add_argument(
        "--run",
        type=Path,
        default=None,
        help="a trained backbone's folder (runs/EXP/MODEL): its loader settings (image size, augmentations, local "
        "contrast, backend, threads, shuffle buffer)",
    )
    pv.add_argument("--image-size", type=int, default=None, help="default: the run's, else 224")
    pv.add_argument("--n", type=int, default=16, help="images in the sheet")
    pv.add_argument("--folds", default=None, help="e.g. 0,1 (default: all)")
    pv.add_argument(
        "--local-contrast",
        type=float,
        default=None,
        help="Graham's sigma / image size, 0: off (default: the run's, else 0)",
    )
    pv.add_argument("--backend", choices=("dali", "wds"), default=None, help="default: the run's, else dali")
    pv.add_argument("--seed", type=int, default=0)
    return p


def format_summary(r: PackResult) -> str:
    lines = [
        f"packed {r.accepted} samples into {r.shards} shards in {r.out} "
        f"({r.bytes / 1e6:.1f} MB, {r.seconds:.1f} s, {r.shards_written} shards written by this run)"
    ]
    lines.append("samples per fold: " + ", ".join(f"fold{i}={n}" for i, n in enumerate(r.samples_per_fold)))
    if r.converted_by_reason:
        lines.append("converted: " + ", ".join(f"{k}={v}" for k, v in r.converted_by_reason.items()))
    if r.rejected:
        lines.append(f"rejected {r.rejected} inputs (see {r.out / 'rejects.parquet'}):")
        lines += [f"  {reason:<22} {n}" for reason, n in r.rejected_by_reason.items()]
    else:
        lines.append("rejected: none")
    if r.complete and r.manifest:
        pos = r.manifest["counts"]["positives"]
        lines.append("positives: " + ", ".join(f"{c}={n}" for c, n in pos.items()))
    if not r.complete:
        lines.append("other nodes are still writing their shards: the last node to finish writes the manifest")
    return "\n".join(lines)


def _preview(args: argparse.Namespace) -> int:
    import dataclasses

    from retina_io.loader import LoaderSettings
    from retina_io.preview import parse_folds, write_batch_preview

    folds = parse_folds(args.folds)
    settings, image_size = LoaderSettings(), 224
    if args.run is not None:  # a run's config, read as training reads it (retina_train sits above retina_io)
        from retina_train.config import read_run_config

        data = read_run_config(args.run).data
        settings, image_size = data, data.image_size or image_size
    chosen = {"backend": args.backend, "local_contrast": args.local_contrast}
    settings = dataclasses.replace(settings, **{k: v for k, v in chosen.items() if v is not None})
    path = write_batch_preview(args.folder, args.out, mode=args.mode, n=args.n, folds=folds, seed=args.seed,
                               image_size=image_size if args.image_size is None else args.image_size,
                               settings=settings)  # fmt: skip
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return console_main("retina-shard", _run, argv)


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    if args.command == "preview":
        return _preview(args)
    if args.command == "verify":
        rep = verify(args.folder, progress=not args.no_progress, workers=args.workers)
        print(f"ok: {args.folder}: {rep.shards} shards, {rep.samples} samples, {rep.bytes / 1e6:.1f} MB verified")
        return 0
    label_columns = tuple(c for c in args.label_columns.split(",") if c)
    result = pack(config_from_args(PackConfig, args, label_columns=label_columns, progress=not args.no_progress))
    print(format_summary(result))
    print(
        json.dumps(
            {
                "accepted": result.accepted,
                "rejected": result.rejected,
                "shards": result.shards,
                "complete": result.complete,
                "rejected_by_reason": result.rejected_by_reason,
            }
        )
    )
    if args.strict and result.rejected:
        print(f"retina-shard: error: --strict and {result.rejected} inputs were rejected", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
