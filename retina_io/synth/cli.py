"""``retina-synth``: render a labelled synthetic fundus dataset (and optionally the contact sheet) from the shell.

Argument parsing and one call to :func:`~retina_io.synth.layouts.generate_dataset`; errors (a
:class:`~retina_io.synth.errors.SynthError` naming the flag) become one line and exit code 2 through
:func:`retina_io.cli.console_main`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from retina_io.cli import console_main, setup_logging
from retina_io.fsutil import require_out_file
from retina_io.synth.errors import SynthError
from retina_io.synth.layouts import LAYOUTS, generate_dataset
from retina_io.synth.preview import write_preview


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="retina-synth", description="Render a labelled synthetic fundus dataset.")
    p.add_argument("--out", type=Path, required=True, help="output directory (empty, or a previous output)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--size", type=int, required=True, help="image size in pixels (square)")
    p.add_argument("--seed", type=int, required=True, help="random seed (same seed -> byte-identical output)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--quality", type=int, default=92, help="JPEG quality (default 92)")
    p.add_argument("--layout", default="synfundus", help=f"one of {', '.join(LAYOUTS)} (default synfundus)")
    p.add_argument("--preview", type=Path, default=None, help="also write a PNG contact sheet of every class")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``retina-synth``; returns the process exit status."""
    return console_main("retina-synth", _run, argv)


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.WARNING)
    if args.preview is not None:  # before hours of generating
        require_out_file(args.preview, SynthError, flag="--preview")
    t0 = time.perf_counter()
    labels = generate_dataset(args.out, n=args.n, size=args.size, seed=args.seed, workers=args.workers,
                              quality=args.quality, layout=args.layout, progress=not args.quiet)  # fmt: skip
    dt = time.perf_counter() - t0
    print(f"retina-synth: wrote {args.n} {args.layout} images ({args.size} px) to {args.out} in {dt:.1f} s "
          f"({args.n / max(dt, 1e-9):.1f} img/s); labels: {labels}")  # fmt: skip
    if args.preview is not None:
        write_preview(args.preview, size=args.size, seed=args.seed)
        print(f"retina-synth: preview {args.preview}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
