"""retina-export and retina-predict: the bundle round trip, its refusals, and predictions equal to retina-eval's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from retina_io.pack import PackConfig, pack
from retina_train.bundle import Bundle, BundleError, ExportConfig, export_bundle
from retina_train.bundle import main as export_main
from retina_train.predict import EXIT_REJECTS, PredictConfig, PredictError, predict_bundle
from retina_train.predict import main as predict_main
from tests.test_evaluate import BACKBONES, _fake_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny trained run (two backbones x 2 folds, random weights, real OOF), its meta-learner, an external set."""
    from retina_io.synth import generate_dataset
    from retina_train.stack import StackConfig, run_stack

    root = tmp_path_factory.mktemp("predict")
    labels = generate_dataset(root / "synfundus", n=60, size=64, seed=5, workers=1, progress=False)
    pack(PackConfig(images=root / "synfundus", labels=labels, preset="synfundus", out=root / "shards" / "synfundus",
                    folds=2, workers=1, progress=False))  # fmt: skip
    _fake_training(root / "runs", root / "shards" / "synfundus")
    run_stack(StackConfig(runs=root / "runs", data=root / "shards" / "synfundus", out=root / "runs" / "stack",
                          bootstrap=0, progress=False, control_max_rows=60))  # fmt: skip
    lab = generate_dataset(root / "aptos", n=24, size=64, seed=11, workers=1, layout="aptos", progress=False)
    pack(PackConfig(images=lab.parent / "train_images", labels=lab, preset="aptos", out=root / "shards" / "aptos",
                    folds=2, workers=1, progress=False))  # fmt: skip
    export_bundle(ExportConfig(runs=root / "runs", out=root / "ens.retina"))
    return root


