"""``retina-bench NAME [--quick]``: run one benchmark; prints a markdown table and, last, one JSON line.

Benchmarks of later issues (loader, train, stack, all) register here as they are built.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

BENCHMARKS: dict[str, tuple[str, str]] = {
    "shard": ("benchmarks.bench_shard", "packing vs. GNU tar cf (store) and a naive PIL loop (--resize)"),
    "loader": ("benchmarks.bench_loader", "DALI pipeline vs. torchvision ImageFolder + PIL (and the fallback)"),
    "train": ("benchmarks.bench_train", "per backbone: fed by DALI vs. batch on device; DeepSpeed vs. plain loop"),
    "stack": ("benchmarks.bench_stack", "OOF table: polars vs pandas concat+pivot; meta-learner native vs MultiOutput"),
    "all": ("benchmarks.bench_all", "every benchmark; writes bench-out/all.json and bench-out/all.md"),
}


def _load(name: str) -> Callable:
    import importlib

    return importlib.import_module(BENCHMARKS[name][0]).run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="retina-bench", description="retina throughput benchmarks")
    p.add_argument("name", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
    p.add_argument("--quick", action="store_true", help="a small, fast run (smoke test; figures are noisier)")
    p.add_argument("--workers", type=int, default=2, help="worker processes for our side")
    args = p.parse_args(argv)
    from benchmarks.common import emit

    result = _load(args.name)(quick=args.quick, workers=args.workers)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
