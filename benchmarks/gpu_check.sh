#!/usr/bin/env bash
# The GPU check: one command for a GPU window (fresh machine, no network, no package index; python3 with
# torch, triton, transformers, ninja, setuptools and pytest preinstalled; nvcc under /usr/local/cuda*).
# At most GPU_CHECK_BUDGET_S seconds (default 585) in all, each step under its own timeout, a failed step
# does not stop the later ones, and every line goes to the log as it is printed:
#   0. preflight: python, torch/CUDA, triton, transformers, pytest(-timeout), nvcc, ninja, CUDA_HOME, Python.h;
#      without nvcc or Python.h the build is skipped and the check goes on with Triton + reference;
#   1. build the C++ and CUDA kernels in place against the preinstalled torch (no pip, no downloads);
#   2. timings (benchmarks/gpu_check.py): copy bandwidth first, then the headline targets (attribution at the
#      PERF.md shapes, the segment + advantage stage at 64x2048/16 incl. its CUDA-graph time, p2t_advantages
#      vs the attribution), each printed as "TARGET ..." as soon as it is measured, with torch.compile on
#      those cases only; host time per call beside device time; then the other cases while time is left;
#   3. the GPU cases of the op and backend tests (pytest --timeout), then the rest of those files;
#   4. the TARGET lines again, last.
# Files in $OUT (5, default benchmarks/results): gpu_check.log, build.log, gpu_check_<card>.csv, tests.log,
# tests_rest.log.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run                # rehearsal on CPU: every step's Python, tiny shapes,
#                                                         # no build (setup.py only evaluated), tests collected
# Env: PYTHON (default python3, else python), CUDA_HOME, GPU_CHECK_BUDGET_S, MAX_JOBS.
# The end-to-end benchmark (benchmarks/gpu_bench.sh) is a separate command for a second window.
set -o pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 1 ]; then OUT="${OUT:-${TMPDIR:-/tmp}/p2t-gpu-check-dry-run}"; else OUT="${OUT:-benchmarks/results}"; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then PY=$(command -v python3 || command -v python || echo python3); fi
LOG="$OUT/gpu_check.log"
: > "$LOG"
T_START=$(date +%s)
BUDGET="${GPU_CHECK_BUDGET_S:-585}"
say() { echo "[gpu_check $(date -u +%H:%M:%S) +$(( $(date +%s) - T_START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - T_START) )); }
cap() { local want=$1 l; l=$(( $(left) - ${2:-0} )); [ "$l" -lt "$want" ] && want=$l; [ "$want" -lt 5 ] && want=5; echo "$want"; }
status=0
if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1 P2T_BENCH_COMPILE_BACKEND=eager
  say "DRY RUN on CPU (TRITON_INTERPRET=1, torch.compile traced with its eager backend); OUT=$OUT"
fi

# 0. preflight -------------------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; break; fi
  done
fi
[ -n "${CUDA_HOME:-}" ] && export PATH="$CUDA_HOME/bin:$PATH"
say "preflight: $PY ($(command -v "$PY" || echo missing)); nvidia-smi: $(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1 || echo none)"
timeout 60 "$PY" benchmarks/gpu_check.py preflight 2>&1 | tee -a "$LOG"
pre=$?
BUILD=1
if [ $pre -eq 3 ]; then BUILD=0
elif [ $pre -ne 0 ]; then BUILD=0; say "preflight failed (rc=$pre)"; [ $DRY = 0 ] && status=1; fi

# 1. build -----------------------------------------------------------------------------------------
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if [ $DRY = 1 ]; then
  say "build (dry run): setup.py evaluated, not built; the GPU run does: P2T_BUILD_CUDA=1 $PY setup.py build_ext --inplace"
  P2T_BUILD_CUDA=auto timeout 120 "$PY" setup.py --name > "$OUT/build.log" 2>&1
  rc=$?
  say "setup.py rc=$rc: $(grep -v -i warn "$OUT/build.log" | tail -2 | tr '\n' ' ')"
  [ $rc -ne 0 ] && status=1
elif [ $BUILD = 1 ]; then
  t0=$(date +%s)
  secs=$(cap 230 300)
  say "build (timeout ${secs}s, MAX_JOBS=$MAX_JOBS, CUDA_HOME=$CUDA_HOME)"
  P2T_BUILD_CUDA=1 timeout "$secs" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  say "build rc=$rc in $(( $(date +%s) - t0 )) s (log: $OUT/build.log)"
  if [ $rc -ne 0 ]; then
    status=1
    grep -E "error|Error" "$OUT/build.log" | head -20 | tee -a "$LOG"
  fi
else
  say "build skipped (see preflight): timings and tests with the backends that need no build"
  echo "build skipped by the preflight" > "$OUT/build.log"
fi
"$PY" -c "import p2t; print('backends:', {d: p2t.available_backends(d) for d in ('cpu', 'cuda')}, '| unavailable:', p2t.ops._backends.unavailable_backends())" 2>&1 \
  | grep -v -E "Warning|_cpp" | tee -a "$LOG"

# 2. timings, headline targets first ---------------------------------------------------------------
tb=$(cap 220 150)
say "timings (budget ${tb}s for starting cases, hard timeout $(( tb + 60 ))s)"
args=(timings --out "$OUT" --budget-s "$tb")
[ $DRY = 1 ] && args+=(--dry-run)
timeout -k 5 $(( tb + 60 )) "$PY" benchmarks/gpu_check.py "${args[@]}" ${GPU_CHECK_ARGS:-} 2>&1 \
  | grep --line-buffered -v -E "^W[0-9]{4} |USDT|P2TExtensionWarning|from \. import _cpp" | tee -a "$LOG"
rc=$?
say "timings rc=$rc"
[ $rc -ne 0 ] && status=1

# 3. tests: GPU cases first, then the rest of the op and backend tests ------------------------------
TESTS="tests/test_gpu_backends.py tests/test_ops.py"
targs=(-q -p no:cacheprovider -rs)
if "$PY" -c "import pytest_timeout" 2>/dev/null; then targs+=(--timeout 90); else say "pytest-timeout missing: no per-test timeout"; fi
[ $DRY = 1 ] && targs+=(--collect-only)
if "$PY" -c "import pytest" 2>/dev/null; then
  secs=$(cap 400 10)
  say "tests, GPU cases (timeout ${secs}s)"
  t0=$(date +%s)
  timeout -k 5 "$secs" "$PY" -m pytest $TESTS -k "cuda or triton" "${targs[@]}" > "$OUT/tests.log" 2>&1
  rc=$?
  tail -25 "$OUT/tests.log" | tee -a "$LOG"
  say "tests, GPU cases: rc=$rc in $(( $(date +%s) - t0 )) s (log: $OUT/tests.log)"
  [ $rc -ne 0 ] && status=1
  if [ "$(left)" -gt 40 ]; then
    secs=$(cap 300 5)
    t0=$(date +%s)
    timeout -k 5 "$secs" "$PY" -m pytest $TESTS -k "not (cuda or triton)" "${targs[@]}" > "$OUT/tests_rest.log" 2>&1
    rc=$?
    tail -5 "$OUT/tests_rest.log" | tee -a "$LOG"
    say "tests, other cases: rc=$rc in $(( $(date +%s) - t0 )) s (log: $OUT/tests_rest.log)"
    [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1
  else
    say "no time left for the other test cases"
  fi
else
  say "pytest is not installed: tests skipped"
  status=1
fi

# 4. the targets, last ------------------------------------------------------------------------------
say "targets (first measurement of each line):"
targets=$(grep "^TARGET " "$LOG" | awk '!seen[$0]++')
echo "${targets:-(none measured)}" | tee -a "$LOG"
say "done in $(( $(date +%s) - T_START )) s, status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
