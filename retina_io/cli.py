"""What every console script shares (docs/architecture.md, "Command lines"): logging, progress-bar refresh and the
error contract.

Each ``main(argv)`` of a console script is ``console_main(PROG, run, argv)`` where ``run(argv) -> int`` parses its
arguments and calls the library. Here:

- A :class:`~retina_io.errors.RetinaError` (any stage's user error) becomes one line ``PROG: error: MESSAGE`` on stderr
  and exit code 2, never a traceback. So does an ``OSError`` on a path the user named (an unwritable ``--out``, an
  ``--out`` that is a file, a missing input): its message names the path.
- ``KeyboardInterrupt`` exits 130 with one line.
- OpenMP's wait policy is left to OpenMP and the user (``OMP_WAIT_POLICY``). Until 2026-12-03 it was set to
  ``PASSIVE`` here for every command: threads that sleep between parallel regions made each training step of the
  tiny backbones 1.6x slower and the demo's XGBoost stacking 1.8x slower on the 2-core machine (benchmarks/RESULTS.md,
  "OpenMP wait policy"); it had been meant for XGBoost on a busy shared machine. Set it yourself where that helps.
- Progress bars refresh every 30 s instead of 10 times a second when stderr is a log file, not a terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from retina_io.errors import RetinaError

T = TypeVar("T")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def set_thread_policy() -> None:
    """tqdm's refresh interval for this process and its children (unless set already); OpenMP's wait policy is left
    alone (see the module's docstring)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", "30")


def setup_logging(level: int = logging.INFO, fmt: str = LOG_FORMAT) -> None:
    logging.basicConfig(level=level, format=fmt)


def error_line(prog: str, exc: BaseException) -> str:
    """The one line a user error prints."""
    if isinstance(exc, RetinaError):
        return f"{prog}: error: {exc.one_line()}"
    if isinstance(exc, OSError) and exc.filename is not None:
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{prog}: error: {where}: {exc.strerror or type(exc).__name__}"
    return f"{prog}: error: {' '.join(str(exc).split())}"


def config_from_args(cls: type[T], args: argparse.Namespace, **fields: Any) -> T:
    """The config dataclass ``cls`` from the parsed arguments: each field takes the argument of the same name (an
    option ``--shard-samples`` is ``args.shard_samples``); ``fields`` give the rest or override. The one place where
    command lines become configs, so a new option needs a field and an argument, not a third line of glue."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(fields) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return cls(**{**values, **fields})


def console_main(prog: str, run: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a console script's body under the shared policy; returns its exit code."""
    set_thread_policy()
    try:
        return int(run(argv) or 0)
    except RetinaError as exc:
        print(error_line(prog, exc), file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.filename is None:  # not about a path the user named: a bug or the machine; keep the traceback
            raise
        print(error_line(prog, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
