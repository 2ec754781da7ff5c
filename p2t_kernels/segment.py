"""Segment softmax redistribution r_i = R_s + omega * R_s * softmax_{j in s}(x_j / T)_i
- omega_neg * (1 - R_s) * softmax_{j in s}(-x_j / T)_i, fused with the GRPO token advantage
A~ = A^_b + alpha * r when asked (p2t_advantages)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (CONST_RTOL, INTERPRET, _effective_ids, _group_advantage, _scatter_run_bounds, check_tokens,
                      compute_dtype, device_guard, init_bounds, next_pow2)


@triton.jit(do_not_specialize=["R", "N", "S"])
def _run_bounds_kernel(ids_ptr, mask_ptr, pos_ptr, R, N, S, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """pos[s] = first token of segment s, pos[S + s] = -(its last token + 1) (see _scatter_run_bounds)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _scatter_run_bounds(ids_ptr, mask_ptr, pos_ptr, offs, R, N, S, HAS_MASK)


@triton.jit
def _softmax_logits(x_ptr, ids_ptr, mask_ptr, offs, end, s, S, mean, std, const, temperature, xmax,
                    CD: tl.constexpr, HAS_MASK: tl.constexpr, STANDARDIZE: tl.constexpr):
    """(lanes of segment s, x / temperature) for tokens ``offs`` (x standardised when asked); lanes
    outside the segment get xmax, so exp(x - xmax) never overflows there."""
    mine = _effective_ids(ids_ptr, mask_ptr, offs, offs < end, S, HAS_MASK) == s
    x = tl.load(x_ptr + offs, mask=mine, other=0).to(CD)
    if STANDARDIZE:
        x = tl.where(const, 0, (x - mean) / std)
    return mine, tl.where(mine, x / temperature, xmax)


