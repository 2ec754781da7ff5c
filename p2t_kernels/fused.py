"""The whole P2T pipeline in two launches: attribution (one pass over grad/embeds, also storing the
segment run bounds), then the segment kernel (softmax redistribution + GRPO token advantage, and
the tokens in no segment). No host synchronisation and no [B, N, D] intermediate."""
from __future__ import annotations

from typing import Optional

import torch

from ._common import check_tokens, compute_dtype, device_guard, init_bounds, row_major
from .attribution import launch_attribution
from .segment import launch_segment


def p2t_advantages_into(grad, embeds, null_embed, segment_ids, segment_rewards, outcome_rewards,
                        mask: Optional[torch.Tensor], group_size: int, omega: float, alpha: float,
                        temperature: float, standardize: bool, normalize_sum: bool, scale: int, eps: float,
                        omega_neg: float, out: torch.Tensor) -> torch.Tensor:
    """grad, embeds [B, N, D]; null_embed [D]; segment_ids, mask [B, N]; segment_rewards [S];
    outcome_rewards [B]; writes out (contiguous [B, N]) and returns it. Masked tokens are in no
    segment and get 0; tokens with id -1 (or >= S) get A^_b."""
    B, N, D = grad.shape
    R = B * N
    if R == 0:
        return out
    cd = compute_dtype(grad, embeds, null_embed, segment_rewards, outcome_rewards)
    g = row_major(grad.reshape(R, D))
    e = row_major(embeds.reshape(R, D))
    nl = null_embed.contiguous()
    ids = segment_ids.reshape(R).contiguous()
    m = None if mask is None else mask.reshape(R).contiguous().view(torch.uint8)
    S = segment_rewards.shape[0]
    check_tokens(R)
    with device_guard(grad):
        scores = torch.empty(R, device=grad.device, dtype=cd)
        pos = init_bounds(S, grad.device)
        launch_attribution(g, e, nl, m, scores, ids=ids, pos=pos, N=N, S=S)
        launch_segment(scores, ids, m, segment_rewards.contiguous(), outcome_rewards.to(cd).contiguous(), pos,
                       out.reshape(R), B, N, group_size, omega, temperature, alpha, standardize, normalize_sum,
                       scale, eps, omega_neg)
    return out


def p2t_advantages(grad, embeds, null_embed, segment_ids, segment_rewards, outcome_rewards, mask, group_size,
                   omega, alpha, temperature, standardize, normalize_sum, scale, eps, omega_neg=0.0):
    """As :func:`p2t_advantages_into`, returning a new [B, N] float32 tensor (float64 when every
    floating input is float64)."""
    B, N, _ = grad.shape
    cd = compute_dtype(grad, embeds, null_embed, segment_rewards, outcome_rewards)
    out = torch.empty((B, N), device=grad.device, dtype=cd)
    return p2t_advantages_into(grad, embeds, null_embed, segment_ids, segment_rewards, outcome_rewards, mask,
                               group_size, omega, alpha, temperature, standardize, normalize_sum, scale, eps, omega_neg,
                               out)
