"""``benchmarks/contention.py --dry-run``: the busy-core benchmark runs end to end with tiny shapes (every
provider checked against float64, one quiet and one busy phase, the verdict lines, the CSV), and the busy
process it starts is gone when it returns."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_contention_dry_run(tmp_path):
    out = tmp_path / "c.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, os.path.join(HERE, "contention.py"), "--dry-run", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    assert "load average" in log
    for d in ("fp32", "bf16"):
        assert sum(ln.startswith(f"TARGET {d} busy") for ln in log.splitlines()) == 2, log[-4000:]
        assert sum(ln.startswith(f"TARGET {d} quiet") for ln in log.splitlines()) == 1, log[-4000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    cells = {(r["phase"], r["dtype"], r["provider"]) for r in rows}
    assert cells == {(ph, d, pr) for ph in ("quiet", "busy") for d in ("fp32", "bf16")
                     for pr in ("cpp-1t", "compile-1t", "cpp-2t", "compile-2t", "cpp-2t-all")}, cells
    assert all(float(r["median_ms"]) > 0 and float(r["p90_ms"]) >= float(r["median_ms"]) for r in rows)
    assert all(float(r["gbps"]) > 0 for r in rows)
    assert {r["isa"] for r in rows if r["provider"].startswith("cpp")} <= {"default", "avx2", "avx512"}
    # the busy process was stopped
    pids = [int(ln.split()[2]) for ln in log.splitlines() if ln.startswith("busy process")]
    assert len(pids) == 1, log[-4000:]
    try:
        os.kill(pids[0], 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