@triton.jit(do_not_specialize=["R", "N", "S", "B", "G", "n_chunks"])
def _segment_kernel(x_ptr, ids_ptr, mask_ptr, rewards_ptr, o_ptr, pos_ptr, out_ptr,
                    R, N, S, B, G, n_chunks,
                    omega: tl.float64, temperature: tl.float64, alpha: tl.float64, eps: tl.float64,  # exact for fp64
                    omega_neg: tl.float64,
                    HAS_MASK: tl.constexpr,  # masked tokens are in no segment (and get 0)
                    SIGNED: tl.constexpr,  # omega_neg != 0: the blame term (else the kernel without it)
                    HAS_ADV: tl.constexpr,  # write A^_b + alpha * r (p2t_advantages), else r
                    STANDARDIZE: tl.constexpr, NORMALIZE_SUM: tl.constexpr, SCALE: tl.constexpr,
                    BLOCK: tl.constexpr, FILL_BLOCK: tl.constexpr, BLOCK_G: tl.constexpr,
                    CONST_RTOL: tl.constexpr):
    """Programs 0..S-1: one per segment s, over its tokens in [pos[s], -pos[S+s]) in BLOCK chunks
    (tokens of other segments in that range, e.g. inside a hole of s, are skipped):
        x = scores (or (scores - mean_s) / std_s, population std, 0 for a constant segment) / T
        w = exp(x - max_s x) / sum_s exp(x - max_s x)
        v = exp(-x - max_s(-x)) / sum_s exp(-x - max_s(-x))   (SIGNED: the same passes)
        r = R_s (1 + omega w) - omega_neg (1 - R_s) v  [/ (n_s + omega) with NORMALIZE_SUM]
        out = r  or  A^_b + alpha r
    A segment with no tokens keeps the INT32_MAX bounds of ``init_bounds`` and the program does
    nothing. Programs S..S+B*n_chunks-1: one per (row b, FILL_BLOCK chunk), writing the
    tokens in no segment: 0, or with HAS_ADV A^_b where mask is True and 0 where it is False."""
    CD: tl.constexpr = x_ptr.dtype.element_ty
    # fp64 scalars (exact for a float64 computation) cast to CD; the zeros keep the interpreter, which
    # passes Python floats, from rounding them to fp32 first
    omega = (omega + tl.zeros([], CD)).to(CD)
    temperature = (temperature + tl.zeros([], CD)).to(CD)
    alpha = (alpha + tl.zeros([], CD)).to(CD)
    eps = (eps + tl.zeros([], CD)).to(CD)
    omega_neg = (omega_neg + tl.zeros([], CD)).to(CD)
    pid = tl.program_id(0)
    if pid < S:
        s = pid
        start = tl.load(pos_ptr + s)
        end = -tl.load(pos_ptr + S + s)
        ok = (start >= 0) & (start < end) & (end <= R)
        start = tl.where(ok, start, 0)
        first = _effective_ids(ids_ptr, mask_ptr, start, ok, S, HAS_MASK)
        end = tl.where(ok & (first == s), end, start)
        # pass 1: count, sum and max of the scores
        cnt = tl.zeros([BLOCK], CD)
        tot = tl.zeros([BLOCK], CD)
        mx = tl.full([BLOCK], float("-inf"), CD)
        nmx = tl.full([BLOCK], float("-inf"), CD)
        for k in range(start, end, BLOCK):
            offs = k + tl.arange(0, BLOCK)
            inb = offs < end
            mine = _effective_ids(ids_ptr, mask_ptr, offs, inb, S, HAS_MASK) == s
            x = tl.load(x_ptr + offs, mask=mine, other=0).to(CD)
            cnt += tl.where(mine, 1, 0).to(CD)
            tot += x
            mx = tl.maximum(mx, tl.where(mine, x, float("-inf")))
            if SIGNED:
                nmx = tl.maximum(nmx, tl.where(mine, -x, float("-inf")))
        n = tl.sum(cnt, 0)
        xmax = tl.max(mx, 0)
        nxmax = tl.max(nmx, 0)  # max of -x
        mean = tl.sum(tot, 0) / tl.maximum(n, 1)
        std = mean * 0 + 1
        const = mean != mean  # False
        if STANDARDIZE:
            accv = tl.zeros([BLOCK], CD)
            for k in range(start, end, BLOCK):
                offs = k + tl.arange(0, BLOCK)
                inb = offs < end
                mine = _effective_ids(ids_ptr, mask_ptr, offs, inb, S, HAS_MASK) == s
                d = tl.load(x_ptr + offs, mask=mine, other=0).to(CD) - mean
                accv += tl.where(mine, d * d, 0)
            var = tl.sum(accv, 0) / tl.maximum(n, 1)
            lim = tl.abs(mean) * 1e-6  # ZERO_STD_RTOL of p2t.ops.reference: a constant segment
            const = var <= lim * lim
            std = tl.sqrt(tl.where(const, 1, var))
            xmax = tl.where(const, 0, (xmax - mean) / std)
            nxmax = tl.where(const, 0, (nxmax + mean) / std)
        xmax = xmax / temperature
        nxmax = nxmax / temperature
        # pass 2: softmax denominators
        accs = tl.zeros([BLOCK], CD)
        accn = tl.zeros([BLOCK], CD)
        for k in range(start, end, BLOCK):
            offs = k + tl.arange(0, BLOCK)
            mine, x = _softmax_logits(x_ptr, ids_ptr, mask_ptr, offs, end, s, S, mean, std, const, temperature,
                                      xmax, CD, HAS_MASK, STANDARDIZE)
            accs += tl.where(mine, tl.exp(x - xmax), 0)
            if SIGNED:
                accn += tl.where(mine, tl.exp(tl.where(mine, -x, nxmax) - nxmax), 0)
        den = tl.sum(accs, 0)
        den_neg = tl.sum(accn, 0)
        rew = tl.load(rewards_ptr + s).to(CD)
        scale_r = rew * 0 + 1
        if NORMALIZE_SUM:
            scale_r = 1 / (n + omega)
        if HAS_ADV:
            adv = _group_advantage(o_ptr, start // N, B, G, eps, CD, SCALE, BLOCK_G, CONST_RTOL)
        # pass 3: write
        for k in range(start, end, BLOCK):
            offs = k + tl.arange(0, BLOCK)
            mine, x = _softmax_logits(x_ptr, ids_ptr, mask_ptr, offs, end, s, S, mean, std, const, temperature,
                                      xmax, CD, HAS_MASK, STANDARDIZE)
            w = tl.exp(x - xmax) / den
            r = rew + omega * rew * w
            if SIGNED:
                v = tl.exp(tl.where(mine, -x, nxmax) - nxmax) / den_neg
                r = r - omega_neg * (1 - rew) * v
            if NORMALIZE_SUM:
                r = r * scale_r
            if HAS_ADV:
                r = adv + alpha * r
            tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mine)
    else:
        f = pid - S
        b = f // n_chunks
        c = f - b * n_chunks
        col = c * FILL_BLOCK + tl.arange(0, FILL_BLOCK)
        offs = b.to(tl.int64) * N + col
        inb = col < N
        sid = _effective_ids(ids_ptr, mask_ptr, offs, inb, S, HAS_MASK)
        fill = tl.zeros([FILL_BLOCK], CD)
        if HAS_ADV:
            adv = _group_advantage(o_ptr, b, B, G, eps, CD, SCALE, BLOCK_G, CONST_RTOL)
            keep = inb
            if HAS_MASK:
                keep = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
            fill = tl.where(keep, adv + fill, 0)
        tl.store(out_ptr + offs, fill.to(out_ptr.dtype.element_ty), mask=inb & (sid < 0))


