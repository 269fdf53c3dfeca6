"""How the generator's randomness is keyed, so that every file is byte-identical for a seed and any worker count.

- Labels of the ``synfundus`` layout come from ``np.random.default_rng([seed, LABEL_STREAM])`` (what
  :func:`~retina_io.synth.labels.sample_labels` draws); an external layout's from ``[seed, LABEL_STREAM, layout
  index]``, its file names and extra columns from ``[seed, LABEL_STREAM, layout index, S_LAYOUT]``.
- Image ``i`` is keyed ``(seed, i)`` in the ``synfundus`` layout and ``(seed, EXTERNAL_STREAM + layout index, i)`` in
  an external one; ``render_fundus(seed=s)`` is keyed ``(s,)``.
- Within one image each component draws from its own generator ``default_rng([*key, stream])``: anatomy, nuisance
  (field, illumination, optics), vessel tree, readability, sensor noise, and ``S_CLASS + class index`` for each class's
  lesions (a few classes use further streams at ``S_CLASS + 50`` and up), so toggling one class with the same seed
  changes only that class's sign.
"""

from __future__ import annotations

import numpy as np

LABEL_STREAM = 1_000_003
EXTERNAL_STREAM = 2_000_003
S_ANATOMY, S_NUISANCE, S_VESSELS, S_READABILITY, S_NOISE, S_LAYOUT = 1, 2, 3, 4, 5, 6
S_CLASS = 100  # + class index


def stream_rng(key: tuple[int, ...], stream: int) -> np.random.Generator:
    """The generator of one component (``stream``) of the image keyed ``key``."""
    return np.random.default_rng([*key, stream])
