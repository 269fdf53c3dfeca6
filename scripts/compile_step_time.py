"""Step time of one training step (forward, BCE, backward, AdamW) with and without ``torch.compile`` on this machine.

    python scripts/compile_step_time.py [--backbone tiny_resnet] [--batch 16] [--image-size 64] [--steps 20]

Eager and compiled steps are timed alternately in rounds (so that load from other processes hits both alike); prints
one JSON line: the median step time of each, their ratio, and the compile time (the first compiled steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from retina_train.backbones import create_backbone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="tiny_resnet")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = (torch.rand(args.batch, 11) > 0.8).float()
    variants = {}
    for name in ("eager", "compiled"):
        model = create_backbone(args.backbone, image_size=args.image_size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        fwd = torch.compile(model) if name == "compiled" else model
        variants[name] = (fwd, opt)

    def step(name: str) -> float:
        fwd, opt = variants[name]
        t0 = time.perf_counter()
        loss = F.binary_cross_entropy_with_logits(fwd(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(3):  # the compiled variant compiles here (forward and backward graphs)
        step("compiled")
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        step("eager")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name in times:
            times[name] += [step(name) for _ in range(args.steps)]
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"backbone": args.backbone, "batch": args.batch, "image_size": args.image_size,
              "threads": torch.get_num_threads(), "eager_ms": round(1000 * med["eager"], 2),
              "compiled_ms": round(1000 * med["compiled"], 2), "speedup": round(med["eager"] / med["compiled"], 3),
              "compile_s": round(compile_s, 1)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
