#!/usr/bin/env bash
# Builds libp2t with CMake against the installed torch (the C++/libtorch route; Python users use setup.py).
# Usage: scripts/cmake_build.sh [BUILD_DIR]   env: P2T_BUILD_CUDA=AUTO|ON|OFF, TORCH_CUDA_ARCH_LIST (default 9.0)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$here/build/cmake}"
py="${PYTHON:-python}"
prefix="$($py -c 'import torch; print(torch.utils.cmake_prefix_path)')"
args=(-DCMAKE_PREFIX_PATH="$prefix" -DP2T_BUILD_CUDA="${P2T_BUILD_CUDA:-AUTO}")
if [ "$($py -c 'import torch; print(torch.version.cuda or "")')" != "" ]; then
  # A CUDA build of torch makes find_package(Torch) look for the toolkit; the pip wheels carry
  # the CUDA libraries (nvrtc, cuBLAS headers) that a bare toolkit may lack.
  cuda="${CUDA_HOME:-/usr/local/cuda}"
  nv="$($py -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null || true)"
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda")
  if [ -n "$nv" ] && [ -e "$nv/lib/libnvrtc.so.13" ]; then
    args+=(-DCUDA_nvrtc_LIBRARY="$nv/lib/libnvrtc.so.13" -DCMAKE_CUDA_FLAGS="-I$nv/include" -DCMAKE_CXX_FLAGS="-I$nv/include")
  fi
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
fi
cmake -S "$here" -B "$build" "${args[@]}"
cmake --build "$build" -j "$(nproc)"
echo "built: $(ls "$build"/libp2t.so)"
