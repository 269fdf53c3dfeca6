#!/usr/bin/env bash
# The main job: make the environment, then run retina-demo end to end on procedural fundus data
# (generate -> pack -> six tiny backbones x 5 folds with DeepSpeed -> XGBoost stacking -> zero-shot external eval).
# Extra args go to retina-demo (e.g. --out DIR --n 3000 --epochs 5 --backbones paper --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/retina-demo "$@"
