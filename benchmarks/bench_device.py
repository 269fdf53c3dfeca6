"""``retina-bench device [--out DIR] [--dry-run]``: everything a GPU must show, in one command, within 8 minutes.

The plan (:data:`PLAN`), one part after another, each in its own process with its own time cap, so that a part that
fails, runs out of memory or hangs is reported as such and the others still run (device time is precious: one
failure must not lose the other figures):

1. ``prepare``: the procedural fundus JPEGs (512 px) packed into shards, for the next two parts.
2. ``loader``: DALI ``mixed`` (nvJPEG) training batches/s at 224 and 384 px with ``hw_decoder_load`` 0, 0.65 and 0.9
   (:func:`benchmarks.bench_loader._time_loader`).
3. ``train``: the paper's six backbones in bf16 as their training runs them (config micro-batch, channels-last CNNs):
   model-only vs. fed by DALI, fed/model and MFU (:func:`benchmarks.bench_train.bench_backbone`); ResNet-50 first.
4. ``stack``: the stack's nested CV (``auto`` strategy check + 5 folds) on 1M samples with ``device=cuda``
   (:func:`benchmarks.bench_stack.nested_cv_seconds`).
5. ``demo``: a short ``retina-demo --device cuda`` (tiny backbones, 300 images, 1 epoch, :func:`retina_train.demo.
   run_demo`).

Goals (:func:`goals`), each reported as measured / goal: >= 20,000 img/s DALI decode+augment at 224 px on one
H100/H200; fed/model >= 0.97 for all six backbones; ResNet-50 bf16 >= 3,000 img/s fed on one H200; stack nested CV
< 60 s. Writes ``OUT/device.json`` and ``OUT/device.md``; prints progress on stderr, the markdown table, and last
the JSON on one line. DALI gets one CPU thread per core of the machine (on the CPU: ``--workers``).

``--dry-run`` runs the same plan on the CPU at tiny sizes (:data:`DRY`: 48 images of 96 px, loader outputs of 64 and
96 px, timm's ``test_*`` stand-ins, 2,000 stack rows, a 2-fold demo); its figures say only that every part works.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import machine

TOTAL_S = 480  # the whole plan's budget: 8 minutes
MIN_PART_S = 5  # a part with less left than this is not started
PLAN: tuple[tuple[str, float], ...] = (("prepare", 40), ("loader", 80), ("train", 190), ("stack", 95), ("demo", 75))
GOAL_DALI_224 = 20_000.0  # images/s, DALI decode + augment at 224 px, one H100/H200
GOAL_FED_RATIO = 0.97  # fed / model-only, each of the six backbones
GOAL_RESNET50_FED = 3_000.0  # images/s, ResNet-50 bf16 fed, one H200
GOAL_STACK_S = 60.0  # seconds, the stack's nested CV on 1M rows


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: :data:`GPU` (the real figures) or :data:`DRY` (``--dry-run``, the CPU)."""

    images: int
    source_px: int
    image_sizes: tuple[int, ...]
    hw_decoder_loads: tuple[float, ...]
    loader_batch: int
    loader_epochs: int
    backbones: tuple[str, ...]
    train_steps: int
    train_epochs: int
    train_batch: int | None  # None: each backbone's config
    stack_rows: int
    stack_trees: int
    demo: dict = field(default_factory=dict)  # DemoConfig fields


GPU = Sizes(images=2048, source_px=512, image_sizes=(224, 384), hw_decoder_loads=(0.0, 0.65, 0.9), loader_batch=256,
            loader_epochs=6, backbones=("resnet50", "tf_efficientnetv2_m", "convnextv2_base", "vit_base_patch16_224",
                                        "swinv2_base_window12_192", "retfound"),
            train_steps=20, train_epochs=2, train_batch=None, stack_rows=1_000_000, stack_trees=100,
            demo={"n": 300, "size": 64, "epochs": 1, "n_external": 60, "bootstrap": 20, "folds": 2})  # fmt: skip
