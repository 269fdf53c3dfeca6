"""The main job at a small scale, end to end, through its command line (slow: run with -m slow)."""

from __future__ import annotations

import json

import pytest

from retina_train.demo import main


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--n", "300", "--size", "64", "--epochs", "1", "--n-external", "120",
            "--bootstrap", "20", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the last line is one JSON object
    for key in ("ensemble_macro_auc", "best_single_macro_auc", "external_macro_auc", "seconds"):
        assert key in result
    assert 0.0 <= result["ensemble_macro_auc"] <= 1.0
    # one epoch on 240 images: little, but the six backbones learn something (0.62 on this machine) and the
    # shuffled-label control does not
    assert result["mean_of_backbones_macro_auc"] > 0.55
    assert abs(result["control_macro_auc"] - 0.5) < 0.15
    assert (out / "runs" / "stack" / "report.md").is_file()
    assert (out / "runs" / "eval" / "rfmid" / "report.md").is_file()
    for name in ("tiny_resnet", "tiny_efficientnet", "tiny_convnext", "tiny_vit", "tiny_swinv2", "tiny_retfound"):
        assert len(list((out / "runs" / name).glob("fold*/oof-rank*.parquet"))) == 5
