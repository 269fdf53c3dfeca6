"""The meta-learner: XGBoost over the ``MODEL__CLASS`` features, its parameters, device, saving and loading.

:func:`create_meta_learner`: XGBoost, ``tree_method="hist"``, on ``device="cuda"`` when a GPU is visible; on cuda
prediction feeds the boosters device-matched data (:func:`prediction_path`: CuPy, else one DMatrix per call), never a
host array through ``inplace_predict``. Two strategies fit the same model — binary relevance, one boosted tree
ensemble per class:

- ``multioutput``: scikit-learn ``MultiOutputClassifier(XGBClassifier(...))``, as in the paper: one booster per
  class, each building its own quantile sketch.
- ``native``: one ``XGBClassifier`` on the 2-D label matrix with ``multi_strategy="one_output_per_tree"`` (XGBoost's
  own multi-label mode: ``binary:logistic`` per target, one tree per target per round, one shared sketch and one
  booster). ``multi_output_tree`` (vector leaves) also trains multi-label ``binary:logistic`` in XGBoost 3.2, but it
  is a different model (one tree shared by all classes; lower AUC on our synthetic OOF and slower on CPU) and its
  gain cannot be split per class, so it is not used.
- ``auto`` (resolved by :func:`retina_train.stack.run.run_stack`): fit both on the first fold of the nested CV; keep
  ``native`` when its macro-AUC on that fold is within 0.001 of ``multioutput``'s, else ``multioutput``.

**The saved model**: the final meta-learner fits on all rows, is saved as XGBoost UBJSON (``meta_model.ubj``, or
``meta_model_CLASS.ubj`` per class for ``multioutput``) with ``meta.json`` (feature columns in order, classes,
strategy, parameters, models, per-class thresholds chosen on the meta-OOF); :func:`load_meta_learner` reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from retina_io.schema import FEATURE_SEP, split_feature_name
from retina_train.stack.errors import SHOW, StackError

STRATEGIES = ("auto", "native", "multioutput")
DEVICES = ("auto", "cuda", "cpu")
META_FORMAT = "retina-stack"
META_VERSION = 1


@dataclass
class MetaParams:
    """XGBoost parameters of the meta-learner (the same for every strategy, fold and the control)."""

    n_estimators: int = 100
    max_depth: int = 4
    learning_rate: float = 0.1
    subsample: float = 1.0
    colsample_bytree: float = 1.0
    min_child_weight: float = 1.0
    reg_lambda: float = 1.0
    max_bin: int = 256
    n_jobs: int | None = None  # None: all cores

    def xgb_kwargs(self, *, device: str, seed: int) -> dict:
        kw = asdict(self)
        return {**kw, "tree_method": "hist", "device": device, "random_state": seed, "objective": "binary:logistic"}


def cuda_available() -> bool:
    """Whether XGBoost can train on a CUDA GPU here (torch's view when torch is installed, else a tiny XGBoost fit)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, or a broken CUDA install: ask XGBoost
        pass
    import xgboost as xgb

    if not xgb.build_info().get("USE_CUDA"):
        return False
    try:
        xgb.train({"device": "cuda", "tree_method": "hist"}, xgb.DMatrix(np.zeros((2, 1)), label=[0, 1]), 1)
        return True
    except xgb.core.XGBoostError:
        return False


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise StackError(f"--device {device!r}: choose one of {DEVICES}")
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise StackError("--device cuda, but no CUDA GPU is visible to XGBoost; use --device auto or --device cpu")
    return device


def prediction_path(device: str) -> str:
    """How :meth:`MetaLearner.predict_proba` feeds its boosters, so that the data sits where they run.

    ``numpy`` on the CPU (``inplace_predict`` on the host array). On ``cuda`` a host array would make XGBoost
    fall back to building a DMatrix per booster and call (its "Falling back to prediction using DMatrix due to
    mismatched devices" warning): ``cupy`` when CuPy is importable (the rows copied to the GPU once per call,
    ``inplace_predict`` there), else ``dmatrix`` (one explicit ``DMatrix`` per call, shared by every booster).
    """
    if device == "cpu":
        return "numpy"
    return "cupy" if _cupy_usable() else "dmatrix"


def _cupy_usable() -> bool:
    """CuPy imports and sees a GPU (a CuPy built for another CUDA imports but cannot start: not usable)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - not installed, or installed for another CUDA/driver
        return False


@dataclass
class MetaLearner:
    """The XGBoost meta-learner: ``MODEL__CLASS`` features in a fixed order -> one probability per target class."""

    feature_columns: list[str]
    classes: list[str]
    strategy: str = "native"
    device: str = "cpu"
    params: MetaParams = field(default_factory=MetaParams)
    seed: int = 0
    boosters: list = field(default_factory=list)  # xgboost.Booster: one (native) or one per class (multioutput)
    thresholds: dict[str, float] = field(default_factory=dict)

    def fit(self, X: np.ndarray, Y: np.ndarray) -> MetaLearner:  # noqa: N803
        from xgboost import XGBClassifier

        X = np.ascontiguousarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=np.uint8)
        if X.shape[1] != len(self.feature_columns) or Y.shape[1] != len(self.classes):
            raise ValueError(
                f"fit on X {X.shape}, Y {Y.shape}: expected {len(self.feature_columns)} features and "
                f"{len(self.classes)} classes"
            )
        kw = self.params.xgb_kwargs(device=self.device, seed=self.seed)
        if self.strategy == "native":
            clf = XGBClassifier(**kw, multi_strategy="one_output_per_tree").fit(X, Y)
            self.boosters = [clf.get_booster()]
        elif self.strategy == "multioutput":
            from sklearn.multioutput import MultiOutputClassifier

            clf = MultiOutputClassifier(XGBClassifier(**kw)).fit(X, Y)
            self.boosters = [e.get_booster() for e in clf.estimators_]
        else:
            raise ValueError(f"strategy {self.strategy!r}: native or multioutput")
        for b in self.boosters:
            b.feature_names = list(self.feature_columns)
        return self

    def check_frame(self, features: pl.DataFrame) -> np.ndarray:
        """The feature matrix of ``features``; refuses a frame whose ``MODEL__CLASS`` columns differ from the order."""
        have = [c for c in features.columns if FEATURE_SEP in c]
        if have != self.feature_columns:
            missing = [c for c in self.feature_columns if c not in have]
            extra = [c for c in have if c not in self.feature_columns]
            detail = []
            if missing:
                detail.append(
                    f"missing {missing[:SHOW]}" + (f" (+{len(missing) - SHOW})" if len(missing) > SHOW else "")
                )
            if extra:
                detail.append(f"not trained on {extra[:SHOW]}")
            if not missing and not extra:
                at = next(i for i, (a, b) in enumerate(zip(have, self.feature_columns, strict=True)) if a != b)
                detail.append(
                    f"order differs from position {at}: got {have[at]!r}, expected {self.feature_columns[at]!r}"
                )
            models = sorted({split_feature_name(c)[0] for c in self.feature_columns})
            raise StackError(
                "the feature frame does not match the meta-learner's feature order (meta.json 'feature_columns': "
                f"models {models} x classes in CLASSES order): "
                + "; ".join(detail)
                + ". Build it with retina_train.stack.feature_columns(models) from the same backbones."
            )
        return features.select(self.feature_columns).to_numpy().astype(np.float32)

    def predict_proba(self, features: pl.DataFrame | np.ndarray) -> np.ndarray:  # noqa: N803
        """``(n, classes)`` probabilities. A polars frame is checked against :attr:`feature_columns` first."""
        if isinstance(features, pl.DataFrame):
            X = self.check_frame(features)
        else:
            X = np.ascontiguousarray(features, dtype=np.float32)
            if X.ndim != 2 or X.shape[1] != len(self.feature_columns):
                raise StackError(f"feature matrix of shape {X.shape}: expected (n, {len(self.feature_columns)})")
        if not self.boosters:
            raise StackError("the meta-learner is not fitted")
        path = prediction_path(self.device)
        if path == "numpy":
            preds = [np.asarray(b.inplace_predict(X)) for b in self.boosters]
        elif path == "cupy":  # the rows copied to the GPU once, every booster predicts them there
            import cupy

            X_gpu = cupy.asarray(X)
            preds = [cupy.asnumpy(b.inplace_predict(X_gpu)) for b in self.boosters]
        else:  # one DMatrix for all boosters, not one fallback DMatrix per booster
            import xgboost as xgb

            dm = xgb.DMatrix(X, feature_names=self.feature_columns, nthread=self.params.n_jobs or -1)
            preds = [b.predict(dm) for b in self.boosters]
        return np.concatenate([p.reshape(len(X), -1) for p in preds], axis=1).astype(np.float32)

    def gain(self) -> np.ndarray:
        """``(classes, features)`` total split gain of each feature in each class's trees."""
        out = np.zeros((len(self.classes), len(self.feature_columns)))
        for bi, booster in enumerate(self.boosters):
            model = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]
            for tree, target in zip(model["trees"], model["tree_info"], strict=True):
                left = np.asarray(tree["left_children"])
                split = np.asarray(tree["split_indices"])[left != -1]
                loss = np.asarray(tree["loss_changes"], dtype=np.float64)[left != -1]
                np.add.at(out[bi + target], split, loss)
        return out

    def importance(self, models: Sequence[str]) -> np.ndarray:
        """``(classes, models)``: each class's gain summed per backbone, normalised to sum 1 per class."""
        gain = self.gain()
        per_model = np.stack(
            [
                gain[:, [j for j, c in enumerate(self.feature_columns) if split_feature_name(c)[0] == m]].sum(axis=1)
                for m in models
            ],
            axis=1,
        )
        total = per_model.sum(axis=1, keepdims=True)
        return np.divide(per_model, total, out=np.zeros_like(per_model), where=total > 0)

    def model_files(self) -> list[str]:
        if self.strategy == "native":
            return ["meta_model.ubj"]
        return [f"meta_model_{c}.ubj" for c in self.classes]

    def save(self, folder: Path, extra: Mapping | None = None) -> Path:
        """Write the booster file(s) and ``meta.json`` into ``folder``; returns the path of ``meta.json``."""
        import xgboost as xgb

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = self.model_files()
        for b, name in zip(self.boosters, names, strict=True):
            b.save_model(str(folder / name))
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "feature_columns": self.feature_columns,
            "classes": self.classes,
            "models": sorted({split_feature_name(c)[0] for c in self.feature_columns}),
            "strategy": self.strategy,
            "multi_strategy": "one_output_per_tree" if self.strategy == "native" else None,
            "device": self.device,
            "params": asdict(self.params),
            "seed": self.seed,
            "model_files": names,
            "thresholds": self.thresholds,
            "xgboost": xgb.__version__,
            **(extra or {}),
        }
        path = folder / "meta.json"
        path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return path


