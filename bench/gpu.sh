#!/usr/bin/env bash
# The device check, on the GPU machine (bench/gpu.py says what it checks and measures): installs
# the wheels bench/gpu_wheels.sh downloaded (carried in wheels/) beside the machine's own torch,
# then runs bench/gpu.py, figures to $OUT/gpu.json. Idempotent: a second run reuses the venv.
# Here, with no GPU: `bash bench/gpu.sh --dry-run` runs every part on the CPU on a tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-out}"
venv=.venv-gpu
if [ ! -x "$venv/bin/daemon" ]; then
  python3 -m venv --system-site-packages "$venv"   # torch, Triton and CUDA: the machine's
  if [ -d wheels ]; then
    "$venv/bin/pip" install --quiet --no-index --no-deps wheels/*.whl
  fi
  # the project itself (its CPU kernels compile here), its dependencies installed above
  "$venv/bin/pip" install --quiet --no-index --no-deps --no-build-isolation -e .
fi
exec "$venv/bin/python" bench/gpu.py --out "$out" "$@"
