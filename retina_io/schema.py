"""The label schema (DESIGN.md, contract 1): the 11 SynFundus-1M classes and their byte layout.

Every label vector, every column order and every stacked feature table uses ``CLASSES`` in this order.
In a shard, a sample's labels are ``KEY.labels``: exactly ``NUM_CLASSES`` raw bytes, each 0 or 1.
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
