"""``retina-bench device``: the plan's time caps, failures and report (fast), the benchmarks' GPU settings (batch per
backbone, channels-last, MFU, the stack's GPU row), and the whole dry run on the CPU (slow)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from benchmarks import bench_device
from benchmarks.bench_device import DRY, GPU, DeviceReport, goals, run_plan


def _script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failing_or_hanging_part_is_reported_and_the_rest_still_run(tmp_path):
    """Each part runs under its cap; a crash and a hang are reported with their reason, what a part wrote before it
    was stopped is kept, the parts after it still run, and a part the plan's total leaves no time for is skipped."""

    def command(name, cap_s, result_file):
        write = f"import json, pathlib; pathlib.Path({str(result_file)!r}).write_text(json.dumps({{'part': {name!r}}}))"
        return _script({
            "ok": write,
            "boom": "import sys; print('working'); print('RuntimeError: CUDA out of memory', flush=True); sys.exit(1)",
            "hang": write + "; import time; time.sleep(60)",
            "after": write,
            "late": write,
        }[name])  # fmt: skip

    plan = (("ok", 20), ("boom", 20), ("hang", 2), ("after", 20), ("late", 20))
    t0 = time.perf_counter()
    parts = run_plan(plan[:4], command, work=tmp_path)
    assert time.perf_counter() - t0 < 40, "the hanging part was stopped at its cap"
    assert [parts[n]["status"] for n, _ in plan[:4]] == ["ok", "failed", "timeout", "ok"]
    assert parts["ok"]["result"] == {"part": "ok"} and parts["after"]["result"] == {"part": "after"}
    assert "exit code 1" in parts["boom"]["reason"] and "CUDA out of memory" in parts["boom"]["reason"]
    assert parts["boom"]["result"] is None
    assert parts["hang"]["result"] == {"part": "hang"}, "what the part wrote before its cap is kept"
    assert "time cap of 2 s" in parts["hang"]["reason"] and 2 <= parts["hang"]["seconds"] < 15
    # the plan's total: the first part's cap is cut to what is left, then nothing is left for the others
    parts = run_plan((("hang", 20), ("late", 20)), command, total_s=bench_device.MIN_PART_S + 1, work=tmp_path)
    assert parts["hang"]["status"] == "timeout" and parts["hang"]["cap_s"] <= bench_device.MIN_PART_S + 1
    assert parts["late"]["status"] == "skipped" and "used up" in parts["late"]["reason"]


def _parts(**over) -> dict:
    ok = {"status": "ok", "seconds": 1.0, "cap_s": 10, "reason": ""}
    backbones = {b: {"backbone": b, "image_size": 224, "batch": 64, "channels_last": True, "ceiling_images_per_s":
                     1000.0, "fed_images_per_s": 990.0, "ratio": 0.99, "train_gflop_per_image": 10.0,
                     "mfu_model": 0.4, "mfu_fed": 0.39} for b in GPU.backbones}  # fmt: skip
    backbones["resnet50"].update(fed_images_per_s=3500.0)
    backbones["retfound"].update(ratio=0.95)
    parts = {
        "prepare": {**ok, "result": {}},
        "loader": {**ok, "result": {"decode": "mixed", "threads": 16, "batch": 256, "runs": [
            {"image_size": 224, "hw_decoder_load": 0.0, "images_per_s": 12_000.0},
            {"image_size": 224, "hw_decoder_load": 0.65, "images_per_s": 21_000.0},
            {"image_size": 384, "hw_decoder_load": 0.65, "images_per_s": 30_000.0},
            {"image_size": 224, "hw_decoder_load": 0.9, "error": "RuntimeError: nvJPEG"}]}},
        "train": {**ok, "result": {"backbones": backbones}},
        "stack": {**ok, "result": {"samples": 1_000_000, "device": "cuda", "strategy": "native", "n_estimators": 100,
                                   "nested_cv_seconds": 75.0, "table_seconds": 2.0, "macro_auc": 0.9}},
        "demo": {"status": "timeout", "seconds": 75.0, "cap_s": 75, "reason": "stopped at its time cap of 75 s",
                 "result": None},
    }  # fmt: skip
    parts.update(over)
    return parts


