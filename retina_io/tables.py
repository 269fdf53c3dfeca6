"""Label tables read strictly: every value as a string, every row accounted for, nothing shifted or guessed.

- Text encodings: UTF-8 with or without a byte-order mark; UTF-16 and UTF-32 with a byte-order mark, and UTF-16
  without one (recognised by its NUL bytes), are decoded. Anything else (e.g. Latin-1 from an old spreadsheet) is
  refused, naming the line of the first byte that is not UTF-8.
- The separator: ``,`` (``.tsv``: tab) unless the header has none of it but has ``;``, a tab or ``|`` (tables saved
  by spreadsheets in locales where the comma is the decimal mark).
- Each record must have as many fields as the header. One that does not is kept as a row (so row numbers stay those
  of the file) and reported in :attr:`Table.ragged` with its line number; the reader of the labels rejects it
  (``ragged_row``) instead of reading its labels from the wrong columns.
- Column names: stripped of whitespace; an empty one is named ``column_N`` (its position); two columns with one name
  are an error naming them. A table without data rows is an error, not an empty result.
- Empty fields are null. Blank lines are skipped; ``row`` numbers count data records (1 = the first after the header).

Parquet tables are read with polars and every column cast to a string.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from retina_io.errors import RetinaError

TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
CHUNK_ROWS = 1 << 16  # records parsed into Python strings before they become columns
HEAD_BYTES = 1 << 20  # bytes decoded to find the header line
PARQUET_SUFFIXES = (".parquet", ".pq")
_BOMS = (  # longest first: the UTF-32-LE mark starts with the UTF-16-LE one
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 (little-endian)"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 (big-endian)"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8 with a byte-order mark"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 (little-endian)"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 (big-endian)"),
)


class TableError(RetinaError, ValueError):
    """A label table that cannot be read as one (its encoding, its shape, its column names)."""


OnHeader = Callable[[list[str]], None]
Convert = Callable[[pl.DataFrame, int, dict[int, str]], pl.DataFrame]


@dataclass
class Table:
    frame: pl.DataFrame  # every column a string; one row per data record
    ragged: dict[int, str] = field(default_factory=dict)  # 0-based row -> why the record does not fit the header
    encoding: str = "UTF-8"


def read_table(path: Path, *, on_header: OnHeader | None = None, convert: Convert | None = None) -> Table:
    """Read a label table (CSV, TSV or parquet, chosen by the extension); see the module docstring.

    Streaming: the file is never held whole. ``on_header(columns)`` is called once the column names are known (it may
    raise); ``convert(chunk, first, ragged)`` turns each chunk of at most :data:`CHUNK_ROWS` rows (every column a
    string; ``first`` its first row, 0-based; ``ragged`` its entries of :attr:`Table.ragged`) into what the table
    keeps, so that a reader who needs a few compact columns never holds every value of a million rows as a string.
    """
    path = Path(path)
    if not path.is_file():  # also keeps a named pipe or a device from being opened
        raise TableError(f"labels file {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        try:
            df = pl.read_parquet(path)
            df.head(0).with_columns(pl.all().cast(pl.String))  # a nested column fails here, before anything else
        except Exception as exc:  # polars raises several exception types (unreadable file, nested columns)
            raise TableError(f"labels file {path} could not be read as a parquet table of values: {exc}") from exc
        _check_names(path, df.columns)
        if on_header is not None:
            on_header(df.columns)
        parts = []
        for start in range(0, max(df.height, 1), CHUNK_ROWS):  # one slice as strings at a time
            part = df.slice(start, CHUNK_ROWS).with_columns(pl.all().cast(pl.String))
            parts.append(convert(part, start, {}) if convert is not None else part)
        table = Table(pl.concat(parts, rechunk=True), encoding="parquet")
    elif suffix in TEXT_SUFFIXES:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES + 4)
            codec, encoding, skip = text_codec(head, path)
            f.seek(skip)
            first = head[skip : skip + HEAD_BYTES].decode(codec, errors="ignore")  # the header line, for the separator
            try:  # decoded while parsed: the text is never held whole (nor as a StringIO of 4 bytes per character)
                text = io.TextIOWrapper(f, encoding=codec, newline="")
                sep = "\t" if suffix == ".tsv" else ","
                table = parse_stream(text, first, path, sep, on_header=on_header, convert=convert)
            except UnicodeDecodeError:
                decode_text(path.read_bytes(), path)  # raises the error that names the line
                raise
        table.encoding = encoding
    else:
        raise TableError(f"labels file {path}: unknown table type {suffix!r}; use .csv, .tsv or .parquet")
    if table.frame.height == 0:
        raise TableError(f"labels file {path} has a header but no data rows")
    return table


def text_codec(raw: bytes, path: Path) -> tuple[str, str, int]:
    """The codec of a table file's bytes, the encoding in words and the length of its byte-order mark (see the module
    docstring); a file that is no text is a :class:`TableError`."""
    for bom, codec, name in _BOMS:
        if raw.startswith(bom):
            return codec, name, len(bom)
    head = raw[:4096]
    if b"\x00" in head:
        codec = _utf16_without_bom(head)
        if codec is None:
            decode_text(raw, path)  # raises
        return codec, f"{codec.upper()} without a byte-order mark", 0
    return "utf-8", "UTF-8", 0


def decode_text(raw: bytes, path: Path) -> tuple[str, str]:
    """The text of a table file and the encoding it was in (see the module docstring)."""
    for bom, codec, name in _BOMS:
        if raw.startswith(bom):
            try:
                return raw[len(bom) :].decode(codec), name
            except UnicodeDecodeError as exc:
                raise TableError(f"labels file {path} starts with a {name} byte-order mark but is not {name} text "
                                 f"({exc.reason} at byte {exc.start + len(bom)})") from None  # fmt: skip
    head = raw[:4096]
    if b"\x00" in head:
        codec = _utf16_without_bom(head)
        if codec is None:
            raise TableError(f"labels file {path} contains NUL bytes: it is not a text table (a spreadsheet or "
                             "another binary file?); export it as CSV in UTF-8")  # fmt: skip
        try:
            return raw.decode(codec), f"{codec.upper()} without a byte-order mark"
        except UnicodeDecodeError:
            raise TableError(f"labels file {path} looks like {codec.upper()} but does not decode as it; "
                             "save it as UTF-8") from None  # fmt: skip
    try:
        return raw.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise TableError(
            f"labels file {path} is not UTF-8 text: byte {raw[exc.start]:#04x} on line {line} (probably Latin-1 or "
            "Windows-1252, as old spreadsheets save); save it as UTF-8 (or UTF-16 with a byte-order mark)"
        ) from None


def _utf16_without_bom(head: bytes) -> str | None:
    """``utf-16-le``/``-be`` when the NUL bytes sit where ASCII text in UTF-16 puts them, else None."""
    even = head[0::2].count(0) / max(1, len(head[0::2]))
    odd = head[1::2].count(0) / max(1, len(head[1::2]))
    if odd > 0.9 and even < 0.1:
        return "utf-16-le"
    if even > 0.9 and odd < 0.1:
        return "utf-16-be"
    return None


def _separator(header: str, default: str) -> str:
    if default in header:
        return default
    return next((c for c in (";", "\t", ",", "|") if c in header), default)


def parse_text(text: str, path: Path, default_separator: str = ",") -> Table:
    """Parse CSV text strictly (see the module docstring)."""
    return parse_stream(io.StringIO(text, newline=""), text, path, default_separator)


def parse_stream(stream, head: str, path: Path, default_separator: str = ",", *, on_header: OnHeader | None = None,
                 convert: Convert | None = None) -> Table:  # fmt: skip
    """Parse CSV text from ``stream`` (opened with ``newline=""``) strictly; ``head``: its beginning (the header).
    ``on_header``, ``convert``: see :func:`read_table`."""
    first = head.lstrip("\r\n").split("\n", 1)[0]
    reader = csv.reader(stream, delimiter=_separator(first, default_separator))
    header: list[str] | None = None
    columns: list[list[str | None]] = []
    chunks: list[pl.DataFrame] = []  # every CHUNK_ROWS records become columns: no Python object per value survives
    ragged: dict[int, str] = {}
    rows = 0

    def flush() -> None:
        chunk = _chunk(header, columns)
        if convert is not None:
            start = rows - chunk.height
            chunk = convert(chunk, start, {i: ragged[i] for i in range(start, rows) if i in ragged})
        chunks.append(chunk)

    try:
        while True:
            start = reader.line_num + 1
            record = next(reader, None)
            if record is None:
                break
            if not record:
                continue  # a blank line
            if header is None:
                header = _names(path, record)
                if on_header is not None:
                    on_header(header)
                columns = [[] for _ in header]
                continue
            if len(record) != len(header):
                ragged[rows] = f"line {start} has {len(record)} fields; the header has {len(header)}"
                record = (record + [""] * len(header))[: len(header)]
            for col, value in zip(columns, record, strict=True):
                col.append(value if value != "" else None)
            rows += 1
            if rows % CHUNK_ROWS == 0:
                flush()
                columns = [[] for _ in header]
    except csv.Error as exc:
        raise TableError(f"labels file {path}: line {reader.line_num} cannot be parsed as CSV ({exc})") from None
    if header is None:
        raise TableError(f"labels file {path} is empty (no header line)")
    if rows % CHUNK_ROWS or not chunks:
        flush()
    return Table(pl.concat(chunks, rechunk=True), ragged)


def _chunk(header: list[str], columns: list[list[str | None]]) -> pl.DataFrame:
    return pl.DataFrame(dict(zip(header, columns, strict=True)), schema=dict.fromkeys(header, pl.String))


def _names(path: Path, header: list[str]) -> list[str]:
    names = [h.lstrip("\ufeff").strip() or f"column_{i + 1}" for i, h in enumerate(header)]
    _check_names(path, names)
    return names


def _check_names(path: Path, names: list[str]) -> None:
    repeated = sorted(n for n, k in Counter(names).items() if k > 1)
    if repeated:
        raise TableError(
            f"labels file {path} has columns with the same name: {', '.join(repeated)}; which one holds the labels "
            "cannot be told: rename or remove the extra columns"
        )
