"""``benchmarks/grpo_update.py --tiny``: the per-part timing of a GRPO update runs end to end on a tiny lab
(both samplers, every part of a P2T update timed, one line per sampler)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_grpo_update_tiny():
    p = subprocess.run([sys.executable, os.path.join(HERE, "grpo_update.py"), "--tiny", "--repeats", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["sampler"] for r in rows] == ["fast", "hf"]
    for r in rows:
        assert r["threads"] == 1 and r["mode"] == "p2t"
        assert all(r[k] > 0 for k in ("sampling", "scoring", "policy", "update", "evaluation"))
