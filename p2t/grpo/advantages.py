"""Token advantages for the three modes, everything else equal.

* ``outcome``: ``A^_b`` on every completion token (GRPO).
* ``process``: ``A^_b + alpha * R_s`` on the tokens of step s (no redistribution inside a step).
* ``p2t``: ``A^_b + alpha * r_i`` with ``r_i`` from :func:`p2t.segment_redistribute` of the PRM's token
  attributions (the paper's Eq. 3, with the op's omega / temperature / standardize / normalize).

Tokens in no step (separators, the EOS token) get ``A^_b``; padding gets 0. The token rewards of every
mode come from one function, :func:`p2t.attribution.token_rewards`.

:func:`rollout_advantages` is the trainer's one call per rollout. In ``p2t`` mode it ends in the fused
:func:`p2t.p2t_advantages` wherever the scorer can fuse (:meth:`p2t.P2TScorer.advantages_ids`: the
policy's own tokens in the PRM input, the ``taylor`` method, no packing, no images). The fused op takes
the ``[B, N, D]`` gradient and embeddings that the scorer only ever holds one micro-batch at a time, so
it runs once per micro-batch: ``A^_b`` depends on the outcome rewards alone and is computed once for the
whole batch, the op returns ``alpha * r_i`` (each row in a group of its own) and ``A^_b`` is added as its
output is gathered onto the completion tokens (:mod:`p2t.attribution.fused`). Other set-ups take the
unfused tail (:func:`p2t.segment_redistribute` then :func:`p2t.token_advantages`, equal within the ops'
tolerances), as does ``fused=False``. ``process`` mode needs no gradient at all: its step rewards come
from the scorer's forward alone (:meth:`p2t.P2TScorer.rewards_ids`).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, Optional, Tuple

import torch

import p2t
from p2t.attribution.batch import token_rewards as _token_rewards
from p2t.ops.reference import segment_weights


def token_rewards(mode: str, scores: Optional[torch.Tensor], segment_ids: Optional[torch.Tensor],
                  segment_rewards: Optional[torch.Tensor], mask: torch.Tensor, *, omega: float = 0.6,
                  temperature: float = 1.0, standardize: bool = False, normalize: str = "paper") -> torch.Tensor:
    """Per-token rewards ``[B, N]`` (zeros in outcome mode) from loose tensors; see
    :func:`p2t.attribution.token_rewards` for a scored batch."""
    if mode == "outcome":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if mode in ("process", "p2t") and (segment_ids is None or segment_rewards is None):
        raise ValueError(f"mode={mode!r} needs segment_ids and segment_rewards from a PRM")
    if mode == "p2t" and scores is None:
        raise ValueError("mode='p2t' needs the attribution scores")
    batch = SimpleNamespace(scores=None if scores is None else scores.float(), segment_ids=segment_ids,
                            segment_rewards=segment_rewards.float() if segment_rewards is not None else None,
                            response_mask=None)
    return _token_rewards(batch, mode, omega=omega, temperature=temperature, standardize=standardize,
                          normalize=normalize)


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


def advantages_from_scored(mode: str, outcome_rewards: torch.Tensor, mask: torch.Tensor, scored, *,
                           group_size: int, alpha: float, scale: str, omega: float = 0.6, temperature: float = 1.0,
                           standardize: bool = False, normalize: str = "paper") -> Tuple[torch.Tensor, torch.Tensor]:
    """(advantages, token rewards) ``[B, N]`` from a :class:`p2t.ScoredBatch` aligned to ``mask``'s
    columns (``None`` in outcome mode), on its device."""
    if mode == "outcome" or scored is None:
        if mode != "outcome":
            raise ValueError(f"mode={mode!r} needs a scored batch from a PRM")
        tr = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    else:
        tr = _token_rewards(scored, mode, omega=omega, temperature=temperature, standardize=standardize,
                            normalize=normalize).float()
    adv = p2t.token_advantages(outcome_rewards.float(), tr, group_size=group_size,
                               alpha=alpha if mode != "outcome" else 0.0, mask=mask, scale=scale)
    return adv, tr


def rollout_advantages(scorer, mode: str, prompts, response_ids, outcome_rewards: torch.Tensor,
                       mask: torch.Tensor, *, group_size: int, alpha: float, scale: str, omega: float = 0.6,
                       temperature: float = 1.0, standardize: bool = False, normalize: str = "paper",
                       method: str = "taylor", fused: bool = True, device=None, extra: Optional[dict] = None):
    """(advantages ``[B, N]``, token rewards ``[B, N]``, scored batch or ``None``) of one rollout whose
    completions are ``response_ids`` (policy ids, ``mask``'s columns), on ``device``: one scorer call
    (none in outcome mode). ``extra``: more scorer arguments (a vision-language PRM's ``images``; they
    keep the call on :meth:`~p2t.P2TScorer.score_ids`)."""
    kw = dict(omega=omega, temperature=temperature, standardize=standardize, normalize=normalize)
    N = mask.shape[1]
    if mode == "p2t" and fused and not extra and scorer.fuses(method):
        sb = scorer.advantages_ids(prompts, response_ids, outcome_rewards, group_size=group_size, alpha=alpha,
                                   scale=scale, mask=mask, device=device, method=method, **kw)
        return sb.advantages, _token_rewards(sb, "p2t", **kw).float(), sb
    scored = None
    if mode == "process" and not extra:
        scored = scorer.rewards_ids(prompts, response_ids, length=N, device=device)
    elif mode != "outcome":
        scored = scorer.score_ids(prompts, response_ids, method=method, length=N, device=device, **(extra or {}))
    adv, tr = advantages_from_scored(mode, outcome_rewards, mask, scored, group_size=group_size, alpha=alpha,
                                     scale=scale, **kw)
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
