#!/usr/bin/env bash
# Install linops into the current Python. `bash scripts/setup.sh` for the package,
# `bash scripts/setup.sh test` for the package and its test tools, `bash scripts/setup.sh bench`
# for the peers the benchmarks compare with (curvlinops 3.0.1, JAX).
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
if [ "${1:-}" = "bench" ]; then
  # backpack-for-pytorch (a curvlinops dependency) asks for torchvision, and torchvision for
  # the newest torch: a plain `pip install .[bench]` replaced torch 2.13.0+cpu by a 5 GB CUDA
  # build. curvlinops and backpack never import torchvision here, so they go in without deps.
  "$PY" -m pip install --quiet -e ".[bench]"
  "$PY" -m pip install --quiet --no-deps "curvlinops-for-pytorch==3.0.1" "backpack-for-pytorch==1.7.1"
fi
