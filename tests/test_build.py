"""The build artefacts: the CMake library for libtorch users, and p2t without any compiled extension."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.skipif(not os.environ.get("P2T_CMAKE_LIB"), reason="set P2T_CMAKE_LIB to the CMake-built libp2t.so")
def test_cmake_library_registers_the_ops():
    r = _run("""
        import os, torch
        torch.ops.load_library(os.environ["P2T_CMAKE_LIB"])
        g, e, n = torch.randn(7, 33, dtype=torch.float64), torch.randn(7, 33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
        out = torch.ops.p2t.token_attribution(g, e, n, None)
        torch.testing.assert_close(out, ((e - n) * g).sum(-1))
        ids = torch.tensor([0, 0, -1, 1, 1, 1, -1])
        r = torch.ops.p2t.segment_redistribute(torch.randn(7), ids, torch.tensor([0.5, 1.0]), 0.6, 1.0, False, True, 0.0)
        assert abs(r[:2].sum().item() - 0.5) < 1e-6 and abs(r[3:6].sum().item() - 1.0) < 1e-6 and r[2] == 0
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_imports_without_extension_and_falls_back_to_reference():
    r = _run("""
        import sys, warnings
        sys.modules["p2t._C"] = None  # as if the extension were not built
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import p2t, torch
        msgs = [str(x.message) for x in w if "p2t" in str(x.message)]
        assert len(msgs) == 1 and "pip install" in msgs[0], msgs
        assert p2t.available_backends("cpu") == ["reference"] or "triton" in p2t.available_backends("cpu")
        g = torch.randn(2, 3, 4)
        assert p2t.token_attribution(g, g, torch.zeros(4)).shape == (2, 3)
        try:
            p2t.token_attribution(g, g, torch.zeros(4), backend="cpu")
        except RuntimeError as e:
            assert "not available" in str(e) and "To get it" in str(e)
        else:
            raise AssertionError("backend='cpu' should fail without the extension")
        from p2t.ops import host  # the layout takes its NumPy path
        assert host.has_layout() is False and host.layout_ids(*[None] * 9, 0, None, False) is None
        print("ok")
    """, TRITON_INTERPRET="0")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_readme_example_runs():
    import re

    import torch

    src = open(os.path.join(ROOT, "README.md")).read()
    code = next(b for b in re.findall(r"```python\n(.*?)```", src, re.S) if "A_fused" in b)  # the ops example
    ns = {}
    exec(code, ns)
    torch.testing.assert_close(ns["A"], ns["A_fused"], rtol=1e-5, atol=1e-5)
    assert ns["A"].shape == (8, 512) and ns["A"].std() > 0


def test_extension_has_avx512_code():
    """The built extension carries AVX-512 clones of the CPU kernels (zmm registers) next to the portable code."""
    import glob
    import platform
    import shutil

    so = glob.glob(os.path.join(ROOT, "p2t", "_C*.so"))
    if not so or shutil.which("objdump") is None or platform.machine() != "x86_64":
        pytest.skip("needs the in-place built extension, objdump and x86-64")
    import p2t
    if "avx512" not in p2t.ops.cpu_isas():
        pytest.skip(f"this CPU has no AVX-512 (clones here: {p2t.ops.cpu_isas()}); the check reads the code only")
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so[0]], capture_output=True, text=True,
                         timeout=300).stdout
    assert asm.count("zmm") > 100 and asm.count("ymm") > 100, (asm.count("zmm"), asm.count("ymm"))
