"""The op spec table: one entry per op of every op namespace (``p2t`` for the C++/CUDA ops, ``p2t_triton``
for the Triton launches, ``p2t_cuda_emulated`` in the tests), with its schema, plain-PyTorch reference
forward and closed-form backward, fake (meta) function and differentiable inputs.

Everything that lists the ops loops over :data:`SPECS`: ``_custom.register_meta`` (register_fake and
register_autograd), the Triton registration (``_triton``), the dispatch table's op list
(``_backends.OPS``) and the tests. The C++ schemas (``csrc/schemas.h``) are checked against this table.

Tensors are the normalised ones ``p2t.ops`` passes: grad/embeds ``[R, D]`` for token_attribution and
``[B, N, D]`` for p2t_advantages; ``scale`` 0 group, 1 batch, 2 none. Outputs are float32, float64 when
every floating input is float64 (``reference.compute_dtype``). ``omega_neg`` (the blame term's weight) is
the last scalar of segment_redistribute and p2t_advantages (appended: calls written before it keep their
order). The ``*_out`` twins write into ``out``
(it may alias token_rewards) and are not differentiable.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import torch

from . import reference


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    schema: str  # "(Tensor grad, ...) -> Tensor", as in csrc/schemas.h
    reference: Callable  # forward over the schema's arguments (the *_out twins: the value written into out)
    fake: Callable  # register_fake function
    backward: Optional[Callable] = None  # (grad_out, *args) -> grads of `differentiable`, in order
    differentiable: tuple = ()  # names of the differentiable inputs
    mutates: tuple = ()  # names of the arguments written in place
    public: bool = True  # an entry of the dispatch table (the *_out twins are reached through out=)

    @property
    def arg_names(self) -> list:
        args = self.schema[1:self.schema.index(") ->")]
        return [re.split(r"\s+", a.strip())[-1] for a in args.split(",")]


def _cd(*ts):
    return reference.compute_dtype(*ts)


def _fake_attribution(grad, embeds, null_embed, mask):
    torch._check(grad.dim() == 2, lambda: "grad must be [R, D]")
    torch._check(embeds.shape == grad.shape, lambda: "embeds must match grad")
    return grad.new_empty(grad.shape[:1], dtype=_cd(grad, embeds, null_embed))


def _fake_segment(scores, segment_ids, segment_rewards, omega, temperature, standardize, normalize_sum, omega_neg):
    torch._check(segment_ids.shape == scores.shape, lambda: "segment_ids must match scores")
    return scores.new_empty(scores.shape, dtype=_cd(scores, segment_rewards))


def _fake_advantages(outcome_rewards, token_rewards, mask, group_size, alpha, scale, eps):
    torch._check(token_rewards.dim() == 2, lambda: "token_rewards must be [B, N]")
    return token_rewards.new_empty(token_rewards.shape, dtype=_cd(outcome_rewards, token_rewards))


def _fake_p2t(grad, embeds, null_embed, segment_ids, segment_rewards, outcome_rewards, mask, group_size, omega,
              alpha, temperature, standardize, normalize_sum, scale, eps, omega_neg):
    torch._check(grad.dim() == 3, lambda: "grad must be [B, N, D]")
    return grad.new_empty(grad.shape[:2], dtype=_cd(grad, embeds, null_embed, segment_rewards, outcome_rewards))


def _fake_none(*args):
    return None


_ATTR = "(Tensor grad, Tensor embeds, Tensor null_embed, Tensor? mask) -> Tensor"
_SEG = ("(Tensor scores, Tensor segment_ids, Tensor segment_rewards, float omega, float temperature, "
        "bool standardize, bool normalize_sum, float omega_neg) -> Tensor")
_ADV_ARGS = "Tensor outcome_rewards, Tensor token_rewards, Tensor? mask, int group_size, float alpha, int scale, float eps"
_P2T_ARGS = ("Tensor grad, Tensor embeds, Tensor null_embed, Tensor segment_ids, Tensor segment_rewards, "
             "Tensor outcome_rewards, Tensor? mask, int group_size, float omega, float alpha, float temperature, "
             "bool standardize, bool normalize_sum, int scale, float eps, float omega_neg")

SPECS = {s.name: s for s in [
    OpSpec("token_attribution", _ATTR, reference.token_attribution, _fake_attribution,
           reference.token_attribution_backward, ("grad", "embeds", "null_embed")),
    OpSpec("segment_redistribute", _SEG, reference.segment_redistribute, _fake_segment,
           reference.segment_redistribute_backward, ("scores", "segment_rewards")),
    OpSpec("token_advantages", f"({_ADV_ARGS}) -> Tensor", reference.token_advantages, _fake_advantages,
           reference.token_advantages_backward, ("outcome_rewards", "token_rewards")),
    OpSpec("token_advantages_out", f"({_ADV_ARGS}, Tensor(a!) out) -> ()",
           lambda *a: reference.token_advantages(*a[:-1]), _fake_none, mutates=("out",), public=False),
    OpSpec("p2t_advantages", f"({_P2T_ARGS}) -> Tensor", reference.p2t_advantages, _fake_p2t,
           reference.p2t_advantages_backward,
           ("grad", "embeds", "null_embed", "segment_rewards", "outcome_rewards")),
    OpSpec("p2t_advantages_out", f"({_P2T_ARGS}, Tensor(a!) out) -> ()",
           lambda *a: reference.p2t_advantages(*a[:-1]), _fake_none, mutates=("out",), public=False),
]}

# the ops of the dispatch table, in order
PUBLIC_OPS = tuple(name for name, s in SPECS.items() if s.public)
