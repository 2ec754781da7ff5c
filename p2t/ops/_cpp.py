"""Loads the compiled extension ``p2t._C`` (C++ CPU kernels, CUDA kernels when built with CUDA) and
registers the "cpu" and "cuda" backends. Without the extension p2t still imports: the reference
backend serves, and one warning says how to build."""
from __future__ import annotations

import warnings

import torch

from . import _backends
from ._custom import make_backend, register_meta


class P2TExtensionWarning(UserWarning):
    pass


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("p2t::token_attribution", "CUDA")


try:
    from p2t import _C  # noqa: F401
except ImportError as e:
    why = f"the compiled extension p2t._C could not be imported ({e})"
    _backends.mark_unavailable("cpu", why)
    _backends.mark_unavailable("cuda", why)
    warnings.warn(f"p2t: {why}; using the plain-PyTorch reference backend. To build the fused kernels: "
                  f"{_backends.HOW_TO_BUILD['cpu']}", P2TExtensionWarning, stacklevel=2)
else:
    register_meta("p2t")
    _backends.register(make_backend("cpu", ("cpu",), "p2t"))
    if not _has_cuda_kernels():
        _backends.mark_unavailable("cuda", "p2t._C was built without CUDA kernels")
    elif not torch.cuda.is_available():
        _backends.mark_unavailable("cuda", "p2t._C has CUDA kernels but no GPU is visible")
    else:
        _backends.register(make_backend("cuda", ("cuda",), "p2t"))
