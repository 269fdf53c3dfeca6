#!/usr/bin/env bash
# Create .venv (if absent) and install retina with its dependencies; idempotent. Used by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch <= 2.14.1: the CUDA build that the pinned range selects runs on the CPU where there is no GPU.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v -E "^WARNING: Location .* is ignored" || true
.venv/bin/python -c "import retina_io, polars, PIL, nvidia.dali, webdataset, iterstrat" \
  || { echo "setup: the installation is incomplete (see pip's output above)" >&2; exit 1; }
