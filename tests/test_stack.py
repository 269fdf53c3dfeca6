"""Stacking: the OOF feature table and its refusals, nested CV without leaks, importance, control, CLI, reload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from benchmarks.bench_stack import make_oof_inputs
from retina_io.dataset import PackedDataset
from retina_io.schema import CLASSES
from retina_train.stack import (
    CONTROL_ROW,
    META_ROW,
    MetaParams,
    StackConfig,
    StackError,
    build_feature_table,
    create_meta_learner,
    feature_columns,
    load_meta_learner,
    nested_cv,
    run_stack,
)
from retina_train.stack.cli import main
from retina_train.stack.run import _macro_auc

FAST = MetaParams(n_estimators=20, max_depth=3, n_jobs=1)


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    return make_oof_inputs(tmp_path, n=600, models=("b", "a", "c"), ranks=2, seed=3)


# ------------------------------------------------------------------------------------------------- feature table


def test_feature_columns_are_models_sorted_then_classes_in_order():
    cols = feature_columns(["vit", "convnext"])
    assert cols[:2] == ["convnext__DR", "convnext__AMD"]
    assert cols == [f"{m}__{c}" for m in ("convnext", "vit") for c in CLASSES]
    assert len(feature_columns([f"m{i}" for i in range(6)])) == 66


def test_table_has_one_row_per_sample_and_the_oof_values(inputs):
    runs, data = inputs
    table = build_feature_table(runs, data)
    assert PackedDataset.open(data).index().height == table.n == 600
    assert table.models == ["a", "b", "c"]
    assert table.frame.columns == ["key", "fold", *CLASSES, *feature_columns(["a", "b", "c"])]
    assert table.frame.schema["a__DR"] == pl.Float32 and table.frame.schema["DR"] == pl.UInt8
    index = PackedDataset.open(data).index()
    assert table.frame["key"].to_list() == index["key"].to_list()  # index order
    assert table.frame["fold"].to_list() == index["fold"].to_list()
    # one value traced back to its file
    oof = pl.read_parquet(runs / "b" / "fold2" / "oof-rank1.parquet")
    key, value = oof["key"][0], oof["HtR"][0]
    assert table.frame.filter(pl.col("key") == key)["b__HtR"].item() == value
    assert table.X().shape == (600, 33) and table.Y().shape == (600, 11)


def test_any_number_of_backbones(tmp_path):
    runs, data = make_oof_inputs(tmp_path, n=200, models=("only",))
    table = build_feature_table(runs, data)
    assert table.feature_columns == [f"only__{c}" for c in CLASSES]


def _refusal(runs: Path, data: Path) -> str:
    with pytest.raises(StackError) as exc:
        build_feature_table(runs, data)
    return str(exc.value)


def test_refuses_incomplete_oof(inputs):
    runs, data = inputs
    gone = pl.read_parquet(runs / "c" / "fold3" / "oof-rank0.parquet")
    (runs / "c" / "fold3" / "oof-rank0.parquet").unlink()
    msg = _refusal(runs, data)
    assert f"c: {gone.height} index samples have no prediction (fold 3: {gone.height})" in msg
    listed = msg.split("no prediction (fold 3: ")[1].split("): ")[1].split("\n")[0].split(", ")
    assert len(listed) == min(10, gone.height) and set(listed) <= set(gone["key"].to_list())
    assert "rerun the missing folds" in msg


def test_refuses_duplicated_oof(inputs):
    runs, data = inputs
    src = runs / "a" / "fold1" / "oof-rank0.parquet"
    shutil.copy(src, runs / "a" / "fold1" / "oof-rank7.parquet")
    msg = _refusal(runs, data)
    n = pl.read_parquet(src).height
    assert f"a: {n} keys predicted more than once" in msg
    assert "oof-rank7.parquet" in msg and "oof-rank0.parquet" in msg


def test_refuses_a_key_missing_from_the_index(inputs):
    runs, data = inputs
    path = runs / "b" / "fold0" / "oof-rank1.parquet"
    df = pl.read_parquet(path)
    extra = df.head(1).with_columns(pl.lit("999999999").alias("key"))
    pl.concat([df, extra]).write_parquet(path)
    msg = _refusal(runs, data)
    assert "b: 1 OOF rows have a key that is not in index.parquet: 999999999" in msg


def test_refuses_fold_mismatch_and_bad_probabilities(inputs):
    runs, data = inputs
    path = runs / "a" / "fold4" / "oof-rank0.parquet"
    df = pl.read_parquet(path)
    df = df.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(1, pl.Int32)).otherwise(pl.col("fold")).alias("fold"),
        pl.when(pl.int_range(pl.len()) == 1).then(pl.lit(float("nan"), pl.Float32)).otherwise(pl.col("GC")).alias("GC"),
    )
    df.write_parquet(path)
    msg = _refusal(runs, data)
    assert "a: 1 OOF rows disagree with the index fold" in msg
    assert "differs from their fold{k} folder" in msg
    assert "a: 1 OOF rows have a probability that is missing, NaN or outside [0, 1]" in msg


def test_refuses_a_file_without_the_contract_columns(inputs):
    runs, data = inputs
    path = runs / "a" / "fold0" / "oof-rank0.parquet"
    pl.read_parquet(path).drop("PM").write_parquet(path)
    assert "missing columns ['PM']" in _refusal(runs, data)


def test_clear_errors_for_wrong_folders(tmp_path, inputs):
    runs, data = inputs
    assert "is not a folder; point it at one experiment folder" in _refusal(tmp_path / "does_not_exist", data)
    (tmp_path / "empty").mkdir()
    assert "no OOF prediction files under --runs" in _refusal(tmp_path / "empty", data)
    msg = _refusal(runs, runs)
    assert msg.startswith(f"--data {runs}:") and "retina-shard pack" in msg


def test_classes_not_labelled_are_skipped_and_none_is_an_error(tmp_path):
    runs, data = make_oof_inputs(tmp_path / "some", n=300, models=("a",), classes_present=("DR", "GC"))
    table = build_feature_table(runs, data)
    assert table.targets == ["DR", "GC"]
    assert table.skipped["AMD"] == "not labelled by this dataset"
    assert table.frame.columns[:4] == ["key", "fold", "DR", "GC"]
    assert len(table.feature_columns) == 11  # the inputs stay all 11 classes
    runs, data = make_oof_inputs(tmp_path / "none", n=100, models=("a",), classes_present=())
    assert "shares no scorable class" in _refusal(runs, data)


# ---------------------------------------------------------------------------------------------------- nested CV


class Spy:
    """A stand-in meta-learner that records which rows (column 0 holds the row id) it trained on and scored."""

    log: list[Spy] = []

    def __init__(self):
        self.trained: set[int] = set()
        self.scored: set[int] = set()
        Spy.log.append(self)

    def fit(self, X, Y):  # noqa: N803
        self.trained |= set(X[:, 0].astype(int).tolist())
        return self

    def predict_proba(self, X):  # noqa: N803
        self.scored |= set(X[:, 0].astype(int).tolist())  # every row it is asked about, its training rows included
        return np.full((len(X), 2), 0.5, dtype=np.float32)


def test_nested_cv_never_scores_a_row_with_a_model_that_trained_on_it():
    n = 500
    rng = np.random.default_rng(0)
    X = np.column_stack([np.arange(n), rng.random((n, 3))]).astype(np.float32)
    Y = (rng.random((n, 2)) < 0.3).astype(np.uint8)
    folds = rng.integers(0, 5, n)
    Spy.log = []
    result = nested_cv(X, Y, folds, Spy)
    assert len(Spy.log) == 5
    for spy in Spy.log:  # not even its own training rows (no in-sample predictions, e.g. for thresholds)
        assert spy.scored and not (spy.scored & spy.trained)
        assert spy.scored | spy.trained == set(range(n))
    assert set().union(*(s.scored for s in Spy.log)) == set(range(n))
    for f in range(5):
        assert set(result.scored_rows[f].tolist()) == set(np.flatnonzero(folds == f).tolist())
        assert not np.intersect1d(result.train_rows[f], result.scored_rows[f]).size
    # the recorded guarantee is checked: a forged overlap is caught
    result.train_rows[2] = np.append(result.train_rows[2], result.scored_rows[2][:1])
    with pytest.raises(AssertionError, match="fold 2"):
        result.check(n)


def test_native_and_multioutput_agree_and_gain_matches_xgboost():
    rng = np.random.default_rng(1)
    n = 1500
    Y = (rng.random((n, 3)) < 0.3).astype(np.uint8)
    X = (rng.normal(0, 1, (n, 6)) + np.repeat(Y, 2, axis=1) * [1.5, 0, 1.0, 0, 0.5, 0]).astype(np.float32)
    cols = [f"{m}__{c}" for m in ("a", "b") for c in ("DR", "AMD", "AON")]
    train, test = np.arange(n) < 1000, np.arange(n) >= 1000
    fitted = {}
    for s in ("native", "multioutput"):
        fitted[s] = create_meta_learner(cols, ["DR", "AMD", "AON"], strategy=s, params=FAST).fit(X[train], Y[train])
    aucs = {s: _macro_auc(Y[test], m.predict_proba(X[test])) for s, m in fitted.items()}
    assert abs(aucs["native"] - aucs["multioutput"]) < 0.001
    multi = fitted["multioutput"]
    gain = multi.gain()
    for j, booster in enumerate(multi.boosters):
        total = booster.get_score(importance_type="total_gain")
        assert np.allclose([total.get(c, 0.0) for c in cols], gain[j], rtol=1e-4)


def _fake_cupy(calls: list) -> object:
    """A stand-in CuPy module whose "GPU" arrays are numpy arrays (records each host->device copy)."""
    import types

    def asarray(x):
        calls.append(("asarray", x.shape))
        return np.asarray(x)

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    return types.SimpleNamespace(asarray=asarray, asnumpy=np.asarray, cuda=types.SimpleNamespace(runtime=runtime))


def test_prediction_path_matches_the_boosters_device(monkeypatch):
    import sys

    from retina_train.stack.meta import prediction_path

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    assert prediction_path("cpu") == "numpy"
    assert prediction_path("cuda") == "dmatrix"
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy([]))
    assert prediction_path("cpu") == "numpy", "the CPU path never changes"
    assert prediction_path("cuda") == "cupy"


def test_cuda_prediction_feeds_device_matched_data_and_gives_the_cpu_result(monkeypatch):
    """On cuda the boosters get no host array through inplace_predict (XGBoost's per-call DMatrix fallback): the rows
    go to the GPU once (CuPy) or into one DMatrix shared by every booster. Boosters trained on the CPU stand in for
    GPU ones; the probabilities must equal the CPU path's."""
    import sys

    import xgboost as xgb

    rng = np.random.default_rng(2)
    Y = (rng.random((400, 3)) < 0.3).astype(np.uint8)
    X = (rng.normal(0, 1, (400, 6)) + np.repeat(Y, 2, axis=1)).astype(np.float32)
    cols = [f"{m}__{c}" for m in ("a", "b") for c in ("DR", "AMD", "AON")]
    learner = create_meta_learner(cols, ["DR", "AMD", "AON"], strategy="multioutput", params=FAST).fit(X, Y)
    expected = learner.predict_proba(X)  # device cpu: inplace_predict on numpy, as before
    host_inplace, dmatrices = [], []
    real_inplace, real_dmatrix = xgb.Booster.inplace_predict, xgb.DMatrix

    def inplace(self, data, **kw):
        host_inplace.append(isinstance(data, np.ndarray) and not cupy_active[0])
        return real_inplace(self, data, **kw)

    def dmatrix(*a, **kw):
        dmatrices.append(1)
        return real_dmatrix(*a, **kw)

    cupy_active = [False]
    monkeypatch.setattr(xgb.Booster, "inplace_predict", inplace)
    monkeypatch.setattr(xgb, "DMatrix", dmatrix)
    learner.device = "cuda"
    monkeypatch.setitem(sys.modules, "cupy", None)  # no CuPy: one explicit DMatrix per call
    np.testing.assert_array_equal(learner.predict_proba(X), expected)
    assert dmatrices == [1] and not host_inplace, "one DMatrix for all 3 boosters, no host inplace_predict"
    copies: list = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(copies))
    cupy_active[0] = True
    np.testing.assert_array_equal(learner.predict_proba(X), expected)
    assert copies == [("asarray", X.shape)], "the rows go to the device once per call, not once per booster"
    assert dmatrices == [1], "no DMatrix on the CuPy path"


