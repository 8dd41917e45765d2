#!/usr/bin/env bash
# Install linops into the current Python. `bash scripts/setup.sh` for the package,
# `bash scripts/setup.sh test` for the package and its test tools.
# torch comes first, pinned to 2.13.0 when absent: a bare `pip install torch` would pull a
# multi-gigabyte CUDA build, while 2.13.0 installs a local CPU build quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install --quiet -e ".${extra}"
