"""The static resource report (benchmarks/static_resources.py): the occupancy model against values worked
out by hand for sm_90, the ptxas log parser, and the script end to end (recompiling only the parts whose
sources changed since the committed results; the CUDA part is skipped without nvcc)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import static_resources as sr  # noqa: E402

LOG = """ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 256 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
"""


@pytest.mark.parametrize("regs,threads,smem,blocks,occ,limiter", [
    (38, 256, 0, 6, 0.75, "registers"),      # 1280 registers per warp: 51 warps -> 6 blocks of 8 warps
    (32, 256, 0, 8, 1.0, "none"),
    (40, 128, 256, 12, 0.75, "registers"),   # 1280 per warp: 51 warps -> 12 blocks of 4
    (64, 128, 512, 8, 0.5, "registers"),
    (123, 128, 128, 4, 0.25, "registers"),   # 4096 per warp: 16 warps
    (16, 128, 100 * 1024, 2, 0.125, "shared"),  # (100 KiB + 1 KiB reserved) per block in 228 KiB
    (16, 32, 0, 32, 0.5, "blocks"),           # at most 32 blocks per SM
])
def test_occupancy_sm90(regs, threads, smem, blocks, occ, limiter):
    got = sr.occupancy(regs, threads, smem)
    assert (got["blocks_per_sm"], got["occupancy"], got["limiter"]) == (blocks, occ, limiter)


def test_parse_ptxas():
    got = sr.parse_ptxas(LOG)
    assert got["_Z3fooPf"] == dict(registers=40, spill_stores=4, spill_loads=16, stack=8, smem=256, barriers=1)
    assert got["_Z3barv"] == dict(registers=32, spill_stores=0, spill_loads=0, stack=0, smem=0, barriers=0)


def test_bytes_model():
    bpe, elem, n = sr._bytes_cuda("attribution_kernel<BFloat16, BFloat16, float, 8>")
    assert elem == "(token, d)" and bpe == pytest.approx(4 + 4 / 1536) and n == 64 * 2048 * 1536
    assert sr._bytes_cuda("segment_kernel<float, float>")[0] == 16
    assert sr._bytes_cuda("something_new<float>")[0] is None


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs c++filt")
def test_static_resources_script(tmp_path):
    pytest.importorskip("triton")
    committed = os.path.join(HERE, "results", sr.NAME + ".json")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, os.path.join(HERE, "static_resources.py"), "--out", str(tmp_path)]
    if os.path.exists(committed):
        cmd += ["--cache", committed]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    with open(tmp_path / (sr.NAME + ".json")) as f:
        doc = json.load(f)
    parts = ["triton"] + (["cuda"] if sr._nvcc() else [])
    for part in parts:
        kernels = doc[part]["kernels"]
        assert kernels, part
        for k in kernels:
            assert "error" not in k, k
            assert 0 < k["registers"] <= 255 and k["threads"] > 0 and 0 < k["occupancy"] <= 1, k
            assert k["spill_stores"] >= 0 and k["smem"] >= 0, k
    names = " ".join(k["name"] for k in doc["triton"]["kernels"])
    assert "_attribution_kernel" in names and "_segment_kernel" in names
    assert os.path.exists(tmp_path / (sr.NAME + ".md"))
