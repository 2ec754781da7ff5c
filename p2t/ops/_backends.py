"""The one dispatch table: which backends exist, which devices each runs on, which one "auto" picks.

A backend provides four functions over normalised arguments (see ``p2t.ops.reference``):

* ``token_attribution(grad [R, D], embeds [R, D], null_embed [D], mask [R] | None) -> [R]``
* ``segment_redistribute(scores [R], ids [R], rewards [S], omega, temperature, standardize, normalize_sum,
  omega_neg) -> [R]``
* ``token_advantages(outcome [B], token_rewards [B, N], mask | None, group_size, alpha, scale, eps, out | None)``
* ``p2t_advantages(grad [B, N, D], embeds, null, ids [B, N], rewards [S], outcome [B], mask | None,
  group_size, omega, alpha, temperature, standardize, normalize_sum, scale, eps, omega_neg, out | None)``

Backends register themselves with :func:`register`; ``p2t.ops`` imports the modules that do.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ._spec import PUBLIC_OPS

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")
OPS = PUBLIC_OPS  # the ops of the spec table that the dispatch table serves

# What "auto" picks, per device type and op, first available wins. On CUDA the order is a design choice,
# not a measurement: no GPU run of these kernels exists yet (docs/performance.md says how to run the GPU
# check that would decide it); the CUDA C++ kernels come first because they need no JIT compilation.
AUTO = {
    "cpu": {op: ("cpu", "reference") for op in OPS},
    "cuda": {op: ("cuda", "triton", "reference") for op in OPS},
}

HOW_TO_BUILD = {
    "cpu": "build the C++ extension: `pip install -e .` (or `python setup.py build_ext --inplace`)",
    "cuda": "build the extension with a CUDA build of torch and a CUDA toolkit: `P2T_BUILD_CUDA=1 pip install -e .`",
    "triton": "install triton (`pip install triton`); on a machine without a GPU set TRITON_INTERPRET=1",
    "reference": "",
}


@dataclasses.dataclass
class Backend:
    name: str
    devices: tuple  # device types this backend runs on ("cpu", "cuda")
    token_attribution: Callable
    segment_redistribute: Callable
    token_advantages: Callable
    p2t_advantages: Callable


assert tuple(f.name for f in dataclasses.fields(Backend))[2:] == OPS, "Backend's fields are the ops of _spec"


_REGISTRY: dict[str, Backend] = {}
_UNAVAILABLE: dict[str, str] = {}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _UNAVAILABLE.pop(backend.name, None)
    _RESOLVED.clear()


def mark_unavailable(name: str, why: str) -> None:
    if name not in _REGISTRY:
        _UNAVAILABLE[name] = why


def available_backends(device: Optional[str] = None) -> list[str]:
    """Names of the usable backends (for one device type when ``device`` is given)."""
    names = [n for n in BACKEND_NAMES if n in _REGISTRY]
    if device is not None:
        dev = str(device).split(":")[0]
        names = [n for n in names if dev in _REGISTRY[n].devices]
    return names


def unavailable_backends() -> dict[str, str]:
    return dict(_UNAVAILABLE)


_RESOLVED: dict = {}  # (name, op, device type) -> function; cleared when a backend registers


def get(name: str, op: str, device_type: str) -> Callable:
    if torch.compiler.is_compiling():
        # resolved afresh while tracing: a guard on the cache's contents would recompile the caller once the
        # cache fills (the first eager call after a trace)
        return _resolve(name, op, device_type)
    key = (name, op, device_type) if isinstance(name, str) else None
    fn = _RESOLVED.get(key)
    if fn is not None:
        return fn
    fn = _resolve(name, op, device_type)
    _RESOLVED[(name, op, device_type)] = fn
    return fn


def _resolve(name: str, op: str, device_type: str) -> Callable:
    if not isinstance(name, str) or (name != "auto" and name not in BACKEND_NAMES):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKEND_NAMES))}; got {name!r}")
    if name == "auto":
        for cand in AUTO.get(device_type, {}).get(op, ("reference",)):
            b = _REGISTRY.get(cand)
            if b is not None and device_type in b.devices:
                return getattr(b, op)
        return getattr(_REGISTRY["reference"], op)
    b = _REGISTRY.get(name)
    if b is None:
        why = _UNAVAILABLE.get(name, "it is not built")
        raise RuntimeError(f"backend {name!r} is not available: {why}. To get it: {HOW_TO_BUILD[name]}")
    if device_type not in b.devices:
        raise ValueError(f"backend {name!r} runs on {' or '.join(b.devices)} tensors, but the inputs are on "
                         f"{device_type}: pick backend='auto' or move the tensors")
    return getattr(b, op)
