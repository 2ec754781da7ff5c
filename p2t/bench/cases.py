"""Benchmark cases: the op, its layout, dtype and shape, how to make its inputs, how to call it through
the public API and as plain PyTorch (for torch.compile), and how many bytes a pass moves; the suites."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

import p2t
from p2t.ops import reference as ref

MODES = ("forward", "backward", "full")
# the plain-PyTorch math (p2t.ops.reference) under torch.compile(dynamic=False) / (dynamic=True)
COMPILE_PROVIDERS = ("torch_compile", "torch_compile_dynamic")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def lengths(B: int, N: int, gen: torch.Generator, lo_frac: float = 0.25) -> torch.Tensor:
    """Random sequence lengths, uniform in ``[lo_frac * N, N]``."""
    lo = max(1, int(N * lo_frac))
    return torch.randint(lo, N + 1, (B,), generator=gen)


def segment_ids(lens: torch.Tensor, N: int, steps: int, gen: torch.Generator, prompt_frac: float = 0.125):
    """int64 ids ``[B, N]``: per row a prompt (id -1), then ``steps`` contiguous steps up to the row's
    length, then padding (-1). Ids are global across the batch. Returns (ids, S)."""
    B = lens.shape[0]
    ids = torch.full((B, N), -1, dtype=torch.long)
    nxt = 0
    for b in range(B):
        L = int(lens[b])
        p = min(L - 1, int(L * prompt_frac))
        span = L - p
        k = max(1, min(steps, span))
        cuts = torch.randperm(span - 1, generator=gen)[: k - 1] + 1 if k > 1 else torch.empty(0, dtype=torch.long)
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([span])])
        row = torch.repeat_interleave(torch.arange(k) + nxt, bounds.diff())
        ids[b, p:L] = row
        nxt += k
    return ids, nxt


def _randn(shape, gen: torch.Generator, device: str, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Normal values (never zeros) made on ``device``; seeded from the CPU generator ``gen``."""
    if device.startswith("cuda"):
        g = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


@dataclasses.dataclass
class Case:
    """One benchmark case: the op, its layout/dtype/shape, and how to call it.

    ``make(gen)`` returns a tuple of inputs; ``public(backend)`` returns ``f(inputs)`` calling the public
    op; ``plain`` is the same math in plain PyTorch (p2t.ops.reference), used eager-free under
    torch.compile; ``diff`` indexes the inputs that get gradients in backward/full modes;
    ``nbytes(inputs, mode)`` counts the bytes a pass must move."""
    kernel: str
    layout: str
    dtype: str
    shape: str
    x_name: str
    x: float
    make: Callable
    public: Callable
    plain: Callable
    diff: tuple
    nbytes: Callable
    skip: tuple = ()  # providers left out of this case (to keep short suites short)


def _nb(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _out_nb(n_out: int, *ts) -> int:
    return 4 * n_out + _nb(*ts)


def attribution_case(B: int, N: int, D: int, dtype: str = "fp32", layout: str = "dense", x_name: str = "N",
                     device: str = "cpu") -> Case:
    """token_attribution on ``[B, N, D]`` (dense: no mask; padded: random lengths, mask) or packed
    ``[T, D]`` (the same random lengths, concatenated)."""
    dt = DTYPES[dtype]

    def make(gen):
        lens = lengths(B, N, gen)
        shape = (int(lens.sum()), D) if layout == "packed" else (B, N, D)
        g = _randn(shape, gen, device, dt, 1e-2)
        e = _randn(shape, gen, device, dt, 0.05)
        null = _randn(D, gen, device, dt, 0.05)
        mask = (torch.arange(N)[None, :] < lens[:, None]).to(device) if layout == "padded" else None
        return g, e, null, mask

    def public(backend):
        return lambda g, e, null, mask: p2t.token_attribution(g, e, null, mask=mask, backend=backend)

    def plain(g, e, null, mask):
        D_ = g.shape[-1]
        out = ref.token_attribution(g.reshape(-1, D_), e.reshape(-1, D_), null,
                                    None if mask is None else mask.reshape(-1))
        return out.reshape(g.shape[:-1])

    def nbytes(inp, mode):
        g, e, null, mask = inp
        R = g.numel() // D
        fwd = _out_nb(R, g, e, null, mask)
        bwd = _out_nb(R, g, e, null, mask) + _nb(g, e, null)  # dy, inputs in; d_grad, d_embeds, d_null out
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]

    T = f"T~{B * N * 5 // 8}" if layout == "packed" else f"{B}x{N}"
    x = {"N": N, "D": D, "B": B}[x_name]
    return Case("token_attribution", layout, dtype, f"{T}x{D}", x_name, x, make, public, plain, (0, 1, 2), nbytes)


