"""Token advantages straight from the PRM's gradient: the fused end of a P2T step.

:meth:`P2TScorer.advantages_ids` computes ``A~ = A^_b + alpha * r_i`` for sampled completions. Where it
can, it ends in :func:`p2t.p2t_advantages` (attribution, redistribution and advantages in one op, one
read of the gradient and the embeddings) instead of :func:`p2t.token_attribution` ->
:func:`p2t.segment_redistribute` -> :func:`p2t.token_advantages`:

* micro-batches are made of whole GRPO groups (:func:`~p2t.attribution.layout.whole_groups`), so the
  op's group statistics are exact inside each micro-batch; with ``scale="batch"`` the batch's std is a
  statistic of the whole batch, so the micro-batches get the batch-scaled ``A^`` (one
  :func:`p2t.group_advantages` call) with ``scale="none"`` (re-centring ``A^`` within its group changes
  it by rounding only);
* the op runs on the micro-batch's own ``[b, L, D]`` gradient and embeddings in the PRM layout (segment
  ids -1 outside the response's step tokens); its output is gathered onto the policy's tokens. A
  policy token with no PRM counterpart (separators, whitespace between steps, EOS) gets ``A^_b``, padding
  and tokens outside ``mask`` 0, as on the unfused path;
* a micro-batch with a step token the PRM never sees (a special token sampled inside a step: it joins the
  step with attribution 0) runs the op on the policy layout instead (the gradient gathered onto the
  policy's tokens, zeros for that token), so that such a token shares its step's softmax as it does
  unfused.

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
from .batch import Assembly, ScoredBatch, row_map
from .layout import whole_groups

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
    o = outcome_rewards
    a_hat = ops.group_advantages(o, group_size, scale=scale, eps=eps)
    o_in, scale_in = (a_hat, "none") if scale == "batch" else (o, scale)
    adv = torch.where(keep, a_hat.to(dev, torch.float32)[:, None], torch.zeros((), device=dev))
    null = scorer._null_embed
    for idx in whole_groups(rows, group_size, scorer.micro_batch_tokens):
        live = [j for j, i in enumerate(idx) if rows[i] is not None]
        if not live:
            continue
        lrows = [rows[idx[j]] for j in live]
        t, inputs, x = scorer._micro_batch(lrows)
        attn, tstep = t["attention_mask"], t["step_index"]
        with scorer._autocast():
            m, g = M.gradient(lambda xx: scorer.head.margins(scorer.model, xx, attn, inputs), x, scorer.objective)
        nul = null.to(device=x.device, dtype=x.dtype)
        out.add(lrows, M.reduce(g, x, nul, tstep >= 0) if attributions else None, m)
        R = torch.sigmoid(m.to(scorer._dtype))
        steps = np.asarray([r.num_steps for r in lrows], dtype=np.int64)
        off = np.concatenate([[0], np.cumsum(steps)[:-1]])  # first step id of each live row in this call
        b, (_, L, D) = len(idx), x.shape
        jl = torch.as_tensor(live, device=x.device)
        holes = any(r.map_policy.size != np.count_nonzero(r.policy_step >= 0) for r in lrows)
        src, dst = row_map(lrows)
        if holes:  # the policy layout: every step token, the gradient of those the PRM sees, 0 for the others
            src_t = torch.from_numpy(np.stack(src)).to(x.device)
            dst_t = torch.from_numpy(np.stack([np.asarray(live)[src[0]], dst[1]])).to(x.device)
            G, X = (x.new_zeros((b, N, D)) for _ in range(2))
            G[dst_t[0], dst_t[1]], X[dst_t[0], dst_t[1]] = g[src_t[0], src_t[1]], x[src_t[0], src_t[1]]
            seg_g = out.segment_ids[torch.as_tensor(idx, device=dev)].to(x.device)
            shift = torch.zeros(b, dtype=torch.long, device=x.device)
            shift[jl] = torch.from_numpy(off - out.base[[idx[j] for j in live]]).to(x.device)
            seg = torch.where(seg_g >= 0, seg_g + shift[:, None], -1)
        else:  # the PRM layout: step ids on the PRM's own step tokens
            seg_l = torch.where(tstep >= 0, tstep + torch.from_numpy(off).to(x.device)[:, None], -1)
            if len(live) == b:
                G, X, seg = g, x, seg_l
            else:  # rows without a PRM input: zeros in no step (A^_b), for their group's statistics
                G, X = (x.new_zeros((b, L, D)) for _ in range(2))
                G[jl], X[jl] = g, x
                seg = torch.full((b, L), -1, dtype=torch.long, device=x.device)
                seg[jl] = seg_l
        a = ops.p2t_advantages(G, X, nul, seg, R, o_in[torch.as_tensor(idx, device=o_in.device)].to(x.device),
                               group_size=group_size, omega=omega, alpha=alpha, temperature=temperature,
                               standardize=standardize, normalize=normalize, scale=scale_in, eps=eps, validate=False)
        if holes:
            adv[torch.as_tensor(idx, device=dev)] = a.to(dev, torch.float32)
        else:  # gathered onto the policy's tokens: (row in the micro-batch, PRM position) -> (response, token)
            src_t = torch.from_numpy(np.stack([np.asarray(live)[src[0]], src[1]])).to(x.device)
            dst_t = torch.from_numpy(np.stack(dst)).to(dev)
            adv[dst_t[0], dst_t[1]] = a[src_t[0], src_t[1]].to(dev, torch.float32)
    sb = out.finish("taylor", scorer.objective)
    sb.advantages = torch.where(keep, adv, torch.zeros((), device=dev))
    return sb
