"""Deterministic WebDataset tar shards and their DALI ``.idx`` files.

Members are plain files with fixed metadata (mtime 0, uid/gid 0, no owner names, mode 0644, ustar format), so the
same samples always give the same bytes. The ``.idx`` is exactly what DALI's ``wds2idx`` writes for the tar:
``v1.2 <samples>`` then one line per sample, ``<ext> <data offset> <size> <member name>`` per component.

Reading treats a shard as untrusted input: every member must be a regular file named ``KEY.EXT`` (``KEY`` the format's
9-digit key, ``EXT`` one of :data:`MEMBER_EXTENSIONS`, no directory part); anything else is a :class:`MemberError`
naming the member, which readers turn into a ``DatasetError`` naming the shard.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retina_io.schema import KEY_WIDTH, NUM_CLASSES

IDX_VERSION = "v1.2"
BLOCK = 512
MEMBER_EXTENSIONS = ("jpg", "png", "labels", "json")  # docs/contracts.md, contract 2


class MemberError(ValueError):
    """A tar member (or ``.idx`` entry) that is not a regular file named ``KEY.EXT`` of shard format v1."""


_MEMBER = re.compile(rf"([0-9]{{{KEY_WIDTH}}})\.({'|'.join(MEMBER_EXTENSIONS)})")


def split_member(name: str) -> tuple[str, str]:
    """``"000000012.jpg"`` -> ``("000000012", "jpg")``; a directory part, another key or extension is refused."""
    match = _MEMBER.fullmatch(name)
    if match is None:
        key, dot, ext = name.partition(".")
        if dot and ext in MEMBER_EXTENSIONS:
            raise MemberError(f"member {name!r}: its key {key!r} is not {KEY_WIDTH} decimal digits")
        raise MemberError(f"member {name!r} is not KEY.EXT with EXT one of {', '.join(MEMBER_EXTENSIONS)}")
    return match.group(1), match.group(2)


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through (tarfile needs write and tell)."""

    def __init__(self, raw):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.pos = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.pos += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.raw.flush()


class _HashingReader:
    """A read-only file wrapper that hashes what passes through (tarfile's stream mode reads strictly in order)."""

    def __init__(self, raw, sha):
        self.raw, self.sha = raw, sha

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        return data

    def drain(self, chunk: int = 1 << 20) -> None:
        while self.read(chunk):
            pass


@dataclass
class ShardStats:
    samples: int
    bytes: int
    sha256: str
    idx: str  # the text of the .idx file
    members: list[tuple[str, int, int]] = field(default_factory=list)  # (name, data offset, size)


def _header_template(ext: str) -> bytes:
    """The ustar header tarfile writes for a member ``KEY.EXT`` of size 0 with the fixed metadata (built by tarfile
    itself, so the bytes are exactly what it writes)."""
    info = tarfile.TarInfo("0" * KEY_WIDTH + "." + ext)
    info.size = 0
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


_TEMPLATES: dict[str, bytes] = {}


def member_header(name: str, size: int) -> bytes:
    """tarfile's ustar header for the member ``name`` (``KEY.EXT``, under 100 bytes) of ``size`` bytes: the template
    of its extension with the name, the size and the checksum filled in (tarfile's own header code costs more than
    writing the member)."""
    ext = name.partition(".")[2]
    template = _TEMPLATES.get(ext)
    if template is None:
        template = _TEMPLATES[ext] = _header_template(ext)
    buf = bytearray(template)
    raw = name.encode("ascii")
    buf[0:100] = raw + bytes(100 - len(raw))
    buf[124:136] = b"%011o\0" % size
    buf[148:156] = b"        "  # the checksum counts its own field as spaces
    buf[148:155] = b"%06o\0" % sum(buf)
    return bytes(buf)


