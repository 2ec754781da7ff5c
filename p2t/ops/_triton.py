"""Registers the "triton" backend: the Triton kernels of ``p2t_kernels`` wrapped as custom ops in
the ``p2t_triton`` namespace. Usable on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1."""
from __future__ import annotations

from . import _backends

_backends.mark_unavailable("triton", "the Triton backend is not written yet")