def test_goals_are_measured_against_their_targets():
    g = {x["goal"]: x for x in goals(_parts(), GPU, dry_run=False)}
    dali = g["DALI decode+augment at 224 px, img/s (best hw_decoder_load)"]
    assert dali["measured"] == 21_000.0 and dali["met"] == "yes", "the best 224 px setting, not the 384 px one"
    assert g["fed / model, resnet50"]["met"] == "yes" and g["fed / model, retfound"]["met"] == "no"
    assert g["resnet50 bf16 fed, img/s"]["measured"] == 3500.0 and g["resnet50 bf16 fed, img/s"]["met"] == "yes"
    stack = g["stack nested CV on 1,000,000 rows, s"]
    assert stack["measured"] == 75.0 and stack["met"] == "no" and stack["target"] == "< 60"
    assert len(g) == 9
    # a part that delivered nothing: its goals say so, with the part's status
    g = {x["goal"]: x for x in goals(_parts(train={"status": "failed", "result": None}), GPU, dry_run=False)}
    assert g["fed / model, vit_base_patch16_224"]["met"] == "not measured (train: failed)"
    assert g["resnet50 bf16 fed, img/s"]["measured"] is None
    assert all(x["met"] in ("n/a (dry run)",) for x in goals(_parts(), GPU, dry_run=True))


def test_report_shows_every_part_and_failure_and_is_json():
    parts = _parts()
    parts["train"]["result"]["backbones"]["convnextv2_base"] = {"backbone": "convnextv2_base", "error": "OOM"}
    report = DeviceReport(False, "NVIDIA H200", parts, goals(parts, GPU, dry_run=False))
    md = report.markdown()
    assert "| demo | timeout | 75 | 75 | stopped at its time cap of 75 s |" in md
    assert "| convnextv2_base | failed: OOM |" in md
    assert "| 224 | 0.65 | 21,000 |" in md and "RuntimeError: nvJPEG" in md
    assert "| resnet50 | 224 | 64 | yes | 1,000 | 3,500 | 0.990 | 10.0 | 40.0% | 39.0% |" in md
    assert "| fed / model, retfound | 0.950 | >= 0.97 | no |" in md
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["benchmark"] == "device" and set(doc["parts"]) == set(parts)


def test_dry_run_is_the_same_plan_at_tiny_sizes():
    from retina_train.backbones import BACKBONES, PAPER_BACKBONES

    assert GPU.backbones == PAPER_BACKBONES and GPU.backbones[0] == "resnet50"
    assert [BACKBONES[b].family for b in DRY.backbones] == [BACKBONES[b].family for b in GPU.backbones]
    assert all(BACKBONES[b].tiny for b in DRY.backbones)
    assert GPU.image_sizes == (224, 384) and DRY.hw_decoder_loads == GPU.hw_decoder_loads == (0.0, 0.65, 0.9)
    assert GPU.stack_rows == 1_000_000 and DRY.stack_rows < 10_000
    assert sum(cap for _, cap in bench_device.PLAN) <= bench_device.TOTAL_S == 480
    assert [n for n, _ in bench_device.PLAN] == list(bench_device.PARTS)


