#!/usr/bin/env bash
# Every GPU benchmark of p2t in one run, within 8 minutes on an H100/H200 (a second command, for a GPU window
# after benchmarks/gpu_check.sh; with the build skipped when gpu_check.sh built in the same machine session): the op benchmarks (every
# backend vs the eager reference vs torch.compile static/dynamic, N and D sweeps, dense/padded/packed,
# bf16 + fp32, % of the copy bandwidth measured in the same run), the recompilation check and the
# end-to-end P2T reward step on a random-init Qwen2 of the 1.5B shape. Each step has its own timeout and
# a failed step does not stop the later ones; CSVs are written row by row, so a timeout keeps what was
# measured. Writes to $OUT (default benchmarks/results), at most 6 files:
#   gpu_bench.log, e2e_<card>.csv, ops-headline_<card>.csv, recompile_<card>.csv, ops_<card>.csv, build.log
#
#   OUT=/some/dir bash benchmarks/gpu_bench.sh
# Optional: a Liger-Kernel wheel under .whl/ (no network on the GPU machine) adds the engine with
# Liger's Qwen2 patches; P2T_SKIP_BUILD=1 skips the build when p2t._C already has CUDA kernels.
set -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then PY=$(command -v python3 || command -v python || echo python3); fi
LOG="$OUT/gpu_bench.log"
: > "$LOG"
say() { echo "[gpu_bench $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
T_START=$(date +%s)
left() { echo $(( 470 - ($(date +%s) - T_START) )); }   # seconds left of the 8-minute budget (10 s margin)
budget() { local want=$1 l; l=$(left); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 5 ] && want=5; echo "$want"; }
status=0

say "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"

# 1. build (skipped when the CUDA kernels are already registered, e.g. after gpu_check.sh in the same call)
has_cuda() { "$PY" -c "import torch, p2t, sys; sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key('p2t::token_attribution', 'CUDA') else 1)" 2>/dev/null; }
if [ "${P2T_SKIP_BUILD:-0}" = 1 ] || has_cuda; then
  say "build skipped (CUDA kernels present: $(has_cuda && echo yes || echo no))"
else
  if [ -z "${CUDA_HOME:-}" ]; then
    for d in /usr/local/cuda /usr/local/cuda-*; do
      if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
    done
  fi
  export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
  t0=$(date +%s)
  P2T_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
    timeout "$(budget 150)" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  say "build rc=$rc in $(( $(date +%s) - t0 )) s"
  [ $rc -ne 0 ] && { status=1; grep -E "error" "$OUT/build.log" | head -10 | tee -a "$LOG"; }
fi
if command -v nvidia-smi >/dev/null && ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install --no-deps --no-index -q .whl/liger_kernel-*.whl >> "$LOG" 2>&1 && say "liger-kernel installed from .whl/"
fi
"$PY" -m p2t env 2>&1 | tee -a "$LOG"
TAG=$("$PY" -c "from p2t import bench; print(bench.device_tag('cuda'))" 2>/dev/null || echo gpu)

run_step() {  # name, seconds, command...
  local name=$1 secs; secs=$(budget "$2"); shift 2
  say "$name (timeout ${secs}s)"
  local t0; t0=$(date +%s)
  timeout -k 10 "$secs" "$@" 2>&1 | grep -v -E "^W[0-9]{4} |USDT" | tee -a "$LOG"
  local rc=$?
  say "$name rc=$rc in $(( $(date +%s) - t0 )) s"
  [ $rc -ne 0 ] && status=1
}

# Most important first; the last step takes what is left of the budget.
# 2. end-to-end P2T reward step, Qwen2 1.5B shape, bf16, sdpa; packed beside sorted-padded micro-batches
LIGER=""
"$PY" -c "import liger_kernel" 2>/dev/null && LIGER="--liger"
run_step "e2e reward step" 250 "$PY" benchmarks/e2e_reward_step.py --device cuda $LIGER --reps 2 \
  --methods forward,naive,engine,packed,exact,host --out "$OUT/e2e_${TAG}.csv"
# 3. op benchmarks at the headline shapes, every provider (static and dynamic compile), bf16 + fp32
run_step "ops headline" 70 "$PY" benchmarks/bench_ops.py --device cuda --suite quick --dtypes bf16,fp32 \
  --out "$OUT/ops-headline_${TAG}.csv"
# 4. recompilation: 10 lengths through compiled callers and the Triton kernels (JIT cache misses)
run_step "recompile check" 45 "$PY" benchmarks/recompile_check.py --device cuda --out "$OUT/recompile_${TAG}.csv"
# 5. the bf16 sweep (N, D, dense/padded/packed, forward/backward/full at the headline shapes) vs static compile
PROVS=$("$PY" -c "from p2t import bench; print(','.join(bench.providers('cuda', ('torch_compile',))))")
run_step "ops bf16 sweep" 400 "$PY" benchmarks/bench_ops.py --device cuda --suite full --dtypes bf16 \
  --providers "$PROVS" --out "$OUT/ops_${TAG}.csv"

say "done in $(( $(date +%s) - T_START )) s, status $status; files: $(ls "$OUT" | tr '\n' ' ')"
exit $status
