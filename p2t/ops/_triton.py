"""Registers the "triton" backend: the Triton kernels of ``p2t_kernels`` wrapped as custom ops in
the ``p2t_triton`` namespace (schemas identical to the ``p2t`` ops of csrc/p2t.cpp; fake and
autograd registrations shared through ``_custom.register_meta``). Usable on CUDA tensors, and on
CPU tensors under TRITON_INTERPRET=1 (set before triton is first imported).

``torch.library.custom_op`` (not ``triton_op``): it passes opcheck under the interpreter too."""
from __future__ import annotations

import os

import torch

from . import _backends
from ._custom import make_backend, register_meta

NS = "p2t_triton"

SCHEMAS = {
    "token_attribution": "(Tensor grad, Tensor embeds, Tensor null_embed, Tensor? mask) -> Tensor",
    "segment_redistribute": "(Tensor scores, Tensor segment_ids, Tensor segment_rewards, float omega, "
                            "float temperature, bool standardize, bool normalize_sum) -> Tensor",
    "token_advantages": "(Tensor outcome_rewards, Tensor token_rewards, Tensor? mask, int group_size, "
                        "float alpha, int scale, float eps) -> Tensor",
    "token_advantages_out": "(Tensor outcome_rewards, Tensor token_rewards, Tensor? mask, int group_size, "
                            "float alpha, int scale, float eps, Tensor(a!) out) -> ()",
    "p2t_advantages": "(Tensor grad, Tensor embeds, Tensor null_embed, Tensor segment_ids, "
                      "Tensor segment_rewards, Tensor outcome_rewards, Tensor? mask, int group_size, float omega, "
                      "float alpha, float temperature, bool standardize, bool normalize_sum, int scale, "
                      "float eps) -> Tensor",
    "p2t_advantages_out": "(Tensor grad, Tensor embeds, Tensor null_embed, Tensor segment_ids, "
                          "Tensor segment_rewards, Tensor outcome_rewards, Tensor? mask, int group_size, "
                          "float omega, float alpha, float temperature, bool standardize, bool normalize_sum, "
                          "int scale, float eps, Tensor(a!) out) -> ()",
}


def _register(kernels) -> None:
    def op(name, fn, mutates=()):
        torch.library.custom_op(f"{NS}::{name}", fn, mutates_args=mutates, schema=SCHEMAS[name])

    op("token_attribution", lambda grad, embeds, null_embed, mask: kernels.token_attribution(
        grad, embeds, null_embed, mask))
    op("segment_redistribute", lambda scores, segment_ids, segment_rewards, omega, temperature, standardize,
       normalize_sum: kernels.segment_redistribute(scores, segment_ids, segment_rewards, omega, temperature,
                                                   standardize, normalize_sum))
    op("token_advantages", lambda outcome_rewards, token_rewards, mask, group_size, alpha, scale, eps:
       kernels.token_advantages(outcome_rewards, token_rewards, mask, group_size, alpha, scale, eps))

    def token_advantages_out(outcome_rewards, token_rewards, mask, group_size, alpha, scale, eps, out):
        kernels.token_advantages_into(outcome_rewards, token_rewards, mask, group_size, alpha, scale, eps, out)

    op("token_advantages_out", token_advantages_out, ("out",))
    op("p2t_advantages", lambda *args: kernels.p2t_advantages(*args))

    def p2t_advantages_out(*args):
        kernels.p2t_advantages_into(*args)

    op("p2t_advantages_out", p2t_advantages_out, ("out",))


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
