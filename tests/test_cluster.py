"""First contact with a cluster (issue 12), the parts that need no second process: the world read from every
launcher's variables, the device decision and its reasons, the optimizer DeepSpeed builds on a GPU, ZeRO options."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retina_train import distributed, launchers
from retina_train.config import ConfigError, RunConfig, resolve_config
from retina_train.ds_config import build_ds_config
from retina_train.launchers import DEFAULT_PORT, detect_world, first_host, parse_first_host


# ----------------------------------------------------------------------------------------------- the world
def test_torch_launcher_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}
    w = detect_world(env)
    assert (w.launcher, w.rank, w.size, w.local_rank, w.master_addr, w.master_port) == ("env", 3, 8, 1, "n0", 1234)
    assert w.torch_env() == env


def test_slurm_variables_alone_make_the_world(monkeypatch):
    monkeypatch.setattr(launchers.shutil, "which", lambda name: None)  # no scontrol: the list is parsed here
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[007-010],c1", "SLURM_NODELIST": "gpu[008-009]"}  # fmt: skip
    w = detect_world(env)
    assert (w.launcher, w.rank, w.size, w.local_rank) == ("slurm", 5, 8, 1)
    assert w.master_addr == "gpu008", "the step's node list (srun sets SLURM_NODELIST to it) before the job's"
    assert w.master_port == DEFAULT_PORT + 456, "a port per job, so that two jobs sharing a node do not meet"
    env["MASTER_PORT"], env["MASTER_ADDR"] = "40000", "head"
    w = detect_world(env)
    assert (w.master_addr, w.master_port) == ("head", 40000), "MASTER_ADDR/MASTER_PORT override"


def test_slurm_master_from_scontrol_when_installed(monkeypatch):
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="alpha-1\nalpha-2\n", stderr="")

    monkeypatch.setattr(launchers.shutil, "which", lambda name: "/opt/slurm/bin/scontrol")
    monkeypatch.setattr(launchers.subprocess, "run", run)
    assert first_host("alpha-[1-2]") == "alpha-1"
    assert calls == [["/opt/slurm/bin/scontrol", "show", "hostnames", "alpha-[1-2]"]]


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("node01", "node01"), ("a,b", "a"), ("gpu[003-010,012],cpu1", "gpu003"), ("r[1-2]n[05,07]", "r1n05"),
     ("x-[2,4]-ib", "x-2-ib"), ("n[9-11]", "n9")],
)  # fmt: skip
def test_parse_first_host(nodelist, first):
    assert parse_first_host(nodelist) == first


def test_unreadable_nodelist_is_refused():
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        parse_first_host("gpu[01-02")


def test_open_mpi_and_pmi_variables():
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}  # fmt: skip
    w = detect_world(ompi)
    assert (w.launcher, w.rank, w.size, w.local_rank, w.master_addr) == ("openmpi", 1, 2, 1, "127.0.0.1")
    assert w.torch_env()["LOCAL_SIZE"] == "2" and w.master_port == DEFAULT_PORT
    pmi = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h0"}
    w = detect_world(pmi)
    assert (w.launcher, w.rank, w.size, w.local_rank, w.master_addr) == ("pmi", 2, 4, 0, "h0")
    # mpirun inside a Slurm allocation: MPI's ranks, Slurm's node list for the rendezvous
    w = detect_world({**ompi, "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                      "SLURM_NODELIST": "c[4-5]"})  # fmt: skip
    assert (w.launcher, w.rank, w.size, w.master_addr) == ("openmpi", 1, 2, "c4")


def test_several_ranks_are_never_turned_into_one():
    with pytest.raises(ConfigError, match="MASTER_ADDR"):  # two nodes, nobody says where rank 0 is
        detect_world({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    with pytest.raises(ConfigError, match="SLURM_PROCID=2 is not below SLURM_NTASKS=2"):
        detect_world({"SLURM_PROCID": "2", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n1"})
    with pytest.raises(ConfigError, match="RANK is not set"):
        detect_world({"WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        detect_world({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "a"})
    with pytest.raises(ConfigError, match="PMI_SIZE='x'"):
        detect_world({"PMI_RANK": "0", "PMI_SIZE": "x"})


def test_no_launcher_is_a_world_of_one():
    w = detect_world({})
    assert (w.launcher, w.rank, w.size, w.local_rank, w.master_addr) == ("none", 0, 1, 0, "127.0.0.1")
    w = detect_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NODELIST": "n1"})
    assert (w.launcher, w.size) == ("slurm", 1)


def test_slurm_batch_script_itself_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="retina_train.launchers"):
        detect_world({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_NODELIST": "n1"})
    assert "start the training with srun" in caplog.text


def test_local_gpu_is_the_local_rank_modulo_the_visible_gpus():
    assert distributed.local_gpu(3, 8) == 3
    assert distributed.local_gpu(3, 1) == 0, "a scheduler showing each task its one GPU"
    assert distributed.local_gpu(5, 4) == 1
    with pytest.raises(ConfigError, match="sees no GPU"):
        distributed.local_gpu(0, 0)


def test_a_task_shown_one_gpu_uses_it(monkeypatch):
    """Issue 12: set_device(LOCAL_RANK) failed where the scheduler shows each task only its own GPU."""
    chosen = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    distributed.use_local_gpu("cuda")
    distributed.use_local_gpu("cpu")
    assert chosen == [0]


# ----------------------------------------------------------------------------------------------- the device
@pytest.fixture
def old_driver(monkeypatch):
    """A cu130 torch on a node whose driver (R550) is too old for CUDA 13: CUDA cannot start."""

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12040). Please update your "
                           "GPU driver by downloading and installing a new version from the URL")  # fmt: skip

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.setattr(distributed, "nvidia_driver_version", lambda: "550.54.15")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_auto_says_loudly_why_cuda_cannot_start(old_driver, caplog):
    with caplog.at_level(logging.WARNING, logger="retina_train.distributed"):
        assert distributed.resolve_device("auto") == "cpu"
    warning = caplog.text
    assert "CUDA cannot start, so this runs on the CPU" in warning
    for part in ("CUDA 13.0 (cu130)", "needs NVIDIA driver R580 or newer", "the driver here is 550.54.15",
                 "driver on your system is too old (found version 12040)"):  # fmt: skip
        assert part in warning, part


def test_cuda_is_refused_with_the_reason(old_driver):
    with pytest.raises(ConfigError, match=r"--device cuda asked for, but CUDA cannot start: .*550\.54\.15.*R580"):
        distributed.resolve_device("cuda")


def test_reasons_without_a_driver_or_with_gpus_hidden(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(distributed, "nvidia_driver_version", lambda: None)
    monkeypatch.setattr(distributed, "_torch_cuda_error", lambda: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    text = distributed.cuda_problem()
    assert "R525" in text and "no NVIDIA driver found" in text and "CUDA_VISIBLE_DEVICES='' hides every GPU" in text
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in distributed.cuda_problem()


def test_cpu_only_build_falls_back_quietly(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with caplog.at_level(logging.WARNING):
        assert distributed.resolve_device("auto") == "cpu"
    assert not caplog.records
    with pytest.raises(ConfigError, match="CPU-only build"):
        distributed.resolve_device("cuda")


@pytest.mark.parametrize("prog", ["run.py", "retina-eval", "retina-predict"])
def test_command_lines_refuse_cuda_naming_the_reason(old_driver, tmp_path, capsys, prog):
    from retina_train import evaluate, predict, run

    argv = {"run.py": (run.main, ["--backbone", "tiny_resnet", "--data", str(tmp_path), "--out", str(tmp_path)]),
            "retina-eval": (evaluate.main, ["--runs", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path)]),
            "retina-predict": (predict.main, ["--bundle", str(tmp_path / "b.retina"), "--images", str(tmp_path),
                                              "--out", str(tmp_path / "p")])}  # fmt: skip
    main, args = argv[prog]
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "error: --device cuda asked for, but CUDA cannot start" in err and "550.54.15" in err, err


# ----------------------------------------------------------------------------------------------- DeepSpeed's config
def _ds(cfg: RunConfig, device: str, precision: str = "fp32") -> dict:
    return build_ds_config(cfg, world_size=1, total_steps=10, warmup_steps=1, device=device, precision=precision)


def test_cuda_config_asks_for_torch_fused_adamw_not_a_jit_build():
    params = _ds(RunConfig(), "cuda", "bf16")["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    cpu = _ds(RunConfig(), "cpu")["optimizer"]["params"]
    assert cpu["torch_adam"] is True and "fused" not in cpu


def test_deepspeed_builds_torch_fused_adamw_from_the_cuda_config():
    """The cuda config through deepspeed.initialize (here on the CPU, where torch's fused AdamW also runs): torch's
    AdamW with fused=True, nothing built; it trains a step."""
    import deepspeed

    distributed.init_distributed("cpu")
    model = torch.nn.Linear(4, 2)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=_ds(RunConfig(), "cuda"))  # fmt: skip
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    before = model.weight.detach().clone()
    for _ in range(3):  # WarmupCosineLR: the first two steps have lr 0
        engine.backward(engine(torch.randn(3, 4)).square().mean())
        engine.step()
    assert not torch.equal(before, engine.module.weight.detach())


def test_zero_stage_and_overlap_comm_reach_deepspeed():
    from retina_train.preflight import check_options

    over = {"data": {"dataset": "x"}}
    cfg = resolve_config("tiny_resnet", overrides={**over, "train": {"zero_stage": 2, "overlap_comm": True}})
    check_options(cfg)
    assert _ds(cfg, "cuda")["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert _ds(RunConfig(), "cpu")["zero_optimization"] == {"stage": 0}
    with pytest.raises(ConfigError, match="train.zero_stage must be 0, 1 or 2"):
        check_options(resolve_config("tiny_resnet", overrides={**over, "train": {"zero_stage": 3}}))
    with pytest.raises(ConfigError, match="overlap_comm needs train.zero_stage 1 or 2"):
        check_options(resolve_config("tiny_resnet", overrides={**over, "train": {"overlap_comm": True}}))


def test_one_rank_cpu_world_skips_the_shm_op_build():
    """A run without a launcher on the CPU joins a world of one without DeepSpeed's shared-memory all-reduce op,
    which DeepSpeed would JIT-compile in every process; all-reduce still works (gloo)."""
    code = (
        "import os, torch, torch.distributed as d\n"
        "for v in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE',"
        " 'PMI_SIZE', 'MASTER_PORT', 'MASTER_ADDR'): os.environ.pop(v, None)\n"  # a free port (earlier tests set one)
        "from retina_train.distributed import init_distributed\n"
        "init_distributed('cpu')\n"
        "import deepspeed.ops\n"
        "x = torch.ones(2); d.all_reduce(x)\n"
        "print(deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'], d.get_world_size(), x.tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False 1 [1.0, 1.0]"
    assert "built successfully" not in out.stdout
