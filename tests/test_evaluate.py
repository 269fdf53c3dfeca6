"""retina-eval end to end: fold models of tiny backbones -> OOF -> retina-stack -> zero-shot on external layouts."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch

from retina_io.dataset import PackedDataset
from retina_io.loader import LoaderConfig, build_loader
from retina_io.pack import PackConfig, pack
from retina_train.backbones import create_backbone
from retina_train.config import resolve_config, to_dict
from retina_train.evaluate import EvalConfig, EvalError, evaluate_external, main
from retina_train.inference import predict
from retina_train.oof import write_oof

BACKBONES = ("tiny_resnet", "tiny_vit")


def _fake_training(runs: Path, data: Path) -> None:
    """What training leaves behind, without the training: config, fold models and their real OOF predictions."""
    from safetensors.torch import save_file

    ds = PackedDataset.open(data)
    for b, name in enumerate(BACKBONES):
        cfg = resolve_config(name, overrides={"data": {"dataset": str(data), "image_size": 48}, "out": str(runs)})
        model_dir = runs / name
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text(json.dumps(to_dict(cfg)))
        for k in range(ds.k):
            torch.manual_seed(100 * b + k)
            model = create_backbone(name, image_size=48)
            (model_dir / f"fold{k}").mkdir()
            save_file(
                {n: t.contiguous() for n, t in model.state_dict().items()},
                str(model_dir / f"fold{k}" / "best.safetensors"),
            )
            loader = build_loader(LoaderConfig(data=data, folds=[k], mode="eval", image_size=48, batch_size=16,
                                               num_threads=1))  # fmt: skip
            keys, probs, _ = predict(model, loader, device=torch.device("cpu"))
            write_oof(model_dir / f"fold{k}" / "oof-rank0.parquet", keys, probs, fold=k)
            if b == 0:  # training records the dataset's k in done.json; the other backbone falls back to the dataset
                (model_dir / f"fold{k}" / "done.json").write_text(json.dumps({"fold": k, "k": ds.k}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from retina_io.synth import generate_dataset
    from retina_train.stack import StackConfig, run_stack

    root = tmp_path_factory.mktemp("eval")
    labels = generate_dataset(root / "synfundus", n=120, size=64, seed=5, workers=1, progress=False)
    pack(PackConfig(images=root / "synfundus", labels=labels, preset="synfundus", out=root / "shards" / "synfundus",
                    folds=3, workers=1, progress=False))  # fmt: skip
    _fake_training(root / "runs", root / "shards" / "synfundus")
    run_stack(StackConfig(runs=root / "runs", data=root / "shards" / "synfundus", out=root / "runs" / "stack",
                          bootstrap=0, progress=False))  # fmt: skip
    for layout, n in (("rfmid", 90), ("airogs", 60), ("aptos", 60)):
        lab = generate_dataset(root / layout, n=n, size=64, seed=11, workers=1, layout=layout, progress=False)
        images = lab.parent / {"rfmid": "images", "airogs": "images", "aptos": "train_images"}[layout]
        pack(PackConfig(images=images, labels=lab, preset=layout, out=root / "shards" / layout, folds=2, workers=1,
                        progress=False))  # fmt: skip
    return root


@pytest.mark.parametrize(("layout", "expected"), [("rfmid", None), ("airogs", ["GC"]), ("aptos", ["DR"])])
def test_zero_shot_on_external_layouts(trained, layout, expected):
    data = trained / "shards" / layout
    out = trained / "runs" / "eval" / layout
    result = evaluate_external(EvalConfig(runs=trained / "runs", data=data, out=out, bootstrap=20))
    index = pl.read_parquet(data / "index.parquet")
    present = PackedDataset.open(data).classes_present
    if expected is None:  # RFMiD: the mapped classes that have both labels in this sample
        expected = [c for c in present if 0 < index[c].sum() < index.height]
        assert len(expected) >= 3
    assert result.classes == expected
    assert result.predictions.height == index.height
    assert sorted(result.predictions["key"].to_list()) == sorted(index["key"].to_list())
    rows = set(result.scores["model"].unique().to_list())
    assert rows == {*BACKBONES, "mean of backbones", "meta-learner"}
    assert set(result.scores["class"].unique().to_list()) == {*expected, "macro", "micro", "samples"}
    for name in (
        "report.md",
        "roc.png",
        "calibration.png",
        "importance.png",
        "predictions.parquet",
        "scores.parquet",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    assert 0.0 <= result.macro() <= 1.0


def test_fold_models_predict_any_batch_source(trained):
    """What ``retina-predict`` will do: the fold models of a backbone folder over batches it makes itself (no labels;
    bare image tensors get their position as key) give what the packed-dataset path gives."""
    import numpy as np

    from retina_io.loader import Batch
    from retina_train.inference import BackboneRun, fold_mean, predict_backbone

    data, model_dir = trained / "shards" / "aptos", trained / "runs" / "tiny_resnet"
    keys, probs = predict_backbone(model_dir, data, backend="wds", num_threads=1)
    run = BackboneRun.open(model_dir)
    assert run.settings.image_size == 48 and len(run.weights) == 3

    def loader_for(model):
        return build_loader(run.loader_config(model, data=data, folds=range(2), mode="eval", batch_size=64,
                                              backend="wds", num_threads=1))  # fmt: skip

    unlabelled = fold_mean(run, lambda model: [Batch(b.images, None, b.keys) for b in loader_for(model).iter_epoch(0)])
    assert np.array_equal(unlabelled[0], keys) and np.array_equal(unlabelled[1], probs)
    model = run.load(run.weights[0])
    k, p, y = predict(model, loader_for(model), "cpu")
    assert y is not None and len(k) == len(y) == PackedDataset.open(data).index().height
    images = [b.images[b.keys >= 0] for b in loader_for(model).iter_epoch(0)]
    k2, p2, y2 = predict(model, images, "cpu")
    assert y2 is None and np.array_equal(k2, np.arange(len(k))) and np.abs(p2 - p).max() < 1e-5
    k3, p3, _ = predict(model, [], "cpu")
    assert k3.shape == (0,) and p3.shape == (0, 11)


def test_errors_name_the_input(trained, tmp_path, capsys):
    # a run whose backbones differ from the meta-learner's features
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(trained / "runs", runs)
    shutil.rmtree(runs / "tiny_vit")
    with pytest.raises(EvalError, match="do not match the meta-learner"):
        evaluate_external(EvalConfig(runs=runs, data=trained / "shards" / "aptos", out=tmp_path / "o", bootstrap=0))
    # no meta-learner yet
    shutil.rmtree(runs / "stack")
    with pytest.raises(EvalError, match="retina-stack"):
        evaluate_external(EvalConfig(runs=runs, data=trained / "shards" / "aptos", out=tmp_path / "o", bootstrap=0))
    # missing fold models
    runs2 = tmp_path / "runs2"
    shutil.copytree(trained / "runs", runs2)
    for f in (runs2 / "tiny_vit").glob("fold*/best.safetensors"):
        f.unlink()
    assert main(["--runs", str(runs2), "--data", str(trained / "shards" / "aptos"), "--out", str(tmp_path / "p"),
                 "--device", "cpu"]) == 2  # fmt: skip
    assert "no fold models" in capsys.readouterr().err


def test_dataset_sharing_no_class(trained, tmp_path, monkeypatch):
    import retina_train.stack as stack

    real = stack.load_meta_learner

    def only_amd(path):
        meta = real(path)
        meta.classes = ["AMD"]
        return meta

    monkeypatch.setattr(stack, "load_meta_learner", only_amd)
    with pytest.raises(EvalError, match="share no class"):
        evaluate_external(EvalConfig(runs=trained / "runs", data=trained / "shards" / "aptos", out=tmp_path / "o"))


def _without_fold_model(trained: Path, tmp_path: Path, backbone: str, fold: int) -> Path:
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(trained / "runs", runs, ignore=shutil.ignore_patterns("eval"))
    (runs / backbone / f"fold{fold}" / "best.safetensors").unlink()
    return runs


@pytest.mark.parametrize("backbone", BACKBONES)  # k from done.json (tiny_resnet) / from the dataset (tiny_vit)
def test_missing_fold_model_is_refused_naming_it(trained, tmp_path, capsys, backbone):
    """Issue 11, point 8: one fold model missing used to give exit 0, another AUC and a report saying "the mean of its
    fold models". Now: exit 2, one line naming the file, nothing written."""
    runs = _without_fold_model(trained, tmp_path, backbone, 2)
    out = tmp_path / "eval"
    argv = ["--runs", str(runs), "--data", str(trained / "shards" / "aptos"), "--out", str(out), "--device", "cpu",
            "--bootstrap", "0"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("retina-eval: error: fold model(s) missing: "), err
    assert str(runs / backbone / "fold2" / "best.safetensors") in err and "--allow-partial" in err
    assert not out.exists()


def test_allow_partial_says_so(trained, tmp_path, capsys, caplog):
    runs = _without_fold_model(trained, tmp_path, "tiny_vit", 1)
    out = tmp_path / "eval"
    argv = ["--runs", str(runs), "--data", str(trained / "shards" / "aptos"), "--out", str(out), "--device", "cpu",
            "--bootstrap", "0", "--allow-partial"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["partial"] is True
    assert "partial ensemble: tiny_vit uses 2 of its 3 fold models" in caplog.text
    missing = str(runs / "tiny_vit" / "fold1" / "best.safetensors")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"] is True
    assert summary["fold_models"]["tiny_vit"]["missing"] == [missing]
    assert (
        len(summary["fold_models"]["tiny_vit"]["used"]) == 2 and summary["fold_models"]["tiny_resnet"]["missing"] == []
    )
    report = (out / "report.md").read_text()
    assert "Partial ensemble" in report and "tiny_vit: 2 of 3 fold models" in report and missing in report
    assert "mean of all its fold models" not in report
    # the whole ensemble says so too
    whole = evaluate_external(EvalConfig(runs=trained / "runs", data=trained / "shards" / "aptos",
                                         out=tmp_path / "whole", bootstrap=0))  # fmt: skip
    assert whole.partial is False and json.loads((tmp_path / "whole" / "summary.json").read_text())["partial"] is False
    assert "mean of all its fold models" in (tmp_path / "whole" / "report.md").read_text()


def _per_fold_model_reference(model_dir: Path, data: Path) -> tuple:
    """What retina-eval computed before the ensemble path: one loader (one decode of the dataset) per fold model,
    one model in memory at a time, a float64 sum of the fold models' probabilities divided by their count."""
    import numpy as np

    from retina_train.inference import BackboneRun

    run = BackboneRun.open(model_dir)
    total, keys_ref = None, None
    for w in run.weights:
        model = run.load(w)
        loader = build_loader(run.loader_config(model, data=data, folds=range(2), mode="eval", batch_size=16,
                                                backend="wds", num_threads=1))  # fmt: skip
        keys, probs, _ = predict(model, loader, "cpu")
        order = np.argsort(keys)
        if keys_ref is None:
            keys_ref, total = keys[order], probs[order].astype(np.float64)
        else:
            assert np.array_equal(keys[order], keys_ref)
            total += probs[order]
    return keys_ref, total / len(run.weights)


def test_ensemble_decodes_once_per_preprocessing_group(trained, tmp_path, monkeypatch):
    """retina-eval's probabilities per backbone are the per-fold-model path's (to 1e-5), with one loader per
    preprocessing group instead of one per fold model, at the backbones' eval batch size."""
    import shutil

    import numpy as np

    from retina_io.schema import CLASSES, feature_name, parse_key
    from retina_train import inference

    data = trained / "shards" / "aptos"
    built = []

    def counting_build_loader(cfg):
        built.append(cfg)
        return build_loader(cfg)

    monkeypatch.setattr(inference, "build_loader", counting_build_loader)
    features = inference.predict_runs(trained / "runs", data, backend="wds", num_threads=1, progress=False)
    # tiny_resnet and tiny_vit share size, mean/std and local contrast: one pass for both backbones' 6 fold models
    assert len(built) == 1 and built[0].batch_size == 64  # tiny_resnet's micro-batch 16 -> eval batch 4 x 16
    keys = np.array([parse_key(k) for k in features["key"]])
    for name in BACKBONES:
        ref_keys, ref = _per_fold_model_reference(trained / "runs" / name, data)
        assert np.array_equal(keys, ref_keys)
        got = features.select([feature_name(name, c) for c in CLASSES]).to_numpy()
        assert np.abs(got - ref).max() < 1e-5, name
    # a backbone with other preprocessing gets its own pass, still one for all its fold models
    runs = tmp_path / "runs"
    shutil.copytree(trained / "runs", runs, ignore=shutil.ignore_patterns("eval", "stack"))
    cfg = json.loads((runs / "tiny_vit" / "config.json").read_text())
    cfg["data"]["local_contrast"] = 0.0
    (runs / "tiny_vit" / "config.json").write_text(json.dumps(cfg))
    built.clear()
    two = inference.predict_runs(runs, data, backend="wds", num_threads=1, batch_size=8, progress=False)
    assert len(built) == 2 and {c.local_contrast for c in built} == {0.0, 0.047}
    assert all(c.batch_size == 8 for c in built)
    resnet = [feature_name("tiny_resnet", c) for c in CLASSES]
    assert np.abs(two.select(resnet).to_numpy() - features.select(resnet).to_numpy()).max() < 1e-5


def test_inference_settings_follow_the_run():
    """bf16/fp16 autocast on a GPU as the run trained, fp32 on the CPU; channels-last for a CNN; eval batch >= 2x."""
    from retina_train.inference import autocast_dtype
    from retina_train.settings import default_eval_batch_size, resolve_settings

    cfg = resolve_config("tiny_resnet")
    assert autocast_dtype(resolve_settings(cfg, "cpu")) is None
    gpu = resolve_settings(cfg, "cuda")
    assert autocast_dtype(gpu) == torch.bfloat16 and gpu.channels_last and gpu.eval_batch_size == 64
    cfg.train.precision = "fp16"
    assert autocast_dtype(resolve_settings(cfg, "cuda")) == torch.float16
    cfg.train.precision = "bf16"
    assert autocast_dtype(resolve_settings(cfg, "cpu")) is None  # the CPU predicts in fp32
    assert not resolve_settings(resolve_config("tiny_vit"), "cuda").channels_last
    assert [default_eval_batch_size(b) for b in (1, 16, 64, 128, 512)] == [4, 64, 256, 256, 1024]
    cfg.data.eval_batch_size = 100
    assert resolve_settings(cfg, "cpu").eval_batch_size == 100


@pytest.mark.parametrize("damage", ["garbage", "a folder"])
def test_damaged_fold_model_is_one_line(trained, tmp_path, capsys, damage):
    """A fold model that is not a safetensors file of its backbone (cut short, overwritten, a folder) gave a traceback
    from safetensors; now one line naming the file."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(trained / "runs", runs, ignore=shutil.ignore_patterns("eval"))
    bad = runs / "tiny_resnet" / "fold1" / "best.safetensors"
    bad.unlink()
    if damage == "garbage":
        bad.write_bytes(b"not a safetensors file")
    else:
        bad.mkdir()
    argv = ["--runs", str(runs), "--data", str(trained / "shards" / "aptos"), "--out", str(tmp_path / "o"),
            "--device", "cpu", "--bootstrap", "0"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err  # after the progress bar of the fold models read before it
    line = err[err.index("retina-eval: error: ") :]
    assert line.startswith(f"retina-eval: error: {bad} is not usable weights of tiny_resnet") and line.count("\n") == 1
    assert "Traceback" not in err