DRY = Sizes(images=48, source_px=96, image_sizes=(64, 96), hw_decoder_loads=(0.0, 0.65, 0.9), loader_batch=16,
            loader_epochs=1, backbones=("tiny_resnet", "tiny_efficientnet", "tiny_convnext", "tiny_vit",
                                        "tiny_swinv2", "tiny_retfound"),
            train_steps=1, train_epochs=1, train_batch=8, stack_rows=2000, stack_trees=5,
            demo={"n": 40, "size": 64, "epochs": 1, "n_external": 10, "bootstrap": 0, "folds": 2})  # fmt: skip


@dataclass
class Context:
    """What a part's process is told: sizes, where to cache data, its deadline, threads, where to write results."""

    dry_run: bool
    cache: Path
    result_file: Path
    deadline: float  # time.time() by which the part must be done
    threads: int

    @property
    def sizes(self) -> Sizes:
        return DRY if self.dry_run else GPU

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def left(self) -> float:
        return self.deadline - time.time()


def _save(ctx: Context, result: dict) -> None:
    """Write the part's results so far (atomically): a part killed at its cap keeps what it finished."""
    tmp = ctx.result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(ctx.result_file)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _data(ctx: Context) -> Path:
    from benchmarks.common import ensure_images, ensure_packed

    images, labels = ensure_images(ctx.cache, n=ctx.sizes.images, size=ctx.sizes.source_px)
    return ensure_packed(ctx.cache, images, labels)


def part_prepare(ctx: Context) -> dict:
    data = _data(ctx)
    return {"images": ctx.sizes.images, "source_px": ctx.sizes.source_px, "data": str(data)}


def part_loader(ctx: Context) -> dict:
    from benchmarks.bench_loader import _time_loader
    from retina_io.loader import LoaderConfig

    sz, data = ctx.sizes, _data(ctx)
    decode = "cpu" if ctx.dry_run else "mixed"
    result: dict = {"decode": decode, "threads": ctx.threads, "batch": sz.loader_batch, "runs": []}
    for size in sz.image_sizes:
        for hw in sz.hw_decoder_loads:
            run = {"image_size": size, "hw_decoder_load": hw}
            try:
                cfg = LoaderConfig(data=data, folds=range(5), mode="train", backend="dali", image_size=size,
                                   batch_size=sz.loader_batch, num_threads=ctx.threads, device=ctx.device,
                                   decode_device=decode, hw_decoder_load=hw)  # fmt: skip
                seconds, n = _time_loader(cfg, sz.loader_epochs)
                run["images_per_s"] = round(n / seconds, 1)
            except Exception as exc:  # noqa: BLE001 - one setting failing must not lose the others
                run["error"] = f"{type(exc).__name__}: {exc}"
            result["runs"].append(run)
            _save(ctx, result)
            _say(f"loader: DALI {decode} {size} px hw_decoder_load {hw}: {run.get('images_per_s', run.get('error'))}")
    return result


