"""The structure of PNG and JPEG files, walked without decoding: dimensions from the header, and whether the file is
whole (``--check header``; ``--check decode`` does this and decodes).

- PNG: the signature, ``IHDR`` first, every chunk inside the file with its CRC right, at least one ``IDAT``, and an
  ``IEND``. Bytes after ``IEND`` are allowed.
- JPEG: ``SOI``, then every marker segment inside the file, a frame header (``SOF``), at least one scan, and the
  end-of-image marker (``EOI``) after the last scan's entropy-coded data. Bytes after ``EOI`` are allowed (cameras
  append data, e.g. a second picture). Scans must be complete where that can be counted without decoding: as many
  restart markers as the restart interval asks for, every component in a scan, and in a progressive file every
  coefficient of every component coded to full precision.

Each walker returns the dimensions it found (so that a pixel limit can act before anything is decoded) and the first
problem, or None. Pure Python over bytes already in memory; segments are counted, so a hostile file cannot make the
walk slow.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SEGMENTS = 1 << 20  # PNG chunks or JPEG marker segments: far above any real file (IDATs of 8 KB: 8 GB)

_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_LOSSLESS_OR_HIERARCHICAL = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xCB, 0xCD, 0xCE, 0xCF})
_ALL_COEFFICIENTS = (1 << 64) - 1


@dataclass(frozen=True)
class Structure:
    """What a walk found: the image size from the header (0 when not reached) and the first problem (None: whole)."""

    width: int = 0
    height: int = 0
    problem: str | None = None
    progressive: bool = False  # JPEG: a progressive frame
    restart_interval: int = 0  # JPEG: MCUs per restart interval (0: no restart markers)
    eoi: int = -1  # JPEG: offset of the end-of-image marker (its first 0xFF)


def png_structure(data: bytes) -> Structure:
    """Walk a PNG's chunks from the signature to ``IEND``."""
    n = len(data)
    if not data.startswith(PNG_SIGNATURE):
        return Structure(problem="not a PNG signature")
    view = memoryview(data)
    width = height = 0
    pos, chunks, idat = len(PNG_SIGNATURE), 0, False
    while True:
        if pos + 8 > n:
            return Structure(width, height, f"PNG ends at byte {n} without an IEND chunk (truncated file)")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > n:
            return Structure(width, height, f"PNG chunk {ctype!r} at byte {pos} runs past the end of the file "
                                            "(truncated file)")  # fmt: skip
        if chunks == 0:
            if ctype != b"IHDR" or length != 13:
                return Structure(problem="PNG does not start with an IHDR chunk")
            width, height = struct.unpack_from(">II", data, pos + 8)
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[pos + 4 : end - 4]) != crc:
            return Structure(width, height, f"PNG chunk {ctype!r} at byte {pos} has a wrong CRC (damaged data)")
        chunks += 1
        if chunks > MAX_SEGMENTS:
            return Structure(width, height, f"PNG has more than {MAX_SEGMENTS} chunks")
        idat = idat or ctype == b"IDAT"
        if ctype == b"IEND":
            if not idat:
                return Structure(width, height, "PNG has no IDAT chunk (no image data)")
            return Structure(width, height)
        pos = end


@dataclass
class _Frame:
    width: int
    height: int
    components: dict[int, tuple[int, int]]  # component id -> (horizontal, vertical) sampling factor
    progressive: bool
    counted: bool  # scan completeness is checked (not for lossless or hierarchical frames)


def _entropy_end(data: bytes, pos: int) -> int:
    """Offset of the marker that ends the entropy-coded data starting at ``pos`` (its first 0xFF, fill bytes
    included), or -1. Inside the data 0xFF is followed by a stuffed 0x00 or a restart marker 0xD0-0xD7."""
    n = len(data)
    while (ff := data.find(b"\xff", pos)) >= 0:
        nxt = ff + 1
        while nxt < n and data[nxt] == 0xFF:
            nxt += 1
        if nxt >= n:
            return -1
        if data[nxt] != 0x00 and not 0xD0 <= data[nxt] <= 0xD7:
            return ff
        pos = nxt + 1
    return -1


