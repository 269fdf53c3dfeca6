"""The benchmark suite runs end to end and reports every figure the issue asks for (slow: run with -m slow)."""

from __future__ import annotations

import json

import pytest

from retina_train.backbones import TINY_BACKBONES


@pytest.mark.slow
def test_bench_all_quick_reports_every_figure(tmp_path, monkeypatch):
    from benchmarks import bench_all

    monkeypatch.setattr(bench_all, "OUT", tmp_path)
    result = bench_all.run(quick=True)
    doc = json.loads((tmp_path / "all.json").read_text())
    assert set(doc) == {"shard", "loader", "train", "stack"}
    assert all(doc[k]["ratio"] > 0 for k in doc) and result.ratio > 0
    train = doc["train"]
    for name in TINY_BACKBONES:
        for figure in ("ceiling", "fed", "dali_loader", "wds_loader"):
            assert train[f"{name}_{figure}_images_per_s"] > 0, (name, figure)
    best = train["loader_settings_sweep"]["best"]
    assert best["num_threads"] >= 1 and best["prefetch_queue_depth"] >= 1 and best["images_per_s"] > 0
    table = (tmp_path / "all.md").read_text()
    assert all(f"| {name} |" in table for name in TINY_BACKBONES) and "Best: `num_threads=" in table
