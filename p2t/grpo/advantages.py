"""The token advantages of one rollout, for any registered mode (:mod:`p2t.rewards`), everything else equal.

* ``outcome``: ``A^_b`` on every completion token (GRPO).
* ``process``: ``A^_b + alpha * R_s`` on the tokens of step s (no redistribution inside a step).
* ``p2t``: ``A^_b + alpha * r_i`` with ``r_i`` from :func:`p2t.segment_redistribute` of the PRM's token
  attributions (the paper's Eq. 3, with the options' omega / omega_neg / temperature / standardize / normalize).

Tokens in no step (separators, the EOS token) get ``A^_b``; padding gets 0. The token rewards of every
mode come from one function, :func:`p2t.token_rewards`, under one :class:`p2t.P2TOptions`.

:func:`rollout_advantages` is the trainer's one call per rollout. What it asks of the scorer is read from
the mode's registration: no call for a mode that needs no PRM; the forward-only
:meth:`p2t.P2TScorer.rewards_ids` for one that needs step rewards but no attributions (``process``);
:meth:`~p2t.P2TScorer.score_ids` otherwise. A fusable mode (``p2t``) ends in the fused
:func:`p2t.p2t_advantages` wherever the scorer can fuse (:meth:`p2t.P2TScorer.advantages_ids`: the
policy's own tokens in the PRM input, the ``taylor`` method, no packing). The fused op takes
the ``[B, N, D]`` gradient and embeddings that the scorer only ever holds one micro-batch at a time, so
it runs once per micro-batch: ``A^_b`` depends on the outcome rewards alone and is computed once for the
whole batch, the op returns ``alpha * r_i`` (each row in a group of its own) and ``A^_b`` is added as its
output is gathered onto the completion tokens (:mod:`p2t.attribution.fused`). Other set-ups take the
unfused tail (:func:`p2t.token_rewards` then :func:`p2t.token_advantages`, equal within the ops'
tolerances), as does ``fused=False``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import ops
from ..ops.reference import segment_weights
from ..options import P2TOptions
from ..rewards import get_mode, token_rewards

__all__ = ["rollout_advantages", "advantages_from_scored", "attribution_stats", "scored_stats"]


def advantages_from_scored(scored, outcome_rewards: torch.Tensor, mask: torch.Tensor, options: P2TOptions, *,
                           group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(advantages, token rewards) ``[B, N]`` float32 of a scored batch aligned to ``mask``'s columns (``None``
    for a mode that needs no PRM), on ``mask``'s device: :func:`p2t.token_rewards` then
    :func:`p2t.token_advantages` with ``options``."""
    if scored is None:
        if get_mode(options.mode).needs_prm:
            raise ValueError(f"mode={options.mode!r} needs a scored batch from a PRM")
        tr = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    else:
        tr = token_rewards(scored, options).float()
    adv = ops.token_advantages(outcome_rewards.float(), tr, group_size=group_size, mask=mask, **options.advantage)
    return adv, tr


def rollout_advantages(scorer, options: P2TOptions, prompts, response_ids, outcome_rewards: torch.Tensor,
                       mask: torch.Tensor, *, group_size: int, fused: bool = True, device=None,
                       extra: Optional[dict] = None):
    """(advantages ``[B, N]``, token rewards ``[B, N]``, scored batch or ``None``) of one rollout whose
    completions are ``response_ids`` (policy ids, ``mask``'s columns), on ``device``: one scorer call
    (none for a mode that needs no PRM). ``extra``: more arguments of every scorer call (a vision-language
    PRM's ``images``: :class:`~p2t.attribution.MultimodalP2TScorer` takes them on each call, fused or not)."""
    mode = get_mode(options.mode)
    N = mask.shape[1]
    if not mode.needs_prm:
        return (*advantages_from_scored(None, outcome_rewards, mask, options, group_size=group_size), None)
    extra = extra or {}
    if mode.fusable and fused and scorer.fuses(options.method, options):
        sb = scorer.advantages_ids(prompts, response_ids, outcome_rewards, group_size=group_size, options=options,
                                   mask=mask, device=device, **extra)
        return sb.advantages, token_rewards(sb, options).float(), sb
    if mode.needs_attributions:
        scored = scorer.score_ids(prompts, response_ids, method=options.method, length=N, device=device, **extra)
    else:  # step rewards alone: the scorer's forward, no gradient
        scored = scorer.rewards_ids(prompts, response_ids, length=N, device=device, **extra)
    adv, tr = advantages_from_scored(scored, outcome_rewards, mask, options, group_size=group_size)
    return adv, tr, scored


def _stats(scores: torch.Tensor, segment_ids: torch.Tensor, S: int, temperature: float, standardize: bool):
    """[attr_abs_mean, attr_entropy] as a float64 tensor on the scores' device (no host sync)."""
    sel = segment_ids >= 0
    ids = segment_ids[sel]
    if S == 0 or ids.numel() == 0:
        return torch.tensor([0.0, 1.0], dtype=torch.float64, device=scores.device)
    # the same within-step weights as the ops (reference formulas, float64)
    w, _ = segment_weights(scores[sel].double(), ids, S, temperature, standardize)
    n = torch.bincount(ids, minlength=S).double()
    ent = torch.zeros(S, dtype=torch.float64, device=scores.device).index_add_(
        0, ids, -w * torch.log(w.clamp(min=1e-300)))
    multi = n > 1
    norm = ent[multi] / torch.log(n[multi])
    one = torch.ones((), dtype=torch.float64, device=scores.device)
    entropy = norm.mean() if norm.numel() else one
    abs_mean = scores[sel].abs().float().mean().double() if ids.numel() else 0 * one
    return torch.stack([abs_mean, entropy])


@torch.no_grad()
def attribution_stats(scores: torch.Tensor, segment_ids: torch.Tensor, *, temperature: float = 1.0,
                      standardize: bool = False) -> Dict[str, float]:
    """Mean |I| over step tokens and the mean normalised entropy of the within-step softmax weights
    (1 = uniform: redistribution then does nothing beyond the process reward)."""
    sel = segment_ids >= 0
    if not bool(sel.any()):
        return {"attr_abs_mean": 0.0, "attr_entropy": 1.0}
    S = int(segment_ids[sel].max()) + 1
    a, e = _stats(scores, segment_ids, S, temperature, standardize).tolist()
    return {"attr_abs_mean": a, "attr_entropy": e}


@torch.no_grad()
def scored_stats(scored, *, temperature: float = 1.0, standardize: bool = False) -> Dict[str, float]:
    """The log's view of a scored batch, moved to the CPU in one copy: mean step reward and
    :func:`attribution_stats`."""
    R = scored.segment_rewards
    S = int(R.numel())
    st = _stats(scored.scores, scored.segment_ids, S, temperature, standardize)
    step = R.float().mean().double() if S else torch.zeros((), dtype=torch.float64, device=R.device)
    a, e, r = torch.cat([st, step.reshape(1).to(st.device)]).tolist()
    return {"step_reward": r, "attr_abs_mean": a, "attr_entropy": e}
