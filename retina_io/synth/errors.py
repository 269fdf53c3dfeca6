"""The generator's user error and the check of its integer arguments.

:class:`SynthError` is the :class:`~retina_io.errors.RetinaError` of ``retina-synth``: library calls raise it with a
one-line message naming the flag or input at fault (``--n``, ``--out``, ``dr_grade``, ...); the command line turns it
into ``retina-synth: error: ...`` and exit code 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from retina_io.errors import RetinaError

# Arguments that are also command-line flags: their messages name the flag (``--size``), the others the argument.
_FLAGS = ("n", "size", "seed", "workers", "quality")


class SynthError(RetinaError, ValueError):
    """A bad argument, label or output folder for the generator."""


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Raise :class:`SynthError` unless ``value`` is an integer (not a bool) in ``[lo, hi]`` (``hi`` None: no bound)."""
    flag = f"--{name}" if name in _FLAGS else name
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise SynthError(f"{flag} must be an integer; got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise SynthError(f"{flag} must be {rng}; got {value}")
