"""Who started this process: the world (rank, size, local rank, rendezvous) read from any launcher's environment.

One process per rank, started by any of (the first whose variables are set wins):

- ``deepspeed`` / ``torchrun`` (and anything setting torch's variables): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``;
- Open MPI's ``mpirun`` (also ``deepspeed --launcher openmpi``): ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``,
  ``OMPI_COMM_WORLD_LOCAL_RANK``;
- MPICH / Intel MPI (Hydra's PMI): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``;
- Slurm's ``srun`` (also ``deepspeed --launcher slurm``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and
  the node list (``SLURM_STEP_NODELIST``, ``SLURM_NODELIST`` or ``SLURM_JOB_NODELIST``).

The rendezvous: ``MASTER_ADDR`` when set, else the first host of the Slurm node list (``scontrol show hostnames`` when
``scontrol`` is on the PATH, else parsed here), else ``127.0.0.1`` when every rank is on this node (the MPI launchers
say how many are), else a ConfigError asking for ``MASTER_ADDR``. ``MASTER_PORT`` when set, else
:data:`DEFAULT_PORT` (Slurm: ``DEFAULT_PORT + SLURM_JOB_ID % 1000``, so that two jobs sharing a node do not meet).

No variables at all: a plain ``python run.py``, a world of one. A launcher that says there are several ranks is never
turned into a world of one; variables that contradict themselves are a ConfigError naming them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from retina_train.config import ConfigError

DEFAULT_PORT = 29500  # torch's and DeepSpeed's default rendezvous port
SLURM_PORTS = 1000  # Slurm: DEFAULT_PORT + SLURM_JOB_ID % SLURM_PORTS
NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in the run, as its launcher describes it."""

    launcher: str  # "env" (deepspeed/torchrun), "openmpi", "pmi", "slurm" or "none"
    rank: int
    size: int
    local_rank: int
    master_addr: str
    master_port: int
    local_size: int | None = None  # ranks on this node, where the launcher says

    def torch_env(self) -> dict[str, str]:
        """The variables ``torch.distributed``'s ``env://`` rendezvous (and DeepSpeed) read."""
        env = {"RANK": str(self.rank), "WORLD_SIZE": str(self.size), "LOCAL_RANK": str(self.local_rank),
               "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}  # fmt: skip
        if self.local_size is not None:
            env["LOCAL_SIZE"] = str(self.local_size)
        return env


# (launcher, rank variable, size variable, local rank variables, local size variable)
LAUNCHERS = (
    ("env", "RANK", "WORLD_SIZE", ("LOCAL_RANK",), "LOCAL_WORLD_SIZE"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",),
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("pmi", "PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"), "MPI_LOCALNRANKS"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", ("SLURM_LOCALID",), None),
)  # fmt: skip


def detect_world(env: Mapping[str, str] | None = None) -> World:
    """The world ``env`` (default: this process's environment) describes; see the module docstring."""
    env = os.environ if env is None else env
    for launcher, rank_var, size_var, local_vars, local_size_var in LAUNCHERS:
        if rank_var not in env and size_var not in env:
            continue
        others = [v for _, r, s, *_ in LAUNCHERS[1:] for v in (r, s)]
        if launcher == "env" and "WORLD_SIZE" not in env and any(v in env for v in others):
            continue  # a stray RANK beside an MPI or Slurm launcher's variables: theirs describe the world
        size = _int(env, size_var, launcher, low=1)
        rank = _int(env, rank_var, launcher, low=0)
        if rank >= size:
            raise ConfigError(f"{rank_var}={rank} is not below {size_var}={size}; the launcher's variables "
                              "contradict each other")  # fmt: skip
        local_var = next((v for v in local_vars if v in env), None)
        # no local rank said: ranks are numbered node by node, and the device is the rank modulo the visible ones
        local_rank = _int(env, local_var, launcher, low=0) if local_var else rank
        local_size = _int(env, local_size_var, launcher, low=1) if local_size_var and local_size_var in env else None
        if size == 1:
            return _alone(launcher, env)
        if launcher == "slurm" and not ({"SLURM_STEP_ID", "SLURM_STEPID"} & set(env)):
            log.warning("SLURM_NTASKS=%d but no SLURM_STEP_ID: a batch script itself is one process; start the "
                        "training with srun so that Slurm starts all %d ranks", size, size)  # fmt: skip
        addr, port = _rendezvous(env, launcher, size, local_size)
        return World(launcher, rank, size, local_rank, addr, port, local_size)
    return _alone("none", env)


def _int(env: Mapping[str, str], var: str, launcher: str, *, low: int) -> int:
    value = env.get(var)
    if value is None:
        raise ConfigError(f"the {launcher} launcher's variables are incomplete: {var} is not set")
    try:
        n = int(value.strip())
    except ValueError:
        n = low - 1
    if n < low:
        raise ConfigError(f"{var}={value!r} must be an integer >= {low}")
    return n


def _alone(launcher: str, env: Mapping[str, str]) -> World:
    """A world of one on this host (a free port, unless ``MASTER_PORT`` names one)."""
    import socket

    port = env.get("MASTER_PORT")
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    return World(launcher, 0, 1, 0, env.get("MASTER_ADDR") or "127.0.0.1", int(port), 1)


def _rendezvous(env: Mapping[str, str], launcher: str, size: int, local_size: int | None) -> tuple[str, int]:
    """(address, port) of rank 0's rendezvous for a world of ``size`` ranks."""
    port = env.get("MASTER_PORT")
    if port is not None:
        port = _int(env, "MASTER_PORT", launcher, low=1)
    elif launcher == "env":
        raise ConfigError("WORLD_SIZE is set but MASTER_PORT is not; the launcher must set both (or neither)")
    else:
        job = env.get("SLURM_JOB_ID", "")
        port = DEFAULT_PORT + (int(job) % SLURM_PORTS if job.isdigit() else 0)
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"], port
    nodelist = next((env[v] for v in NODELIST_VARS if env.get(v)), None)
    if nodelist:
        return first_host(nodelist), port
    if local_size == size:  # every rank on this node
        return "127.0.0.1", port
    raise ConfigError(f"the {launcher} launcher starts {size} ranks but names no rendezvous host: set MASTER_ADDR "
                      "to rank 0's host (e.g. mpirun -x MASTER_ADDR=HOST) and optionally MASTER_PORT")  # fmt: skip


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``gpu[003-010,012],cpu1`` -> ``gpu003``): ``scontrol show hostnames``
    where Slurm's own tool is installed, else :func:`parse_first_host`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()  # fmt: skip
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("scontrol show hostnames %s failed (%s); parsing the node list here", nodelist, exc)
    return parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    """The first host of Slurm's compact node list syntax: hosts separated by commas, each a prefix with bracketed
    ranges (``node[01-04,07]``, several brackets expand as a product: ``r[1-2]n[3-4]`` -> ``r1n3``)."""
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, ch in enumerate(text):  # the first host expression ends at the first comma outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = text[:end]
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)
    if not host or "[" in host or "]" in host or depth < 0:
        raise ConfigError(f"Slurm node list {nodelist!r} cannot be read; set MASTER_ADDR to rank 0's host")
    return host
