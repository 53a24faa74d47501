#!/usr/bin/env bash
# The first run on a GPU, one command: build and install nvrm_ext (editable, this checkout), run
# every cuda-marked test, run the GPU bench rows (launches per step, bandwidth against a measured
# device-to-device copy), write bench/results/gpu.json and print a one-screen summary.
# Budget (one H100/H200, 16 cores): build <= 150 s, tests <= 150 s, bench <= 120 s: under 8 min.
# Without a GPU it refuses: exit status 2 and one line saying why.
#
# Environment: PYTHON, the interpreter to build, install and test with (default: python3; a venv's
# interpreter need not be activated); BUILD=0 skips the build (an install already made).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
cd "$ROOT"

if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import torch; install PyTorch (a CUDA build) first" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU" >&2
  exit 2
fi

if [[ "${BUILD:-1}" != 0 ]]; then
  echo "== building and installing nvrm_ext (CUDA library with nvcc when found)"
  start=$SECONDS
  # No network is assumed: build with what is installed (setuptools, ninja or a ninja on PATH);
  # fall back to an isolated build, which downloads the build requirements.
  timeout 150 "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . \
    || timeout 150 "$PYTHON" -m pip install -q --no-deps -e .
  echo "built in $((SECONDS - start)) s: $("$PYTHON" -c 'from nvrm_ext.backends import compiled; print(compiled.build_info())')"
fi

echo "== cuda-marked tests, then the bench rows"
exec "$PYTHON" -m bench.gpu_check "$@"