class TarShardWriter:
    """Write samples (lists of ``(extension, bytes)`` under one key) into one tar; :meth:`close` gives the stats.

    The bytes are exactly what ``tarfile`` writes in ustar format (headers from :func:`member_header`, data padded to
    512-byte blocks, two zero blocks and padding to a 10240-byte record at the end), written directly."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._raw = open(self.path, "wb", buffering=4 << 20)  # noqa: SIM115 - closed in close(); large writes
        self._hw = _HashingWriter(self._raw)
        self._lines: list[str] = []
        self._members: list[tuple[str, int, int]] = []

    def add(self, key: str, components: list[tuple[str, bytes]]) -> None:
        if not key or "." in key or "/" in key or len(key) > 80 or not key.isascii():
            raise ValueError(f"a sample key must be non-empty ASCII without dots or slashes; got {key!r}")
        parts = []
        for ext, data in components:
            name = f"{key}.{ext}"
            offset = self._hw.tell() + BLOCK  # ustar: one header block for names under 100 bytes
            header, pad = member_header(name, len(data)), bytes(-len(data) % BLOCK)
            if len(data) < 1 << 16:
                self._hw.write(header + data + pad)  # one write (and hash update) for a small member
            else:
                for part in (header, data, pad):
                    self._hw.write(part)
            parts.append(f"{ext} {offset} {len(data)} {name}")
            self._members.append((name, offset, len(data)))
        self._lines.append(" ".join(parts))

    def close(self) -> ShardStats:
        end = self._hw.tell() + 2 * BLOCK
        self._hw.write(bytes(2 * BLOCK + (-end % tarfile.RECORDSIZE)))
        self._raw.close()
        idx = f"{IDX_VERSION} {len(self._lines)}\n" + "".join(line + "\n" for line in self._lines)
        return ShardStats(len(self._lines), self._hw.pos, self._hw.sha.hexdigest(), idx, self._members)

    def abort(self) -> None:
        try:
            self._raw.close()
        finally:
            self.path.unlink(missing_ok=True)


@dataclass
class TarSample:
    key: str
    components: dict[str, bytes]  # extension -> bytes


def iter_tar(path: Path, *, sha=None) -> Iterator[tuple[TarSample, list[tuple[str, int, int]]]]:
    """Read a shard back: samples in tar order (components grouped by key), with each member's (name, offset, size).

    A member that is not a regular ``KEY.EXT`` file, or a component twice in one sample, is a :class:`MemberError`.

    With ``sha`` (a ``hashlib`` object) every byte of the file goes through it on the same single pass, end-of-archive
    blocks included once the iteration is done — a verifier reads each tar once, not once to hash and once to parse.
    """
    current: TarSample | None = None
    members: list[tuple[str, int, int]] = []
    with open(path, "rb") as raw:
        reader = _HashingReader(raw, sha) if sha is not None else None
        with tarfile.open(fileobj=reader or raw, mode="r|" if reader else "r:") as tar:
            for info in tar:
                if not info.isfile():
                    raise MemberError(f"member {info.name!r} is not a regular file (tar type {info.type!r})")
                key, ext = split_member(info.name)
                data = tar.extractfile(info).read()
                if current is not None and key != current.key:
                    yield current, members
                    current, members = None, []
                if current is None:
                    current = TarSample(key, {})
                if ext in current.components:
                    raise MemberError(f"member {info.name!r} appears twice in one sample")
                current.components[ext] = data
                members.append((info.name, info.offset_data, info.size))
        if current is not None:
            yield current, members
        if reader is not None:
            reader.drain()


# The header fields tarfile reads as numbers (offset, width): in the writer's form, octal digits then a NUL (or all
# NUL, read as 0: tarfile leaves devmajor/devminor so).
_NUMBER_FIELDS = ((100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8))
_FAST_NAME = re.compile(rb"([0-9]{%d})\.(%s)\x00" % (KEY_WIDTH, "|".join(MEMBER_EXTENSIONS).encode()))
_ZERO_BLOCK = bytes(BLOCK)
_EXTENSIONS = frozenset(e.encode() for e in MEMBER_EXTENSIONS)
# The number fields' columns side by side, where each field starts among them, and which of those columns must be
# octal digits (all but a field's last, which must be NUL): every header block checked in a few array operations.
_FIELD_COLUMNS = np.concatenate([np.arange(start, start + width) for start, width in _NUMBER_FIELDS])
_FIELD_STARTS = np.cumsum([0] + [width for _, width in _NUMBER_FIELDS[:-1]])
_DIGIT_COLUMNS = ~np.isin(np.arange(len(_FIELD_COLUMNS)), _FIELD_STARTS + [w - 1 for _, w in _NUMBER_FIELDS])


@dataclass
class ScannedTar:
    """A tar's members, in order, as parallel lists (cheap to build and to compare a million of)."""

    keys: list[bytes]
    exts: list[bytes]
    offsets: list[int]  # of each member's data
    sizes: list[int]

    def members(self) -> list[tuple[str, int, int]]:
        """(member name, data offset, size) per member, as :func:`iter_tar` gives them."""
        names = [f"{k.decode()}.{e.decode()}" for k, e in zip(self.keys, self.exts, strict=True)]
        return list(zip(names, self.offsets, self.sizes, strict=True))


