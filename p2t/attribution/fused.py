"""Token advantages straight from the PRM's gradient: the fused end of a P2T step.

:meth:`P2TScorer.advantages_ids` computes ``A~ = A^_b + alpha * r_i`` for sampled completions. Where it
can, it ends in :func:`p2t.p2t_advantages` (attribution, redistribution and advantages in one op, one
read of the gradient and the embeddings) instead of :func:`p2t.token_attribution` ->
:func:`p2t.segment_redistribute` -> :func:`p2t.token_advantages`:

* the micro-batches are the scorer's usual ones (rows sorted by length under the token budget), so the
  fused path forwards no more padding and holds no more activations than :meth:`P2TScorer.score_ids`;
* ``A^_b`` depends on the outcome rewards alone: it is computed once for the whole batch
  (:func:`p2t.group_advantages`, exact for every ``scale``), and each micro-batch's op runs with every
  row in a group of its own (``group_size=1``: its ``A^`` is 0), so the op returns ``alpha * r_i``;
  ``A^_b`` is added where the output is gathered onto the policy's tokens;
* the op runs on the micro-batch's own ``[b, L, D]`` gradient and embeddings in the PRM layout (segment
  ids -1 outside the response's step tokens). A policy token with no PRM counterpart (separators,
  whitespace between steps, EOS) gets ``A^_b``, padding and tokens outside ``mask`` 0, as unfused;
* a micro-batch with a step token the PRM never sees (a special token sampled inside a step: it joins
  the step with attribution 0) runs the op on the policy layout instead (the gradient gathered onto the
  policy's tokens, zeros for that token), so that such a token shares its step's softmax as unfused.

The fused path needs the policy's own tokens in the PRM input (same tokenizer: an identity on ids), the
``taylor`` method (one gradient per micro-batch; the other methods reduce several gradients or none),
rows that are not packed and no image features (:mod:`.multimodal`); :func:`unfused_reason` says which
is missing, and the scorer then takes the unfused path (equal within the ops' tolerances).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import methods as M
from .batch import Assembly, ScoredBatch

__all__ = ["unfused_reason", "advantages", "unfused"]


def unfused_reason(scorer, method: str) -> Optional[str]:
    """Why :meth:`P2TScorer.advantages_ids` cannot end in the fused op (``None``: it can)."""
    from .scorer import P2TScorer
    if method != "taylor":
        return f"method={method!r} (the fused op takes one gradient: 'taylor')"
    if not scorer.same_tokenizer:
        return "the policy and the PRM tokenizers differ (attributions are split over policy tokens)"
    if scorer.packing:
        return "packing=True"
    if type(scorer)._inputs_embeds is not P2TScorer._inputs_embeds:
        return "the PRM's inputs_embeds hold more than its token embeddings (image features)"
    return None


def unfused(sb: ScoredBatch, o: torch.Tensor, mask: Optional[torch.Tensor], *, group_size: int, alpha: float,
            scale: str, eps: float, **options) -> ScoredBatch:
    """The unfused path: ``sb`` (a :meth:`P2TScorer.score_ids` batch) with ``advantages`` from its
    :meth:`~ScoredBatch.token_rewards` and :func:`p2t.token_advantages`."""
    from .. import ops
    keep = sb.response_mask if mask is None else mask
    sb.advantages = ops.token_advantages(o, sb.token_rewards("p2t", **options).float(), group_size=group_size,
                                         alpha=alpha, mask=keep, scale=scale, eps=eps)
    return sb


def advantages(scorer, rows, lens, N: int, dev, outcome_rewards: torch.Tensor, mask: Optional[torch.Tensor], *,
               group_size: int, alpha: float, omega: float, temperature: float, standardize: bool, normalize: str,
               scale: str, eps: float, attributions: bool) -> ScoredBatch:
    """The fused path of :meth:`P2TScorer.advantages_ids` (arguments checked there): a
    :class:`ScoredBatch` with ``advantages`` ``[B, N]`` float32 on ``dev``."""
    from .. import ops
    out = Assembly(rows, lens, N, dev, scorer._dtype, scorer.tokenizer)
    keep = out.mask if mask is None else mask
    a_hat = ops.group_advantages(outcome_rewards, group_size, scale=scale, eps=eps).to(dev, torch.float32)
    adv = torch.where(keep, a_hat[:, None], torch.zeros((), device=dev))
    null = scorer._null_embed
    live = [r for r in rows if r is not None]
    for mb in scorer._plan(live, scorer._groups(live, lambda r: r.length), out):
        t, inputs, x = scorer._micro_batch(mb)
        attn, tstep = t["attention_mask"], t["step_index"]
        with scorer._autocast():
            m, g = M.gradient(lambda xx: scorer.head.margins(scorer.model, xx, attn, inputs), x, scorer.objective)
        nul = null.to(device=x.device, dtype=x.dtype)
        out.add(mb, M.reduce(g, x, nul, tstep >= 0) if attributions else None, m)
        at = mb.scatter  # (row in the micro-batch, PRM position, response, policy token)
        b, D = len(mb.rows), x.shape[2]
        if any(r.map_policy.size != np.count_nonzero(r.policy_step >= 0) for r in mb.rows):
            # the policy layout: every step token, the gradient of those the PRM sees, 0 for the others
            rows_t = torch.from_numpy(mb.index).to(dev)
            ax = at.to(x.device)
            G, X = (x.new_zeros((b, N, D)) for _ in range(2))
            G[ax[0], ax[3]], X[ax[0], ax[3]] = g[ax[0], ax[1]], x[ax[0], ax[1]]
            seg = out.segment_ids[rows_t].to(x.device)  # global step ids -> this micro-batch's
            shift = torch.from_numpy(mb.first - out.base[mb.index]).to(x.device)
            seg = torch.where(seg >= 0, seg + shift[:, None], -1)
        else:  # the PRM layout: step ids on the PRM's own step tokens
            G, X, seg = g, x, t["steps"]
        # every row its own group: the op's A^ is 0 and it returns alpha * r_i (A^_b is added below)
        a = ops.p2t_advantages(G, X, nul, seg, torch.sigmoid(m.to(scorer._dtype)), x.new_zeros(b, dtype=torch.float32),
                               group_size=1, omega=omega, alpha=alpha, temperature=temperature,
                               standardize=standardize, normalize=normalize, scale="none", eps=eps, validate=False)
        if G is not g:
            adv[rows_t] = a.to(dev, torch.float32) + a_hat[rows_t][:, None]
        else:  # gathered onto the policy's tokens: (row in the micro-batch, PRM position) -> (response, token),
            # added to the A^_b that ``adv`` holds there (each policy token is written by one PRM position)
            src = mb.flat[0].to(x.device)
            adv.view(-1).index_add_(0, mb.flat[1], a.reshape(-1).index_select(0, src).to(dev, torch.float32))
    sb = out.finish("taylor", scorer.objective)
    sb.advantages = torch.where(keep, adv, torch.zeros((), device=dev))
    return sb
