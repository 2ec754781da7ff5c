"""Registers the "triton" backend: the Triton kernels of ``p2t_kernels`` wrapped as custom ops in
the ``p2t_triton`` namespace (schemas, fakes and backwards from the spec table ``_spec.SPECS``, as the
``p2t`` ops of csrc/). Usable on CUDA tensors, and on
CPU tensors under TRITON_INTERPRET=1 (set before triton is first imported).

``torch.library.custom_op`` (not ``triton_op``): it passes opcheck under the interpreter too."""
from __future__ import annotations

import os

import torch

from . import _backends
from ._custom import make_backend, register_meta
from ._spec import SPECS

NS = "p2t_triton"

# the p2t_kernels launcher of each op of the spec table (the *_out twins write into their last argument)
LAUNCHERS = {"token_attribution": "token_attribution", "segment_redistribute": "segment_redistribute",
             "token_advantages": "token_advantages", "token_advantages_out": "token_advantages_into",
             "p2t_advantages": "p2t_advantages", "p2t_advantages_out": "p2t_advantages_into"}


def _register(kernels) -> None:
    for name, spec in SPECS.items():
        launch = getattr(kernels, LAUNCHERS[name])
        if spec.mutates:
            def fn(*args, _launch=launch):
                _launch(*args)
        else:
            def fn(*args, _launch=launch):
                return _launch(*args)
        torch.library.custom_op(f"{NS}::{name}", fn, mutates_args=spec.mutates, schema=spec.schema)


def _devices() -> tuple:
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


try:
    import p2t_kernels
except ImportError as e:  # triton missing or unusable
    _backends.mark_unavailable("triton", f"triton could not be imported ({e})")
else:
    if not hasattr(torch.ops, NS) or not hasattr(getattr(torch.ops, NS), "token_attribution"):
        _register(p2t_kernels)
    register_meta(NS)
    if torch.cuda.is_available() or "cpu" in _devices():
        _backends.register(make_backend("triton", _devices(), NS))
    else:
        _backends.mark_unavailable("triton", "no GPU is visible (on CPU, set TRITON_INTERPRET=1 before importing "
                                             "p2t to run the Triton kernels in the interpreter)")
