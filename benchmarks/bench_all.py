"""``retina-bench all``: every benchmark in one run, one JSON file and one markdown table.

Runs ``shard``, ``loader``, ``train`` and ``stack`` (each against its own baseline, as when run alone) and writes
``bench-out/all.json`` and ``bench-out/all.md``: the per-backbone table (model-only training images/s, loader-fed
training images/s, their ratio, loader-only images/s of each loader) plus the packing and stacking figures.
``ratio`` here is the worst benchmark's fraction of its goal (``min(ratio / goal)``), so 1.0 means every goal is met.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks.common import BenchResult, Row, machine

OUT = Path(os.environ.get("RETINA_BENCH_OUT", "bench-out"))


def run(*, quick: bool = False, workers: int = 2, backbones: str = "tiny") -> BenchResult:
    from benchmarks import bench_loader, bench_shard, bench_stack, bench_train

    results = {
        "shard": bench_shard.run(quick=quick, workers=workers),
        "loader": bench_loader.run(quick=quick, workers=workers),
        "train": bench_train.run(quick=quick, workers=workers, backbones=backbones),
        "stack": bench_stack.run(quick=quick, workers=workers),
    }
    loader_rows = {r.name: r.per_second for r in results["loader"].rows}
    dali = next(v for k, v in loader_rows.items() if k.startswith("retina DALI"))
    wds = next(v for k, v in loader_rows.items() if k.startswith("retina fallback"))
    folder = next(v for k, v in loader_rows.items() if k.startswith("torchvision"))
    tx = results["train"].extra
    backbones = [k.removesuffix("_ceiling_images_per_s") for k in tx if k.endswith("_ceiling_images_per_s")]
    lines = [
        "| backbone | model only img/s | fed by DALI img/s | fed / model | DALI loader alone img/s | "
        "fallback loader alone img/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in backbones:
        ceiling, fed = tx[f"{b}_ceiling_images_per_s"], tx[f"{b}_fed_images_per_s"]
        b_dali, b_wds = tx.get(f"{b}_dali_loader_images_per_s"), tx.get(f"{b}_wds_loader_images_per_s")
        lines.append(f"| {b} | {ceiling:,.0f} | {fed:,.0f} | {fed / ceiling:.2f} | {b_dali or 0:,.0f} | "
                     f"{b_wds or 0:,.0f} |")  # fmt: skip
    lines += ["", f"Loader benchmark at 224 px (train augmentations): DALI {dali:,.0f} img/s, fallback {wds:,.0f} "
              f"img/s, torchvision ImageFolder + PIL {folder:,.0f} img/s."]  # fmt: skip
    sweep = tx.get("loader_settings_sweep")
    if sweep:
        lines += ["", f"Loader settings for the most loader-bound backbone ({sweep['backbone']}), fed img/s:", "",
                  "| settings | fed img/s |", "| --- | ---: |"]  # fmt: skip
        lines += [f"| {r['settings']} | {r['images_per_s']:,.0f} |" for r in sweep["runs"]]
        best = {k: v for k, v in sweep["best"].items() if k != "images_per_s"}
        lines += ["", "Best: " + ", ".join(f"`{k}={v}`" for k, v in best.items())]
    lines += ["", "| benchmark | ratio | goal | met |", "| --- | ---: | ---: | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r.ratio:.3f} | {r.goal} | {'yes' if r.ratio >= r.goal else 'no'} |")
    extras = {"shard_resize_ratio": results["shard"].extra.get("resize_ratio"),
              "train_deepspeed_overhead": tx.get("deepspeed_overhead")}  # fmt: skip
    lines += ["", *(f"- {k}: {v}" for k, v in extras.items() if v is not None), "", f"machine: {machine()}"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "all.md").write_text("\n".join(lines) + "\n")
    doc = {name: r.to_json() for name, r in results.items()}
    (OUT / "all.json").write_text(json.dumps(doc, indent=1))
    worst = min(results, key=lambda k: results[k].ratio / results[k].goal)
    rows = [Row(f"{name}: ratio {r.ratio:.3f} (goal {r.goal})", sum(x.seconds for x in r.rows), 1)
            for name, r in results.items()]  # fmt: skip
    return BenchResult(benchmark="all", ratio=results[worst].ratio / results[worst].goal, goal=1.0, rows=rows,
                       extra={"worst": worst, "json": str(OUT / "all.json"), "markdown": str(OUT / "all.md"),
                              **{f"{k}_ratio": round(r.ratio, 3) for k, r in results.items()}})  # fmt: skip