def create_meta_learner(
    feature_columns: Sequence[str],
    classes: Sequence[str],
    *,
    strategy: str = "native",
    device: str = "cpu",
    params: MetaParams | None = None,
    seed: int = 0,
) -> MetaLearner:
    """An unfitted meta-learner (``strategy``: ``native`` or ``multioutput``; ``device``: ``cpu`` or ``cuda``)."""
    if strategy not in ("native", "multioutput"):
        raise StackError(f"strategy {strategy!r}: choose native or multioutput (auto is resolved by run_stack)")
    return MetaLearner(list(feature_columns), list(classes), strategy, device, params or MetaParams(), seed)


def load_meta_learner(stack_dir: Path) -> MetaLearner:
    """The final meta-learner that ``retina-stack`` saved in ``stack_dir`` (``meta.json`` + booster files)."""
    import xgboost as xgb

    stack_dir = Path(stack_dir)
    path = stack_dir / "meta.json"
    if not path.is_file():
        raise StackError(f"{stack_dir} holds no meta.json: not a retina-stack output folder; run `retina-stack` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StackError(f"{path} is not valid JSON ({exc}); rerun `retina-stack`") from exc
    if meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        raise StackError(f"{path} is not a retina-stack v{META_VERSION} meta.json; rerun `retina-stack`")
    learner = MetaLearner(
        list(meta["feature_columns"]),
        list(meta["classes"]),
        meta["strategy"],
        "cpu",
        MetaParams(**meta["params"]),
        int(meta["seed"]),
        thresholds={k: float(v) for k, v in meta.get("thresholds", {}).items()},
    )
    for name in meta["model_files"]:
        f = stack_dir / name
        if not f.is_file():
            raise StackError(f"{f} (named in {path}) is missing; rerun `retina-stack`")
        booster = xgb.Booster(model_file=str(f))
        booster.set_param({"device": "cpu"})  # trained on a GPU or not, predict where the caller's arrays live
        learner.boosters.append(booster)
    return learner
