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

The fused path needs a fusable mode (``p2t``), the policy's own tokens in the PRM input (same tokenizer:
an identity on ids), the ``taylor`` method (one gradient per micro-batch; the other methods reduce several
gradients or none) and rows that are not packed; :func:`unfused_reason` says which is missing, and the
scorer then takes the unfused path (equal within the ops' tolerances). A vision-language PRM's image
features are part of ``inputs_embeds`` (:mod:`.multimodal`); they sit in no step, so the op gives their
positions nothing, as the unfused path does.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..options import P2TOptions
from ..rewards import get_mode, token_advantages_of
from . import methods as M
from .batch import Assembly, ScoredBatch

__all__ = ["unfused_reason", "advantages", "unfused"]


def unfused_reason(engine, options: P2TOptions) -> Optional[str]:
    """Why :meth:`P2TScorer.advantages_ids` cannot end in the fused op under ``options`` (``None``: it can)."""
    if not get_mode(options.mode).fusable:
        return f"mode={options.mode!r} (not a fusable mode)"
    if options.method != "taylor":
        return f"method={options.method!r} (the fused op takes one gradient: 'taylor')"
    if not engine.layout.same_tokenizer:
        return "the policy and the PRM tokenizers differ (attributions are split over policy tokens)"
    if engine.packing:
        return "packing=True"
    return None


def unfused(sb: ScoredBatch, o: torch.Tensor, mask: Optional[torch.Tensor], options: Optional[P2TOptions] = None, *,
            group_size: int, **overrides) -> ScoredBatch:
    """The unfused path: ``sb`` (a :meth:`P2TScorer.score_ids` batch) with ``advantages`` from
    :func:`p2t.rewards.token_advantages_of` (the mode's token rewards, then :func:`p2t.token_advantages`)
    under ``options`` with ``overrides``."""
    sb.advantages = token_advantages_of(sb, o, options, group_size=group_size, mask=mask, **overrides).float()
    return sb


def advantages(engine, rows, lens, N: int, dev, outcome_rewards: torch.Tensor, mask: Optional[torch.Tensor],
               options: P2TOptions, *, group_size: int, attributions: bool) -> ScoredBatch:
    """The fused path of :meth:`P2TScorer.advantages_ids` (arguments checked there; ``engine``: the
    scorer's :class:`~p2t.attribution.engine.Engine`): a :class:`ScoredBatch` with ``advantages`` ``[B, N]``
    float32 on ``dev``."""
    from .. import ops
    out = Assembly(rows, lens, N, dev, engine.dtype, engine.tokenizer)
    keep = out.mask if mask is None else mask
    a_hat = ops.group_advantages(outcome_rewards, group_size, scale=options.scale,
                                 eps=options.eps).to(dev, torch.float32)
    adv = torch.where(keep, a_hat[:, None], torch.zeros((), device=dev))
    # every row its own group: the op's A^ is 0 and it returns alpha * r_i (A^_b is added below)
    op_options = {**options.fused, "scale": "none"}
    live = [r for r in rows if r is not None]
    for mb in engine.plan(live, engine.groups(live, lambda r: r.length), out):
        t, inputs, x = engine.micro_batch(mb)
        attn, tstep = t["attention_mask"], t["step_index"]
        with engine.autocast_context():
            m, g = M.gradient(lambda xx: engine.margins(xx, attn, inputs), x, engine.objective)
        nul = engine.null(x)
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
        a = ops.p2t_advantages(G, X, nul, seg, torch.sigmoid(m.to(engine.dtype)), x.new_zeros(b, dtype=torch.float32),
                               group_size=1, validate=False, **op_options)
        if G is not g:
            adv[rows_t] = a.to(dev, torch.float32) + a_hat[rows_t][:, None]
        else:  # gathered onto the policy's tokens: (row in the micro-batch, PRM position) -> (response, token),
            # added to the A^_b that ``adv`` holds there (each policy token is written by one PRM position)
            src = mb.flat[0].to(x.device)
            adv.view(-1).index_add_(0, mb.flat[1], a.reshape(-1).index_select(0, src).to(dev, torch.float32))
    sb = out.finish("taylor", engine.objective)
    sb.advantages = torch.where(keep, adv, torch.zeros((), device=dev))
    return sb
