"""Packed sequences: several PRM inputs in one row of the micro-batch.

Without packing, a micro-batch is a group of PRM inputs of similar length, each padded to the longest
(:meth:`.engine.Engine.groups`). With packing (``P2TScorer(..., packing=True)``) the inputs are laid end
to end in rows of at most ``pack_length`` tokens (first-fit decreasing), ``position_ids`` restart at the
start of every input (at 0, or where the model starts its own: ``padding_idx + 1`` for RoBERTa-family
encoders), and the model is called with ``attention_mask=None`` and those
``position_ids``: transformers then keeps the inputs apart by itself -- a block-causal mask for
sdpa/eager (``masking_utils.find_packed_sequence_indices``: a position that does not follow its
predecessor by 1 starts a new sequence), variable-length kernels for flash-attention (one packed row
per call, ``cu_seqlens`` from the positions). One forward and one input-gradient per packed row; the
reduction ``(x - e_null) . g`` runs on the packed ``[T, D]`` layout (:func:`p2t.token_attribution`).
Padding at the end of a row restarts its positions too: it is a sequence of its own that no step reads.

Row length (``pack_length=None``): the longest PRM input of the call for sdpa/eager (their mask is
dense over a row, so a longer row would cost attention on masked blocks), the token budget
``micro_batch_tokens`` for flash-attention (varlen kernels skip them). Rows per micro-batch: as many as
the token budget holds (one under flash-attention, whose packed path takes one row).

The ``exact`` method is not packed: its perturbed copies are already batches of one input.

A PRM that does not keep packed inputs apart (an encoder whose mask ignores ``position_ids``, a model
without ``position_ids``) or whose packed inputs are not scored as they are alone is refused at
construction: :func:`check` runs two inputs packed and each alone (with an attention mask, as the padded
path does) and asks for the same outputs, with positions from 0 or from ``padding_idx + 1``
(:func:`position_offset`); the first start that agrees is the one the packed rows use.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import methods as M
from .heads import forward_takes, model_logits
from .layout import Row

__all__ = ["check", "position_offset", "row_length", "plan", "split", "tensors", "attribute"]


def _flash(model) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return "flash" in str(impl)


def check(model, kind: str, pack_length: Optional[int]) -> int:
    """Refuse options and PRMs that cannot be packed (``ValueError`` naming the option); the position of a
    packed input's first token otherwise (:func:`position_offset`)."""
    if kind == "callable":
        raise ValueError("packing=True needs a transformers PRM read by the scorer's head (kind='step_classifier', "
                         "'value_head' or 'lm_judge'); a callable reward builds its own model call")
    if pack_length is not None and (isinstance(pack_length, bool) or not isinstance(pack_length, int)
                                    or pack_length < 1):
        raise ValueError(f"pack_length must be a positive int or None, got {pack_length!r}")
    if not forward_takes(model, "position_ids"):
        raise ValueError(f"packing=True but the PRM ({type(model).__name__}) takes no position_ids: packed inputs "
                         "could not restart their positions")
    try:
        offset = position_offset(model)
    except TypeError as e:  # a forward without attention_mask=None / use_cache
        raise ValueError(f"packing=True but the PRM ({type(model).__name__}) cannot be called with position_ids, "
                         f"attention_mask=None and use_cache=False ({e})") from None
    if offset is None:
        raise ValueError(f"packing=True but the PRM ({type(model).__name__}, attention "
                         f"{getattr(getattr(model, 'config', None), '_attn_implementation', None)!r}) lets packed "
                         "inputs see each other or places them differently from an input run alone (its attention "
                         "mask ignores restarting position_ids, or its positions follow another convention); use "
                         "packing=False")
    return offset


def _offsets(model) -> List[int]:
    """Where a model may start its positions: 0, and ``padding_idx + 1`` (RoBERTa, XLM-RoBERTa, CamemBERT:
    their embeddings count positions from after the padding id)."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return [0] + ([pad + 1] if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else [])


def position_offset(model) -> Optional[int]:
    """The position of a packed input's first token that gives every packed input the outputs it has when
    run alone (as the padded path runs it), or ``None`` when no candidate (:func:`_offsets`) does: two
    inputs of 5 and 4 random tokens, packed in one row and each run alone with an attention mask."""
    emb = model.get_input_embeddings()
    w = emb.weight
    n = int(w.shape[0])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, n, (1, 9), generator=g).to(w.device)
    spans = ((0, 5), (5, 9))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            alone = [model_logits(model, emb(ids[:, a:b]), torch.ones((1, b - a), dtype=torch.long,
                                                                      device=w.device)).float() for a, b in spans]
            scale = max(float(x.abs().max()) for x in alone)
            tol = (1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2) * max(scale, 1.0)
            for offset in _offsets(model):
                pos = torch.tensor([[p + offset for a, b in spans for p in range(b - a)]], device=w.device)
                packed = model_logits(model, emb(ids), None, position_ids=pos).float()
                if scale > 0 and all((packed[:, a:b] - x).abs().max().item() <= tol
                                     for (a, b), x in zip(spans, alone)):
                    return offset
    finally:
        for m, mode in modes:
            m.training = mode
    return None


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


def tensors(rows: Sequence[Row], cap: int, pad_id: int, device, offset: int = 0) -> dict:
    """The packed tensors of one micro-batch (``rows`` listed row after row, see :func:`split`):
    ``input_ids``, ``position_ids``, ``step_index``, ``prompt_mask`` ``[b, T]``, ``readout_positions``
    ``[K, 2]`` (packed row, position) in the order of ``rows``, ``local`` / ``num_local`` (each readout's
    step within its input), ``row_index`` ``[n]`` and ``where`` ``[n, 2]`` (packed row, offset of each
    input). Each input's positions count from ``offset`` (:func:`position_offset`)."""
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
            pos[j, o:o + n] = np.arange(offset, offset + n)
            where[i] = (j, o)
            o += n
        pos[j, o:] = np.arange(offset, offset + T - o)  # trailing padding: a sequence of its own
    k = np.asarray([r.num_steps for r in rows], dtype=np.int64)
    ro = np.stack([np.repeat(where[:, 0], k), np.concatenate([r.readout for r in rows]) + np.repeat(where[:, 1], k)],
                  axis=1)
    local = np.concatenate([np.arange(n) for n in k])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)  # noqa: E731
    return dict(input_ids=t(ids), position_ids=t(pos), step_index=t(tstep), prompt_mask=t(pmask),
                readout_positions=t(ro), local=t(local), num_local=int(k.max()) if k.size else 0,
                row_index=t(np.asarray([r.index for r in rows], dtype=np.int64)), where=where, lengths=lengths)


def attribute(engine, rows: List[Row], method: str, ig_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attributions ``[n, L]`` (one row per input, as the padded path returns them) and margins ``[K]``
    of a packed micro-batch (``engine``: the scorer's :class:`~p2t.attribution.engine.Engine`)."""
    if method not in ("taylor", "taylor_per_step", "integrated_gradients"):
        raise ValueError(f"method {method!r} is not packed")
    cap = row_length(engine.model, rows, engine.pack_length, engine.micro_batch_tokens)
    t = tensors(rows, cap, engine.pad_id, engine.device, engine.position_offset)
    inputs = {k: t[k] for k in ("input_ids", "position_ids", "step_index", "readout_positions", "prompt_mask",
                                "row_index")}
    x = engine.embedding()(t["input_ids"]).detach()
    f = lambda xx: engine.margins(xx, None, inputs)  # noqa: E731
    with engine.autocast_context():
        out, m = M.gradient_method(engine, f, x, t["step_index"], t, method, ig_steps)
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