def _scan_mcus(frame: _Frame, ids: list[int]) -> int:
    """Number of MCUs in a scan of ``ids`` (ITU T.81, A.2): interleaved scans count MCUs of the largest sampling
    factors, a single-component scan counts that component's 8x8 blocks."""
    hmax = max(h for h, _ in frame.components.values())
    vmax = max(v for _, v in frame.components.values())
    if len(ids) > 1:
        return -(-frame.width // (8 * hmax)) * -(-frame.height // (8 * vmax))
    h, v = frame.components[ids[0]]
    cw, ch = -(-frame.width * h // hmax), -(-frame.height * v // vmax)
    return -(-cw // 8) * -(-ch // 8)


def jpeg_structure(data: bytes) -> Structure:
    """Walk a JPEG's markers from ``SOI`` to ``EOI`` (see the module docstring)."""
    n = len(data)
    if not data.startswith(b"\xff\xd8"):
        return Structure(problem="not a JPEG start-of-image marker")
    frame: _Frame | None = None
    restart = 0
    scans = 0
    coded: dict[int, int] = {}  # component id -> bit mask of coefficients coded to full precision

    def result(problem: str | None = None, eoi: int = -1) -> Structure:
        w, h = (frame.width, frame.height) if frame else (0, 0)
        return Structure(w, h, problem, bool(frame and frame.progressive), restart, eoi)

    pos, segments = 2, 0
    while True:
        if pos >= n:
            return result(f"JPEG ends at byte {n} without an end-of-image marker (truncated file)")
        if data[pos] != 0xFF:  # bytes between segments: decoders skip them (libjpeg: "extraneous bytes"), so do we
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return result(f"JPEG ends at byte {n} without an end-of-image marker (truncated file)")
        start = pos
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return result(f"JPEG ends at byte {n} without an end-of-image marker (truncated file)")
        marker = data[pos]
        pos += 1
        segments += 1
        if segments > MAX_SEGMENTS:
            return result(f"JPEG has more than {MAX_SEGMENTS} marker segments")
        if marker == 0xD9:  # EOI
            if frame is None or scans == 0:
                return result("JPEG ends before any image data (no frame header or no scan)", start)
            missing = [c for c in frame.components if coded.get(c, 0) != _ALL_COEFFICIENTS] if frame.counted else []
            if missing:
                what = "coefficients of component(s)" if frame.progressive else "component(s)"
                return result(f"JPEG ends before all scans: {what} {missing} never coded (truncated file)", start)
            return result(eoi=start)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn, TEM: no length
            continue
        if marker == 0xD8 or marker == 0x00:
            return result(f"JPEG has a stray marker {marker:#04x} at byte {start}: damaged data")
        if pos + 2 > n:
            return result(f"JPEG ends inside a marker segment at byte {start} (truncated file)")
        (length,) = struct.unpack_from(">H", data, pos)
        body, pos = pos + 2, pos + length
        if length < 2 or pos > n:
            return result(f"JPEG marker segment {marker:#04x} at byte {start} runs past the end of the file "
                          "(truncated file)")  # fmt: skip
        if marker in _SOF:
            if frame is not None or length < 8:
                return result(f"JPEG has a second or short frame header at byte {start}")
            height, width, count = struct.unpack_from(">HHB", data, body + 1)
            if length < 6 + 3 * count or count == 0:
                return result(f"JPEG frame header at byte {start} is too short for its {count} components")
            comps = {}
            for i in range(count):
                cid, hv = data[body + 6 + 3 * i], data[body + 7 + 3 * i]
                if not (1 <= hv >> 4 <= 4 and 1 <= hv & 15 <= 4):
                    return result(f"JPEG component {cid} has sampling factors {hv >> 4}x{hv & 15}")
                comps[cid] = (hv >> 4, hv & 15)
            frame = _Frame(width, height, comps, marker in _PROGRESSIVE, marker not in _LOSSLESS_OR_HIERARCHICAL)
            if width == 0 or height == 0:
                return result(f"JPEG frame header says {width}x{height} pixels (unsupported or damaged)")
        elif marker == 0xDD and length >= 4:  # DRI
            (restart,) = struct.unpack_from(">H", data, body)
        elif marker == 0xDA:  # SOS: then entropy-coded data up to the next marker
            if frame is None:
                return result(f"JPEG has a scan before its frame header (byte {start})")
            count = data[body] if body < pos else 0
            if count == 0 or length < 6 + 2 * count:
                return result(f"JPEG scan header at byte {start} is damaged")
            ids = [data[body + 1 + 2 * i] for i in range(count)]
            if any(c not in frame.components for c in ids):
                return result(f"JPEG scan at byte {start} names a component the frame does not have")
            ss, se, al = data[body + 1 + 2 * count], data[body + 2 + 2 * count], data[body + 3 + 2 * count] & 15
            mask = ((1 << (se + 1)) - (1 << ss)) if frame.progressive and ss <= se <= 63 else _ALL_COEFFICIENTS
            if al == 0 or not frame.progressive:
                for c in ids:
                    coded[c] = coded.get(c, 0) | mask
            scans += 1
            end = _entropy_end(data, pos)
            if end < 0:
                return result(f"JPEG ends inside scan {scans} without an end-of-image marker (truncated file)")
            if restart and frame.counted:
                rst = sum(data.count(bytes((0xFF, 0xD0 + i)), pos, end) for i in range(8))
                expected = -(-_scan_mcus(frame, ids) // restart) - 1
                if rst < expected:
                    return result(f"JPEG scan {scans} has {rst} of its {expected} restart markers (truncated data)")
            pos = end
