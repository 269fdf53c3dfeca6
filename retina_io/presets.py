"""Dataset presets: read a published label table (CSV or parquet) with polars and map it onto the 11 classes.

A preset knows one public dataset's label layout (docs/contracts.md, contract 1): which columns must exist, which
column is the image id, where the image file lives relative to ``--images``, how its labels map onto :data:`CLASSES`
(the one mapping table in the code is :data:`CLASS_MAPS`), which columns are kept as metadata and which column groups
images (patients).

:func:`read_labels` returns a :class:`LabelTable`: one row per input row, with the 11 class columns (``UInt8``; null
where the dataset has no such class), metadata columns, and a reject ``reason``/``detail`` for rows that do not fit
(``ragged_row``, ``bad_label``, ``duplicate_id``, ``unsafe_path``). A table that does not fit the preset at all (its
columns absent) raises :class:`PresetError` naming the missing columns; so does one that cannot be read as a table
(its encoding, repeated column names, no data rows: :mod:`retina_io.tables` reads it strictly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from retina_io.errors import RetinaError
from retina_io.schema import CLASSES
from retina_io.tables import Table, TableError
from retina_io.tables import read_table as _read_table

# Columns every index/label table reserves for itself; metadata columns with these names get a preset prefix.
RESERVED_COLUMNS = frozenset({"key", "id", "fold", "shard", "group", "row", "relpath", "reason", "detail", *CLASSES})

# Each published layout's label-table header, in its published order: the one home of these column names (the
# presets below read them; retina-synth writes them).

#: SynFundus-1M's ``is_*`` column of every class except DR (DR is carried by ``dr_grade > 0``), in CLASSES order.
SYNFUNDUS_CLASS_COLUMNS: dict[str, str] = {c: f"is_{c.lower()}" for c in CLASSES if c != "DR"}
SYNFUNDUS_FLAGS: tuple[str, ...] = tuple(SYNFUNDUS_CLASS_COLUMNS.values())
SYNFUNDUS_READABILITY: tuple[str, ...] = (
    "is_fundus",
    "is_macular_readable",
    "is_optic_disc_readable",
    "is_retinal_region_readable",
)
#: SynFundus-1M ``labels.csv``: ``file_name``, ``dr_grade`` (0-4), ``eye_side``, the class flags, the readability flags.
SYNFUNDUS_COLUMNS: tuple[str, ...] = ("file_name", "dr_grade", "eye_side", *SYNFUNDUS_FLAGS, *SYNFUNDUS_READABILITY)
#: The 45 RFMiD disease columns, in the published order (after ``ID`` and ``Disease_Risk``).
RFMID_DISEASES: tuple[str, ...] = (
    "DR", "ARMD", "MH", "DN", "MYA", "BRVO", "TSLN", "ERM", "LS", "MS", "CSR", "ODC", "CRVO", "TV", "AH", "ODP", "ODE",
    "ST", "AION", "PT", "RT", "RS", "CRS", "EDN", "RPEC", "MHL", "RP", "CWS", "CB", "ODPM", "PRH", "MNF", "HR", "CRAO",
    "TD", "CME", "PTCR", "CF", "VH", "MCA", "VS", "BRAO", "PLQ", "HPED", "CL",
)  # fmt: skip
#: The full RFMiD header: ``ID``, ``Disease_Risk``, then the 45 disease columns.
RFMID_COLUMNS: tuple[str, ...] = ("ID", "Disease_Risk", *RFMID_DISEASES)
AIROGS_COLUMNS: tuple[str, ...] = ("challenge_id", "class")
APTOS_COLUMNS: tuple[str, ...] = ("id_code", "diagnosis")
EYEPACS_COLUMNS: tuple[str, ...] = ("image", "level")
MESSIDOR2_COLUMNS: tuple[str, ...] = ("id_code", "diagnosis", "adjudicated_dme", "adjudicated_gradable")
#: Named layout -> its label-table header (the columns a preset requires, in the published order).
LAYOUT_COLUMNS: dict[str, tuple[str, ...]] = {
    "synfundus": SYNFUNDUS_COLUMNS,
    "rfmid": RFMID_COLUMNS,
    "airogs": AIROGS_COLUMNS,
    "aptos": APTOS_COLUMNS,
    "eyepacs": EYEPACS_COLUMNS,
    "messidor2": MESSIDOR2_COLUMNS,
}

# The one mapping table: preset -> class -> rule. A rule is ("any", [binary columns]) — positive when any is 1 —,
# ("grade>0", column) — an integer grade 0-4, positive when > 0 — or ("equals", column, value) for a string class.
# Classes a dataset does not have are absent here; their label is null in the index (0 in the 11 label bytes) and
# evaluation scores only the classes listed.
CLASS_MAPS: dict[str, dict[str, tuple]] = {
    "synfundus": {
        "DR": ("grade>0", "dr_grade"),
        **{c: ("any", [col]) for c, col in SYNFUNDUS_CLASS_COLUMNS.items()},
    },
    "rfmid": {
        "DR": ("any", ["DR"]),
        "AMD": ("any", ["ARMD"]),
        "AON": ("any", ["ODE", "ODP", "AION"]),  # optic disc edema / pallor / ischemic optic neuropathy
        "EM": ("any", ["ERM"]),
        "GC": ("any", ["ODC"]),  # optic disc cupping
        "PM": ("any", ["MYA"]),
        "RVO": ("any", ["BRVO", "CRVO"]),
    },
    "airogs": {"GC": ("equals", "class", "RG")},
    "aptos": {"DR": ("grade>0", "diagnosis")},
    "eyepacs": {"DR": ("grade>0", "level")},
    "messidor2": {"DR": ("grade>0", "diagnosis"), "DME": ("any", ["adjudicated_dme"])},
}


class PresetError(RetinaError, ValueError):
    """A label table that does not fit the chosen preset (or a preset that does not exist)."""


@dataclass(frozen=True)
class Preset:
    """How one published dataset lays out its labels and images."""

    name: str
    id_column: str
    required: tuple[str, ...]
    # Image file name (relative to --images, may contain "/") of one row: its id followed by this suffix (e.g.
    # ".png"), before any search; computed on the whole column at once.
    file_suffix: str = ""
    # When the exact relative path is absent, find the file by its base name anywhere under --images
    # (datasets shipped in numbered or split subfolders).
    search_by_name: bool = True
    # Also try these folder prefixes before searching (SynFundus-1M keeps images under Fundus/).
    prefixes: tuple[str, ...] = ()
    int_columns: dict[str, tuple[int, int]] = field(default_factory=dict)  # column -> inclusive range, validated
    string_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # column -> allowed values
    group: Callable[[pl.Expr], pl.Expr] | None = None  # group expression from the id column
    metadata: tuple[str, ...] = ()
    path_column: str | None = None
    class_map: dict[str, tuple] = field(default_factory=dict)  # class -> rule; CLASS_MAPS[name] for named presets
    # The same dataset published with other column names: column -> alternatives, used when the column is absent.
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def classes_present(self) -> tuple[str, ...]:
        """The classes this dataset labels; the others are unknown (null in the index)."""
        return tuple(c for c in CLASSES if c in self.class_map)


def _binary(cols: Sequence[str]) -> dict[str, tuple[int, int]]:
    return {c: (0, 1) for c in cols}


PRESETS: dict[str, Preset] = {
    "synfundus": Preset(
        name="synfundus",
        class_map=CLASS_MAPS["synfundus"],
        id_column="file_name",
        required=SYNFUNDUS_COLUMNS,
        prefixes=("Fundus/",),
        int_columns={"dr_grade": (0, 4), **_binary(SYNFUNDUS_FLAGS)},
        metadata=("dr_grade", "eye_side", *SYNFUNDUS_READABILITY),
    ),
    "rfmid": Preset(
        name="rfmid",
        class_map=CLASS_MAPS["rfmid"],
        id_column="ID",
        required=RFMID_COLUMNS,
        file_suffix=".png",
        int_columns={"ID": (0, 10**12), **_binary(("Disease_Risk", *RFMID_DISEASES))},
        metadata=("Disease_Risk", *RFMID_DISEASES),
    ),
    "airogs": Preset(
        name="airogs",
        class_map=CLASS_MAPS["airogs"],
        id_column="challenge_id",
        required=AIROGS_COLUMNS,
        file_suffix=".jpg",
        string_columns={"class": ("RG", "NRG")},
        metadata=("class",),
    ),
    "aptos": Preset(
        name="aptos",
        class_map=CLASS_MAPS["aptos"],
        id_column="id_code",
        required=APTOS_COLUMNS,
        file_suffix=".png",
        int_columns={"diagnosis": (0, 4)},
        metadata=("diagnosis",),
    ),
    "eyepacs": Preset(
        name="eyepacs",
        class_map=CLASS_MAPS["eyepacs"],
        id_column="image",
        required=EYEPACS_COLUMNS,
        file_suffix=".jpeg",
        int_columns={"level": (0, 4)},
        group=lambda e: e.str.split("_").list.first(),
        metadata=("level",),
    ),
    "messidor2": Preset(
        name="messidor2",
        class_map=CLASS_MAPS["messidor2"],
        id_column="id_code",
        required=MESSIDOR2_COLUMNS,
        # Kaggle's preprocessed copy names them id_code/diagnosis; Google's adjudicated grades (Krause et al. 2018,
        # kaggle.com/datasets/google-brain/messidor2-dr-grades) image_id/adjudicated_dr_grade.
        aliases={"id_code": ("image_id",), "diagnosis": ("adjudicated_dr_grade",)},
        int_columns={"diagnosis": (0, 4), "adjudicated_dme": (0, 1), "adjudicated_gradable": (0, 1)},
        metadata=("diagnosis", "adjudicated_dme", "adjudicated_gradable"),
    ),
}
PRESET_NAMES = (*PRESETS, "generic")


def generic_preset(*, id_column: str, label_columns: Sequence[str], path_column: str | None = None) -> Preset:
    """A preset for any table: ``label_columns`` are ``COLUMN`` (named as a class) or ``COLUMN:CLASS`` pairs, 0/1."""
    if not label_columns:
        raise PresetError("--preset generic needs --label-columns (e.g. 'DR,AMD' or 'has_dr:DR,glaucoma:GC')")
    rules: dict[str, tuple] = {}
    cols: list[str] = []
    for spec in label_columns:
        col, _, cls = spec.partition(":")
        cls = cls or col
        if cls not in CLASSES:
            raise PresetError(f"--label-columns: {spec!r} maps to {cls!r}, which is not a class; classes: {CLASSES}")
        rules.setdefault(cls, ("any", []))[1].append(col)
        cols.append(col)
    required = (id_column, *cols, *([path_column] if path_column else []))
    return Preset(
        name="generic",
        id_column=id_column,
        required=tuple(dict.fromkeys(required)),
        search_by_name=path_column is None,
        int_columns=_binary(cols),
        path_column=path_column,
        class_map=rules,
    )


def get_preset(
    name: str,
    *,
    id_column: str | None = None,
    label_columns: Sequence[str] = (),
    path_column: str | None = None,
) -> Preset:
    """Look up a preset by name; ``generic`` is built from the column options."""
    if name == "generic":
        if not id_column:
            raise PresetError("--preset generic needs --id-column (the column with each image's id or file name)")
        return generic_preset(id_column=id_column, label_columns=label_columns, path_column=path_column)
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
    return PRESETS[name]


def read_table(path: Path, **streaming) -> Table:
    """Read a label table strictly (:func:`retina_io.tables.read_table`, ``streaming``: its ``on_header`` and
    ``convert``); a table that cannot be read is a :class:`PresetError`."""
    try:
        return _read_table(path, **streaming)
    except TableError as exc:
        raise PresetError(str(exc)) from exc


@dataclass
class LabelTable:
    """One row per input row: ``row``, ``id``, ``relpath``, ``group``, class columns, metadata, ``reason``, ``detail``.

    ``reason`` is null for rows that fit; otherwise the reject reason, with a human-readable ``detail``.
    """

    preset: Preset
    frame: pl.DataFrame
    metadata_columns: tuple[str, ...]

    @property
    def accepted(self) -> pl.DataFrame:
        return self.frame.filter(pl.col("reason").is_null())

    @property
    def rejected(self) -> pl.DataFrame:
        return self.frame.filter(pl.col("reason").is_not_null())


def _int_value(col: str) -> pl.Expr:
    s = pl.col(col).str.strip_chars()
    return s.cast(pl.Float64, strict=False)


def _int_problem(col: str, lo: int, hi: int) -> pl.Expr:
    """A null expression when ``col`` holds an integer in [lo, hi]; otherwise a message naming the value."""
    raw = pl.col(col)
    v = _int_value(col)
    bad = raw.is_null() | (raw.str.strip_chars() == "") | v.is_null() | v.is_nan() | (v != v.floor())
    bad = bad | (v < lo) | (v > hi)
    shown = pl.when(raw.is_null()).then(pl.lit("<empty>")).otherwise(raw)
    return pl.when(bad).then(pl.format(f"{col}={{}} is not an integer in [{lo}, {hi}]", shown))


def _string_problem(col: str, allowed: tuple[str, ...]) -> pl.Expr:
    raw = pl.col(col).str.strip_chars()
    shown = pl.when(raw.is_null()).then(pl.lit("<empty>")).otherwise(pl.col(col))
    return pl.when(raw.is_null() | ~raw.is_in(list(allowed))).then(
        pl.format(f"{col}={{}} is not one of {list(allowed)}", shown)
    )


def _class_expr(rule: tuple) -> pl.Expr:
    kind = rule[0]
    if kind == "any":
        return pl.max_horizontal([_int_value(c) for c in rule[1]]).cast(pl.UInt8, strict=False)
    if kind == "grade>0":
        return (_int_value(rule[1]) > 0).cast(pl.UInt8)
    if kind == "equals":
        return (pl.col(rule[1]).str.strip_chars() == rule[2]).cast(pl.UInt8)
    raise ValueError(f"unknown class rule {rule!r}")


def _unsafe_problem(name: pl.Expr) -> pl.Expr:
    """Flag names that would read outside --images: absolute paths, drive letters, '..' components, NUL bytes."""
    norm = name.str.replace_all("\\\\", "/")
    bad = (
        norm.str.starts_with("/")
        | norm.str.contains(r"^[A-Za-z]:")
        | norm.str.contains(r"(^|/)\.\.(/|$)")
        | norm.str.contains("\x00", literal=True)
    )
    return pl.when(bad).then(pl.format("path {} would read outside --images", name))


def with_columns_of(preset: Preset, columns: Sequence[str]) -> Preset:
    """``preset`` speaking the table's own column names where the table uses one of its aliases (so messages and
    metadata name the columns the user's file has)."""
    sub = {c: next(a for a in alts if a in columns) for c, alts in preset.aliases.items()
           if c not in columns and any(a in columns for a in alts)}  # fmt: skip
    if not sub:
        return preset

    def n(c: str) -> str:
        return sub.get(c, c)

    def rule(r: tuple) -> tuple:
        return (r[0], [n(c) for c in r[1]]) if r[0] == "any" else (r[0], n(r[1]), *r[2:])

    return dataclasses.replace(
        preset, id_column=n(preset.id_column), required=tuple(n(c) for c in preset.required),
        int_columns={n(c): v for c, v in preset.int_columns.items()},
        string_columns={n(c): v for c, v in preset.string_columns.items()},
        metadata=tuple(n(c) for c in preset.metadata), class_map={k: rule(r) for k, r in preset.class_map.items()},
    )  # fmt: skip


