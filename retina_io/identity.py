"""An image's identity is its content: the same bytes never reach two folds (train/validation leakage) and never
carry two labellings.

The packer hashes (sha256) the bytes it checks, once per file; rows that name one file (another spelling of its path,
a case variant, a link or a hard link) share that file's hash, and byte-identical copies under other names have the
same hash too. Among rows whose images have the same hash:

- all with the same 11 labels: the first id (in sorted order, then by row) is packed, the others are rejected as
  ``duplicate_image``, naming the id that is packed;
- labels that differ: every one of them is rejected as ``conflicting_duplicate``, naming the others (which labelling
  is right cannot be told).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from retina_io.schema import CLASSES

SHOWN = 5  # ids named in a detail


def split_duplicates(items: list[tuple[dict, Any]]) -> tuple[list[tuple[dict, Any]], list[tuple[dict, str, str]]]:
    """``(row, probe)`` pairs (``probe.sha256`` set) -> the pairs to pack, in input order, and ``(row, reason,
    detail)`` for the rows rejected as duplicates of another image."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, (_, pr) in enumerate(items):
        by_hash[pr.sha256].append(i)
    dropped: dict[int, tuple[str, str]] = {}
    for sha, members in by_hash.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda i: (items[i][0]["id"], items[i][0]["row"]))
        rows = [items[i][0] for i in members]
        labellings = {tuple(r[c] for c in CLASSES) for r in rows}
        if len(labellings) == 1:
            first = rows[0]
            for i in members[1:]:
                dropped[i] = (
                    "duplicate_image",
                    f"the same image (sha256 {sha[:16]}…) as id {first['id']} ({first['relpath']}, row {first['row']}) "
                    "with the same labels; that one is packed",
                )
            continue
        for i in members:
            others = [f"{r['id']} ({_labels(r)})" for r in rows if r is not items[i][0]]
            shown = ", ".join(others[:SHOWN]) + (f" and {len(others) - SHOWN} more" if len(others) > SHOWN else "")
            dropped[i] = (
                "conflicting_duplicate",
                f"the same image (sha256 {sha[:16]}…) is labelled {_labels(items[i][0])} here and differently as "
                f"{shown}; none of them is packed",
            )
    kept = [item for i, item in enumerate(items) if i not in dropped]
    rejected = [(items[i][0], *dropped[i]) for i in sorted(dropped)]
    return kept, rejected


def _labels(row: dict) -> str:
    """The positive classes of a row, e.g. ``DR+GC`` (``none`` when there are none)."""
    return "+".join(c for c in CLASSES if row[c]) or "none"
