"""Token advantages for the three modes, everything else equal.

* ``outcome``: ``A^_b`` on every completion token (GRPO).
* ``process``: ``A^_b + alpha * R_s`` on the tokens of step s (no redistribution inside a step).
* ``p2t``: ``A^_b + alpha * r_i`` with ``r_i`` from :func:`p2t.segment_redistribute` of the PRM's token
  attributions (the paper's Eq. 3, with the op's omega / temperature / standardize / normalize).

Tokens in no step (separators, the EOS token) get ``A^_b``; padding gets 0.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

import p2t
from p2t.ops.reference import segment_weights


def token_rewards(mode: str, scores: Optional[torch.Tensor], segment_ids: Optional[torch.Tensor],
                  segment_rewards: Optional[torch.Tensor], mask: torch.Tensor, *, omega: float = 0.6,
                  temperature: float = 1.0, standardize: bool = False, normalize: str = "paper") -> torch.Tensor:
    """Per-token rewards ``[B, N]`` (zeros in outcome mode)."""
    if mode == "outcome":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if segment_ids is None or segment_rewards is None:
        raise ValueError(f"mode={mode!r} needs segment_ids and segment_rewards from a PRM")
    if mode == "process":
        return p2t.process_token_rewards(segment_ids, segment_rewards.float())
    if mode == "p2t":
        return p2t.segment_redistribute(scores.float(), segment_ids, segment_rewards.float(), omega=omega,
                                        temperature=temperature, standardize=standardize, normalize=normalize)
    raise ValueError(f"unknown mode {mode!r}: choose one of outcome, process, p2t")


def compute_advantages(mode: str, outcome_rewards: torch.Tensor, mask: torch.Tensor, *, group_size: int,
                       alpha: float, scale: str, scores=None, segment_ids=None, segment_rewards=None,
                       omega: float = 0.6, temperature: float = 1.0, standardize: bool = False,
                       normalize: str = "paper") -> Tuple[torch.Tensor, torch.Tensor]:
    """(advantages ``[B, N]``, token rewards ``[B, N]``) through :func:`p2t.token_advantages`."""
    tr = token_rewards(mode, scores, segment_ids, segment_rewards, mask, omega=omega, temperature=temperature,
                       standardize=standardize, normalize=normalize)
    adv = p2t.token_advantages(outcome_rewards.float(), tr, group_size=group_size,
                               alpha=alpha if mode != "outcome" else 0.0, mask=mask, scale=scale)
    return adv, tr


@torch.no_grad()
def attribution_stats(scores: torch.Tensor, segment_ids: torch.Tensor, *, temperature: float = 1.0,
                      standardize: bool = False) -> Dict[str, float]:
    """Mean |I| over step tokens and the mean normalised entropy of the within-step softmax weights
    (1 = uniform: redistribution then does nothing beyond the process reward)."""
    sel = segment_ids >= 0
    if not bool(sel.any()):
        return {"attr_abs_mean": 0.0, "attr_entropy": 1.0}
    ids = segment_ids[sel]
    S = int(ids.max()) + 1
    # the same within-step weights as the ops (reference formulas, float64)
    w, _ = segment_weights(scores[sel].double(), ids, S, temperature, standardize)
    n = torch.bincount(ids, minlength=S).double()
    ent = torch.zeros(S, dtype=torch.float64).index_add_(0, ids, -w * torch.log(w.clamp(min=1e-300)))
    multi = n > 1
    norm_ent = (ent[multi] / torch.log(n[multi])).mean().item() if bool(multi.any()) else 1.0
    return {"attr_abs_mean": scores[sel].abs().float().mean().item(), "attr_entropy": norm_ent}
