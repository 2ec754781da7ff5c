"""Shared test setup: TRITON_INTERPRET before triton is imported, and a fixed seed per test.

Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set here before
triton is imported), so the "triton" backend joins the CPU cases with small shapes.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import p2t  # noqa: E402,F401  (imported after TRITON_INTERPRET: the triton backend registers for CPU)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