# ------------------------------------------------------------------------------------------------- the whole step


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    root = tmp_path_factory.mktemp("stacked")
    # backbone a alone carries DR's signal; every backbone carries some signal for the other classes
    strength = {"a": [3.0] + [1.5] * 10, "b": [0.0] + [1.5] * 10, "c": [0.0] + [1.5] * 10}
    runs, data = make_oof_inputs(root, n=2500, models=("a", "b", "c"), strength=strength, seed=5)
    cfg = StackConfig(
        runs=runs, data=data, out=root / "stack", device="cpu", bootstrap=100, params=FAST, progress=False
    )
    return run_stack(cfg)


def test_outputs_are_written(stacked):
    out = Path(stacked.config.out)
    for name in ("features.parquet", "meta_oof.parquet", "scores.parquet", "scores.md", "importance.parquet",
                 "importance.csv", "importance.png", "roc.png", "calibration.png", "meta.json", "report.md",
                 "meta_model.ubj"):  # fmt: skip
        assert (out / name).is_file(), name
    meta = json.loads((out / "meta.json").read_text())
    assert meta["feature_columns"] == feature_columns(["a", "b", "c"])
    assert meta["classes"] == list(CLASSES) and meta["models"] == ["a", "b", "c"]
    assert meta["strategy"] == stacked.strategy == "native"  # auto: equal AUC on fold 0
    assert meta["strategy_check"]["chosen"] == "native"
    oof = pl.read_parquet(out / "meta_oof.parquet")
    assert oof.columns == ["key", "fold", *CLASSES] and oof.height == 2500
    assert oof.select(pl.col(CLASSES).is_nan().any()).row(0) == (False,) * 11
    report = (out / "report.md").read_text()
    assert "![roc](roc.png)" in report and "control (shuffled labels)" in report
    for png in ("roc.png", "calibration.png", "importance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_meta_learner_scores_high_and_the_control_stays_near_half(stacked):
    assert stacked.macro(META_ROW) > 0.9
    assert abs(stacked.macro(CONTROL_ROW) - 0.5) < 0.06
    rows = set(stacked.scores["model"].unique().to_list())
    assert rows == {"a", "b", "c", "mean of backbones", META_ROW, CONTROL_ROW}


def test_the_backbone_carrying_a_signal_dominates_its_importance(stacked):
    imp = stacked.importance
    assert imp.columns == ["class", "a", "b", "c"]
    dr = imp.filter(pl.col("class") == "DR").row(0, named=True)
    assert dr["a"] > 0.8 and dr["b"] < 0.1 and dr["c"] < 0.1
    assert np.allclose(imp.select("a", "b", "c").to_numpy().sum(axis=1), 1.0)


def test_load_meta_learner_round_trip_and_column_check(stacked):
    learner = load_meta_learner(stacked.config.out)
    assert learner.feature_columns == stacked.final.feature_columns and learner.classes == list(CLASSES)
    features = pl.read_parquet(Path(stacked.config.out) / "features.parquet")
    p = learner.predict_proba(features)  # key, fold and label columns are ignored
    assert p.shape == (2500, 11)
    assert np.allclose(p, stacked.final.predict_proba(stacked.table.X()), atol=1e-6)
    swapped = features.select(["a__AMD", "a__DR", *[c for c in features.columns if c not in ("a__AMD", "a__DR")]])
    with pytest.raises(StackError, match="order differs from position 0"):
        learner.predict_proba(swapped)
    with pytest.raises(StackError, match=r"missing \['c__RVO'\]"):
        learner.predict_proba(features.drop("c__RVO"))
    with pytest.raises(StackError, match="no meta.json"):
        load_meta_learner(Path(stacked.config.out).parent)


# ------------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(autouse=True)
def _no_global_env_change(monkeypatch):
    """main() sets TQDM_MININTERVAL when unset; keep that from leaking into the rest of the test session."""
    monkeypatch.setenv("TQDM_MININTERVAL", "30")


def test_cli_end_to_end(tmp_path, capsys):
    runs, data = make_oof_inputs(tmp_path, n=800, models=("x", "y"), classes_present=("DR", "AMD", "GC"))
    out = tmp_path / "stack"
    argv = ["--runs", str(runs), "--data", str(data), "--out", str(out), "--strategy", "multioutput", "--device", "cpu"]
    argv += ["--bootstrap", "30", "--n-estimators", "10", "--threads", "1", "--no-progress", "-q"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "stacked 800 samples x 22 features (2 models)" in printed and "skipped AON" in printed
    for name in ("report.md", "roc.png", "calibration.png", "importance.png", "meta_model_DR.ubj", "meta_model_GC.ubj"):
        assert (out / name).is_file(), name
    assert load_meta_learner(out).classes == ["DR", "AMD", "GC"]


def test_cli_exits_2_with_one_message(tmp_path, capsys, inputs):
    runs, data = inputs
    assert main(["--runs", str(tmp_path / "nothing"), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retina-stack: error: --runs") and "Traceback" not in err
    assert main(["--runs", str(runs), "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "is not a packed dataset" in capsys.readouterr().err
    (runs / "a" / "fold0" / "oof-rank1.parquet").unlink()
    assert main(["--runs", str(runs), "--data", str(data), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "index samples have no prediction" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- thresholds (issue 15)


def _best_threshold_brute_force(y: np.ndarray, p: np.ndarray) -> float:
    """The highest score t that maximises F1 of ``p >= t``, trying every distinct score (no shared code)."""
    cands = np.unique(p)[::-1]
    pred = p[None, :] >= cands[:, None]
    tp = (pred & (y[None, :] == 1)).sum(axis=1)
    fp = (pred & (y[None, :] == 0)).sum(axis=1)
    fn = (y == 1).sum() - tp
    return float(cands[np.argmax(2 * tp / (2 * tp + fp + fn))])


def test_reported_f1_at_t_equals_an_independent_computation_from_meta_oof(stacked):
    from sklearn.metrics import f1_score, recall_score

    out = Path(stacked.config.out)
    oof = pl.read_parquet(out / "meta_oof.parquet")
    labels = pl.read_parquet(out / "features.parquet").select("key", *CLASSES)
    joined = oof.join(labels, on="key", suffix="_y")
    p = joined.select(CLASSES).to_numpy()
    y = joined.select([f"{c}_y" for c in CLASSES]).to_numpy()
    folds = joined["fold"].to_numpy()
    # fold f's threshold: F1-optimal on the other folds' meta-OOF
    thr = np.array([[_best_threshold_brute_force(y[folds != f, j], p[folds != f, j]) for j in range(11)]
                    for f in range(5)])  # fmt: skip
    assert np.array_equal(thr, stacked.nested.thresholds)
    yhat = (p >= thr[folds]).astype(np.uint8)
    scores = pl.read_parquet(out / "scores.parquet").filter(pl.col("model") == META_ROW)
    look = {(c, m): v for c, m, v in scores.select("class", "metric", "value").iter_rows()}
    assert look[("macro", "f1")] == pytest.approx(f1_score(y, yhat, average="macro"), abs=1e-12)
    assert look[("micro", "f1")] == pytest.approx(f1_score(y, yhat, average="micro"), abs=1e-12)
    assert look[("samples", "f1")] == pytest.approx(f1_score(y, yhat, average="samples", zero_division=1), abs=1e-12)
    assert look[("samples", "f1_05")] == pytest.approx(
        f1_score(y, p >= 0.5, average="samples", zero_division=1), abs=1e-12
    )
    for j, c in enumerate(CLASSES):
        assert look[(c, "f1")] == pytest.approx(f1_score(y[:, j], yhat[:, j]), abs=1e-12)
        assert look[(c, "sensitivity")] == pytest.approx(recall_score(y[:, j], yhat[:, j]), abs=1e-12)
    lo, hi = scores.filter((pl.col("class") == "micro") & (pl.col("metric") == "f1")).select("lo", "hi").row(0)
    assert lo < look[("micro", "f1")] < hi  # bootstrapped like every other score
    report = (out / "report.md").read_text()
    assert "## Thresholds of the meta-learner" in report and "sample-F1@t" in report
    assert f"| DR | {' | '.join(f'{t:.3f}' for t in thr[:, 0])} |" in report


def test_an_overfitting_meta_learner_keeps_its_sensitivity(tmp_path):
    """Deep trees on few rows with rare classes: the in-sample rule (issue 15) collapses sensitivity, the
    out-of-fold rule does not."""
    runs, data = make_oof_inputs(tmp_path, n=400, models=("a", "b", "c"), prevalence=0.08, strength=1.2, seed=7)
    deep = MetaParams(n_estimators=200, max_depth=8, learning_rate=0.3, min_child_weight=0.1, n_jobs=1)
    cfg = StackConfig(runs=runs, data=data, out=tmp_path / "stack", strategy="native", device="cpu", bootstrap=0,
                      params=deep, progress=False)  # fmt: skip
    result = run_stack(cfg)
    X, Y, folds, t = result.table.X(), result.table.Y(), result.table.folds(), result.table
    reported = result.scores.filter((pl.col("model") == META_ROW) & (pl.col("class") == "macro"))
    macro = dict(reported.select("metric", "value").iter_rows())
    # the old rule on the same meta-OOF: each fold's threshold F1-optimal on its model's in-sample predictions
    old = np.zeros((5, len(t.targets)))
    for f in range(5):
        model = create_meta_learner(t.feature_columns, t.targets, params=deep).fit(X[folds != f], Y[folds != f])
        assert np.array_equal(model.predict_proba(X[folds == f]), result.nested.oof[folds == f])  # the same model
        in_sample = model.predict_proba(X[folds != f])
        old[f] = [_best_threshold_brute_force(Y[folds != f, j], in_sample[:, j]) for j in range(len(t.targets))]
    old_pred = result.nested.oof >= old[folds]
    old_sens = np.mean([(old_pred[:, j] & (Y[:, j] == 1)).sum() / Y[:, j].sum() for j in range(Y.shape[1])])
    assert old_sens < 0.3  # what the in-sample rule would have reported
    assert macro["sensitivity"] > 0.5 and macro["sensitivity"] > 2 * old_sens
    assert (old > result.nested.thresholds).mean() > 0.8  # in-sample thresholds sit too high
    assert macro["f1"] > macro["f1_05"] - 0.05  # tuning no longer costs F1 against 0.5