def segment_case(B: int, N: int, steps: int, dtype: str = "fp32", layout: str = "padded", x_name: str = "N",
                 device: str = "cpu") -> Case:
    """segment_redistribute on scores ``[B, N]`` (padded) or ``[T]`` (packed), ``steps`` steps per row."""
    dt = DTYPES[dtype]

    def make(gen):
        lens = lengths(B, N, gen)
        ids, S = segment_ids(lens, N, steps, gen)
        scores = torch.randn(B, N, generator=gen) * 0.1
        if layout == "packed":
            keep = torch.arange(N)[None, :] < lens[:, None]
            ids, scores = ids[keep], scores[keep]
        rewards = torch.rand(S, generator=gen)
        return scores.to(device=device, dtype=dt), ids.to(device), rewards.to(device)

    def public(backend):
        return lambda s, ids, r: p2t.segment_redistribute(s, ids, r, validate=False, backend=backend)

    def plain(s, ids, r):
        return ref.segment_redistribute(s.reshape(-1), ids.reshape(-1), r, 0.6, 1.0, False, False).reshape(s.shape)

    def nbytes(inp, mode):
        s, ids, r = inp
        fwd = _out_nb(s.numel(), s, ids, r)
        bwd = _out_nb(s.numel(), s, ids, r) + _nb(s, r)
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]

    T = f"T~{B * N * 5 // 8}" if layout == "packed" else f"{B}x{N}"
    return Case("segment_redistribute", layout, dtype, f"{T},{steps}steps", x_name, {"N": N, "B": B}[x_name],
                make, public, plain, (0, 2), nbytes)


def advantages_case(B: int, N: int, group_size: int = 8, x_name: str = "N", device: str = "cpu") -> Case:
    """token_advantages on token rewards ``[B, N]`` fp32 with a padding mask."""

    def make(gen):
        lens = lengths(B, N, gen)
        o = torch.rand(B, generator=gen).to(device)
        tr = (torch.randn(B, N, generator=gen) * 0.1).to(device)
        mask = (torch.arange(N)[None, :] < lens[:, None]).to(device)
        return o, tr, mask

    def public(backend):
        return lambda o, tr, mask: p2t.token_advantages(o, tr, group_size=group_size, mask=mask, backend=backend)

    def plain(o, tr, mask):
        return ref.token_advantages(o, tr, mask, group_size, 0.1, 0, 1e-6)

    def nbytes(inp, mode):
        o, tr, mask = inp
        fwd = _out_nb(tr.numel(), o, tr, mask)
        bwd = _out_nb(tr.numel(), o, mask) + _nb(tr, o)
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]

    return Case("token_advantages", "padded", "fp32", f"{B}x{N},G{group_size}", x_name, {"N": N, "B": B}[x_name],
                make, public, plain, (0, 1), nbytes)