def group_block(group_size: int, B: int, scale: int) -> int:
    """Tile of the group-statistics loops: the group (or the batch, scale 1), 16..1024 values."""
    return min(max(next_pow2(max(group_size, B if scale == 1 else 1)), 16), 1024)


def segment_blocks():
    """(BLOCK, FILL_BLOCK, num_warps) of the segment kernel: segments are ~100 tokens."""
    return (256, 4096, 4) if INTERPRET else (128, 1024, 4)


def launch_segment(x, ids, mask, rewards, outcome, pos, out, B, N, group_size, omega, temperature, alpha,
                   standardize, normalize_sum, scale, eps, omega_neg=0.0):
    """Run the segment kernel over x [B*N] (run bounds already in pos [2S]); rows of N tokens."""
    R = x.shape[0]
    S = rewards.shape[0]
    if R == 0:
        return out
    check_tokens(R)
    block, fill_block, warps = segment_blocks()
    n_chunks = triton.cdiv(N, fill_block)
    grid = (S + B * n_chunks,)
    has_adv = outcome is not None
    _segment_kernel[grid](
        x, ids, mask if mask is not None else ids, rewards, outcome if has_adv else rewards, pos, out,
        R, N, S, B, group_size, n_chunks, float(omega), float(temperature), float(alpha), float(eps),
        float(omega_neg), HAS_MASK=mask is not None, SIGNED=float(omega_neg) != 0.0,
        HAS_ADV=has_adv, STANDARDIZE=bool(standardize),
        NORMALIZE_SUM=bool(normalize_sum), SCALE=int(scale),
        BLOCK=block, FILL_BLOCK=fill_block, BLOCK_G=group_block(group_size, B, scale),
        CONST_RTOL=CONST_RTOL[x.dtype], num_warps=warps)
    return out


def segment_redistribute(scores: torch.Tensor, segment_ids: torch.Tensor, segment_rewards: torch.Tensor,
                         omega: float, temperature: float, standardize: bool, normalize_sum: bool,
                         omega_neg: float = 0.0) -> torch.Tensor:
    """scores [R] (any float dtype), segment_ids int32/int64 [R] (ids outside [0, S) are in no segment),
    segment_rewards [S] -> [R] float32 (float64 when scores and rewards are float64). Two launches:
    run bounds, then the segment kernel; no host synchronisation."""
    cd = compute_dtype(scores, segment_rewards)
    x = scores.to(cd).contiguous()
    ids = segment_ids.contiguous()
    rewards = segment_rewards.contiguous()
    R, S = x.shape[0], rewards.shape[0]
    out = torch.empty(R, device=x.device, dtype=cd)
    if R == 0:
        return out
    check_tokens(R)
    with device_guard(x):
        pos = init_bounds(S, x.device)
        if S > 0:
            block = 4096 if INTERPRET else 1024
            _run_bounds_kernel[(triton.cdiv(R, block),)](ids, ids, pos, R, R, S, HAS_MASK=False, BLOCK=block)
        return launch_segment(x, ids, None, rewards, None, pos, out, 1, R, 1, omega, temperature, 0.0, standardize,
                              normalize_sum, 2, 0.0, omega_neg)
