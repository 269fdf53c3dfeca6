"""``retina-stack``: the command line over :func:`retina_train.stack.run.run_stack`.

    retina-stack --runs runs/EXP --data shards/NAME --out runs/EXP/stack \\
        [--strategy auto|native|multioutput] [--device auto|cuda|cpu] [--bootstrap 1000] [--seed 0]

Exit 0 on success; 2 with one message naming the input and the fix when the inputs are wrong (no OOF files, a folder
that is not a packed dataset, incomplete or duplicated OOF, a dataset sharing no class with the backbones).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from retina_io.cli import config_from_args, console_main, setup_logging
from retina_train.stack.meta import DEVICES, STRATEGIES, MetaParams
from retina_train.stack.rows import CONTROL_ROW, MEAN_ROW, META_ROW
from retina_train.stack.run import StackConfig, run_stack


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retina-stack",
        description="Stack the backbones' out-of-fold predictions with an XGBoost meta-learner (nested CV).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--runs", type=Path, required=True, help="experiment folder: runs/EXP/MODEL/fold{k}/oof-rank{R}")
    p.add_argument("--data", type=Path, required=True, help="the packed dataset the backbones were trained on")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. runs/EXP/stack")
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="meta-learner: one XGBoost over the label "
        "matrix (native), MultiOutputClassifier (multioutput), or native unless fold 0 says otherwise",
    )
    p.add_argument("--device", choices=DEVICES, default="auto", help="XGBoost device (auto: cuda when visible)")
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for the confidence intervals (time grows with samples x resamples: at 1M samples "
        "on a few cores, 200 is quicker and ample)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the meta-learner, bootstrap and control")
    d = MetaParams()
    p.add_argument("--n-estimators", type=int, default=d.n_estimators, help="boosting rounds (trees per class)")
    p.add_argument("--max-depth", type=int, default=d.max_depth, help="tree depth (0: no limit)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="shrinkage")
    p.add_argument("--threads", type=int, default=None, help="XGBoost threads (default: all cores)")
    p.add_argument("--control-rows", type=int, default=200_000, help="rows of the shuffled-label control (subsample)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    return console_main("retina-stack", _run, argv)


def _run(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    params = config_from_args(MetaParams, args, n_jobs=args.threads)
    cfg = config_from_args(StackConfig, args, params=params, control_max_rows=args.control_rows,
                           progress=not args.no_progress)  # fmt: skip
    result = run_stack(cfg)
    t = result.table
    print(
        f"stacked {t.n:,} samples x {len(t.feature_columns)} features ({len(t.models)} models); "
        f"classes {', '.join(t.targets)}" + (f"; skipped {', '.join(t.skipped)}" if t.skipped else "")
    )
    print(
        f"macro AUC: meta-learner ({result.strategy}) {result.macro(META_ROW):.4f}, mean of backbones "
        f"{result.macro(MEAN_ROW):.4f}, control {result.macro(CONTROL_ROW):.4f}"
    )
    print(f"report: {result.files['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
