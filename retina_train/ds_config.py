"""The DeepSpeed config, generated from ours (or a user's JSON with the batch sizes checked).

Precision: on a GPU the default is DeepSpeed's ``torch_autocast`` section with bfloat16 — weights, optimizer state
and BatchNorm statistics stay fp32, only Linear/Conv2d compute in bf16 — rather than DeepSpeed's ``bf16`` mode, which
would hold the weights (and BatchNorm running statistics) in bf16 with fp32 master copies in the optimizer. On the
CPU: fp32 by default. ``fp16`` is the same autocast with float16 (DeepSpeed adds a gradient scaler); ``fp32``: no
autocast.

The optimizer is torch's AdamW on every device (DeepSpeed's ``torch_adam``), with ``fused=True`` on a GPU (one
kernel for all parameters) and ``foreach=True`` on the CPU. DeepSpeed's own FusedAdam is not prebuilt in its wheel
and would be JIT-compiled at ``deepspeed.initialize`` (ninja, ``CUDA_HOME`` and an nvcc matching torch's CUDA on every
node, minutes each).

ZeRO: ``train.zero_stage`` 0 (plain data parallelism: gradients all-reduced after backward), 1 (optimizer state
partitioned across ranks) or 2 (gradients too); ``train.overlap_comm`` overlaps the stage 1/2 gradient reduction with
the backward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from retina_train.config import ConfigError, RunConfig

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # train.precision -> torch_autocast dtype; fp32: none


def read_user_config(path: Path) -> dict:
    """A user's DeepSpeed JSON (``--deepspeed-config``): a JSON object, or a ConfigError naming the file."""
    try:
        user = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--deepspeed-config {path} cannot be read as JSON: {exc}") from exc
    if not isinstance(user, dict):
        raise ConfigError(f"--deepspeed-config {path} must hold a JSON object")
    return user


def build_ds_config(
    cfg: RunConfig,
    *,
    world_size: int,
    total_steps: int,
    warmup_steps: int,
    device: str,
    precision: str,
) -> dict:
    """The DeepSpeed config dict for ``cfg`` (``total_steps``/``warmup_steps`` count optimizer steps)."""
    micro, accum = cfg.data.batch_size, cfg.data.grad_accum
    if cfg.train.deepspeed_config:
        path = Path(cfg.train.deepspeed_config)
        user = read_user_config(path)
        user.setdefault("train_micro_batch_size_per_gpu", micro)
        user.setdefault("gradient_accumulation_steps", accum)
        if user["train_micro_batch_size_per_gpu"] != micro:
            raise ConfigError(f"{path}: train_micro_batch_size_per_gpu {user['train_micro_batch_size_per_gpu']} "
                              f"differs from --batch-size {micro}; the loader needs them equal")  # fmt: skip
        user.pop("train_batch_size", None)
        return user
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": 1e-8,
                "weight_decay": cfg.optim.weight_decay,
                "torch_adam": True,  # torch.optim.AdamW: no JIT-built FusedAdam
                # GPU: one fused kernel; CPU: torch's multi-tensor path (the per-parameter loop was 5% of a tiny step)
                **({"fused": True} if device == "cuda" else {"foreach": True}),
            },
        },  # fmt: skip
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, 1),
                # DeepSpeed refuses 0 and warms up at least 2 steps whatever it is given (max(2, n)): 1 asks for its
                # shortest warmup, so a run of one optimizer step (one batch, one epoch) trains instead of crashing
                "warmup_num_steps": max(min(warmup_steps, total_steps - 1), 1),
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": cfg.optim.min_lr_ratio,
                "warmup_type": "linear",
            },
        },  # fmt: skip
        "zero_optimization": {
            "stage": cfg.train.zero_stage,
            **({"overlap_comm": cfg.train.overlap_comm} if cfg.train.zero_stage else {}),
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision in AUTOCAST_DTYPES:
        ds["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_DTYPES[precision],
                                "lower_precision_safe_modules": ["torch.nn.modules.linear.Linear",
                                                                 "torch.nn.modules.conv.Conv2d"]}  # fmt: skip
    elif precision != "fp32":
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16 (auto resolved); got {precision!r}")
    return ds
