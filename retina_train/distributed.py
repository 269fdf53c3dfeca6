"""The process group: joining the launcher's group, this process's rank, barriers, gathering, the device to use.

Any launcher starts one process per rank: ``deepspeed``, ``torchrun``, ``srun``, ``mpirun`` (Open MPI, MPICH, Intel
MPI); :func:`retina_train.launchers.detect_world` reads the world from its variables and :func:`init_distributed`
joins it. A plain ``python retina_train/run.py`` is a group of one. Every function here also works when no group was
joined (rank 0 of 1, barriers are no-ops).

The device: :func:`resolve_device` is the one place ``--device auto|cpu|cuda`` is decided, for training, evaluation,
prediction and the demo; on a CUDA build of torch where CUDA cannot start, it says why (:func:`cuda_problem`: the
CUDA torch is built for, the driver found, the driver that CUDA needs, CUDA's own error) before ``auto`` falls back to
the CPU, and ``cuda`` is refused with that reason.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

import numpy as np
import torch

from retina_train.config import ConfigError
from retina_train.launchers import detect_world

log = logging.getLogger(__name__)
# The oldest NVIDIA driver branch each CUDA major version runs on (NVIDIA's CUDA toolkit release notes, table 3).
CUDA_MIN_DRIVER = {13: 580, 12: 525, 11: 450}


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def barrier() -> None:
    if (d := _dist()) is not None:
        d.barrier()


def gather_arrays(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every rank's ``arrays`` concatenated in rank order (each array along axis 0); the arrays themselves alone."""
    if (d := _dist()) is None:
        return arrays
    parts: list = [None] * d.get_world_size()
    d.all_gather_object(parts, arrays)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(arrays)))


def init_distributed(device: str) -> None:
    """Join the launcher's process group (gloo on the CPU, nccl on GPUs): the world any launcher describes
    (:func:`retina_train.launchers.detect_world`), written into torch's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
    ``MASTER_ADDR``/``MASTER_PORT``; without a launcher, a group of one. On ``cuda`` this rank's GPU becomes the
    current device first (:func:`use_local_gpu`), so that NCCL never puts two ranks on one GPU."""
    if _dist() is not None:
        return
    import deepspeed

    world = detect_world()
    os.environ.update(world.torch_env())
    if world.size > 1 and world.launcher != "env":
        log.info("rank %d of %d (local rank %d) from the %s launcher; rendezvous at %s:%d", world.rank, world.size,
                 world.local_rank, world.launcher, world.master_addr, world.master_port)  # fmt: skip
    use_local_gpu(device)
    if world.size == 1 and device != "cuda":
        skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False)


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from loading its shared-memory all-reduce op, which it JIT-compiles anew in every
    process (39 s on the 2-core machine, measured): a world of one rank has nothing to all-reduce between processes,
    so torch's gloo group does."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def use_local_gpu(device: str) -> None:
    """On ``cuda``, make this rank's GPU the current device: its local rank modulo the GPUs it sees (a scheduler
    that shows each task only its own GPU makes that GPU 0 for every rank)."""
    if device == "cuda":
        torch.cuda.set_device(local_gpu(int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()))


def local_gpu(local_rank: int, visible: int) -> int:
    """The index of the GPU of local rank ``local_rank`` among the ``visible`` ones."""
    if visible < 1:
        raise ConfigError("--device cuda, but this process sees no GPU (CUDA_VISIBLE_DEVICES?)")
    return local_rank % visible


# ----------------------------------------------------------------------------------------------- the device
def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when CUDA can start, else ``cpu`` (said loudly, with the reason, on a CUDA build of
    torch); ``cuda`` where CUDA cannot start is a ConfigError with the reason. The one device decision of
    training, ``retina-eval``, ``retina-predict`` and ``retina-demo``."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda; got {requested!r}")
    if requested == "cpu" or torch.cuda.is_available():
        return "cuda" if requested == "auto" else requested
    reason = cuda_problem()
    if requested == "cuda":
        raise ConfigError(f"--device cuda asked for, but CUDA cannot start: {reason}; use --device cpu")
    if torch.version.cuda:
        log.warning("--device auto: CUDA cannot start, so this runs on the CPU: %s. (--device cpu runs on the CPU "
                    "without this warning)", reason)  # fmt: skip
    return "cpu"


def cuda_problem() -> str:
    """Why CUDA cannot start here, in one line: the CUDA this torch is built for and the driver that needs, the
    driver found (``/proc/driver/nvidia/version`` or ``nvidia-smi``), ``CUDA_VISIBLE_DEVICES`` hiding every GPU,
    and CUDA's own error."""
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    parts = [f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"]
    major = int(torch.version.cuda.split(".")[0])
    needed = CUDA_MIN_DRIVER.get(major)
    if needed:
        wheel = "cu" + torch.version.cuda.replace(".", "")
        parts[0] += f" ({wheel}), which needs NVIDIA driver R{needed} or newer"
    driver = nvidia_driver_version()
    if driver is None:
        parts.append("no NVIDIA driver found (no /proc/driver/nvidia/version, no nvidia-smi on the PATH)")
    elif needed and int(driver.split(".")[0]) < needed:
        parts.append(f"the driver here is {driver}, older than R{needed}: update the driver or install a torch "
                     "built for an older CUDA")  # fmt: skip
    else:
        parts.append(f"driver {driver}")
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1", "none", "NoDevFiles"):
        parts.append(f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU")
    error = _torch_cuda_error()
    if error:
        parts.append(f"CUDA says: {error}")
    return "; ".join(parts)


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver's version (``580.65.06``), or None when no driver is found."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            text = f.read()
        match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.split()  # fmt: skip
            if out and re.fullmatch(r"\d+\.\d+(\.\d+)?", out[0]):
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def _torch_cuda_error() -> str | None:
    """CUDA's own message for why it does not start (torch's lazy init), its first sentence; None if it starts."""
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - any failure is the reason we report
        text = " ".join(str(exc).split())
        return text.split(". ")[0].rstrip(".") if text else type(exc).__name__
    return None
