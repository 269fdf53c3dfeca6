"""The facts the three contracts share (docs/contracts.md): the 11 classes, the label bytes, the sample key, and the
``MODEL__CLASS`` feature name. Every other module imports them from here.

- Contract 1: every label vector, every column order and every stacked feature table uses ``CLASSES`` in this order.
- Contract 2: in a shard, a sample's labels are ``KEY.labels``: exactly ``NUM_CLASSES`` raw bytes, each 0 or 1
  (:func:`encode_labels` / :func:`decode_labels`); ``KEY`` is the sample's rank, zero-padded to ``KEY_WIDTH`` digits
  (:func:`format_key` / :func:`parse_key`).
- Contract 3: the stacked table names a backbone's probability of a class ``MODEL__CLASS`` (:func:`feature_name`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CLASSES: tuple[str, ...] = ("DR", "AMD", "AON", "CRP", "DM", "DME", "EM", "GC", "HtR", "PM", "RVO")
NUM_CLASSES = len(CLASSES)
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}

CLASS_DESCRIPTIONS = {
    "DR": "diabetic retinopathy",
    "AMD": "age-related macular degeneration",
    "AON": "abnormal optic nerve (disc)",
    "CRP": "chorioretinopathy (choroidal patches)",
    "DM": "degenerative myopia",
    "DME": "diabetic macular edema",
    "EM": "epiretinal membrane",
    "GC": "glaucoma",
    "HtR": "hypertensive retinopathy",
    "PM": "pathological myopia",
    "RVO": "retinal vein occlusion",
}


KEY_WIDTH = 9  # keys are zero-padded decimal ranks: fixed width, no dots, sortable, parseable as int64
FEATURE_SEP = "__"  # MODEL__CLASS


def format_key(rank: int) -> str:
    """The shard key of the sample of rank ``rank`` (``0`` -> ``"000000000"``)."""
    return f"{rank:0{KEY_WIDTH}d}"


def format_keys(ranks: Sequence[int] | np.ndarray) -> list[str]:
    return [format_key(int(k)) for k in np.asarray(ranks).tolist()]


def parse_key(key: str) -> int:
    """A shard key back to its rank; anything but ``KEY_WIDTH`` decimal digits is refused."""
    if len(key) != KEY_WIDTH or not key.isascii() or not key.isdigit():
        raise ValueError(f"a sample key is {KEY_WIDTH} decimal digits; got {key!r}")
    return int(key)


def feature_name(model: str, cls: str) -> str:
    """The stacked table's column for ``model``'s probability of ``cls`` (contract 3)."""
    return f"{model}{FEATURE_SEP}{cls}"


def split_feature_name(column: str) -> tuple[str, str]:
    """``"tiny_vit__DR"`` -> ``("tiny_vit", "DR")``."""
    model, sep, cls = column.rpartition(FEATURE_SEP)
    if not sep or cls not in CLASS_INDEX:
        raise ValueError(f"{column!r} is not a MODEL{FEATURE_SEP}CLASS feature name")
    return model, cls


def encode_labels(labels: Sequence[int] | np.ndarray) -> bytes:
    """Encode one label vector (11 values, each 0 or 1) as the 11 raw bytes of ``KEY.labels``."""
    arr = np.asarray(labels)
    if arr.shape != (NUM_CLASSES,):
        raise ValueError(f"a label vector has {NUM_CLASSES} entries in the order {CLASSES}; got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"label values must be 0 or 1; got {arr.tolist()}")
    return arr.astype(np.uint8).tobytes()


def decode_labels(raw: bytes) -> np.ndarray:
    """Decode the 11 raw bytes of ``KEY.labels`` into a ``uint8[11]`` vector."""
    if len(raw) != NUM_CLASSES:
        raise ValueError(f"a .labels component is exactly {NUM_CLASSES} bytes; got {len(raw)}")
    arr = np.frombuffer(raw, dtype=np.uint8).copy()
    if arr.max(initial=0) > 1:
        raise ValueError(f"label bytes must be 0 or 1; got {arr.tolist()}")
    return arr
