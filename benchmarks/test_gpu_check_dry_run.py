"""The GPU check rehearsed on CPU: ``benchmarks/gpu_check.sh --dry-run`` runs every step's Python (preflight,
setup.py, the timings with tiny shapes and the interpreted Triton kernels, the test selection) so that a
typo fails here, not in a GPU window; and the preflight falls back cleanly without a CUDA toolkit."""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env.update(PYTHON=sys.executable, **extra)
    return env


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env=_env(OUT=str(out), GPU_CHECK_BUDGET_S="400"))
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-6000:]
    for step in ("preflight", "build (dry run)", "setup.py rc=0", "copy bandwidth", "timings rc=0",
                 "tests, GPU cases: rc=0", "tests, other cases: rc=0", "status 0"):
        assert step in log, f"{step!r} missing:\n{log[-6000:]}"
    # the headline targets were measured and printed, each with the host time per call
    for target in ("TARGET attribution", "TARGET segment stage", "TARGET p2t_advantages"):
        lines = [ln for ln in log.splitlines() if ln.startswith(target)]
        assert lines and all("host" in ln for ln in lines), f"{target!r}:\n{log[-6000:]}"
    assert "FAILED" not in log and "Traceback" not in log, log[-6000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 6, files
    (csv_name,) = [f for f in files if f.endswith(".csv")]
    with open(out / csv_name, newline="") as f:
        rows = list(csv.DictReader(f))
    kernels = {r["kernel"] for r in rows}
    assert {"copy", "token_attribution", "segment_stage", "p2t_advantages"} <= kernels, kernels
    stage = {r["provider"] for r in rows if r["kernel"] == "segment_stage"}
    assert {"cpu", "cpu:op", "torch_compile"} <= stage, stage
    assert all(float(r["host_ms"]) > 0 for r in rows if r["kernel"] != "copy")


def test_preflight_without_cuda_toolkit_says_so(tmp_path):
    """No nvcc anywhere: exit status 3 ("build: NO") and the reason, not a crash."""
    path = ":".join(d for d in os.environ.get("PATH", "").split(":")
                    if d and not os.path.exists(os.path.join(d, "nvcc")))
    p = subprocess.run([sys.executable, os.path.join(HERE, "gpu_check.py"), "preflight"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env=_env(CUDA_HOME=str(tmp_path / "no-cuda"), PATH=path))
    assert p.returncode == 3, p.stdout + p.stderr
    assert "build: NO" in p.stdout and "no nvcc" in p.stdout, p.stdout


def test_gpu_bench_script_is_consistent():
    """gpu_bench.sh (the second GPU command, not rehearsed end to end): valid bash, and every option it
    passes to a benchmark script is one that script accepts."""
    path = os.path.join(HERE, "gpu_bench.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    with open(path) as f:
        text = f.read().replace("\\\n", " ")
    calls: dict = {}
    for line in text.splitlines():
        for script in re.findall(r"benchmarks/(\w+\.py)", line):
            calls.setdefault(script, set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line.split(script, 1)[1]))
    assert {"e2e_reward_step.py", "bench_ops.py", "recompile_check.py"} <= set(calls), calls
    for script, flags in calls.items():
        p = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=_env())
        assert p.returncode == 0, p.stdout + p.stderr
        missing = {f for f in flags if not re.search(rf"(?<![\w-]){f}(?![\w-])", p.stdout)}
        assert not missing, f"{script} does not accept {sorted(missing)}"
