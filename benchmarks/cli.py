"""``retina-bench NAME [--quick] [--workers N] [--backbones tiny|paper] [--dry-run] [--out DIR]``: run one
benchmark; prints a markdown table and, last, one JSON line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

BENCHMARKS: dict[str, tuple[str, str]] = {
    "shard": ("benchmarks.bench_shard", "packing vs. GNU tar cf (store) and a naive PIL loop (--resize)"),
    "loader": ("benchmarks.bench_loader", "DALI pipeline vs. torchvision ImageFolder + PIL (and the fallback)"),
    "train": ("benchmarks.bench_train", "per backbone: fed by DALI vs. batch on device; DeepSpeed vs. plain loop"),
    "stack": ("benchmarks.bench_stack", "OOF table: polars vs pandas concat+pivot; meta-learner native vs MultiOutput"),
    "predict": ("benchmarks.bench_predict", "retina-predict on a folder of photographs vs. a plain timm loop, batch 1"),
    "scale": ("benchmarks.bench_scale", "10k..1M images: pack time/memory, verify MB/s, loaders, stack table vs peers"),
    "all": ("benchmarks.bench_all", "every benchmark; writes bench-out/all.json and bench-out/all.md"),
    "device": ("benchmarks.bench_device", "everything a GPU must show in <= 8 min; --dry-run: on the CPU, tiny"),
}


def _load(name: str) -> Callable:
    import importlib

    return importlib.import_module(BENCHMARKS[name][0]).run


def main(argv: list[str] | None = None) -> int:
    from retina_io.cli import console_main

    return console_main("retina-bench", _run, argv)


def _run(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="retina-bench", description="retina throughput benchmarks")
    p.add_argument("name", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
    p.add_argument("--quick", action="store_true", help="a small, fast run (smoke test; figures are noisier)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for our side")
    p.add_argument("--backbones", choices=("tiny", "paper"), default="tiny",
                   help="train/all: the tiny stand-ins (CPU) or the paper's six at full size (GPU)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="device: the same plan on the CPU at tiny sizes")
    p.add_argument("--out", type=Path, default=None, help="device: folder for device.json and device.md")
    p.add_argument("--work", type=Path, default=None,
                   help="scale: folder for its temporary data (default: the system's temporary folder)")  # fmt: skip
    p.add_argument("--sizes", default=None, help=argparse.SUPPRESS)  # scale: e.g. 300,600 (tests)
    p.add_argument("--pool", type=int, default=None, help=argparse.SUPPRESS)  # scale: pool images (tests)
    args = p.parse_args(argv)
    from benchmarks.common import emit

    kw = {"backbones": args.backbones} if args.name in ("train", "all") else {}
    if args.backbones != "tiny" and not kw:
        p.error(f"--backbones applies to 'train' and 'all', not {args.name!r}")
    scale_only = {"--work": args.work, "--sizes": args.sizes, "--pool": args.pool}
    if args.name == "device":
        kw.update(dry_run=args.dry_run, out=args.out)
    elif args.dry_run or args.out is not None:
        p.error(f"--dry-run and --out apply to 'device', not {args.name!r}")
    if args.name == "scale":
        sizes = tuple(int(n) for n in args.sizes.split(",")) if args.sizes else None
        kw = {"work": args.work, "sizes": sizes, **({"pool_size": args.pool} if args.pool else {})}
    elif any(v is not None for v in scale_only.values()):
        p.error(f"{', '.join(k for k, v in scale_only.items() if v is not None)} applies to 'scale' only")
    result = _load(args.name)(quick=args.quick, workers=args.workers, **kw)
    emit(result)
    incomplete = getattr(result, "incomplete", None)  # retina-bench device: parts that failed or hit their cap
    if incomplete:
        print(f"retina-bench {args.name}: not every part finished: {', '.join(incomplete)}; the report above says "
              "why", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
