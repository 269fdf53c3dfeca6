"""Find each label row's image under ``--images`` and every image file that no label row names.

The folder is scanned once; label rows resolve by dictionary look-ups (exact relative path, the preset's folder
prefixes, then — for datasets shipped in numbered or split subfolders — the file's base name anywhere below, exact
and then case-insensitive). Nothing is ever read outside ``--images``: absolute paths, ``..`` and symlinks that
leave the folder are ``unsafe_path``.

The scan records each file's size, modification time, device and inode and type (following links, never opening
anything): the packer reads only regular files, reads each file once however many rows name it, and rejects a file
whose size or time differs when it is read. Folders given as ``exclude_dirs`` (an ``--out`` inside ``--images``) are
not scanned.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from retina_io.presets import Preset


class FileStat(NamedTuple):
    """What the scan saw of one entry (links followed); ``mode`` 0 and ``size`` -1 for a dangling link."""

    size: int
    mtime_ns: int
    dev: int
    ino: int
    mode: int

    @property
    def regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def identity(self) -> tuple[int, int] | None:
        """The file itself (hard links and links to it share it), or None when the scan could not tell."""
        return (self.dev, self.ino) if self.mode else None


@dataclass(frozen=True)
class Resolved:
    relpath: str | None  # the file under --images (posix separators), or None when rejected
    reason: str | None = None
    detail: str | None = None
    claimed: str | None = None  # the file the row names, even when rejected (so it is not also counted as a stray)


class ImageFolder:
    """A one-time scan of ``--images``: relative path -> :class:`FileStat`, and look-ups by base name."""

    def __init__(self, root: Path, *, exclude: tuple[Path, ...] = (), exclude_dirs: tuple[Path, ...] = ()):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--images {self.root} is not a folder")
        self.real_root = os.path.realpath(self.root)
        excluded = {os.path.realpath(p) for p in exclude}
        excluded_names = {os.path.basename(p) for p in excluded}
        # Only folders inside --images can be met by the walk (the check costs a realpath per folder).
        skip_dirs = {d for d in map(os.path.realpath, exclude_dirs) if d.startswith(self.real_root + os.sep)}
        self.files: dict[str, FileStat] = {}
        self.links: set[str] = set()  # files that are symbolic links (checked against leaving --images)
        stack = [("", str(self.root))]
        while stack:  # iterative scandir walk, sorted; directory links are not followed (no cycles)
            rel_dir, path = stack.pop()
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in reversed(entries):
                rel = f"{rel_dir}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    if not (skip_dirs and os.path.realpath(entry.path) in skip_dirs):
                        stack.append((rel + "/", entry.path))
                    continue
                if entry.name in excluded_names and os.path.realpath(entry.path) in excluded:
                    continue
                try:
                    st = entry.stat()
                    self.files[rel] = FileStat(st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, st.st_mode)
                except OSError:
                    self.files[rel] = FileStat(-1, 0, 0, 0, 0)  # a dangling link: still a file someone put here
                if entry.is_symlink():
                    self.links.add(rel)
        self.by_name: dict[str, list[str]] = defaultdict(list)
        self.by_casefold: dict[str, list[str]] = defaultdict(list)
        for rel in self.files:
            base = posixpath.basename(rel)
            self.by_name[base].append(rel)
            self.by_casefold[base.casefold()].append(rel)

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def inside(self, relpath: str) -> bool:
        if relpath not in self.links:
            return True  # a regular file found by walking --images without following directory links
        real = os.path.realpath(os.path.join(self.root, relpath))
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def resolve(self, relpath: str, preset: Preset) -> Resolved:
        rel = posixpath.normpath(relpath) if relpath else relpath
        candidates = [rel] + [posixpath.normpath(p + rel) for p in preset.prefixes]
        for cand in candidates:
            if cand in self.files:
                return self._checked(cand)
        if preset.search_by_name:
            base = posixpath.basename(rel)
            for table, key in ((self.by_name, base), (self.by_casefold, base.casefold())):
                matches = table.get(key, [])
                if len(matches) == 1:
                    return self._checked(matches[0])
                if len(matches) > 1:
                    shown = ", ".join(matches[:5]) + (" …" if len(matches) > 5 else "")
                    return Resolved(None, "ambiguous_file", f"{len(matches)} files are named {base}: {shown}")
        where = " or ".join(candidates) + (
            " (also searched by name in every subfolder)" if preset.search_by_name else ""
        )
        return Resolved(None, "missing_file", f"no file {where} under --images")

    def _checked(self, rel: str) -> Resolved:
        if not self.inside(rel):
            return Resolved(None, "unsafe_path", f"{rel} is a link that leads outside --images", claimed=rel)
        return Resolved(rel, claimed=rel)
