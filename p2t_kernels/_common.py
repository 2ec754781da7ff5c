"""Helpers shared by the Triton kernels: block-size heuristics, dtypes, and the @triton.jit
device functions for effective segment ids, run bounds and group advantages."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Kernels never autotune (the interpreter cannot): block sizes come from the heuristics below.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when every floating input is float64, else float32 (as p2t.ops.reference)."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


# pos (run bounds) and token indices are int32 inside the kernels
MAX_TOKENS = 2**31 - 2
# A GRPO group is constant when max - min <= rtol * max(1, |mean|) (as p2t.ops.reference.CONST_RTOL)
CONST_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def check_tokens(R: int) -> None:
    if R > MAX_TOKENS:
        raise ValueError(f"too many tokens for the Triton segment kernels: {R} > {MAX_TOKENS} (int32 positions)")


def device_guard(t: torch.Tensor):
    """Launch on t's device (Triton launches on the current CUDA device, not the tensor's)."""
    import contextlib
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def init_bounds(S: int, device) -> torch.Tensor:
    """pos [2S] for _scatter_run_bounds: every slot INT32_MAX (atomic minima below)."""
    return torch.full((2 * max(S, 1),), 2**31 - 1, device=device, dtype=torch.int32)


def row_major(t: torch.Tensor) -> torch.Tensor:
    """[R, D] view with unit stride on the last dim (copies only when it is not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _effective_ids(ids_ptr, mask_ptr, offs, inb, S, HAS_MASK: tl.constexpr):
    """Segment id of each token, or -1 when the id is outside [0, S), the token is masked out,
    or ``inb`` is False (out of bounds). The range check is done in the ids' own dtype, before the
    int32 cast (an int64 id >= 2**31 must not alias a real segment)."""
    raw = tl.load(ids_ptr + offs, mask=inb, other=-1)
    ok = inb & (raw >= 0) & (raw < S)
    if HAS_MASK:
        m = tl.load(mask_ptr + offs, mask=inb, other=0)
        ok = ok & (m != 0)
    return tl.where(ok, raw, -1).to(tl.int32)


@triton.jit
def _scatter_run_bounds(ids_ptr, mask_ptr, pos_ptr, offs, R, N, S, HAS_MASK: tl.constexpr):
    """For tokens ``offs`` of the flat [R] id array (rows of N tokens), fold each run's bounds into
    the segment's bounds: ``pos[s] = min first token`` and ``pos[S + s] = -max(last token + 1)``, both
    atomic minima over a ``pos`` filled with INT32_MAX (``init_bounds``). A run is a maximal stretch of
    one id >= 0 inside one row; a segment is the set of its tokens, so it may have several runs, and
    [pos[s], -pos[S + s]) covers them all."""
    inb = offs < R
    sid = _effective_ids(ids_ptr, mask_ptr, offs, inb, S, HAS_MASK)
    has_prev = inb & (offs % N != 0)
    prv = _effective_ids(ids_ptr, mask_ptr, offs - 1, has_prev, S, HAS_MASK)
    has_next = ((offs + 1) < R) & ((offs + 1) % N != 0)
    nxt = _effective_ids(ids_ptr, mask_ptr, offs + 1, has_next, S, HAS_MASK)
    valid = sid >= 0
    tl.atomic_min(pos_ptr + sid, offs.to(tl.int32), mask=valid & (prv != sid))
    tl.atomic_min(pos_ptr + S + sid, -(offs + 1).to(tl.int32), mask=valid & (nxt != sid))


@triton.jit
def _group_advantage(o_ptr, b, B, G, eps, CD: tl.constexpr, SCALE: tl.constexpr, BLOCK_G: tl.constexpr,
                     CONST_RTOL: tl.constexpr):
    """A^_b of GRPO for row ``b`` (scalar): ``(o_b - mean_g) / (std + eps)`` where the groups are
    contiguous blocks of G rows; std is the unbiased std of the group (SCALE 0) or of the whole batch
    (SCALE 1), std = 0 when its variance is 0 or there is one value; SCALE 2: ``o_b - mean_g``.
    0 when b's group is constant: max - min <= CONST_RTOL * max(1, |mean_g|)."""
    g0 = (b // G) * G
    acc = tl.zeros([BLOCK_G], CD)
    hi = tl.full([BLOCK_G], float("-inf"), CD)
    lo = tl.full([BLOCK_G], float("inf"), CD)
    for k in range(0, G, BLOCK_G):
        off = k + tl.arange(0, BLOCK_G)
        v = tl.load(o_ptr + g0 + off, mask=off < G, other=0).to(CD)
        acc += v
        hi = tl.maximum(hi, tl.where(off < G, v, float("-inf")))
        lo = tl.minimum(lo, tl.where(off < G, v, float("inf")))
    mean_g = tl.sum(acc, 0) / G
    constant = tl.max(hi, 0) - tl.min(lo, 0) <= CONST_RTOL * tl.maximum(tl.abs(mean_g), 1.0)
    centered = tl.where(constant, 0, tl.load(o_ptr + b).to(CD) - mean_g)
    if SCALE == 2:
        adv = centered
    else:
        if SCALE == 0:
            lo = g0
            n = G
            mean = mean_g
        else:
            lo = 0
            n = B
            accb = tl.zeros([BLOCK_G], CD)
            for k in range(0, B, BLOCK_G):
                off = k + tl.arange(0, BLOCK_G)
                accb += tl.load(o_ptr + off, mask=off < B, other=0).to(CD)
            mean = tl.sum(accb, 0) / B
        accv = tl.zeros([BLOCK_G], CD)
        for k in range(0, n, BLOCK_G):
            off = k + tl.arange(0, BLOCK_G)
            c = tl.load(o_ptr + lo + off, mask=off < n, other=0).to(CD) - mean
            accv += tl.where(off < n, c * c, 0)
        var = tl.sum(accv, 0) / tl.maximum(n - 1, 1)
        std = tl.where(var == 0, 0, tl.sqrt(tl.where(var == 0, 1, var)))
        den = std + eps
        adv = tl.where(den == 0, 0, centered / tl.where(den == 0, 1, den))  # zero std and eps = 0: 0, not 0/0
    return adv
