"""Packed sequences: several PRM inputs in one row of the micro-batch.

Without packing, a micro-batch is a group of PRM inputs of similar length, each padded to the longest
(:meth:`P2TScorer._groups`). With packing (``P2TScorer(..., packing=True)``) the inputs are laid end to
end in rows of at most ``pack_length`` tokens (first-fit decreasing), ``position_ids`` restart at 0 at
the start of every input, and the model is called with ``attention_mask=None`` and those
``position_ids``: transformers then keeps the inputs apart by itself -- a block-causal mask for
sdpa/eager (``masking_utils.find_packed_sequence_indices``: a position that does not follow its
predecessor by 1 starts a new sequence), variable-length kernels for flash-attention (one packed row
per call, ``cu_seqlens`` from the positions). One forward and one input-gradient per packed row; the
reduction ``(x - e_null) . g`` runs on the packed ``[T, D]`` layout (:func:`p2t.token_attribution`).
Padding at the end of a row restarts at position 0 too: it is a sequence of its own that no step reads.

Row length (``pack_length=None``): the longest PRM input of the call for sdpa/eager (their mask is
dense over a row, so a longer row would cost attention on masked blocks), the token budget
``micro_batch_tokens`` for flash-attention (varlen kernels skip them). Rows per micro-batch: as many as
the token budget holds (one under flash-attention, whose packed path takes one row).

The ``exact`` method is not packed: its perturbed copies are already batches of one input.

A PRM that does not keep packed inputs apart (an encoder whose mask ignores ``position_ids``, a model
without ``position_ids``) is refused at construction: :func:`check` scores two inputs packed and
checks that changing the first one leaves the second one's output unchanged (to 1e-3 of the first
one's change: a PRM whose inputs see each other changes both alike).
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import methods as M
from .layout import Row

__all__ = ["check", "row_length", "plan", "split", "tensors", "attribute"]


def _flash(model) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return "flash" in str(impl)


def check(model, kind: str, pack_length: Optional[int]) -> None:
    """Refuse options and PRMs that cannot be packed (``ValueError`` naming the option)."""
    if kind == "callable":
        raise ValueError("packing=True needs a transformers PRM read by the scorer's head (kind='step_classifier', "
                         "'value_head' or 'lm_judge'); a callable reward builds its own model call")
    if pack_length is not None and (isinstance(pack_length, bool) or not isinstance(pack_length, int)
                                    or pack_length < 1):
        raise ValueError(f"pack_length must be a positive int or None, got {pack_length!r}")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "position_ids" not in params:
        raise ValueError(f"packing=True but the PRM ({type(model).__name__}) takes no position_ids: packed inputs "
                         "could not restart their positions")
    try:
        apart = _keeps_apart(model)
    except TypeError as e:  # a forward without attention_mask=None / use_cache
        raise ValueError(f"packing=True but the PRM ({type(model).__name__}) cannot be called with position_ids, "
                         f"attention_mask=None and use_cache=False ({e})") from None
    if not apart:
        raise ValueError(f"packing=True but the PRM ({type(model).__name__}, attention "
                         f"{getattr(getattr(model, 'config', None), '_attn_implementation', None)!r}) lets packed "
                         "inputs see each other: its attention mask ignores restarting position_ids (encoders, "
                         "custom attention); use packing=False")


def _keeps_apart(model) -> bool:
    """Two inputs of 5 and 4 tokens packed in one row: does changing the first change the second's output?"""
    emb = model.get_input_embeddings()
    w = emb.weight
    n = int(w.shape[0])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, n, (1, 9), generator=g).to(w.device)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]], device=w.device)
    other = ids.clone()
    other[0, :5] = (ids[0, :5] + 1 + torch.arange(5, device=w.device)) % n
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            outs = [_logits(model(inputs_embeds=emb(i), position_ids=pos, attention_mask=None, use_cache=False))
                    for i in (ids, other)]
    finally:
        for m, mode in modes:
            m.training = mode
    a, b = (o.float() for o in outs)
    own = (a[:, :5] - b[:, :5]).abs().max().item()  # the changed input's own outputs: they must change
    other = (a[:, 5:] - b[:, 5:]).abs().max().item()  # the other input's: 0 (kernels may round differently)
    return own > 0 and other <= 1e-3 * own


def _logits(out):
    logits = getattr(out, "logits", None)
    return logits if logits is not None else (out[0] if isinstance(out, (tuple, list)) else out)


def row_length(model, rows: Sequence[Row], pack_length: Optional[int], budget: int) -> int:
    """Tokens of a packed row: ``pack_length``, else the budget (flash-attention) or the longest input."""
    longest = max(r.length for r in rows)
    if pack_length is not None:
        return max(pack_length, longest)
    return max(budget, longest) if _flash(model) else longest


