"""The process group: joining the launcher's group, this process's rank, barriers, gathering, the device to use.

``deepspeed [--num_gpus N | --hostfile H] retina_train/run.py`` starts one process per rank with ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` set; a plain ``python retina_train/run.py`` is a group of one. Every
function here also works when no group was joined (rank 0 of 1, barriers are no-ops).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from retina_train.config import ConfigError


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
    """Join the launcher's process group (gloo on the CPU, nccl on GPUs); a plain ``python run.py`` is one process."""
    if _dist() is not None:
        return
    import deepspeed

    if "WORLD_SIZE" not in os.environ:  # no launcher: a group of one (DeepSpeed would otherwise look for MPI)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is a ConfigError."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no GPU is visible; use --device cpu")
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda; got {requested!r}")
    return requested


def use_local_gpu(device: str) -> None:
    """On ``cuda``, make this rank's GPU (the launcher's ``LOCAL_RANK``) the current device."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
