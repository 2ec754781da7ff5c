"""GRPO token advantages A~[b, i] = A^_b + alpha * token_rewards[b, i] (0 where mask is False)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import CONST_RTOL, INTERPRET, _group_advantage, compute_dtype, device_guard
from .segment import group_block


@triton.jit(do_not_specialize=["N", "B", "G", "n_chunks"])
def _token_advantages_kernel(o_ptr, tr_ptr, mask_ptr, out_ptr, N, B, G, n_chunks,
                             alpha: tl.float64, eps: tl.float64,  # exact for fp64
                             HAS_MASK: tl.constexpr, SCALE: tl.constexpr, BLOCK: tl.constexpr,
                             BLOCK_G: tl.constexpr, CONST_RTOL: tl.constexpr):
    """One program per (row b, BLOCK chunk): A^_b from the outcome rewards of b's group (or the
    batch), then out[b, i] = A^_b + alpha * tr[b, i], 0 where ~mask. Each element is read before
    it is written by the same program, so out may alias tr."""
    CD: tl.constexpr = o_ptr.dtype.element_ty
    # fp64 scalars (exact for a float64 computation) cast to CD; the zeros keep the interpreter, which
    # passes Python floats, from rounding them to fp32 first
    alpha = (alpha + tl.zeros([], CD)).to(CD)
    eps = (eps + tl.zeros([], CD)).to(CD)
    pid = tl.program_id(0)
    b = pid // n_chunks
    c = pid - b * n_chunks
    col = c * BLOCK + tl.arange(0, BLOCK)
    inb = col < N
    offs = b.to(tl.int64) * N + col
    adv = _group_advantage(o_ptr, b, B, G, eps, CD, SCALE, BLOCK_G, CONST_RTOL)
    v = adv + alpha * tl.load(tr_ptr + offs, mask=inb, other=0).to(CD)
    if HAS_MASK:
        keep = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
        v = tl.where(keep, v, 0)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=inb)


def token_advantages_into(outcome_rewards: torch.Tensor, token_rewards: torch.Tensor,
                          mask: Optional[torch.Tensor], group_size: int, alpha: float, scale: int, eps: float,
                          out: torch.Tensor) -> torch.Tensor:
    """Writes A~ into ``out`` (contiguous [B, N], may alias token_rewards) and returns it."""
    B, N = token_rewards.shape
    cd = compute_dtype(outcome_rewards, token_rewards)
    o = outcome_rewards.to(cd).contiguous()
    tr = token_rewards if token_rewards.is_contiguous() else token_rewards.contiguous()
    if B == 0 or N == 0:
        return out
    block = 4096 if INTERPRET else 1024
    n_chunks = triton.cdiv(N, block)
    m = None if mask is None else mask.contiguous().view(torch.uint8)
    with device_guard(out):
        _token_advantages_kernel[(B * n_chunks,)](
            o, tr, m if m is not None else o, out, N, B, group_size, n_chunks, float(alpha), float(eps),
            HAS_MASK=m is not None, SCALE=int(scale), BLOCK=block, BLOCK_G=group_block(group_size, B, scale),
            CONST_RTOL=CONST_RTOL[cd], num_warps=4)
    return out


def token_advantages(outcome_rewards, token_rewards, mask, group_size, alpha, scale, eps):
    """outcome_rewards [B], token_rewards [B, N], mask bool [B, N] | None -> [B, N] float32 (float64
    when both inputs are float64)."""
    out = torch.empty(token_rewards.shape, device=token_rewards.device,
                      dtype=compute_dtype(outcome_rewards, token_rewards))
    return token_advantages_into(outcome_rewards, token_rewards, mask, group_size, alpha, scale, eps, out)