def _ffd(lengths: Sequence[int], cap: int) -> List[List[int]]:
    """First-fit decreasing: bins (lists of indices, in insertion order, bins in creation order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins, room = [], []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(cap - lengths[i])
    return bins


def split(lengths: Sequence[int], cap: int) -> List[List[int]]:
    """The packed rows of a group listed row by row (as :func:`plan` lists them): consecutive inputs
    fill a row until the next one does not fit. This recovers :func:`plan`'s rows exactly: in
    first-fit decreasing, the first input of row k went there because row k-1 had no room for it, and
    row k-1 only filled up afterwards."""
    bins, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and used + n > cap:
            bins.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return bins + ([cur] if cur else [])


def plan(model, rows: Sequence[Row], pack_length: Optional[int], budget: int,
         per_step: bool = False) -> List[List[int]]:
    """Micro-batches of packed rows: each a list of indices into ``rows``, row after row. ``per_step``
    (the ``taylor_per_step`` method, whose gradients are ``[K, b, T, D]``): a packed row costs its
    length times the most steps of any input, as a padded row does."""
    cap = row_length(model, rows, pack_length, budget)
    bins = _ffd([r.length for r in rows], cap)
    cost = cap * (max(max(r.num_steps for r in rows), 1) if per_step else 1)
    per_batch = 1 if _flash(model) else max(1, budget // cost)
    return [[i for b in bins[k:k + per_batch] for i in b] for k in range(0, len(bins), per_batch)]


def tensors(rows: Sequence[Row], cap: int, pad_id: int, device) -> dict:
    """The packed tensors of one micro-batch (``rows`` listed row after row, see :func:`split`):
    ``input_ids``, ``position_ids``, ``step_index``, ``prompt_mask`` ``[b, T]``, ``readout_positions``
    ``[K, 2]`` (packed row, position) in the order of ``rows``, ``local`` / ``num_local`` (each readout's
    step within its input), ``row_index`` ``[n]`` and ``where`` ``[n, 2]`` (packed row, offset of each
    input)."""
    lengths = [r.length for r in rows]
    bins = split(lengths, cap)
    b = len(bins)
    T = max(sum(lengths[i] for i in bn) for bn in bins)
    ids = np.full((b, T), pad_id, dtype=np.int64)
    tstep = np.full((b, T), -1, dtype=np.int64)
    pmask = np.zeros((b, T), dtype=bool)
    pos = np.zeros((b, T), dtype=np.int64)
    where = np.zeros((len(rows), 2), dtype=np.int64)
    for j, bn in enumerate(bins):
        o = 0
        for i in bn:
            r, n = rows[i], lengths[i]
            ids[j, o:o + n] = r.input_ids
            tstep[j, o:o + n] = r.token_step
            pmask[j, o:o + r.prompt_length] = True
            pos[j, o:o + n] = np.arange(n)
            where[i] = (j, o)
            o += n
        pos[j, o:] = np.arange(T - o)  # trailing padding: a sequence of its own
    k = np.asarray([r.num_steps for r in rows], dtype=np.int64)
    ro = np.stack([np.repeat(where[:, 0], k), np.concatenate([r.readout for r in rows]) + np.repeat(where[:, 1], k)],
                  axis=1)
    local = np.concatenate([np.arange(n) for n in k])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)  # noqa: E731
    return dict(input_ids=t(ids), position_ids=t(pos), step_index=t(tstep), prompt_mask=t(pmask),
                readout_positions=t(ro), local=t(local), num_local=int(k.max()) if k.size else 0,
                row_index=t(np.asarray([r.index for r in rows], dtype=np.int64)), where=where, lengths=lengths)


def attribute(scorer, rows: List[Row], method: str, ig_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attributions ``[n, L]`` (one row per input, as the padded path returns them) and margins ``[K]``
    of a packed micro-batch."""
    cap = row_length(scorer.model, rows, scorer.pack_length, scorer.micro_batch_tokens)
    t = tensors(rows, cap, scorer._pad_id, scorer.device)
    tstep = t["step_index"]
    inputs = {k: t[k] for k in ("input_ids", "position_ids", "step_index", "readout_positions", "prompt_mask",
                                "row_index")}
    amask = tstep >= 0
    x = scorer._embedding()(t["input_ids"]).detach()
    null = scorer._null_embed.to(device=x.device, dtype=x.dtype)
    f = lambda xx: scorer.head.margins(scorer.model, xx, None, inputs)  # noqa: E731
    with scorer._autocast():
        if method == "taylor":
            out, m = M.taylor(f, x, null, amask, scorer.objective)
        elif method == "taylor_per_step":
            state = {"vmap_ok": scorer._vmap_ok}
            out, m = M.taylor_per_step(f, x, null, amask, scorer.objective, step_index=tstep, local=t["local"],
                                       num_local=t["num_local"], state=state)
            scorer._vmap_ok = state["vmap_ok"]
        elif method == "integrated_gradients":
            out, m = M.integrated_gradients(f, x, null, amask, scorer.objective, steps=ig_steps)
        else:
            raise ValueError(f"method {method!r} is not packed")
    # back to one row per input: (input, position) <- (packed row, offset + position)
    lengths, where = t["lengths"], t["where"]
    L = max(lengths)
    dst_r = np.repeat(np.arange(len(rows)), lengths)
    dst_p = np.concatenate([np.arange(n) for n in lengths])
    src_j = np.repeat(where[:, 0], lengths)
    src_p = np.repeat(where[:, 1], lengths) + dst_p
    idx = torch.from_numpy(np.stack([dst_r, dst_p, src_j, src_p])).to(out.device)
    res = torch.zeros((len(rows), L), dtype=out.dtype, device=out.device)
    res[idx[0], idx[1]] = out[idx[2], idx[3]]
    return res, m