def stage_case(B: int, N: int, steps: int = 16, group_size: int = 8, x_name: str = "N",
               device: str = "cpu") -> Case:
    """The segment + advantage stage: ``segment_redistribute`` then ``token_advantages`` on ``[B, N]``
    fp32 attributions (``steps`` steps per row, a padding mask) -- what follows the attribution in a
    P2T step, timed as one unit (kernel ``segment_stage``)."""

    def make(gen):
        lens = lengths(B, N, gen)
        ids, S = segment_ids(lens, N, steps, gen)
        scores = torch.randn(B, N, generator=gen) * 0.1
        rewards = torch.rand(S, generator=gen)
        o = torch.rand(B, generator=gen)
        mask = torch.arange(N)[None, :] < lens[:, None]
        return scores.to(device), ids.to(device), rewards.to(device), o.to(device), mask.to(device)

    def public(backend):
        def stage(s, ids, r, o, mask):
            tr = p2t.segment_redistribute(s, ids, r, validate=False, backend=backend)
            return p2t.token_advantages(o, tr, group_size=group_size, mask=mask, backend=backend)
        return stage

    def plain(s, ids, r, o, mask):
        tr = ref.segment_redistribute(s.reshape(-1), ids.reshape(-1), r, 0.6, 1.0, False, False).reshape(s.shape)
        return ref.token_advantages(o, tr, mask, group_size, 0.1, 0, 1e-6)

    def nbytes(inp, mode):
        s, ids, r, o, mask = inp
        fwd = _out_nb(s.numel(), s, ids, r, o, mask)  # one fused pass: the token rewards never leave the chip
        bwd = _out_nb(s.numel(), s, ids, r, o, mask) + _nb(s, r, o)
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]

    return Case("segment_stage", "padded", "fp32", f"{B}x{N},{steps}steps,G{group_size}", x_name,
                {"N": N, "B": B}[x_name], make, public, plain, (0, 2, 3), nbytes)


def pipeline_case(B: int, N: int, D: int, steps: int = 16, dtype: str = "fp32", group_size: int = 8,
                  layout: str = "padded", x_name: str = "N", device: str = "cpu") -> Case:
    """p2t_advantages (attribution -> redistribution -> token advantages) on ``[B, N, D]``."""
    dt = DTYPES[dtype]

    def make(gen):
        lens = lengths(B, N, gen) if layout == "padded" else torch.full((B,), N)
        ids, S = segment_ids(lens, N, steps, gen)
        g = _randn((B, N, D), gen, device, dt, 1e-2)
        e = _randn((B, N, D), gen, device, dt, 0.05)
        null = _randn(D, gen, device, dt, 0.05)
        rewards = torch.rand(S, generator=gen).to(device)
        o = torch.rand(B, generator=gen).to(device)
        mask = (torch.arange(N)[None, :] < lens[:, None]).to(device) if layout == "padded" else None
        return g, e, null, ids.to(device), rewards, o, mask

    def public(backend):
        return lambda g, e, null, ids, r, o, mask: p2t.p2t_advantages(
            g, e, null, ids, r, o, group_size=group_size, mask=mask, validate=False, backend=backend)

    def plain(g, e, null, ids, r, o, mask):
        return ref.p2t_advantages(g, e, null, ids, r, o, mask, group_size, 0.6, 0.1, 1.0, False, False, 0, 1e-6)

    def nbytes(inp, mode):
        g, e, null, ids, r, o, mask = inp
        fwd = _out_nb(B * N, g, e, null, ids, r, o, mask)
        bwd = _out_nb(B * N, g, e, null, ids, r, o, mask) + _nb(g, e, null, r, o)
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]

    return Case("p2t_advantages", layout, dtype, f"{B}x{N}x{D},{steps}steps", x_name, {"N": N, "D": D, "B": B}[x_name],
                make, public, plain, (0, 1, 2, 4, 5), nbytes)


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------
OPS = ("token_attribution", "segment_redistribute", "token_advantages", "p2t_advantages")
FP32_ONLY = ("token_advantages", "segment_stage")  # fp32 token rewards in, whatever the suite's dtypes