def part_train(ctx: Context) -> dict:
    import logging

    from benchmarks import bench_train
    from retina_train.distributed import init_distributed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    sz, data = ctx.sizes, _data(ctx)
    init_distributed(ctx.device)
    peak = bench_train.peak_flops(ctx.device)
    result: dict = {"peak_bf16_tflops": peak and peak / 1e12, "backbones": {}}
    for name in sz.backbones:
        if ctx.left() < 10:
            result["backbones"][name] = {"backbone": name, "error": "not run: the part's time cap was reached"}
            continue
        t0 = time.perf_counter()
        try:
            r = bench_train.bench_backbone(name, data, device=ctx.device, steps=sz.train_steps,
                                           epochs=sz.train_epochs, batch=sz.train_batch, num_threads=ctx.threads,
                                           loader_only=False)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - out of memory in one backbone must not lose the others
            r = {"backbone": name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        bench_train.free()  # outside the except block: its traceback no longer holds the failed step's tensors
        r["seconds"] = round(time.perf_counter() - t0, 1)
        result["backbones"][name] = r
        _save(ctx, result)
        _say(f"train: {name}: " + (r.get("error") or f"model {r['ceiling_images_per_s']:,.0f} img/s, fed "
                                   f"{r['fed_images_per_s']:,.0f} img/s, fed/model {r['ratio']:.3f}"))  # fmt: skip
    return result


def part_stack(ctx: Context) -> dict:
    from benchmarks.bench_stack import nested_cv_seconds

    sz = ctx.sizes
    return nested_cv_seconds(n=sz.stack_rows, device=ctx.device, n_estimators=sz.stack_trees, cache=ctx.cache)


def part_demo(ctx: Context) -> dict:
    import shutil

    from retina_train.demo import DemoConfig, run_demo

    out = Path(tempfile.mkdtemp(prefix="retina-device-demo-", dir=ctx.cache))
    try:
        return run_demo(DemoConfig(out=out, device=ctx.device, **ctx.sizes.demo))
    finally:
        shutil.rmtree(out, ignore_errors=True)


PARTS = {"prepare": part_prepare, "loader": part_loader, "train": part_train, "stack": part_stack, "demo": part_demo}


# ------------------------------------------------------------------------------------------- running the plan


def run_part(name: str, cmd: list[str], *, cap_s: float, result_file: Path, log_lines: int = 30) -> dict:
    """Run one part's command with a time cap; its output is echoed (prefixed) to stderr as it comes. Returns
    ``{"status": ok | failed | timeout, "seconds", "cap_s", "reason", "result"}``, ``result`` being what the part
    wrote to ``result_file`` (even when it failed or was stopped at its cap)."""
    tail: collections.deque[str] = collections.deque(maxlen=log_lines)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env, start_new_session=True)  # fmt: skip

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            print(f"[{name}] {line}", file=sys.stderr, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status, reason = "ok", ""
    try:
        rc = proc.wait(timeout=cap_s)
        if rc != 0:
            status = "failed"
            last = next((ln for ln in reversed(tail) if ln.strip()), "")
            reason = f"exit code {rc}: {last}"[:500]
    except subprocess.TimeoutExpired:
        status, reason = "timeout", f"stopped at its time cap of {cap_s:.0f} s"
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
    reader.join(timeout=5)
    result = None
    if result_file.is_file():
        try:
            result = json.loads(result_file.read_text())
        except ValueError:
            result = None
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1), "cap_s": cap_s, "reason": reason,
            "result": result}  # fmt: skip


def run_plan(plan, command, *, total_s: float = TOTAL_S, work: Path) -> dict[str, dict]:
    """Run ``plan`` (``(name, cap_s)`` pairs) in order, ``command(name, cap_s, result_file)`` giving each part's
    argv. A part's cap is cut to what is left of ``total_s``; a part with under :data:`MIN_PART_S` left is skipped."""
    t_end = time.perf_counter() + total_s
    parts: dict[str, dict] = {}
    for i, (name, cap) in enumerate(plan, 1):
        left = t_end - time.perf_counter()
        if left < MIN_PART_S:
            parts[name] = {"status": "skipped", "seconds": 0.0, "cap_s": cap, "result": None,
                           "reason": f"the plan's {total_s:.0f} s were used up"}  # fmt: skip
            _progress(f"[{i}/{len(plan)}] {name}: skipped ({parts[name]['reason']})")
            continue
        cap = min(cap, left)
        result_file = work / f"{name}.json"
        result_file.unlink(missing_ok=True)
        _progress(f"[{i}/{len(plan)}] {name} (cap {cap:.0f} s) ...")
        parts[name] = run_part(name, command(name, cap, result_file), cap_s=round(cap, 1), result_file=result_file)
        p = parts[name]
        _progress(
            f"[{i}/{len(plan)}] {name}: {p['status']} in {p['seconds']:.0f} s"
            + (f" ({p['reason']})" if p["reason"] else "")
        )
    return parts


