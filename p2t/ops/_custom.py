"""Fake (meta) and autograd registrations shared by every op namespace (``p2t`` for the C++/CUDA
ops, ``p2t_triton`` for the Triton launches), and the backend built from such a namespace. The ops,
their schemas, fakes and backwards come from the spec table (``_spec.SPECS``)."""
from __future__ import annotations

import torch

from ._backends import Backend
from ._spec import SPECS, OpSpec

_REGISTERED: set = set()


def _autograd(spec: OpSpec):
    """(backward, setup_context) of ``spec``: every input is kept for the closed-form backward, which
    returns the gradients of ``spec.differentiable``; the others get None."""
    names = spec.arg_names
    slots = [names.index(n) for n in spec.differentiable]

    def setup(ctx, inputs, output):
        tensors = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor) or v is None]
        ctx.tensor_slots = tensors
        ctx.others = {i: v for i, v in enumerate(inputs) if i not in tensors}
        ctx.save_for_backward(*[inputs[i] for i in tensors])

    def backward(ctx, g):
        args = [None] * len(names)
        for i, t in zip(ctx.tensor_slots, ctx.saved_tensors):
            args[i] = t
        for i, v in ctx.others.items():
            args[i] = v
        grads = spec.backward(g, *args)
        out = [None] * len(names)
        for i, d in zip(slots, grads):
            out[i] = d if ctx.needs_input_grad[i] else None
        return tuple(out)

    return backward, setup


def register_meta(ns: str) -> None:
    """register_fake + register_autograd for every op of namespace ``ns`` (idempotent)."""
    if ns in _REGISTERED:
        return
    _REGISTERED.add(ns)
    for name, spec in SPECS.items():
        torch.library.register_fake(f"{ns}::{name}")(spec.fake)
        if spec.backward is not None:
            backward, setup = _autograd(spec)
            torch.library.register_autograd(f"{ns}::{name}", backward, setup_context=setup)


def _skip_autograd_when_possible(op):
    """``op`` dispatched below the Autograd key when no input requires grad (eager mode only): the
    registered autograd wrapper, a Python function per call (~7 µs of host time per op on a 2-core CPU),
    is skipped; nothing changes otherwise (without a grad-requiring input it would only redispatch)."""
    def call(*args):
        if (not torch.compiler.is_compiling()
                and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)
        return op(*args)

    return call


def make_backend(name: str, devices: tuple, ns: str) -> Backend:
    """A Backend calling the ops of namespace ``ns`` (``out=`` goes to the in-place ``*_out`` twins)."""
    ops = getattr(torch.ops, ns)
    fast = {n: _skip_autograd_when_possible(getattr(ops, n).default) for n in SPECS if SPECS[n].backward}

    def token_advantages(o, tr, mask, G, alpha, scale, eps, out=None):
        if out is None:
            return fast["token_advantages"](o, tr, mask, G, alpha, scale, eps)
        ops.token_advantages_out(o, tr, mask, G, alpha, scale, eps, out)
        return out

    def p2t_advantages(*args, out=None):
        if out is None:
            return fast["p2t_advantages"](*args)
        ops.p2t_advantages_out(*args, out)
        return out

    return Backend(name=name, devices=devices, token_attribution=fast["token_attribution"],
                   segment_redistribute=fast["segment_redistribute"], token_advantages=token_advantages,
                   p2t_advantages=p2t_advantages)