def read_labels(
    path: Path,
    preset: Preset,
    *,
    group_column: str | None = None,
) -> LabelTable:
    """Read and validate a label table for ``preset``; see :class:`LabelTable`.

    The table is validated chunk by chunk as it is read (:func:`retina_io.tables.read_table`'s ``convert``): only
    the columns a :class:`LabelTable` keeps survive each chunk, so a million-row table is never held as strings of
    every column (16 bytes a value in polars, whatever the value). Duplicate ids are marked on the whole table."""
    renamed: dict[str, str] = {}  # metadata column -> its name in the table kept (from the header)

    def on_header(columns: list[str]) -> None:
        nonlocal preset
        preset = with_columns_of(preset, columns)
        needed = list(preset.required) + ([group_column] if group_column else [])
        missing = [c for c in needed if c not in columns]
        if missing:
            listed = ", ".join(columns[:30]) + (" …" if len(columns) > 30 else "")
            shown = [c + (f" (or {' / '.join(preset.aliases[c])})" if c in preset.aliases else "") for c in missing]
            raise PresetError(
                f"labels file {path} does not fit preset {preset.name!r}: missing column(s) {', '.join(shown)} "
                f"(found: {listed}). Choose the preset that matches the table, or --preset generic with --id-column "
                "and --label-columns."
            )
        meta_cols = list(dict.fromkeys(preset.metadata))
        if preset.name == "generic":
            used = {preset.id_column, preset.path_column, group_column, *preset.int_columns}
            meta_cols = [c for c in columns if c not in used]
        renamed.update({c: (f"{preset.name}_{c}" if c in RESERVED_COLUMNS else c) for c in meta_cols})

    def convert(df: pl.DataFrame, first: int, ragged: dict[int, str]) -> pl.DataFrame:
        # Rows whose field count differs from the header's: rejected before their values are read (ragged_row).
        at = sorted(ragged)
        flags = pl.Series("_ragged", [None] * df.height, dtype=pl.String)
        if at:
            flags = flags.scatter([i - first for i in at], [ragged[i] for i in at])
        df = df.with_row_index("row", offset=1 + first).with_columns(flags)

        id_raw = pl.col(preset.id_column).str.strip_chars()
        empty = pl.lit(f"{preset.id_column} is empty")
        problems: list[pl.Expr] = [pl.when(id_raw.is_null() | (id_raw == "")).then(empty)]
        problems += [_int_problem(c, lo, hi) for c, (lo, hi) in preset.int_columns.items()]
        problems += [_string_problem(c, vals) for c, vals in preset.string_columns.items()]
        mapping = preset.class_map

        # Normalise ids the way the dataset writes them: integers without a trailing ".0" (parquet/float exports).
        if preset.name == "rfmid":
            id_value = _int_value(preset.id_column).cast(pl.Int64, strict=False).cast(pl.String)
            id_value = pl.coalesce(id_value, id_raw)
        else:
            id_value = id_raw

        frame = df.with_columns(
            id=id_value,
            label_problem=pl.concat_str(problems, separator="; ", ignore_nulls=True),
        )
        if preset.path_column:
            name_expr = pl.col(preset.path_column).str.strip_chars()
        else:
            name_expr = pl.col("id") + preset.file_suffix if preset.file_suffix else pl.col("id")
        frame = frame.with_columns(relpath=name_expr.str.replace_all("\\\\", "/"))
        frame = frame.with_columns(path_problem=_unsafe_problem(pl.col("relpath")))

        class_cols = [(_class_expr(mapping[c]) if c in mapping else pl.lit(None, dtype=pl.UInt8)).alias(c)
                      for c in CLASSES]  # fmt: skip
        if group_column:
            group = pl.col(group_column).str.strip_chars()
        elif preset.group is not None:
            group = preset.group(pl.col("id"))
        else:
            group = pl.lit(None, dtype=pl.String)

        meta_exprs = []
        for c in renamed:
            if c in preset.int_columns:
                meta_exprs.append(_int_value(c).cast(pl.Int64, strict=False).alias(renamed[c]))
            else:
                meta_exprs.append(pl.col(c).str.strip_chars().alias(renamed[c]))

        # the first problem of each row: (test, reason, detail), in order
        rules = [(pl.col("_ragged").is_not_null(), "ragged_row", pl.col("_ragged")),
                 (pl.col("path_problem").is_not_null(), "unsafe_path", pl.col("path_problem")),
                 (pl.col("label_problem") != "", "bad_label", pl.col("label_problem"))]  # fmt: skip
        reason = detail = None
        for test, why, text in reversed(rules):
            reason = pl.when(test).then(pl.lit(why)).otherwise(reason)
            detail = pl.when(test).then(text).otherwise(detail)
        frame = frame.with_columns(
            *class_cols,
            *meta_exprs,
            group=group,
            reason=reason,
            detail=detail,
        )
        keep = ["row", "id", "relpath", "group", *CLASSES, *renamed.values(), "reason", "detail"]
        return frame.select(keep)

    table = read_table(path, on_header=on_header, convert=convert)
    frame = _mark_duplicates(table.frame)
    return LabelTable(preset=preset, frame=frame, metadata_columns=tuple(renamed.values()))


