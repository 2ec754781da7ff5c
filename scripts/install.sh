#!/usr/bin/env bash
# Creates .venv (unless a virtualenv is already active), installs p2t's requirements and builds the
# extension in place. Usage: scripts/install.sh [dev]   ("dev" adds the test requirements)
# env: P2T_BUILD_CUDA=auto|0|1 (auto: CUDA kernels when torch is a CUDA build and nvcc is found)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -q --upgrade pip
req=requirements.txt
[ "${1:-}" = "dev" ] && req=requirements-dev.txt
python -m pip install -q -r "$req"
if [ "${1:-}" = "dev" ]; then
  # the trainers the integrations are tested against and what verl's entry points import (hydra-core,
  # torchdata, TransferQueue, ...); verl itself without its pins (they conflict with transformers 5)
  python -m pip install -q -r requirements-integrations.txt
  python -m pip install -q --no-deps "verl==0.9.1"
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
python -m pip install -q --no-build-isolation --no-deps -e .
python -m p2t env
