"""Fake (meta) and autograd registrations shared by every op namespace (``p2t`` for the C++/CUDA
ops, ``p2t_triton`` for the Triton launches), and the backend built from such a namespace.

Op schemas (identical in every namespace; tensors already normalised by ``p2t.ops``)::

    token_attribution(Tensor grad, Tensor embeds, Tensor null_embed, Tensor? mask) -> Tensor
        grad, embeds [R, D]; null_embed [D]; mask bool [R]; out [R]
    segment_redistribute(Tensor scores, Tensor segment_ids, Tensor segment_rewards, float omega,
                         float temperature, bool standardize, bool normalize_sum) -> Tensor
        scores [R]; segment_ids int32/int64 [R]; segment_rewards [S]; out [R]
    token_advantages(Tensor outcome_rewards, Tensor token_rewards, Tensor? mask, int group_size,
                     float alpha, int scale, float eps) -> Tensor
        outcome_rewards [B]; token_rewards [B, N]; mask bool [B, N]; out [B, N]; scale 0 group, 1 batch, 2 none
    token_advantages_out(..., Tensor(a!) out) -> ()        same, written into out (may alias token_rewards)
    p2t_advantages(Tensor grad, Tensor embeds, Tensor null_embed, Tensor segment_ids, Tensor segment_rewards,
                   Tensor outcome_rewards, Tensor? mask, int group_size, float omega, float alpha,
                   float temperature, bool standardize, bool normalize_sum, int scale, float eps) -> Tensor
        grad, embeds [B, N, D]; segment_ids, mask [B, N]; out [B, N]
    p2t_advantages_out(..., Tensor(a!) out) -> ()

Outputs are float32, float64 when every floating input is float64 (``reference.compute_dtype``).
"""
from __future__ import annotations

import torch

from . import reference
from ._backends import Backend

_REGISTERED: set = set()


def _cd(*ts):
    return reference.compute_dtype(*ts)


def register_meta(ns: str) -> None:
    """register_fake + register_autograd for every op of namespace ``ns`` (idempotent)."""
    if ns in _REGISTERED:
        return
    _REGISTERED.add(ns)
    lib = torch.library

    @lib.register_fake(f"{ns}::token_attribution")
    def _(grad, embeds, null_embed, mask):
        torch._check(grad.dim() == 2, lambda: "grad must be [R, D]")
        torch._check(embeds.shape == grad.shape, lambda: "embeds must match grad")
        return grad.new_empty(grad.shape[:1], dtype=_cd(grad, embeds, null_embed))

    @lib.register_fake(f"{ns}::segment_redistribute")
    def _(scores, segment_ids, segment_rewards, omega, temperature, standardize, normalize_sum):
        torch._check(segment_ids.shape == scores.shape, lambda: "segment_ids must match scores")
        return scores.new_empty(scores.shape, dtype=_cd(scores, segment_rewards))

    @lib.register_fake(f"{ns}::token_advantages")
    def _(outcome_rewards, token_rewards, mask, group_size, alpha, scale, eps):
        torch._check(token_rewards.dim() == 2, lambda: "token_rewards must be [B, N]")
        return token_rewards.new_empty(token_rewards.shape, dtype=_cd(outcome_rewards, token_rewards))

    @lib.register_fake(f"{ns}::token_advantages_out")
    def _(outcome_rewards, token_rewards, mask, group_size, alpha, scale, eps, out):
        return None

    @lib.register_fake(f"{ns}::p2t_advantages")
    def _(grad, embeds, null_embed, segment_ids, segment_rewards, outcome_rewards, mask, group_size, omega,
          alpha, temperature, standardize, normalize_sum, scale, eps):
        torch._check(grad.dim() == 3, lambda: "grad must be [B, N, D]")
        return grad.new_empty(grad.shape[:2], dtype=_cd(grad, embeds, null_embed, segment_rewards, outcome_rewards))

    @lib.register_fake(f"{ns}::p2t_advantages_out")
    def _(grad, embeds, null_embed, segment_ids, segment_rewards, outcome_rewards, mask, group_size, omega,
          alpha, temperature, standardize, normalize_sum, scale, eps, out):
        return None

    # ---- autograd: closed-form backwards from reference (plain torch ops, traceable) ----
    def attr_setup(ctx, inputs, output):
        grad, embeds, null_embed, mask = inputs
        ctx.save_for_backward(grad, embeds, null_embed, mask)

    def attr_backward(ctx, g):
        grad, embeds, null_embed, mask = ctx.saved_tensors
        d = reference.token_attribution_backward(g, grad, embeds, null_embed, mask)
        need = ctx.needs_input_grad
        return tuple(x if need[i] else None for i, x in enumerate(d)) + (None,)

    lib.register_autograd(f"{ns}::token_attribution", attr_backward, setup_context=attr_setup)

    def seg_setup(ctx, inputs, output):
        scores, ids, rewards, *ctx.opts = inputs
        ctx.save_for_backward(scores, ids, rewards)

    def seg_backward(ctx, g):
        scores, ids, rewards = ctx.saved_tensors
        d_s, d_r = reference.segment_redistribute_backward(g, scores, ids, rewards, *ctx.opts)
        return d_s, None, d_r, None, None, None, None

    lib.register_autograd(f"{ns}::segment_redistribute", seg_backward, setup_context=seg_setup)

    def adv_setup(ctx, inputs, output):
        o, tr, mask, *ctx.opts = inputs
        ctx.save_for_backward(o, tr, mask)

    def adv_backward(ctx, g):
        o, tr, mask = ctx.saved_tensors
        d_o, d_tr = reference.token_advantages_backward(g, o, tr, mask, *ctx.opts)
        return d_o, d_tr, None, None, None, None, None

    lib.register_autograd(f"{ns}::token_advantages", adv_backward, setup_context=adv_setup)

    def p2t_setup(ctx, inputs, output):
        grad, embeds, null_embed, ids, rewards, o, mask, *ctx.opts = inputs
        ctx.save_for_backward(grad, embeds, null_embed, ids, rewards, o, mask)

    def p2t_backward(ctx, g):
        grad, embeds, null_embed, ids, rewards, o, mask = ctx.saved_tensors
        d_grad, d_embeds, d_null, d_rewards, d_o = reference.p2t_advantages_backward(
            g, grad, embeds, null_embed, ids, rewards, o, mask, *ctx.opts)
        return (d_grad, d_embeds, d_null, None, d_rewards, d_o) + (None,) * 9

    lib.register_autograd(f"{ns}::p2t_advantages", p2t_backward, setup_context=p2t_setup)


def make_backend(name: str, devices: tuple, ns: str) -> Backend:
    """A Backend calling the ops of namespace ``ns`` (``out=`` goes to the in-place ``*_out`` twins)."""
    ops = getattr(torch.ops, ns)

    def token_advantages(o, tr, mask, G, alpha, scale, eps, out=None):
        if out is None:
            return ops.token_advantages(o, tr, mask, G, alpha, scale, eps)
        ops.token_advantages_out(o, tr, mask, G, alpha, scale, eps, out)
        return out

    def p2t_advantages(*args, out=None):
        if out is None:
            return ops.p2t_advantages(*args)
        ops.p2t_advantages_out(*args, out)
        return out

    return Backend(name=name, devices=devices,
                   token_attribution=lambda *a: ops.token_attribution(*a),
                   segment_redistribute=lambda *a: ops.segment_redistribute(*a),
                   token_advantages=token_advantages, p2t_advantages=p2t_advantages)
