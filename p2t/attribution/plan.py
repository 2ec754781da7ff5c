"""The micro-batches of one scoring call, planned at once.

:func:`plan` takes the call's rows and their grouping (rows sorted by length under the token budget,
or the packed groups) and builds every micro-batch's host arrays in one NumPy pass over the rows laid
end to end: the padded model inputs, the readout positions, the global ids of the steps it reads, the
map from its PRM positions onto the policy's tokens. Each kind of array goes to its device in one copy
for the whole call (one to the PRM's device, one to the output device), and each :class:`MicroBatch`
holds views into those copies. The loop over micro-batches then does no host work of its own beyond
slicing, and no host-to-device copy: on a GPU the host can queue micro-batch i + 1 while the device
runs micro-batch i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

from .align import within
from .layout import Row

__all__ = ["MicroBatch", "plan"]


@dataclass
class MicroBatch:
    """One micro-batch of a scoring call.

    rows: its rows (PRM inputs), in the order of the padded tensors' rows.
    tensors: the padded model inputs on the PRM's device (``None`` for packed calls, whose rows are
        laid out by :mod:`.packing`): ``input_ids``, ``attention_mask``, ``step_index``, ``prompt_mask``
        ``[b, L]``, ``readout_positions`` ``[K, 2]`` (row, position), ``row_index`` ``[b]``, ``local``
        ``[K]`` (each readout's step within its row), ``num_local`` (its maximum + 1) and ``steps``
        ``[b, L]`` (step ids within the micro-batch on the step tokens, -1 elsewhere).
    logits_at: ``[K]`` global step ids of its readouts, in readout order (output device).
    scatter: ``[4, M]`` (row in the micro-batch, PRM position, response, policy token): where each
        attribution goes on the policy's tokens (output device).
    weight: ``[M]`` float64 share of each PRM token's attribution (``None``: 1, the identity map).
    flat: ``[2, M]`` the same map on flattened tensors (output device): ``row * L + position`` into the
        micro-batch's ``[b, L]`` (its padded width) and ``response * N + token`` into the call's ``[B, N]``
        (one-index gathers and scatters, several times cheaper per call than two-index ones); ``None`` for
        packed calls.
    index: ``[b]`` host array, the response of each row; ``first``: ``[b]`` host array, the first step
        of each row within the micro-batch.
    """
    rows: List[Row]
    tensors: Optional[dict]
    logits_at: torch.Tensor
    scatter: torch.Tensor
    weight: Optional[torch.Tensor]
    index: np.ndarray
    first: np.ndarray
    flat: Optional[torch.Tensor] = None


def _cat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays).astype(np.int64, copy=False)


def plan(rows: Sequence[Row], groups: Sequence[Sequence[int]], pad_id: int, device, out_device,
         base: np.ndarray, length: int, padded: bool = True) -> List[MicroBatch]:
    """The micro-batches of ``rows`` grouped by ``groups`` (indices into ``rows``; each non-empty).
    ``base``: the global id of the first step of every response (indexed by ``Row.index``); ``length``:
    the output's columns. ``padded=False``: no padded model inputs (packed calls)."""
    G = len(groups)
    if G == 0:
        return []
    R = [rows[i] for g in groups for i in g]
    n = len(R)
    gsize = np.fromiter((len(g) for g in groups), dtype=np.int64, count=G)
    gstart = np.cumsum(gsize) - gsize
    mb = np.repeat(np.arange(G), gsize)
    j = np.arange(n, dtype=np.int64) - gstart[mb]            # row within its micro-batch
    index = np.fromiter((r.index for r in R), dtype=np.int64, count=n)
    k = np.fromiter((r.readout.shape[0] for r in R), dtype=np.int64, count=n)
    kstart = np.cumsum(k) - k
    first = kstart - kstart[gstart][mb]                      # first step of each row within its micro-batch
    K_mb = np.add.reduceat(k, gstart)
    local = within(k)
    ro_pos = _cat([r.readout for r in R])
    m = np.fromiter((r.map_prm.shape[0] for r in R), dtype=np.int64, count=n)
    M_mb = np.add.reduceat(m, gstart)
    weighted = any(r.map_weight is not None for r in R)
    weight = (np.concatenate([r.map_weight if r.map_weight is not None else np.ones(r.map_prm.shape[0]) for r in R])
              if weighted else None)

    # the output device, one buffer: [logits_at | scatter (4 x M) | flat (2 x M)], each part written in place
    Kt, Mt = int(k.sum()), int(m.sum())
    host_out = np.empty(Kt + (6 if padded else 4) * Mt, dtype=np.int64)
    np.add(np.repeat(base[index], k), local, out=host_out[:Kt])
    scatter = host_out[Kt:Kt + 4 * Mt].reshape(4, Mt)
    scatter[0] = np.repeat(j, m)
    scatter[2] = np.repeat(index, m)
    if Mt:
        np.concatenate([r.map_prm for r in R], out=scatter[1], casting="unsafe")
        np.concatenate([r.map_policy for r in R], out=scatter[3], casting="unsafe")
    if padded:
        lens = np.fromiter((r.input_ids.shape[0] for r in R), dtype=np.int64, count=n)
        L_mb = np.maximum.reduceat(lens, gstart)
        flat = host_out[Kt + 4 * Mt:].reshape(2, Mt)
        flat[0] = np.repeat(j * L_mb[mb], m)
        flat[0] += scatter[1]
        np.multiply(scatter[2], int(length), out=flat[1])
        flat[1] += scatter[3]
    out = torch.from_numpy(host_out).to(out_device)
    out_logits, out_scatter = out[:Kt], out[Kt:Kt + 4 * Mt].view(4, Mt)
    out_flat = out[Kt + 4 * Mt:].view(2, Mt) if padded else None
    out_weight = torch.from_numpy(weight).to(out_device) if weighted else None

    if padded:
        cells = gsize * L_mb
        cell0 = np.cumsum(cells) - cells
        T = int(cells.sum())
        Kt = int(k.sum())
        # the PRM's device, one buffer:
        # [ids | step_index | steps | attention_mask | readouts (K x 2) | local | row_index]
        host = np.empty(4 * T + 3 * Kt + n, dtype=np.int64)
        ids, tstep, steps, attn = (host[q * T:(q + 1) * T] for q in range(4))
        ids.fill(pad_id)
        host[T:3 * T].fill(-1)
        attn.fill(0)
        ro = host[4 * T:4 * T + 2 * Kt].reshape(-1, 2)
        ro[:, 0], ro[:, 1] = np.repeat(j, k), ro_pos
        host[4 * T + 2 * Kt:4 * T + 3 * Kt] = local
        host[4 * T + 3 * Kt:] = index
        pmask = np.zeros(T, dtype=bool)
        # each row's cells in one slice (a row is contiguous in its micro-batch's [b, L] block)
        at = (cell0[mb] + j * L_mb[mb]).tolist()
        for r, c, ln, f in zip(R, at, lens.tolist(), first.tolist()):
            ts = r.token_step
            ids[c:c + ln] = r.input_ids
            tstep[c:c + ln] = ts
            steps[c:c + ln] = np.where(ts >= 0, ts + f, -1)
            attn[c:c + ln] = 1
            pmask[c:c + r.prompt_length] = True
        buf = torch.from_numpy(host).to(device)
        ids_t, tstep_t, steps_t, attn_t, ro_t, local_t, index_t = torch.split(buf, [T, T, T, T, 2 * Kt, Kt, n])
        ro_t = ro_t.view(-1, 2)
        pmask_t = torch.from_numpy(pmask).to(device)

    out_mbs = []
    ko, mo = 0, 0
    for i, g0 in enumerate(gstart.tolist()):
        b, K, M = int(gsize[i]), int(K_mb[i]), int(M_mb[i])
        t = None
        if padded:
            c, L = int(cell0[i]), int(L_mb[i])
            cut = slice(c, c + b * L)
            t = dict(input_ids=ids_t[cut].view(b, L), attention_mask=attn_t[cut].view(b, L),
                     step_index=tstep_t[cut].view(b, L), prompt_mask=pmask_t[cut].view(b, L),
                     steps=steps_t[cut].view(b, L), readout_positions=ro_t[ko:ko + K], local=local_t[ko:ko + K],
                     num_local=int(k[g0:g0 + b].max()), row_index=index_t[g0:g0 + b])
        out_mbs.append(MicroBatch(R[g0:g0 + b], t, out_logits[ko:ko + K], out_scatter[:, mo:mo + M],
                                  None if out_weight is None else out_weight[mo:mo + M], index[g0:g0 + b],
                                  first[g0:g0 + b], None if out_flat is None else out_flat[:, mo:mo + M]))
        ko, mo = ko + K, mo + M
    return out_mbs