def suite(name: str, device: str, ops: Sequence[str] = OPS, dtypes: Sequence[str] = ("fp32", "bf16"),
          modes: Sequence[str] = MODES, layouts: Sequence[str] = ("dense", "padded", "packed")) -> list:
    """(case, modes) pairs. ``quick``: the headline shapes, forward (the ``p2t bench`` run);
    ``full``: headline shapes in every layout and mode, plus N and D sweeps (forward);
    ``tiny``: small shapes for smoke tests."""
    cuda = device.startswith("cuda")
    out = []
    fwd = [m for m in modes if m == "forward"]

    def add(case, ms):
        if case.layout not in layouts:
            return
        kernel_ops = (("segment_redistribute", "token_advantages") if case.kernel == "segment_stage"
                      else (case.kernel,))
        if any(k in ops for k in kernel_ops) and case.dtype in tuple(dtypes) + (("fp32",) if case.kernel in FP32_ONLY else ()):
            if ms:
                out.append((case, tuple(ms)))

    kw = dict(device=device)
    if name == "tiny":
        for dt in dtypes:
            add(attribution_case(2, 37, 300, dt, "padded", **kw), modes)
            add(attribution_case(2, 37, 300, dt, "packed", **kw), fwd)
            add(segment_case(2, 64, 4, dt, "padded", **kw), modes)
            add(pipeline_case(8, 32, 64, 4, dt, **kw), modes)
        add(advantages_case(8, 64, **kw), modes)
        add(stage_case(8, 64, 4, group_size=4, **kw), modes)
        return out
    if name == "quick":
        B, N, D = (64, 2048, 1536) if cuda else (8, 1024, 1024)
        # torch.compile(dynamic=True) on the attribution only (the core-ops target): one compile less each
        for dt in dtypes:
            add(attribution_case(B, N, D, dt, "dense", **kw), fwd)
            add(dataclasses.replace(pipeline_case(B, N, D, 16, dt, **kw), skip=("torch_compile_dynamic",)), fwd)
        add(dataclasses.replace(segment_case(64, 2048, 16, "fp32", "padded", **kw), skip=("torch_compile_dynamic",)), fwd)
        add(dataclasses.replace(advantages_case(64, 2048, **kw), skip=("torch_compile_dynamic",)), fwd)
        add(dataclasses.replace(stage_case(64, 2048, 16, **kw), skip=("torch_compile_dynamic",)), fwd)
        return out
    if name != "full":
        raise ValueError(f"suite must be tiny, quick or full, got {name!r}")
    if cuda:
        heads = [(64, 2048, 1536), (8, 8192, 3584), (3, 1000, 1531)]  # PERF.md shapes and an odd D
        n_sweep = [(8, n, 3584) for n in (1024, 4096, 16384)]
        d_sweep = [(64, 2048, d) for d in (896, 2048, 4096, 5120)]
        seg = [(64, 2048, 16), (256, 8192, 32)]
    else:
        heads = [(8, 1024, 1024), (3, 1000, 1531)]
        n_sweep = [(8, n, 1024) for n in (256, 2048, 4096)]
        d_sweep = [(8, 1024, d) for d in (512, 1536, 3584)]
        seg = [(64, 2048, 16), (256, 8192, 32)]
    for dt in dtypes:
        for (B, N, D) in heads:
            for layout in ("dense", "padded", "packed"):
                add(attribution_case(B, N, D, dt, layout, **kw), modes if layout != "packed" else fwd)
        for (B, N, D) in n_sweep:
            add(attribution_case(B, N, D, dt, "dense", x_name="N", **kw), fwd)
        for (B, N, D) in d_sweep:
            add(attribution_case(B, N, D, dt, "dense", x_name="D", **kw), fwd)
        for (B, N, S) in seg:
            for layout in ("padded", "packed"):
                add(segment_case(B, N, S, dt, layout, **kw), modes if layout == "padded" else fwd)
        B, N, D = heads[0]
        add(pipeline_case(B, N, D, 16, dt, **kw), modes)
        add(pipeline_case(B, N, D, 16, dt, layout="dense", **kw), fwd)
    for (B, N, S) in seg:
        add(advantages_case(B, N, **kw), modes)
        add(stage_case(B, N, S, **kw), fwd)
    return out
