#!/usr/bin/env bash
# Install linops into the current Python, printing each step and its elapsed time.
#   bash scripts/setup.sh          the package (and a CPU-only torch 2.13.0 when no torch is present)
#   bash scripts/setup.sh test     the package and its test tools (pytest, hypothesis, ruff, mypy)
#   bash scripts/setup.sh bench    the package and the peers the benchmarks compare with
#                                  (curvlinops 3.0.1, JAX, PyHessian, transformers)
# PYTHON=/path/to/python picks the interpreter (default: python3); an existing torch is kept.
# torch comes first: a bare `pip install torch` (or `pip install .` without a torch) pulls the
# default CUDA build with its nvidia-* packages (about 5.7 GB installed), while the CPU build is
# about 1 GB. TORCH_INDEX_URL (default: https://download.pytorch.org/whl/cpu, PyTorch's CPU-only
# index) is where the CPU build comes from; set TORCH_INDEX_URL= (empty) to use pip's own
# configured index instead (a local mirror that already serves the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
mode=${1:-}
case "$mode" in
  "" | test | bench) ;;
  *) echo "setup.sh: expected no argument, 'test' or 'bench', got '$mode'" >&2; exit 2 ;;
esac
START=$SECONDS
step() { echo "[setup.sh +$((SECONDS - START))s] $*"; }
pip_install() { "$PY" -m pip install --quiet --progress-bar off "$@"; }

step "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if "$PY" -c "import torch" >/dev/null 2>&1; then
  step "torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null) already installed: kept"
else
  if [ -n "$TORCH_INDEX_URL" ] && ! "$PY" -c "import sys, urllib.request as u; \
      u.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=10)" "$TORCH_INDEX_URL" >/dev/null 2>&1; then
    step "$TORCH_INDEX_URL does not answer (offline?): using pip's configured index instead"
    TORCH_INDEX_URL=""
  fi
  step "installing torch 2.13.0 (CPU build, about 200 MB to download; a minute or two) ..."
  if [ -n "$TORCH_INDEX_URL" ]; then
    pip_install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  else
    pip_install "torch==2.13.0"
  fi
  step "installed torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
fi
extra=""
[ "$mode" = "test" ] && extra="[test]"
[ "$mode" = "bench" ] && extra="[bench]"
step "installing linops${extra} in editable mode (numpy, scipy, matplotlib, scikit-learn, tqdm) ..."
pip_install -e ".${extra}"
if [ "$mode" = "bench" ]; then
  # backpack-for-pytorch (a curvlinops dependency) asks for torchvision, and torchvision for
  # the newest torch: a plain `pip install .[bench]` replaced torch 2.13.0+cpu by a 5 GB CUDA
  # build. curvlinops and backpack never import torchvision here, so they go in without deps;
  # so does PyHessian (its requirements would pull a torch too).
  step "installing the peers curvlinops 3.0.1, backpack 1.7.1, pyhessian 0.1 (no deps) ..."
  pip_install --no-deps "curvlinops-for-pytorch==3.0.1" "backpack-for-pytorch==1.7.1" "pyhessian==0.1"
  step "installing transformers (for the GPT-style models of bench/) ..."
  pip_install transformers
fi
step "done: linops $("$PY" -c 'import linops; print(linops.__version__)'); try: linops report --quick"
