"""The main job at a small scale, end to end, through its command line (slow: run with -m slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retina_train.backbones import TINY_BACKBONES
from retina_train.demo import DemoConfig, main


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--n", "300", "--size", "64", "--epochs", "1", "--n-external", "120",
            "--bootstrap", "20", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])  # the last line is one JSON object
    # the JSON line reports what the stages wrote: the stack's scores and the external evaluation's summary
    import polars as pl

    scores = pl.read_parquet(out / "runs" / "stack" / "scores.parquet")
    macro_auc = {m: v for m, c, k, v in scores.select("model", "class", "metric", "value").iter_rows()
                 if c == "macro" and k == "auc"}  # fmt: skip
    singles = {m: macro_auc[m] for m in TINY_BACKBONES}
    assert result["ensemble_macro_auc"] == pytest.approx(macro_auc["meta-learner"], abs=6e-5)
    assert result["best_single"] == max(singles, key=singles.get)
    assert result["best_single_macro_auc"] == pytest.approx(max(singles.values()), abs=6e-5)
    summary = json.loads((out / "runs" / "eval" / "rfmid" / "summary.json").read_text())
    assert result["external_macro_auc"] == pytest.approx(summary["macro_auc"]["meta-learner"], abs=6e-5)
    assert result["seconds"] > 0
    # one epoch on 240 images: little, but the six backbones learn something (0.62 on this machine) and the
    # shuffled-label control does not
    assert result["mean_of_backbones_macro_auc"] > 0.55
    assert abs(result["control_macro_auc"] - 0.5) < 0.15
    assert (out / "runs" / "stack" / "report.md").is_file()
    assert (out / "runs" / "eval" / "rfmid" / "report.md").is_file()
    for name in TINY_BACKBONES:
        assert len(list((out / "runs" / name).glob("fold*/oof-rank*.parquet"))) == 5
    # the ensemble in use: exported as a bundle, then retina-predict --cam on a handful of external photographs,
    # whose pictures the demo names before its JSON line
    assert {"ensemble_macro_auc", "best_single_macro_auc", "external_macro_auc", "seconds", "report", "bundle",
            "predict_contact_sheet"} <= set(result)  # fmt: skip
    from retina_train.bundle import Bundle

    bundle = Bundle.open(result["bundle"])  # every checksum checked
    assert [b.name for b in bundle.backbones] == sorted(TINY_BACKBONES)
    assert all(len(b.weights) == 5 for b in bundle.backbones)
    predictions = pl.read_csv(out / "predict" / "predictions.csv")
    assert predictions.height == 6 and sorted(predictions["id"]) == sorted(
        p.name for p in (out / "new-photos").iterdir()
    )
    sheet = Path(result["predict_contact_sheet"])
    assert sheet.is_file() and sheet == out / "predict" / "cam" / "contact_sheet.png"
    overlays = pl.read_csv(out / "predict" / "cam" / "cams.csv")["file"].to_list()
    assert overlays and all((sheet.parent / f).is_file() for f in overlays)
    before_json = printed.strip().splitlines()[:-1]
    assert f"Grad-CAM contact sheet: {sheet}" in before_json
    assert all(f"  {sheet.parent / f}" in before_json for f in overlays)
    assert any(line.startswith(f"bundle: {result['bundle']}") for line in before_json)


def test_paper_mode_overrides(tmp_path):
    """--backbones paper: each config's own recipe, with the demo's data and device; weights as the user chose."""
    from retina_train.config import resolve_config
    from retina_train.demo import DemoConfig, backbone_overrides

    weights = tmp_path / "RETFound_cfp_weights.pth"
    weights.write_bytes(b"x")
    cfg = DemoConfig(backbones="paper", pretrained="none", retfound_weights=weights, paper_epochs=2)
    kw = dict(data=tmp_path / "shards", runs=tmp_path / "runs", device="cpu")
    resnet = resolve_config("resnet50", overrides=backbone_overrides(cfg, "resnet50", **kw))
    assert resnet.data.image_size == 224 and resnet.train.epochs == 2 and resnet.model.pretrained == "none"
    assert resnet.data.dataset == str(tmp_path / "shards") and resnet.out == str(tmp_path / "runs")
    retfound = resolve_config("retfound", overrides=backbone_overrides(cfg, "retfound", **kw))
    assert retfound.model.pretrained_file == str(weights) and retfound.model.layer_decay == 0.65
    timm_cfg = DemoConfig(backbones="paper", pretrained="timm")
    assert backbone_overrides(timm_cfg, "retfound", **kw)["model"]["pretrained"] == "none", "not on the timm hub"
    tiny = resolve_config("tiny_vit", overrides=backbone_overrides(DemoConfig(), "tiny_vit", **kw))
    assert tiny.data.image_size == 64 and tiny.train.epochs == 3
    from retina_train.demo import DemoError, run_demo

    with pytest.raises(DemoError, match="retfound-weights .*missing.pth: no such file"):
        run_demo(DemoConfig(backbones="paper", retfound_weights=tmp_path / "missing.pth", out=tmp_path / "d"))
    assert not (tmp_path / "d").exists(), "refused before any work"
    with pytest.raises(SystemExit):
        main(["--pretrained", "none"])  # paper-only options refused with the tiny backbones


def test_rerun_into_a_demo_with_other_data_settings_is_refused(tmp_path, capsys):
    from retina_train.demo import DemoError, run_demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text('{"n": 1500, "size": 96, "seed": 0, "folds": 5, "n_external": 400, '
                                   '"external_layout": "rfmid"}')  # fmt: skip
    with pytest.raises(DemoError, match=r"n: 1500 -> 300"):
        run_demo(DemoConfig(out=out, n=300, device="cpu"))
    assert main(["--out", str(out), "--n", "300", "--device", "cpu"]) == 2
    assert "other data settings" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["demo.json"], "nothing generated over the old demo"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n", "0"], "--n must be at least the 5 folds; got 0"),
        (["--n", "-5"], "--n must be at least the 5 folds; got -5"),
        (["--size", "-3"], "--size must be 0 (the backbones' default) or >= 32 pixels; got -3"),
        (["--epochs", "0"], "--epochs must be >= 1; got 0"),
        (["--n-external", "0"], "--n-external must be >= 2 (it is packed into 2 folds); got 0"),
        (["--bootstrap", "-1"], "--bootstrap must be >= 0; got -1"),
    ],
)
def test_bad_options_leave_no_claim_on_out(tmp_path, capsys, extra, message):
    """Issue 11, points 9 and 10: a refused option is one line, exit 2, and writes nothing (the first --n 0 used to
    write demo.json, and every corrected rerun was then refused as 'other data settings')."""
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--device", "cpu", *extra]) == 2
    assert capsys.readouterr().err == f"retina-demo: error: {message}\n"
    assert not out.exists()
