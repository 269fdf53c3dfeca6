"""Find each label row's image under ``--images`` and every image file that no label row names.

The folder is scanned once into columns (:attr:`ImageFolder.table`, one row per file: no Python object per file
survives the scan); label rows resolve all at once by look-ups in it (:meth:`ImageFolder.resolve_rows`: exact
relative path, the preset's folder prefixes, then — for datasets shipped in numbered or split subfolders — the file's
base name anywhere below, exact and then case-insensitive). Nothing is ever read outside ``--images``: absolute paths,
``..`` and symlinks that leave the folder are ``unsafe_path``.

The scan records each file's size, modification time, device and inode and type (following links, never opening
anything): the packer reads only regular files, reads each file once however many rows name it (``ident``: the first
file with the same device and inode), and rejects a file whose size or time differs when it is read. Folders given as
``exclude_dirs`` (an ``--out`` inside ``--images``) are not scanned. A file name that is not UTF-8 is shown with
``\\xff`` escapes (no label row can name it: it is a stray).
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import polars as pl

from retina_io.presets import Preset

SCAN_CHUNK = 1 << 16  # files per columnar chunk while scanning
SHOWN = 5  # file names listed in an ambiguous_file detail

FILE_SCHEMA = {
    "relpath": pl.String,
    "size": pl.Int64,
    "mtime_ns": pl.Int64,
    "dev": pl.UInt64,
    "ino": pl.UInt64,
    "mode": pl.UInt32,
    "link": pl.Boolean,
}


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


def display_text(s: str | None) -> str | None:
    """``s`` as UTF-8 text: a file name that is not UTF-8 (Python keeps its bytes as surrogates) shows them as
    ``\\xff`` escapes instead of failing a table."""
    if s is None or s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class ImageFolder:
    """A one-time scan of ``--images`` into :attr:`table` (``file`` index, ``relpath``, ``size``, ``mtime_ns``,
    ``dev``, ``ino``, ``mode``, ``link``, ``ident``), in walk order."""

    def __init__(self, root: Path, *, exclude: tuple[Path, ...] = (), exclude_dirs: tuple[Path, ...] = ()):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--images {self.root} is not a folder")
        self.real_root = os.path.realpath(self.root)
        excluded = {os.path.realpath(p) for p in exclude}
        excluded_names = {os.path.basename(p) for p in excluded}
        # Only folders inside --images can be met by the walk (the check costs a realpath per folder).
        skip_dirs = {d for d in map(os.path.realpath, exclude_dirs) if d.startswith(self.real_root + os.sep)}
        self.os_names: dict[str, str] = {}  # shown relpath -> the name on disk, for names that are not UTF-8
        chunks: list[pl.DataFrame] = []
        cols: list[list] = [[] for _ in FILE_SCHEMA]
        seq: list[int] = []  # the folder's number in walk order, per file
        stack = [("", str(self.root))]
        folders = 0
        while stack:  # iterative scandir walk in sorted order; directory links are not followed (no cycles)
            rel_dir, path = stack.pop()
            subdirs = []
            with os.scandir(path) as it:  # entries one at a time: a folder of a million files holds none of them
                for entry in it:
                    rel = f"{rel_dir}{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        if not (skip_dirs and os.path.realpath(entry.path) in skip_dirs):
                            subdirs.append(entry.name)
                        continue
                    if entry.name in excluded_names and os.path.realpath(entry.path) in excluded:
                        continue
                    try:
                        st = entry.stat()
                        values = (st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, st.st_mode)
                    except OSError:
                        values = (-1, 0, 0, 0, 0)  # a dangling link: still a file someone put here
                    shown = display_text(rel)
                    if shown != rel:
                        self.os_names[shown] = rel
                    for col, v in zip(cols, (shown, *values, entry.is_symlink()), strict=True):
                        col.append(v)
                    seq.append(folders)
                    if len(seq) >= SCAN_CHUNK:
                        chunks.append(_frame(cols, seq))
                        cols, seq = [[] for _ in FILE_SCHEMA], []
            folders += 1
            stack.extend((f"{rel_dir}{name}/", os.path.join(path, name)) for name in sorted(subdirs, reverse=True))
        chunks.append(_frame(cols, seq))
        # Walk order: folder by folder (depth first, sorted), each folder's files by name from the last.
        table = pl.concat(chunks).sort("_folder", "relpath", descending=[False, True]).drop("_folder")
        table = table.with_row_index("file")
        self.table = table.with_columns(
            ident=pl.when(pl.col("mode") != 0).then(pl.col("file").min().over("dev", "ino")).otherwise(pl.col("file"))
        )

    def __len__(self) -> int:
        return self.table.height

    def path(self, relpath: str) -> Path:
        return self.root / self.os_names.get(relpath, relpath)

    def inside(self, relpath: str) -> bool:
        """Whether the link ``relpath`` (a name on disk) stays inside ``--images``."""
        real = os.path.realpath(os.path.join(self.root, relpath))
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def entries(self) -> Iterator[tuple[str, FileStat, bool]]:
        """``(name on disk, stat, is a link)`` per file, sorted by relative path (small folders: photographs)."""
        for rel, size, mtime, dev, ino, mode, link in self.table.sort("relpath").select(*FILE_SCHEMA).iter_rows():
            yield self.os_names.get(rel, rel), FileStat(size, mtime, dev, ino, mode), link

    def _escaping_links(self) -> pl.Series:
        links = self.table.filter(pl.col("link")).select("file", "relpath")
        bad = [f for f, rel in links.iter_rows() if not self.inside(self.os_names.get(rel, rel))]
        return pl.Series("file", bad, dtype=pl.UInt32)

    def resolve_rows(self, relpath: pl.Series, active: pl.Series, preset: Preset) -> pl.DataFrame:
        """Each row's file: columns ``file`` (the file, or null), ``claimed`` (the file the row names, even when it is
        rejected, so that it is no stray) and ``reason``/``detail`` when it is rejected. Only ``active`` rows are
        resolved (the others get nulls)."""
        files = self.table.select("relpath", "file")
        active = active.fill_null(False).alias("active")
        rel = _normalized(pl.select(pl.when(active).then(relpath)).to_series().alias("rel"))
        cand = [rel] + [_normalized((p + rel).alias("rel")) for p in preset.prefixes]
        found = pl.repeat(None, len(rel), dtype=pl.UInt32, eager=True).alias("file")
        for c in cand:
            hit = c.to_frame().join(files, left_on="rel", right_on="relpath", how="left", maintain_order="left")
            found = found.fill_null(hit["file"])
        q = pl.DataFrame([rel, found, active])
        ambiguous = pl.lit(None, dtype=pl.String)
        if preset.search_by_name:  # by base name: exact, then case-insensitive; one match is the file, more: ambiguous
            # Only for the rows still without a file (usually none), and only over the files of the names they need.
            q = q.with_columns(base=pl.col("rel").str.replace(r"^.*/", ""), _amb=pl.lit(None, dtype=pl.String))
            named = None
            for key in ("base", "fold"):
                todo = pl.col("active") & pl.col("file").is_null() & pl.col("_amb").is_null()
                if not q.select(todo.any()).item():
                    break
                if named is None:
                    named = files.with_columns(base=pl.col("relpath").str.replace(r"^.*/", ""))
                if key == "fold":
                    q = q.with_columns(fold=_casefold(q["base"]))
                    named = named.with_columns(fold=_casefold(named["base"]))
                wanted = q.filter(todo)[key].unique().implode()
                groups = (
                    named.filter(pl.col(key).is_in(wanted))
                    .group_by(key, maintain_order=True)
                    .agg(
                        _n=pl.len(), _first=pl.col("file").first(), _shown=pl.col("relpath").head(SHOWN).str.join(", ")
                    )
                )
                shown = pl.format("{} files are named {}: {}", pl.col("_n"), pl.col("base"), pl.col("_shown"))
                more = pl.when(pl.col("_n") > SHOWN).then(pl.lit(" …")).otherwise(pl.lit(""))
                q = q.join(groups, on=key, how="left", maintain_order="left").with_columns(
                    file=pl.when(todo & (pl.col("_n") == 1)).then(pl.col("_first")).otherwise(pl.col("file")),
                    _amb=pl.when(todo & (pl.col("_n") > 1)).then(shown + more).otherwise(pl.col("_amb")),
                )
                q = q.drop("_n", "_first", "_shown")
            ambiguous = pl.col("_amb")
        where = pl.concat_str([pl.lit(c) for c in cand], separator=" or ")
        if preset.search_by_name:
            where = where + pl.lit(" (also searched by name in every subfolder)")
        unsafe = pl.col("file").is_in(self._escaping_links().implode())
        rejected = [
            (unsafe, "unsafe_path", pl.format("{} is a link that leads outside --images", _file_relpath(files))),
            (ambiguous.is_not_null(), "ambiguous_file", ambiguous),
            (pl.col("file").is_null(), "missing_file", pl.format("no file {} under --images", where)),
        ]
        reason = detail = None
        for test, why, text in reversed(rejected):
            reason = pl.when(test).then(pl.lit(why)).otherwise(reason)
            detail = pl.when(test).then(text).otherwise(detail)
        return q.select(
            file=pl.when(unsafe).then(None).otherwise(pl.col("file")),
            claimed=pl.col("file"),
            reason=pl.when(pl.col("active")).then(reason),
            detail=pl.when(pl.col("active")).then(detail),
        )


def _file_relpath(files: pl.DataFrame) -> pl.Expr:
    return pl.col("file").replace_strict(files["file"], files["relpath"], default=None, return_dtype=pl.String)


def _frame(cols: list[list], folder: list[int]) -> pl.DataFrame:
    df = pl.DataFrame(dict(zip(FILE_SCHEMA, cols, strict=True)), schema=FILE_SCHEMA)
    return df.with_columns(_folder=pl.Series(folder, dtype=pl.UInt32))


_ODD = r"(^|/)\.\.?(/|$)|//|/$"  # what posixpath.normpath changes in a relative path


def _normalized(s: pl.Series) -> pl.Series:
    """``posixpath.normpath`` of each non-empty value (in Python only for the values it changes)."""
    odd = (s.str.contains(_ODD) & (s != "")).fill_null(False)
    if not odd.any():
        return s
    idx = odd.arg_true()
    return s.scatter(idx, [posixpath.normpath(v) for v in s.gather(idx).to_list()])


def _casefold(s: pl.Series) -> pl.Series:
    """``str.casefold`` of each value (lower case for ASCII, in Python for the others)."""
    out = s.str.to_lowercase()
    odd = (~s.str.contains(r"^[\x00-\x7f]*$")).fill_null(False)
    if odd.any():
        idx = odd.arg_true()
        out = out.scatter(idx, [v.casefold() for v in s.gather(idx).to_list()])
    return out
