"""Taylor attribution I_r = sum_d (embeds[r, d] - null[d]) * grad[r, d] in one pass over grad/embeds."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, _scatter_run_bounds, compute_dtype, device_guard, next_pow2, row_major


@triton.jit(do_not_specialize=["R", "N", "S"])
def _attribution_kernel(g_ptr, e_ptr, null_ptr, mask_ptr, out_ptr, ids_ptr, pos_ptr,
                        R, D, stride_g, stride_e, N, S,
                        HAS_MASK: tl.constexpr,  # zero the output where mask is False
                        FUSED: tl.constexpr,  # also store the segment run bounds (p2t_advantages)
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        HEAD: tl.constexpr = 0):  # > 0: odd-D layout, rows read from 16 B blocks (below)
    """out[r] = sum_d (e[r, d] - null[d]) * g[r, d] for BLOCK_R rows, accumulated in out's dtype
    (fp32, or fp64 when every input is fp64); rows have unit stride on d, so the loads vectorise
    (16 bytes) when D and the row strides are multiples of 16 elements.

    FUSED: the rows are the B*N tokens of p2t_advantages; the kernel also folds each run's first
    and past-the-end token into pos (``_scatter_run_bounds``) for the segment kernel, and leaves masked
    tokens to it (they are in no segment). Masked rows are not read (their loads are masked off: padding
    costs no bandwidth) and get 0.

    HEAD = elements per 16 bytes (odd D, e.g. 1531, where no row start is 16-byte aligned; grad and
    embeds have one element size and every row starts at the same offset within 16 bytes in both): each
    row is read from its start rounded down to 16 bytes in whole 16-byte vectors (the load mask is
    constant per vector, so the loads vectorise); elements before the row start and after its end are
    zeroed after the load (they lie in a 16-byte block holding a row element: the same page)."""
    CD: tl.constexpr = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    if HAS_MASK:
        keep = tl.load(mask_ptr + rows, mask=rmask, other=0) != 0
        rmask = rmask & keep
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_D], CD)
    if HEAD > 0:
        start_g = rows64 * stride_g
        mis = start_g % HEAD
        base_g = tl.multiple_of(start_g - mis, HEAD)
        base_e = tl.multiple_of(rows64 * stride_e - mis, HEAD)
        for k in range(0, D + HEAD, BLOCK_D):
            cols = k + tl.arange(0, BLOCK_D)  # from the aligned base
            vec0 = (cols // HEAD) * HEAD  # first column of each 16-byte vector
            vmask = rmask[:, None] & ((vec0[None, :] + HEAD) > mis[:, None]) & (vec0[None, :] < (D + mis)[:, None])
            d = cols[None, :] - mis[:, None]  # element index in the row
            inrow = (d >= 0) & (d < D)
            g = tl.load(g_ptr + base_g[:, None] + cols[None, :], mask=vmask, other=0).to(CD)
            e = tl.load(e_ptr + base_e[:, None] + cols[None, :], mask=vmask, other=0).to(CD)
            nl = tl.load(null_ptr + d, mask=vmask & inrow, other=0).to(CD)
            acc += tl.where(inrow, (e - nl) * g, 0)
    for k in range(0, D if HEAD == 0 else 0, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        cmask = cols < D
        m2 = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + rows64[:, None] * stride_g + cols[None, :], mask=m2, other=0).to(CD)
        e = tl.load(e_ptr + rows64[:, None] * stride_e + cols[None, :], mask=m2, other=0).to(CD)
        nl = tl.load(null_ptr + cols, mask=cmask, other=0).to(CD)
        acc += (e - nl[None, :]) * g
    val = tl.sum(acc, 1)  # 0 for masked rows: nothing was loaded
    inb = rows < R
    tl.store(out_ptr + rows, val, mask=inb)
    if FUSED:
        _scatter_run_bounds(ids_ptr, mask_ptr, pos_ptr, rows, R, N, S, HAS_MASK)


def attribution_blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps): ~4096 elements per tensor per step (32 per thread, i.e.
    four 16-byte loads of bf16); 4x larger tiles under the interpreter (fewer, larger programs)."""
    block_d = min(next_pow2(D), 512)
    tile = 16384 if INTERPRET else 4096
    return max(1, tile // block_d), block_d, 4


def head_elems(grad, embeds) -> int:
    """Elements per 16 bytes when the odd-D path applies (see _attribution_kernel's HEAD), else 0."""
    es = grad.element_size()
    D = grad.shape[1]
    if es != embeds.element_size() or es > 8:
        return 0
    v = 16 // es
    aligned = D % v == 0 and grad.stride(0) % v == 0 and embeds.stride(0) % v == 0 and \
        grad.data_ptr() % 16 == 0 and embeds.data_ptr() % 16 == 0
    same = (grad.data_ptr() - embeds.data_ptr()) % 16 == 0 and (grad.stride(0) - embeds.stride(0)) % v == 0
    return v if (not aligned and same and D >= 2 * v) else 0


def launch_attribution(grad, embeds, null_embed, mask, out, ids=None, pos=None, N=1, S=0, head=None):
    R, D = grad.shape
    if R == 0:
        return out
    head = head_elems(grad, embeds) if head is None else head
    block_r, block_d, warps = attribution_blocks(D)
    grid = (triton.cdiv(R, block_r),)
    _attribution_kernel[grid](
        grad, embeds, null_embed, mask if mask is not None else out, out,
        ids if ids is not None else out, pos if pos is not None else out,
        R, D, grad.stride(0), embeds.stride(0), N, S,
        HAS_MASK=mask is not None, FUSED=ids is not None, BLOCK_R=block_r, BLOCK_D=block_d, HEAD=head,
        num_warps=warps)
    return out


def token_attribution(grad: torch.Tensor, embeds: torch.Tensor, null_embed: torch.Tensor,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """grad, embeds [R, D] (any float dtypes, last dim may be strided), null_embed [D], mask bool [R]
    -> [R] float32 (float64 when all inputs are float64)."""
    grad, embeds, null_embed = row_major(grad), row_major(embeds), null_embed.contiguous()
    out = torch.empty(grad.shape[0], device=grad.device, dtype=compute_dtype(grad, embeds, null_embed))
    m = None if mask is None else mask.contiguous().view(torch.uint8)
    with device_guard(grad):
        return launch_attribution(grad, embeds, null_embed, m, out)
