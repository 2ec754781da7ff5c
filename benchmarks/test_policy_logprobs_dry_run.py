"""``benchmarks/policy_logprobs.py --dry-run``: the eager and chunked log-prob paths run end to end on tiny
shapes, agree (log-prob sum and gradient norm), and the CSV holds one row per path and length."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_policy_logprobs_dry_run(tmp_path):
    pytest.importorskip("trl.kernels", reason="the chunked path needs TRL >= 1.16")
    out = tmp_path / "p.csv"
    p = subprocess.run([sys.executable, os.path.join(HERE, "policy_logprobs.py"), "--dry-run", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "MISMATCH" not in log and "Traceback" not in log, log[-4000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["path"], r["length"]) for r in rows} == {(pa, n) for pa in ("eager", "chunked") for n in ("8", "16")}
    assert all(float(r["time_s"]) > 0 and float(r["rss_mib"]) > 0 for r in rows)
