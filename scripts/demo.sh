#!/usr/bin/env bash
# The main job (until retina-demo exists): generate a procedural fundus dataset, pack it into shards, verify them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-demo-out}
N=${N:-2000}
SIZE=${SIZE:-256}
.venv/bin/retina-synth --out "$OUT/synfundus" --n "$N" --size "$SIZE" --seed 0
.venv/bin/retina-shard pack --images "$OUT/synfundus" --labels "$OUT/synfundus/labels.csv" --preset synfundus \
  --out "$OUT/shards/synfundus" --folds 5 --seed 0
.venv/bin/retina-shard verify "$OUT/shards/synfundus"
