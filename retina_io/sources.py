"""Find each label row's image under ``--images`` and every image file that no label row names.

The folder is scanned once; label rows resolve by dictionary look-ups (exact relative path, the preset's folder
prefixes, then — for datasets shipped in numbered or split subfolders — the file's base name anywhere below, exact
and then case-insensitive). Nothing is ever read outside ``--images``: absolute paths, ``..`` and symlinks that
leave the folder are ``unsafe_path``.
"""

from __future__ import annotations

import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from retina_io.presets import Preset


@dataclass(frozen=True)
class Resolved:
    relpath: str | None  # the file under --images (posix separators), or None when rejected
    reason: str | None = None
    detail: str | None = None
    claimed: str | None = None  # the file the row names, even when rejected (so it is not also counted as a stray)


class ImageFolder:
    """A one-time scan of ``--images``: relative path -> size, and look-ups by base name."""

    def __init__(self, root: Path, *, exclude: tuple[Path, ...] = ()):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--images {self.root} is not a folder")
        self.real_root = os.path.realpath(self.root)
        excluded = {os.path.realpath(p) for p in exclude}
        excluded_names = {os.path.basename(p) for p in excluded}
        self.files: dict[str, int] = {}
        self.links: set[str] = set()  # files that are symbolic links (checked against leaving --images)
        stack = [("", str(self.root))]
        while stack:  # iterative scandir walk, sorted; directory links are not followed (no cycles)
            rel_dir, path = stack.pop()
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in reversed(entries):
                rel = f"{rel_dir}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    stack.append((rel + "/", entry.path))
                    continue
                if entry.name in excluded_names and os.path.realpath(entry.path) in excluded:
                    continue
                try:
                    self.files[rel] = entry.stat().st_size
                except OSError:
                    self.files[rel] = -1  # a dangling link: still a file someone put here
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
