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
    note_ratio = float(ours["note"].removeprefix("ratio "))  # from the rounded seconds: within 0.01 of the ratio
    assert ours["note"].startswith("ratio ") and note_ratio == pytest.approx(doc["ratio"], abs=0.011)


def test_bench_scale_goals_verify_from_100k_on():
    from benchmarks.bench_scale import goals

    def fig(n: int, verify: float) -> dict:
        return {"n": n, "verify_mb_per_s": verify, "pack_peak_pss_mb": 300.0, "pack_us_per_image": 200.0,
                "pack_vs_shardwriter_check": 2.5, "pack_vs_shardwriter_nocheck": 1.5}  # fmt: skip

    g = goals([fig(10_000, 420.0), fig(100_000, 650.0), fig(1_000_000, 580.0)], workers=2)["verify_mb_per_s"]
    assert (g["value"], g["at_n"], g["met"]) == (580.0, 1_000_000, True)
    g = goals([fig(10_000, 420.0), fig(100_000, 480.0), fig(1_000_000, 580.0)], workers=2)["verify_mb_per_s"]
    assert (g["value"], g["at_n"], g["met"]) == (480.0, 100_000, False)
    g = goals([fig(10_000, 420.0), fig(50_000, 510.0)], workers=2)["verify_mb_per_s"]  # --quick: the largest N
    assert (g["value"], g["at_n"]) == (510.0, 50_000)


def test_bench_scale_tiny_reports_what_it_measured(tmp_path, monkeypatch, capsys):
    """``retina-bench scale`` at two tiny sizes: the JSON line holds every figure per N, the goals computed from them,
    the rows printed in the table; the plot is written and the work folder left empty."""
    from benchmarks import bench_scale
    from benchmarks.cli import main

    monkeypatch.setattr(bench_scale, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(bench_scale, "OUT", tmp_path / "out")
    work = tmp_path / "work"
    assert main(["scale", "--sizes", "300,600", "--pool", "40", "--workers", "1", "--work", str(work)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(lines[-1])
    assert doc["benchmark"] == "scale" and doc["sizes"] == [300, 600] and doc["pool_images"] == 40
    per_n = doc["per_n"]
    assert [f["n"] for f in per_n] == [300, 600]
    for f in per_n:
        assert all(v > 0 for k, v in f.items()), f
        assert f["pack_images_per_s"] == pytest.approx(f["n"] / f["pack_seconds"], rel=1e-3)
        assert f["pack_peak_rss_mb"] >= f["pack_peak_rss_main_mb"] > 10  # a Python process at least
        assert 10 < f["pack_peak_pss_mb"] <= f["pack_peak_rss_mb"] * 1.01  # shared pages counted once
        assert f["pack_vs_shardwriter_check"] == pytest.approx(
            f["pack_images_per_s"] / f["shardwriter_check_images_per_s"], rel=1e-2
        )
    goals = doc["goals"]
    assert set(goals) == {"pack_peak_pss_gb_at_1m", "pack_cost_flatness", "pack_vs_shardwriter_check",
                          "pack_vs_shardwriter_nocheck", "verify_mb_per_s"}  # fmt: skip
    costs = [f["pack_us_per_image"] for f in per_n]
    assert goals["pack_cost_flatness"]["value"] == pytest.approx(max(costs) / min(costs), rel=1e-3)
    assert goals["verify_mb_per_s"]["value"] == pytest.approx(per_n[-1]["verify_mb_per_s"], rel=1e-3)  # no N >= 100k
    assert goals["pack_vs_shardwriter_check"]["value"] == per_n[-1]["pack_vs_shardwriter_check"]
    for g in goals.values():
        want = g["value"] / g["goal"] if g["direction"] == ">=" else g["goal"] / g["value"]
        assert g["fraction"] == pytest.approx(want, rel=1e-3) and g["met"] == (g["fraction"] >= 1.0)
    assert doc["ratio"] == pytest.approx(min(g["fraction"] for g in goals.values()), abs=1e-3)
    assert doc["goal"] == 1.0 and goals[doc["worst"]]["fraction"] == min(g["fraction"] for g in goals.values())
    rows = [line.strip("| ").split(" | ") for line in lines if line.startswith("| N=")]
    printed = {cells[0]: float(cells[1]) for cells in rows}
    assert len(doc["rows"]) == 8 * len(per_n) == len(printed)
    for row in doc["rows"]:
        assert printed[row["name"]] == pytest.approx(row["seconds"], abs=1.1e-3), row["name"]
    assert (tmp_path / "out" / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(work.iterdir()) == []