def test_cli_refuses_without_a_gpu_and_misplaced_options(tmp_path, capsys):
    import torch

    from benchmarks.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["device", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "retina-bench: error:" in err and "needs a CUDA GPU" in err and "--dry-run" in err
    assert not (tmp_path / "out").exists(), "refused before writing anything"
    with pytest.raises(SystemExit):
        main(["stack", "--dry-run"])
    assert "apply to 'device'" in capsys.readouterr().err


def test_cli_exits_1_when_a_device_part_did_not_finish(monkeypatch, capsys):
    from benchmarks import cli

    ok = {"status": "ok", "seconds": 1.0, "cap_s": 10, "reason": "", "result": {}}
    for statuses, code in ((("ok", "ok"), 0), (("ok", "failed"), 1), (("timeout", "skipped"), 1)):
        parts = {name: {**ok, "status": st} for name, st in zip(("loader", "train"), statuses, strict=True)}
        report = DeviceReport(True, "cpu (dry run)", parts, [])
        monkeypatch.setattr(cli, "_load", lambda name, r=report: lambda **kw: r)
        monkeypatch.setattr("benchmarks.common.emit", lambda result: print("report"))
        assert cli.main(["device", "--dry-run"]) == code, statuses
        err = capsys.readouterr().err
        if code:
            assert "not every part finished" in err and f"train ({statuses[1]})" in err, err


# ------------------------------------------------------------------------------------ the benchmarks' GPU settings


def test_train_benchmark_runs_each_backbone_as_its_training(monkeypatch):
    """Batch from each backbone's config (no more 128 for all), channels-last for CNNs (GPU and CPU), bf16 on a GPU."""
    from benchmarks import bench_train

    batches = {b: bench_train.bench_setup(b, "cuda")[0].data.batch_size for b in GPU.backbones}
    assert batches["tf_efficientnetv2_m"] == 48 and batches["retfound"] == 16 and batches["resnet50"] == 128
    for b in GPU.backbones:
        s = bench_train.bench_setup(b, "cuda")[1]
        assert s.precision == "bf16"
        assert s.channels_last == (b in ("resnet50", "tf_efficientnetv2_m", "convnextv2_base")), b
        assert bench_train.bench_setup(b, "cpu")[1].channels_last == s.channels_last, "channels-last on a CPU too"
    emptied = []
    monkeypatch.setattr(bench_train.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_train.torch.cuda, "empty_cache", lambda: emptied.append(1))

    class Engine:
        destroyed = False

        def destroy(self):
            self.destroyed = True

    engine = Engine()
    bench_train.free(engine)
    assert engine.destroyed and emptied == [1], "engines destroyed and the CUDA cache emptied between backbones"


def test_channels_last_ceiling_and_mfu(monkeypatch):
    import dataclasses

    import torch

    from benchmarks import bench_train
    from retina_train.distributed import init_distributed

    init_distributed("cpu")
    cfg, s = bench_train.bench_setup("tiny_resnet", "cpu")
    cfg.data.batch_size = 4
    s = dataclasses.replace(s, channels_last=True)  # what a CNN gets on a GPU
    engine = bench_train._engine(cfg, s)  # DeepSpeed refuses a channels-last model at initialize (byte view)
    try:
        conv = next(m for m in engine.module.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        held = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
        assert id(conv.weight) in held, "the optimizer still updates the converted weight"
        before = conv.weight.detach().clone()
        seen = []
        engine.module.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(
            memory_format=torch.channels_last)))  # fmt: skip
        assert bench_train._ceiling(engine, batch=4, size=64, device="cpu", steps=1, channels_last=True) > 0
        assert seen and all(seen), "the ceiling's batch is channels-last like the loader's"
        assert not torch.equal(before, conv.weight.detach()), "the steps trained the channels-last weight"
    finally:
        bench_train.free(engine)
    # ResNet-50 at 224 px: 4.1 GMACs forward -> 3 x 8.2 GFLOPs per training image
    assert bench_train.train_flops_per_image("resnet50", 224) == pytest.approx(3 * 8.18e9, rel=0.02)
    assert bench_train.peak_flops("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert bench_train.peak_flops("cuda") == 989e12


def test_stack_benchmark_gpu_row_is_skipped_with_its_reason(monkeypatch):
    from benchmarks import bench_stack
    from benchmarks.common import BenchResult, Row

    if bench_stack.gpu_skip_reason() == "":
        pytest.skip("a GPU is visible to XGBoost")
    assert bench_stack.gpu_skip_reason() in ("no CUDA GPU visible to XGBoost", "this XGBoost build has no CUDA support")
    r = BenchResult("stack", 1.0, 1.0, [Row("meta: native, device=cuda", 0.0, 10, skipped="no CUDA GPU")])
    assert "| meta: native, device=cuda | - | - | - | skipped: no CUDA GPU |" in r.markdown()
    assert r.to_json()["rows"] == [{"name": "meta: native, device=cuda", "skipped": "no CUDA GPU"}]


# ------------------------------------------------------------------------------------------------- the whole dry run


@pytest.mark.slow
def test_dry_run_runs_every_part_on_the_cpu(tmp_path, capsys):
    from benchmarks.common import emit

    plan = tuple((name, cap * 4) for name, cap in bench_device.PLAN)  # a loaded test machine: generous caps
    report = bench_device.run(dry_run=True, out=tmp_path / "out", cache=tmp_path / "cache", plan=plan, total_s=4000)
    assert {n: p["status"] for n, p in report.parts.items()} == dict.fromkeys(bench_device.PARTS, "ok")
    assert all(g["measured"] is not None and g["met"] == "n/a (dry run)" for g in report.goals)
    train = report.parts["train"]["result"]["backbones"]
    assert set(train) == set(DRY.backbones) and all(r["fed_images_per_s"] > 0 for r in train.values())
    assert len(report.parts["loader"]["result"]["runs"]) == 6
    assert report.parts["demo"]["result"]["ensemble_macro_auc"] > 0
    doc = json.loads((tmp_path / "out" / "device.json").read_text())
    assert doc["parts"] == json.loads(json.dumps(report.parts))
    assert (tmp_path / "out" / "device.md").read_text().strip() == report.markdown().strip()
    emit(report)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["benchmark"] == "device"
