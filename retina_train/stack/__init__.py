"""Stacking: the backbones' out-of-fold predictions -> one feature table -> an XGBoost meta-learner scored by nested
cross-validation, with bootstrap intervals, a shuffled-label control and a report (see docs/architecture.md).

- :mod:`~retina_train.stack.table`: find the OOF files, check them, build the ``MODEL__CLASS`` feature table.
- :mod:`~retina_train.stack.meta`: the meta-learner (parameters, device, fit/predict, save/load).
- :mod:`~retina_train.stack.nested`: the nested cross-validation and its no-leak record.
- :mod:`~retina_train.stack.metrics`: AUC/AP/F1 per class and macro, paired bootstrap intervals, fold thresholds.
- :mod:`~retina_train.stack.report`: markdown tables and plots from plain data.
- :mod:`~retina_train.stack.run`: the whole step (:func:`run_stack`); :mod:`~retina_train.stack.cli`: ``retina-stack``.
- :mod:`~retina_train.stack.rows`: the names of the non-backbone score rows.
"""

from __future__ import annotations

from retina_train.stack.errors import StackError
from retina_train.stack.meta import (
    DEVICES,
    STRATEGIES,
    MetaLearner,
    MetaParams,
    create_meta_learner,
    load_meta_learner,
    resolve_device,
)
from retina_train.stack.nested import NestedCV, nested_cv
from retina_train.stack.rows import CONTROL_ROW, MEAN_ROW, META_ROW
from retina_train.stack.run import StackConfig, StackResult, run_stack
from retina_train.stack.table import FeatureTable, build_feature_table, feature_columns, find_oof_files

__all__ = [
    "CONTROL_ROW",
    "DEVICES",
    "MEAN_ROW",
    "META_ROW",
    "STRATEGIES",
    "FeatureTable",
    "MetaLearner",
    "MetaParams",
    "NestedCV",
    "StackConfig",
    "StackError",
    "StackResult",
    "build_feature_table",
    "create_meta_learner",
    "feature_columns",
    "find_oof_files",
    "load_meta_learner",
    "nested_cv",
    "resolve_device",
    "run_stack",
]