def scan_members(buf: bytes) -> ScannedTar | None:
    """The members of the tar ``buf``, read from its headers without ``tarfile``, or None when the tar is not exactly
    in the form :class:`TarShardWriter` writes.

    Accepted only: regular files (type ``0``) named ``KEY.EXT`` (no prefix field), every number field octal digits
    and a NUL (or all NUL), the header checksum right, each member's data inside ``buf``, and an end-of-archive block
    after the last one. Under those rules this reads exactly the members ``tarfile`` reads (which is what
    :func:`iter_tar` gives); anything else, hostile or just unusual, gives None and the caller reads the tar with
    :func:`iter_tar`, whose verdict (and error message) stands. The walk does the least per member (name, size); the
    other fields and the checksums are checked on all headers at once.
    """
    end = len(buf)
    pos, starts, keys, exts, sizes = 0, [], [], [], []
    match = _FAST_NAME.match
    while True:
        name = match(buf, pos)
        if name is None:
            if buf[pos : pos + BLOCK] == _ZERO_BLOCK:
                break
            return None
        if pos + BLOCK > end:
            return None
        try:
            size = int(buf[pos + 124 : pos + 135], 8)
        except ValueError:
            return None
        starts.append(pos)
        keys.append(name[1])
        exts.append(name[2])
        sizes.append(size)
        pos += BLOCK + -(-size // BLOCK) * BLOCK  # past the end when the data is cut: no header matches there
    if not starts:
        return ScannedTar([], [], [], [])
    first = np.asarray(starts)
    heads = np.frombuffer(buf, dtype=np.uint8)[first[:, None] + np.arange(BLOCK)]
    if first[-1] + BLOCK + sizes[-1] > end or not _heads_well_formed(heads):
        return None
    return ScannedTar(keys, exts, (first + BLOCK).tolist(), sizes)


def scan_indexed(buf: bytes, idx: bytes) -> ScannedTar | None:
    """:func:`scan_members` of ``buf`` with its ``.idx`` (``idx``, the file's bytes) as the map: the members the index
    names are checked against the tar's headers all at once instead of walked one by one. The same result as
    :func:`scan_members` when the index lists exactly the members that walk finds (each header where the previous
    member's data ends, the first at 0, an end-of-archive block after the last, every header in the writer's exact
    form with the index's name and size); None otherwise, whatever the index says (the caller then walks the tar).
    Whether ``idx`` is byte for byte what ``wds2idx`` writes is the caller's check (:func:`idx_bytes`)."""
    body = idx.split()[2:]
    if not body or len(body) % 4:
        return None
    exts, names = body[0::4], body[3::4]
    try:
        offsets = np.array(body[1::4]).astype(np.int64)
        sizes = np.array(body[2::4]).astype(np.int64)
    except (ValueError, OverflowError):
        return None
    keys = [n[:KEY_WIDTH] for n in names]
    if [n[KEY_WIDTH + 1 :] for n in names] != exts or not set(exts) <= _EXTENSIONS:
        return None  # so every name is KEY_WIDTH characters, a dot and an extension: at most 17 bytes
    starts = offsets - BLOCK
    padded = -(-sizes // BLOCK) * BLOCK
    if starts[0] != 0 or (sizes < 0).any() or not np.array_equal(starts[1:], offsets[:-1] + padded[:-1]):
        return None
    end = int(offsets[-1] + padded[-1])
    if int(offsets[-1] + sizes[-1]) > len(buf) or buf[end : end + BLOCK] != _ZERO_BLOCK:
        return None
    if len(buf) % BLOCK:
        return None
    heads = np.frombuffer(buf, dtype=np.uint8).reshape(-1, BLOCK)[starts // BLOCK]  # whole blocks: rows gathered
    named = np.array(names, dtype="S100").view(np.uint8).reshape(len(names), 100)
    digits = heads[:, :KEY_WIDTH]
    if not (np.array_equal(heads[:, :100], named) and ((digits >= 48) & (digits <= 57)).all()):
        return None
    if not _heads_well_formed(heads):
        return None
    size_field = ((heads[:, 124:135].astype(np.int64) - ord("0")) * 8 ** np.arange(10, -1, -1)).sum(axis=1)
    if not np.array_equal(size_field, sizes):
        return None
    return ScannedTar(keys, exts, offsets.tolist(), sizes.tolist())


def _heads_well_formed(h: np.ndarray) -> bool:
    """Every header (a row of ``h``) is a regular file (type ``0``) without a prefix, its number fields are octal
    digits + NUL (or all NUL) and its unsigned checksum is right."""
    if not ((h[:, 156] == ord("0")).all() and (h[:, 345] == 0).all()):
        return False
    fields = h[:, _FIELD_COLUMNS]
    zero = fields == 0
    octal = (fields - np.uint8(ord("0"))) < 8  # uint8 arithmetic: a byte below "0" wraps round to 208 or more
    written = np.logical_and.reduceat(np.where(_DIGIT_COLUMNS, octal, zero), _FIELD_STARTS, axis=1)
    if not (written | np.logical_and.reduceat(zero, _FIELD_STARTS, axis=1)).all():
        return False
    check = h[:, 148:156]
    if not (((check[:, :6] - np.uint8(ord("0"))) < 8).all() and (check[:, 6] == 0).all() and (check[:, 7] == 32).all()):
        return False
    recorded = ((check[:, :6].astype(np.int64) - ord("0")) * 8 ** np.arange(5, -1, -1)).sum(axis=1)
    computed = h.sum(axis=1, dtype=np.uint32).astype(np.int64) - check.sum(axis=1, dtype=np.int64) + 8 * ord(" ")
    return bool((recorded == computed).all())


def idx_bytes(scanned: ScannedTar, per_sample: int) -> bytes:
    """:func:`idx_text` (ASCII) for a scanned tar whose samples are runs of ``per_sample`` members."""
    members = zip(scanned.keys, scanned.exts, scanned.offsets, scanned.sizes, strict=True)
    parts = [b"%s %d %d %s.%s" % (e, o, n, k, e) for k, e, o, n in members]
    lines = [b" ".join(parts[i : i + per_sample]) for i in range(0, len(parts), per_sample)]
    return b"%s %d\n" % (IDX_VERSION.encode(), len(lines)) + b"".join(line + b"\n" for line in lines)


def idx_text(samples: list[list[tuple[str, int, int]]]) -> str:
    """The ``wds2idx`` index text for samples given as lists of (member name, data offset, size)."""
    lines = [f"{IDX_VERSION} {len(samples)}\n"]
    for members in samples:
        parts = []
        for name, offset, size in members:
            ext = name.rsplit("/", 1)[-1].partition(".")[2]
            parts.append(f"{ext} {offset} {size} {name}")
        lines.append(" ".join(parts) + "\n")
    return "".join(lines)


@dataclass(frozen=True)
class IdxColumns:
    """What a DALI ``.idx`` of one shard lists, one row per sample (tar order): the key as its number, the image's
    data offset and size (JPEG or PNG), and the labels' data offset (the labels are 11 bytes)."""

    keys: np.ndarray  # int64
    image: np.ndarray  # int64 [samples, 2]: offset, size
    labels: np.ndarray  # int64

    @classmethod
    def of_samples(cls, samples: list[list[tuple[str, int, int]]]) -> IdxColumns:
        """From :func:`read_idx`'s samples, each already known to hold one image, ``json`` and ``labels``."""
        keys, image, labels = [], [], []
        for members in samples:
            by_ext = {n.partition(".")[2]: (off, size) for n, off, size in members}
            keys.append(int(members[0][0].partition(".")[0]))
            image.append(by_ext.get("jpg") or by_ext["png"])
            labels.append(by_ext["labels"][0])
        return cls(np.asarray(keys, np.int64), np.asarray(image, np.int64).reshape(-1, 2), np.asarray(labels, np.int64))


_NUMBER = rb"([0-9]{1,18})"  # int64 whatever the digits
_IDX_HEAD = re.compile(re.escape(IDX_VERSION.encode()) + b" " + _NUMBER)
_IDX_SAMPLE = (rb"(jpg|png) %s %s ([0-9]{%d})\.\1 json %s %s \4\.json labels %s %d \4\.labels\n"
               % (_NUMBER, _NUMBER, KEY_WIDTH, _NUMBER, _NUMBER, _NUMBER, NUM_CLASSES))  # fmt: skip
_IDX_BODY = re.compile(rb"(?:%s)*" % _IDX_SAMPLE)


def scan_idx(data: bytes, tar_bytes: int) -> IdxColumns | None:
    """An ``.idx`` (``data``, the file's bytes) in exactly the form the packer writes, as columns: the header with the
    sample count, then per sample ``jpg|png OFFSET SIZE KEY.EXT json OFFSET SIZE KEY.json labels OFFSET 11
    KEY.labels`` (one space between fields, ``\n`` after each line), every member inside the tar's ``tar_bytes``.
    None for anything else (:func:`read_idx` then reads it line by line and names the problem, or accepts another
    form). What this accepts, :func:`read_idx` accepts with the same samples; a regular expression over the whole
    file instead of a Python loop per member, so a million samples take about a second, not half a minute."""
    head, newline, body = data.partition(b"\n")
    count = _IDX_HEAD.fullmatch(head)
    if not newline or count is None or _IDX_BODY.fullmatch(body) is None:
        return None
    fields = body.split()  # the form is exact: 12 fields a sample, where the expression above put them

    def numbers(column: int) -> np.ndarray:  # 1 to 18 digits each (checked above): int64, parsed in C
        return np.fromstring(b" ".join(fields[column::12]), dtype=np.int64, sep=" ")

    n = int(count.group(1))
    if len(fields) != 12 * n:
        return None
    if n == 0:
        return IdxColumns(np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros(0, np.int64))
    image_at, image_size, json_at, json_size, labels_at = (numbers(c) for c in (1, 2, 5, 6, 9))
    keys = np.fromstring(b" ".join(fields[7::12]).replace(b".json", b""), dtype=np.int64, sep=" ")  # KEY.json
    ends = np.stack([image_at + image_size, json_at + json_size, labels_at + NUM_CLASSES])
    if ends.max() > tar_bytes or len(keys) != n:
        return None
    return IdxColumns(keys, np.stack([image_at, image_size], axis=1), labels_at)


def read_idx(path: Path, tar_bytes: int) -> list[list[tuple[str, int, int]]]:
    """Parse a DALI ``.idx``: per sample, its members as (name, data offset, size), every entry checked.

    Each member is ``KEY.EXT`` (:func:`split_member`), its extension the one the line names, one key per sample, each
    extension once, and its bytes inside the tar (``tar_bytes`` long); anything else is a :class:`MemberError`.
    """
    lines = Path(path).read_text(encoding="ascii", errors="replace").splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != IDX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise MemberError(f"the first line is not '{IDX_VERSION} <samples>' for its {max(len(lines) - 1, 0)} samples")
    samples = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % 4:
            raise MemberError(f"line {n} is not '<ext> <offset> <size> <member>' per component")
        members, keys = [], set()
        for ext, offset, size, name in zip(parts[::4], parts[1::4], parts[2::4], parts[3::4], strict=True):
            key, own_ext = split_member(name)
            if own_ext != ext or not offset.isdigit() or not size.isdigit():
                raise MemberError(f"line {n}: entry '{ext} {offset} {size} {name}' is malformed")
            if int(offset) + int(size) > tar_bytes:
                raise MemberError(f"line {n}: member {name!r} lies beyond the tar's {tar_bytes} bytes")
            keys.add(key)
            members.append((name, int(offset), int(size)))
        exts = parts[::4]
        if len(keys) != 1 or len(set(exts)) != len(exts):
            raise MemberError(f"line {n} names several keys or one extension twice: {line.strip()!r}")
        samples.append(members)
    return samples


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