def _mark_duplicates(frame: pl.DataFrame) -> pl.DataFrame:
    """Among rows that fit, an id seen twice keeps its first row if all its rows agree, and loses all if they conflict.

    Agreement is on the 11 class labels and the image path; the later identical rows are rejected as
    ``duplicate_id`` naming the kept row, so nothing is dropped silently.
    """
    ok = pl.col("reason").is_null()
    repeated_ids = frame.filter(ok).filter(pl.col("id").is_duplicated())["id"].unique()  # usually none: small
    sig = pl.concat_str(
        [pl.col(c).cast(pl.String).fill_null("-") for c in CLASSES] + [pl.col("relpath")], separator=","
    )
    stats = (
        frame.filter(ok & pl.col("id").is_in(repeated_ids.implode()))
        .with_columns(_sig=sig)
        .group_by("id")
        .agg(
            _n=pl.len(),
            _nsig=pl.col("_sig").n_unique(),
            _first=pl.col("row").min(),
            _rows=pl.col("row").sort().cast(pl.String).str.join(", "),
        )
        .filter(pl.col("_n") > 1)
    )
    if stats.height == 0:
        return frame
    frame = frame.join(stats, on="id", how="left", maintain_order="left")
    dup = ok & pl.col("_n").is_not_null()
    conflicting = dup & (pl.col("_nsig") > 1)
    repeated = dup & (pl.col("_nsig") == 1) & (pl.col("row") != pl.col("_first"))
    return frame.with_columns(
        reason=pl.when(conflicting | repeated).then(pl.lit("duplicate_id")).otherwise(pl.col("reason")),
        detail=pl.when(conflicting)
        .then(pl.format("id {} has conflicting labels in rows {}", pl.col("id"), pl.col("_rows")))
        .when(repeated)
        .then(
            pl.format("id {} repeats row {} with the same labels (that row is packed)", pl.col("id"), pl.col("_first"))
        )
        .otherwise(pl.col("detail")),
    ).drop("_n", "_nsig", "_first", "_rows")
