"""The names of the score rows that are not a backbone: one definition for the stack report, ``retina-eval`` and
``retina-demo`` (a backbone's row is named after its model folder)."""

from __future__ import annotations

META_ROW = "meta-learner"
MEAN_ROW = "mean of backbones"
CONTROL_ROW = "control (shuffled labels)"
