"""The clipped surrogate with token-level advantages, and the four loss normalisations (TRL's meanings).

``per_token_loss = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * KL_k3``
with ``ratio = exp(logp - old_logp)`` and ``KL_k3 = exp(ref - logp) - (ref - logp) - 1``.

Normalisation of one micro-batch (``mask`` marks completion tokens):

* ``grpo``: mean over each sequence's tokens, then mean over sequences; divided by the accumulation steps.
* ``bnpo``: sum over the micro-batch's tokens / their number; divided by the accumulation steps.
* ``dr_grpo``: sum / (rows * max_completion_length); divided by the accumulation steps.
* ``dapo``: sum / number of completion tokens in the whole accumulated batch (no further division), so
  every token of the batch weighs the same whatever micro-batch it falls in.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .config import LOSS_TYPES


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, epsilon: float,
                   epsilon_high: float, beta: float = 0.0,
                   ref_logp: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token clipped surrogate (+ beta * k3 KL). All tensors ``[B, N]``. Returns (loss, parts)."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    parts = {"ratio": ratio.detach(),
             "clipped": ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))}
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probs (ref_logp)")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
        parts["kl"] = kl.detach()
    return loss, parts


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, *, max_completion_length: int,
              gradient_accumulation_steps: int = 1, num_items_in_batch: Optional[int] = None) -> torch.Tensor:
    """Reduce a micro-batch's per-token loss ``[B, N]`` to the scalar to backpropagate (see module doc).

    ``num_items_in_batch``: completion tokens in the whole accumulated batch (``dapo`` only; defaults to
    this micro-batch's count).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    m = mask.to(loss.dtype)
    masked = loss * m
    if loss_type == "grpo":
        out = (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        out = masked.sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        out = masked.sum() / (loss.shape[0] * max_completion_length)
    else:  # dapo
        n = m.sum() if num_items_in_batch is None else torch.as_tensor(float(num_items_in_batch))
        return masked.sum() / n.clamp(min=1.0)
    return out / gradient_accumulation_steps
