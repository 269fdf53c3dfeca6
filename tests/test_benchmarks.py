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
    # the combined figure is the worst benchmark's fraction of its goal, as documented
    fractions = {k: doc[k]["ratio"] / doc[k]["goal"] for k in doc}
    assert result.ratio == pytest.approx(min(fractions.values()), abs=2e-3)
    assert result.extra["worst"] == min(fractions, key=fractions.get)
    for k in doc:  # every timed row did work in positive time; a row not run here (a GPU row) says why
        rows = doc[k]["rows"]
        assert rows and all(r.get("skipped") or (r["seconds"] > 0 and r["images_per_s"] > 0) for r in rows), k
    train = doc["train"]
    table = (tmp_path / "all.md").read_text()
    for name in TINY_BACKBONES:
        ceiling, fed = train[f"{name}_ceiling_images_per_s"], train[f"{name}_fed_images_per_s"]
        assert ceiling > 0 and fed > 0 and train[f"{name}_dali_loader_images_per_s"] > 0
        assert train[f"{name}_wds_loader_images_per_s"] > 0
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) == pytest.approx(fed / ceiling, abs=0.006), "fed / model column from the JSON"
    sweep = train["loader_settings_sweep"]
    best = sweep["best"]
    fastest = max(r["images_per_s"] for r in sweep["runs"])
    assert best["images_per_s"] == pytest.approx(fastest, abs=0.1), "best is the fastest setting"
    assert best["num_threads"] >= 1 and best["prefetch_queue_depth"] >= 1
    assert f"Best: `num_threads={best['num_threads']}`" in table
    for name in doc:  # the goal table says 'met' exactly when the ratio reaches the goal
        met = "yes" if doc[name]["ratio"] >= doc[name]["goal"] else "no"
        assert f"| {name} | {doc[name]['ratio']:.3f} | {doc[name]['goal']} | {met} |" in table


def test_bench_predict_quick_json_matches_table(tmp_path, capsys, monkeypatch):
    """`retina-bench predict` at a tiny size: retina-predict and the plain loops predict every photograph, and the
    JSON line says what the table says (rows, images/s, the ratio over the batch-1 baseline)."""
    from benchmarks import bench_predict
    from benchmarks.cli import main

    real = bench_predict.run
    monkeypatch.setattr(bench_predict, "run", lambda **kw: real(**kw, cache=tmp_path, n=6))
    assert main(["predict", "--quick", "--workers", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(lines[-1])
    assert doc["benchmark"] == "predict" and doc["goal"] == 3.0
    assert doc["images"] == 6 and doc["fold_models"] == 4 and doc["workers"] == 1
    table = [line for line in lines[:-1] if line.startswith("| ") and not line.startswith(("| run ", "| ---"))]
    assert len(table) == len(doc["rows"]) == 3
    for line, row in zip(table, doc["rows"], strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["name"] and float(cells[1]) == pytest.approx(row["seconds"], abs=1e-3)
        assert float(cells[2].replace(",", "")) == pytest.approx(row["images_per_s"], abs=0.6)
        assert row["seconds"] > 0 and row["images_per_s"] > 0
    baseline, batched, ours = doc["rows"]
    assert "baseline" in baseline["name"] and ours["name"].startswith("retina-predict")
    assert doc["ratio"] == pytest.approx(baseline["seconds"] / ours["seconds"], rel=0.01)
    assert ours["note"] == f"ratio {doc['ratio']:.2f}"
