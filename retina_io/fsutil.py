"""Writing files so that a killed process never leaves a half-written one: write a temporary file beside the target,
then rename it over the target (atomic on POSIX filesystems). Every writer of the project's outputs comes here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"  # temporary names are NAME.tmp-SUFFIX; a resumed pack removes leftovers by this mark


def tmp_path(path: Path, suffix: str | None = None) -> Path:
    """The temporary name for ``path`` (``suffix`` defaults to the process id, so processes never share one)."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{suffix if suffix is not None else os.getpid()}")


@contextmanager
def atomic_path(path: Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it is renamed to ``path``,
    otherwise it is removed. The parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str, suffix: str | None = None) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path, suffix) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an output folder, or None when it can: it, or a folder above it, exists and is
    not a folder (a file, a dangling link), or the nearest existing folder (``path`` itself or the one it would be
    created in) cannot be written. Checked before a command computes anything, so the message comes first."""
    probe = Path(path)
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} exists and is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def require_out_folder(path: Path, error: type[Exception], flag: str = "--out") -> None:
    """Raise ``error`` (one line naming ``flag`` and ``path``) when ``path`` cannot be an output folder
    (:func:`folder_problem`); commands call it before they compute or write anything."""
    problem = folder_problem(path)
    if problem:
        raise error(f"{flag} {path}: {problem}")


def require_out_file(path: Path, error: type[Exception], flag: str = "--out") -> None:
    """Raise ``error`` when ``path`` cannot be an output file: it is a folder, or its folder cannot be one."""
    if Path(path).is_dir():
        raise error(f"{flag} {path} is a folder; name the file to write")
    problem = folder_problem(Path(path).parent)
    if problem:
        raise error(f"{flag} {path}: {problem}")
