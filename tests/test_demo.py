"""The main job at a small scale, end to end (slow: run with -m slow)."""

from __future__ import annotations

import pytest

from retina_train.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    result = run_demo(DemoConfig(out=tmp_path / "demo", n=300, size=64, epochs=1, n_external=120, bootstrap=20,
                                 device="cpu"))  # fmt: skip
    for key in ("ensemble_macro_auc", "best_single_macro_auc", "external_macro_auc", "seconds"):
        assert key in result
    assert 0.0 <= result["ensemble_macro_auc"] <= 1.0
    assert abs(result["control_macro_auc"] - 0.5) < 0.15
    assert (tmp_path / "demo" / "runs" / "stack" / "report.md").is_file()
    assert (tmp_path / "demo" / "runs" / "eval" / "rfmid" / "report.md").is_file()
    for name in ("tiny_resnet", "tiny_efficientnet", "tiny_convnext", "tiny_vit", "tiny_swinv2", "tiny_retfound"):
        assert len(list((tmp_path / "demo" / "runs" / name).glob("fold*/oof-rank*.parquet"))) == 5