def test_export_writes_a_checked_bundle(trained, tmp_path, capsys):
    b = Bundle.open(trained / "ens.retina")
    assert [x.name for x in b.backbones] == list(BACKBONES)
    assert all(len(x.weights) == 2 for x in b.backbones)
    assert b.backbones[0].preprocess["image_size"] == 48 and b.backbones[0].preprocess["local_contrast"] > 0
    info = json.loads((trained / "ens.retina" / "bundle.json").read_text())
    assert info["classes_present"] == list(info["classes"]) and info["training_data"]["k"] == 2
    assert {"torch", "timm", "xgboost"} <= set(info["versions"])
    manifest = json.loads((trained / "ens.retina" / "manifest.json").read_text())
    on_disk = {p.relative_to(trained / "ens.retina").as_posix() for p in (trained / "ens.retina").rglob("*")
               if p.is_file()} - {"manifest.json"}  # fmt: skip
    assert set(manifest["files"]) == on_disk
    assert {"meta/meta.json", "models/tiny_vit/fold1.safetensors"} <= on_disk
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in (trained / "ens.retina").rglob("*"))
    meta = b.meta_learner()
    assert meta.thresholds and set(meta.thresholds) == set(meta.classes)
    # the command line: a second export into an existing folder is refused
    assert export_main(["--runs", str(trained / "runs"), "--out", str(trained / "ens.retina")]) == 2
    assert "exists" in capsys.readouterr().err
    assert export_main(["--runs", str(trained / "runs"), "--out", str(tmp_path / "b.retina")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fold_models"] == 4


def _copy(trained, tmp_path) -> Path:
    dst = tmp_path / "copy.retina"
    shutil.copytree(trained / "ens.retina", dst)
    return dst


def test_bundle_refuses_damage(trained, tmp_path):
    b = _copy(trained, tmp_path)
    fold = b / "models" / "tiny_resnet" / "fold1.safetensors"
    data = bytearray(fold.read_bytes())
    data[-1] ^= 1
    fold.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"models/tiny_resnet/fold1.safetensors.*differ"):
        Bundle.open(b)
    fold.unlink()
    with pytest.raises(BundleError, match=r"fold model\(s\) \['models/tiny_resnet/fold1.safetensors'\].*missing"):
        Bundle.open(b)
    m = json.loads((b / "manifest.json").read_text())
    del m["files"]["models/tiny_resnet/fold1.safetensors"]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"fold model\(s\) \['models/tiny_resnet/fold1.safetensors'\] of backbone"):
        Bundle.open(b)
    b2 = _copy(trained, tmp_path / "v")
    m = json.loads((b2 / "manifest.json").read_text())
    m["version"] = 99
    (b2 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest.json: bundle format version 99"):
        Bundle.open(b2)
    m["version"], m["files"]["../x"] = 1, {"sha256": "0", "bytes": 1}
    (b2 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not a plain path"):
        Bundle.open(b2)


def test_export_refuses_partial_ensembles(trained, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(trained / "runs", runs)
    (runs / "tiny_vit" / "fold1" / "best.safetensors").unlink()
    with pytest.raises(BundleError, match=r"tiny_vit/fold1/best.safetensors'\] missing"):
        export_bundle(ExportConfig(runs=runs, out=tmp_path / "x.retina"))
    assert not (tmp_path / "x.retina").exists()
    shutil.rmtree(runs / "tiny_vit")
    with pytest.raises(BundleError, match="trained on backbones"):
        export_bundle(ExportConfig(runs=runs, out=tmp_path / "x.retina"))


def test_predict_data_equals_retina_eval(trained, tmp_path):
    """On a packed dataset, retina-predict's meta-learner probabilities are retina-eval's."""
    from retina_train.evaluate import EvalConfig, evaluate_external

    data = trained / "shards" / "aptos"
    ev = evaluate_external(EvalConfig(runs=trained / "runs", data=data, out=tmp_path / "eval", bootstrap=0,
                                      backend="wds", batch_size=16))  # fmt: skip
    res = predict_bundle(PredictConfig(bundle=trained / "ens.retina", data=data, out=tmp_path / "pred",
                                       backend="wds", batch_size=16, workers=1, progress=False))  # fmt: skip
    assert res.exit_code == 0 and res.predictions.height == ev.predictions.height == 24
    joined = ev.predictions.join(res.predictions, on="key", suffix="_p")
    classes = [c for c in ev.predictions.columns if c not in ("key", "id")]
    assert joined.height == 24 and joined["id"].to_list() == joined["id_p"].to_list()
    diff = max(float((joined[c] - joined[c + "_p"]).abs().max()) for c in classes)
    assert diff < 1e-6, diff
    out = pl.read_csv(tmp_path / "pred" / "predictions.csv")
    assert out.height == 24 and "tiny_vit__DR" in out.columns and "GC_positive" in out.columns
    assert set(out["GC_positive"].unique().to_list()) <= {0, 1}


def test_predict_images_with_rejects(trained, tmp_path, capsys):
    """A folder of photographs in several formats: bad files are rejected with the packer's reasons (exit 3), the
    rest get the same probabilities as the packed copies of the same images."""
    src = trained / "aptos" / "train_images"
    images = tmp_path / "photos"
    (images / "sub").mkdir(parents=True)
    names = sorted(p.name for p in src.iterdir())[:6]
    for n in names[:3]:
        shutil.copyfile(src / n, images / n)
    for n in names[3:5]:  # the same pixels as TIFF and BMP: converted to PNG, as the packer does
        Image.open(src / n).save(images / "sub" / (Path(n).stem + ".tiff"))
    Image.open(src / names[5]).save(images / "sub" / (Path(names[5]).stem + ".bmp"))
    (images / "notes.txt").write_text("not an image")
    (images / "cut.png").write_bytes((src / names[0]).read_bytes()[:300])
    (images / "empty.jpg").write_bytes(b"")
    out = tmp_path / "pred"
    code = predict_main(["--bundle", str(trained / "ens.retina"), "--images", str(images), "--out", str(out),
                         "--device", "cpu", "--workers", "1", "--batch-size", "4"])  # fmt: skip
    assert code == EXIT_REJECTS, capsys.readouterr().err
    rej = pl.read_parquet(out / "rejects.parquet")
    assert dict(zip(rej["id"], rej["reason"], strict=True)) == {
        "notes.txt": "not_an_image", "cut.png": "corrupt_image", "empty.jpg": "empty_file"}  # fmt: skip
    pred = pl.read_parquet(out / "predictions.parquet")
    assert pred.height == 6 and pred["id"][0] == names[0]
    # the same images through the packed dataset (its loader) give the same backbone probabilities
    ref = predict_bundle(PredictConfig(bundle=trained / "ens.retina", data=trained / "shards" / "aptos", backend="wds",
                                       out=tmp_path / "ref", workers=1, progress=False)).predictions  # fmt: skip
    stem = {Path(i).stem: i for i in pred["id"]}
    ref = ref.filter(pl.col("id").is_in(list(stem))).with_columns(pl.col("id").replace(stem)).sort("id")
    pred = pred.sort("id")
    feats = [c for c in pred.columns if "__" in c]
    assert np.abs(pred.select(feats).to_numpy() - ref.select(feats).to_numpy()).max() < 1e-5
    # all rejected: exit 2 with a message naming the folder, and the rejects still written
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("x")
    with pytest.raises(PredictError, match="nothing to predict"):
        predict_bundle(PredictConfig(bundle=trained / "ens.retina", images=bad, out=tmp_path / "o2", workers=0))
    assert pl.read_csv(tmp_path / "o2" / "rejects.csv").height == 1


def test_tta_makes_predictions_mirror_invariant(trained, tmp_path):
    """--tta averages each fold model over the image and its mirror image: a mirrored photograph then gets the
    original's probabilities, which it does not without --tta."""
    src = trained / "aptos" / "train_images"
    images = tmp_path / "photos"
    images.mkdir()
    for n in sorted(p.name for p in src.iterdir())[:4]:
        im = Image.open(src / n)
        im.save(images / f"{Path(n).stem}.png")
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / f"{Path(n).stem}_mirror.png")

    def spread(tta: bool) -> float:
        pred = predict_bundle(PredictConfig(bundle=trained / "ens.retina", images=images, out=tmp_path / str(tta),
                                            tta=tta, workers=0, progress=False)).predictions  # fmt: skip
        pred = pred.sort("id")  # a.png, a_mirror.png, b.png, ...
        cols = [c for c in pred.columns if "__" in c]
        x = pred.select(cols).to_numpy()
        return float(np.abs(x[0::2] - x[1::2]).max())

    assert spread(False) > 1e-3
    assert spread(True) < 1e-5


def test_cam_overlays(trained, tmp_path, monkeypatch):
    """--cam: one PNG per (photograph, predicted-positive class), a contact sheet, and their list with each
    backbone's weight for that class (the meta-learner's importance, summing to 1)."""
    real = Bundle.meta_learner

    def dr_only(self):  # DR positive everywhere, nothing else: a known set of maps
        meta = real(self)
        meta.thresholds = {c: (0.0 if c == "DR" else 1.1) for c in meta.classes}
        return meta

    monkeypatch.setattr(Bundle, "meta_learner", dr_only)
    src = trained / "aptos" / "train_images"
    images = tmp_path / "photos"
    images.mkdir()
    for n in sorted(p.name for p in src.iterdir())[:3]:
        shutil.copyfile(src / n, images / n)
    res = predict_bundle(PredictConfig(bundle=trained / "ens.retina", images=images, out=tmp_path / "o", cam=True,
                                       workers=0, progress=False))  # fmt: skip
    cams = pl.read_csv(tmp_path / "o" / "cam" / "cams.csv")
    assert cams["class"].to_list() == ["DR"] * 3 and cams["id"].to_list() == sorted(res.predictions["id"])
    weights = cams.select("weight_tiny_resnet", "weight_tiny_vit").to_numpy()
    assert np.allclose(weights.sum(axis=1), 1.0) or np.allclose(weights, 0.0)
    for f in [*cams["file"], "contact_sheet.png"]:
        with Image.open(tmp_path / "o" / "cam" / f) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    assert len(res.cam_files) == 4
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["positives"]["DR"] == 3 and len(summary["cam"]) == 4
    with pytest.raises(PredictError, match="--cam draws over photographs"):
        predict_bundle(PredictConfig(bundle=trained / "ens.retina", data=trained / "shards" / "aptos",
                                     out=tmp_path / "o2", cam=True))  # fmt: skip