def _progress(msg: str) -> None:
    print(f"retina-bench device: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- goals and report


def _f(v, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def goals(parts: dict[str, dict], sizes: Sizes, *, dry_run: bool) -> list[dict]:
    """Each goal as ``{"goal", "measured", "target", "met"}``; ``met`` is ``yes``/``no``, ``not measured (...)``
    when its part did not deliver the figure, or ``n/a (dry run)``."""

    def res(name: str) -> dict:
        return (parts.get(name) or {}).get("result") or {}

    def why(name: str) -> str:
        p = parts.get(name) or {"status": "not run"}
        return f"not measured ({name}: {p['status']})"

    px = sizes.image_sizes[0]  # 224 (the dry run's stand-in: 64)
    runs = [r for r in res("loader").get("runs", []) if r.get("image_size") == px and "images_per_s" in r]
    best = max(runs, key=lambda r: r["images_per_s"], default=None)
    backbones = res("train").get("backbones", {})
    first = sizes.backbones[0]
    out = [(f"DALI decode+augment at {px} px, img/s (best hw_decoder_load)", best and best["images_per_s"],
            GOAL_DALI_224, ">=", "loader")]  # fmt: skip
    out += [(f"fed / model, {b}", backbones.get(b, {}).get("ratio"), GOAL_FED_RATIO, ">=", "train")
            for b in sizes.backbones]  # fmt: skip
    out += [(f"{first} bf16 fed, img/s", backbones.get(first, {}).get("fed_images_per_s"), GOAL_RESNET50_FED, ">=",
             "train"),
            (f"stack nested CV on {sizes.stack_rows:,} rows, s", res("stack").get("nested_cv_seconds"), GOAL_STACK_S,
             "<", "stack")]  # fmt: skip
    table = []
    for text, measured, target, op, part in out:
        if measured is None:
            met = why(part)
        elif dry_run:
            met = "n/a (dry run)"
        else:
            met = "yes" if (measured >= target if op == ">=" else measured < target) else "no"
        table.append({"goal": text, "measured": measured, "target": f"{op} {target:g}", "met": met})
    return table


@dataclass
class DeviceReport:
    """The command's result: every part's outcome, the goals, where the files are (``emit`` prints it)."""

    dry_run: bool
    device: str
    parts: dict[str, dict]
    goals: list[dict]
    files: dict[str, str] = field(default_factory=dict)

    @property
    def incomplete(self) -> list[str]:
        """The parts that did not finish (``"name (status)"``): the command then exits 1, after the report."""
        return [f"{name} ({p['status']})" for name, p in self.parts.items() if p["status"] != "ok"]

    def to_json(self) -> dict:
        return {"benchmark": "device", "dry_run": self.dry_run, "device": self.device, "goals": self.goals,
                "parts": self.parts, **self.files, "machine": machine()}  # fmt: skip

    def markdown(self) -> str:
        sz = DRY if self.dry_run else GPU
        where = "dry run on the CPU (tiny sizes: the figures only show that every part works)" if self.dry_run \
            else self.device  # fmt: skip
        lines = [f"## retina-bench device: {where}", "", "| part | status | seconds | cap s | note |",
                 "| --- | --- | ---: | ---: | --- |"]  # fmt: skip
        for name, p in self.parts.items():
            lines.append(f"| {name} | {p['status']} | {p['seconds']:.0f} | {p['cap_s']:.0f} | {p['reason']} |")
        lines += ["", "| goal | measured | goal | met |", "| --- | ---: | ---: | --- |"]
        for g in self.goals:
            m = g["measured"]
            lines.append(f"| {g['goal']} | {_f(m, ',.3f' if m is not None and m < 10 else ',.0f')} | "
                         f"{g['target']} | {g['met']} |")  # fmt: skip
        res = {k: (p.get("result") or {}) for k, p in self.parts.items()}
        if res["loader"].get("runs"):
            lo = res["loader"]
            lines += ["", f"DALI `{lo['decode']}` training batches (batch {lo['batch']}, {lo['threads']} threads):", "",
                      "| px | hw_decoder_load | img/s |", "| ---: | ---: | ---: |"]  # fmt: skip
            lines += [f"| {r['image_size']} | {r['hw_decoder_load']} | {_f(r.get('images_per_s'))}"
                      f"{' ' + r['error'][:80] if 'error' in r else ''} |" for r in lo["runs"]]  # fmt: skip
        if res["train"].get("backbones"):
            lines += ["", "| backbone | px | batch | channels-last | model img/s | fed img/s | fed/model | "
                      "GFLOP/img | MFU model | MFU fed |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | "
                      "---: | ---: |"]  # fmt: skip
            for b, r in res["train"]["backbones"].items():
                if "error" in r:
                    lines.append(f"| {b} | failed: {r['error'][:120]} | | | | | | | | |")
                    continue
                lines.append(f"| {b} | {r['image_size']} | {r['batch']} | {'yes' if r['channels_last'] else 'no'} | "
                             f"{_f(r['ceiling_images_per_s'])} | {_f(r['fed_images_per_s'])} | {r['ratio']:.3f} | "
                             f"{_f(r.get('train_gflop_per_image'), '.1f')} | {_f(r.get('mfu_model'), '.1%')} | "
                             f"{_f(r.get('mfu_fed'), '.1%')} |")  # fmt: skip
        if res["stack"]:
            s = res["stack"]
            lines += ["", f"Stack: nested CV on {s['samples']:,} rows, device {s['device']}, strategy {s['strategy']},"
                      f" {s['n_estimators']} trees: {s['nested_cv_seconds']:.1f} s (table {s['table_seconds']:.1f} "
                      f"s), meta-OOF macro-AUC {s['macro_auc']:.4f}."]  # fmt: skip
        if res["demo"]:
            d = res["demo"]
            lines += ["", f"Demo ({', '.join(f'{k} {v}' for k, v in sz.demo.items())}): {d['seconds']:.0f} s, "
                      f"ensemble macro-AUC {d['ensemble_macro_auc']:.3f}, best single {d['best_single_macro_auc']:.3f}"
                      f", external {d['external_macro_auc']:.3f}."]  # fmt: skip
        return "\n".join(lines)


def run(*, quick: bool = False, workers: int = 2, out: Path | None = None, dry_run: bool = False,
        cache: Path | None = None, plan=PLAN, total_s: float = TOTAL_S) -> DeviceReport:  # fmt: skip
    """The whole plan (``--dry-run``: on the CPU at tiny sizes); writes ``OUT/device.json`` and ``OUT/device.md``.
    ``quick`` changes nothing (the plan is already sized to its 8 minutes)."""
    import torch

    import benchmarks
    from retina_io.errors import RetinaError

    if not dry_run and not torch.cuda.is_available():
        raise RetinaError("retina-bench device needs a CUDA GPU, and torch sees none here; use --dry-run to run the "
                          "same plan on the CPU at tiny sizes")  # fmt: skip
    out = Path(out or "bench-device")
    work = out / "parts"
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(cache or Path(tempfile.gettempdir()) / "retina-bench-cache")
    cache.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = workers if dry_run else cores
    root = str(Path(benchmarks.__file__).resolve().parent.parent)  # the parts import this checkout's code
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)

    def command(name: str, cap_s: float, result_file: Path) -> list[str]:
        return [sys.executable, "-m", "benchmarks.bench_device", "--part", name, "--result", str(result_file),
                "--cap-s", f"{cap_s:.1f}", "--cache", str(cache), "--threads", str(threads),
                *(["--dry-run"] if dry_run else [])]  # fmt: skip

    parts = run_plan(plan, command, total_s=total_s, work=work)
    device = "cpu (dry run)" if dry_run else torch.cuda.get_device_name()
    report = DeviceReport(dry_run, device, parts, goals(parts, DRY if dry_run else GPU, dry_run=dry_run),
                          {"json": str(out / "device.json"), "markdown": str(out / "device.md")})  # fmt: skip
    (out / "device.md").write_text(report.markdown() + "\n")
    (out / "device.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return report


def _part_main(argv: list[str] | None = None) -> int:
    """One part, in its own process (what :func:`run` starts): ``--part NAME --result FILE --cap-s S ...``."""
    p = argparse.ArgumentParser(prog="benchmarks.bench_device")
    p.add_argument("--part", choices=sorted(PARTS), required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--cap-s", type=float, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    from retina_io.cli import set_thread_policy, setup_logging

    set_thread_policy()
    setup_logging()
    ctx = Context(dry_run=args.dry_run, cache=args.cache, result_file=args.result,
                  deadline=time.time() + args.cap_s, threads=args.threads)  # fmt: skip
    _save(ctx, PARTS[args.part](ctx))
    return 0


if __name__ == "__main__":
    sys.exit(_part_main())
