"""Op benchmarks shared by ``benchmarks/`` and ``p2t bench``: timers, cases, providers, one CSV schema.

Every row compares one *provider* on one *case* (op, layout, dtype, shape) in one *mode*:

* providers: each backend usable on the device through the public API (``reference`` is the plain
  PyTorch eager path), plus ``torch_compile`` / ``torch_compile_dynamic``: the same plain-PyTorch
  math (``p2t.ops.reference``) under ``torch.compile(dynamic=False)`` and ``dynamic=True`` -- what a
  user would otherwise write.
* modes: ``forward``, ``backward`` (``y.backward(dy)`` on a recorded graph) and ``full`` (both).

Timing: on CUDA ``triton.testing.do_bench`` quantiles; on CPU :func:`cpu_quantiles`, a robust
wall-clock timer (warm-up, several calls per sample for short ops, providers interleaved sample by
sample so that load from other processes hits them alike). Inputs are random normals (never zeros)
and rotated over several copies when one set would sit in the last-level cache. The device's copy
bandwidth is measured in the same run; GB/s counts each input read once and each output written once.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the running sum of the allocator's
allocations and frees recorded by ``torch.profiler(profile_memory=True)`` over one call.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import platform
import subprocess
import time
from typing import Callable, Optional, Sequence

import torch

import p2t
from p2t.ops import reference as ref

# ---------------------------------------------------------------------------------------------
# CSV schema: the first eleven columns as in the benchmark suites of Liger-Kernel, then the
# context each row needs to stand alone.
# ---------------------------------------------------------------------------------------------
COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x", "y50", "y20", "y80", "gpu", "version",
           "x_name", "layout", "dtype", "shape", "mbytes", "gbps", "pct_copy_bw", "peak_mem_mb",
           "torch", "triton", "commit", "date")

COMPILE_PROVIDERS = ("torch_compile", "torch_compile_dynamic")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    """The card's name on CUDA; ``cpu-<threads>core (<model>)`` on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    return f"cpu-{cores}core ({model})" + (f", {threads} thread{'s' if threads > 1 else ''}" if threads != cores else "")


def device_tag(device: str) -> str:
    """A file-name friendly device name: ``cpu-2core``, ``nvidia-h100-80gb-hbm3``."""
    name = device_name(device)
    if device.startswith("cpu"):
        cores, threads = os.cpu_count() or 1, torch.get_num_threads()
        name = name.split(" ")[0] + (f"-{threads}thread" if threads != cores else "")
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name.lower()).strip("-")


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(p2t.__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return {"torch": torch.__version__, "triton": tv, "version": p2t.__version__, "commit": git_commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def llc_bytes() -> int:
    """Size of the largest CPU cache level (64 MiB when unknown); rotation keeps inputs out of it."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
                best = max(best, int(s.rstrip("KMG")) * mult)
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return best or (64 << 20)


# ---------------------------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------------------------
def _quantiles(xs: Sequence[float], qs=(0.5, 0.2, 0.8)) -> tuple:
    s = sorted(xs)
    out = []
    for q in qs:
        pos = q * (len(s) - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        out.append(s[lo] + (s[hi] - s[lo]) * (pos - lo))
    return tuple(out)


CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.process_time_ns}


def cpu_quantiles(fns: dict, *, rep_ms: float = 300.0, warmup_ms: float = 50.0, min_samples: int = 8,
                  max_samples: int = 200, min_sample_ms: float = 1.0, clock: str = "wall") -> dict:
    """Median, p20, p80 (ms) of each ``fns[name](i)``, providers interleaved sample by sample.

    ``clock="wall"``: elapsed time. ``clock="cpu"``: CPU time of this process (all its threads), which
    time slices given to other processes do not inflate: on a shared, oversubscribed machine with one
    thread (``torch.set_num_threads(1)``) it measures the work of a call, where wall time favours calls
    short enough to fit in one scheduler slice.

    ``fn(i)`` is called with a running counter (to rotate inputs). The first call of each (compilation)
    is not timed; then warm-up for ``warmup_ms`` (at least two calls). A sample is the mean over enough
    consecutive calls to last ``min_sample_ms``; each provider takes ``rep_ms / sample`` samples,
    clamped to ``[min_samples, max_samples]``.
    """
    now = CLOCKS[clock]
    est, counter = {}, {}
    for name, fn in fns.items():
        fn(0)
        n, t0 = 1, now()
        while True:
            fn(n)
            n += 1
            el = (now() - t0) / 1e9
            if n >= 3 and el * 1e3 >= warmup_ms:
                break
        est[name] = el / (n - 1)
        counter[name] = n
    inner = {k: max(1, math.ceil(min_sample_ms / 1e3 / max(v, 1e-9))) for k, v in est.items()}
    want = {k: int(min(max_samples, max(min_samples, round(rep_ms / 1e3 / (est[k] * inner[k])))))
            for k in fns}
    samples = {k: [] for k in fns}
    while any(len(samples[k]) < want[k] for k in fns):
        for name, fn in fns.items():
            if len(samples[name]) >= want[name]:
                continue
            c = counter[name]
            t0 = now()
            for j in range(inner[name]):
                fn(c + j)
            dt = now() - t0
            counter[name] = c + inner[name]
            samples[name].append(dt / inner[name] / 1e6)
    return {k: _quantiles(v) for k, v in samples.items()}


def cuda_quantiles(fns: dict, *, rep_ms: float = 100.0, warmup_ms: float = 25.0, **_) -> dict:
    """Median, p20, p80 (ms) of each ``fns[name](i)`` with ``triton.testing.do_bench``."""
    from triton.testing import do_bench

    out = {}
    for name, fn in fns.items():
        c = [0]

        def call(fn=fn, c=c):
            fn(c[0])
            c[0] += 1

        call()
        torch.cuda.synchronize()
        q = do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        out[name] = tuple(float(v) for v in q)
    return out


def time_fns(fns: dict, device: str, **kw) -> dict:
    if device.startswith("cuda"):
        kw.pop("clock", None)
        return cuda_quantiles(fns, **kw)
    return cpu_quantiles(fns, **kw)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak bytes allocated during one ``fn()`` above what was allocated before it, in MiB."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        r = fn()
        torch.cuda.synchronize()
        del r
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import torch.profiler as tp

    with tp.profile(activities=[tp.ProfilerActivity.CPU], profile_memory=True) as prof:
        r = fn()
        del r
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 2**20


def copy_bandwidth(device: str, mbytes: Optional[float] = None, **kw) -> tuple:
    """(GB/s, (y50, y20, y80) ms) of ``dst.copy_(src)``: bytes read + bytes written per time.

    1 GiB of bf16 on CUDA (as in PERF.md); on CPU 256 MiB of fp32 (8x a typical last-level cache)."""
    cuda = device.startswith("cuda")
    nbytes = int((mbytes or (1024 if cuda else 256)) * 2**20)
    dt = torch.bfloat16 if cuda else torch.float32
    n = nbytes // torch.tensor([], dtype=dt).element_size()
    src = torch.randn(n, device=device).to(dt)
    dst = torch.empty_like(src)
    q = time_fns({"copy": lambda i: dst.copy_(src)}, device, **kw)["copy"]
    return 2 * nbytes / (q[0] * 1e-3) / 1e9, q


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
        if case.kernel in ops and case.dtype in tuple(dtypes) + (("fp32",) if case.kernel == "token_advantages" else ()):
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
        return out
    if name == "quick":
        B, N, D = (64, 2048, 1536) if cuda else (8, 1024, 1024)
        # torch.compile(dynamic=True) on the attribution only (the core-ops target): one compile less each
        for dt in dtypes:
            add(attribution_case(B, N, D, dt, "dense", **kw), fwd)
            add(dataclasses.replace(pipeline_case(B, N, D, 16, dt, **kw), skip=("torch_compile_dynamic",)), fwd)
        add(dataclasses.replace(segment_case(64, 2048, 16, "fp32", "padded", **kw), skip=("torch_compile_dynamic",)), fwd)
        add(dataclasses.replace(advantages_case(64, 2048, **kw), skip=("torch_compile_dynamic",)), fwd)
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
    for (B, N, _) in seg:
        add(advantages_case(B, N, **kw), modes)
    return out


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def providers(device: str, compile_modes: Sequence[str] = COMPILE_PROVIDERS, interpreted_triton: bool = False) -> list:
    """Backends usable on ``device`` (Triton on CPU only when asked: the interpreter is not a kernel),
    then the torch.compile providers."""
    dev = device.split(":")[0]
    names = [b for b in p2t.available_backends(dev) if not (b == "triton" and dev == "cpu" and not interpreted_triton)]
    return names + [c for c in compile_modes if c in COMPILE_PROVIDERS]


def _compiled(fn, dynamic: bool):
    # backward mode replays one recorded graph (retain_graph=True), which donated buffers forbid
    try:
        torch._functorch.config.donated_buffer = False
    except AttributeError:  # pragma: no cover - older torch
        pass
    return torch.compile(fn, dynamic=dynamic, fullgraph=False)


def _callable(case: Case, provider: str, inputs: list, mode: str):
    """``f(i)`` running one pass of ``mode`` on the ``i % len(inputs)``-th input set."""
    if provider == "torch_compile":
        f = _compiled(case.plain, False)
    elif provider == "torch_compile_dynamic":
        f = _compiled(case.plain, True)
    else:
        f = case.public(provider)
    k = len(inputs)
    if mode == "forward":
        def run(i):
            with torch.no_grad():
                return f(*inputs[i % k])
        return run
    leaves = [[x for j, x in enumerate(inp) if j in case.diff] for inp in inputs]
    for ls in leaves:
        for x in ls:
            x.requires_grad_(True)
    if mode == "full":
        dys = [None] * k

        def run(i):
            inp = inputs[i % k]
            for x in leaves[i % k]:
                x.grad = None
            y = f(*inp)
            if dys[i % k] is None:
                dys[i % k] = torch.randn_like(y)
            y.backward(dys[i % k])
            return y
        return run
    # backward: one recorded graph per input set, replayed with retain_graph
    graphs = []
    for inp in inputs:
        y = f(*inp)
        graphs.append((y, torch.randn_like(y)))

    def run(i):
        for x in leaves[i % k]:
            x.grad = None
        y, dy = graphs[i % k]
        y.backward(dy, retain_graph=True)
    return run


def _rotations(case: Case, device: str, gen) -> list:
    """Input sets to rotate over: the first, then copies whose floating tensors are rolled by a different
    amount (same shapes, same ids and masks, so a static-shape compile does not recompile; values
    stay random normals, never zeros), enough to exceed twice the last-level cache on CPU."""
    first = case.make(gen)
    per_set = _nb(*[t for t in first if isinstance(t, torch.Tensor) and t.is_floating_point()])
    if device.startswith("cuda"):
        return [first]  # do_bench clears the L2 cache between calls
    k = max(1, min(8, math.ceil(2 * llc_bytes() / max(per_set, 1))))
    out = [first]
    for j in range(1, k):
        out.append(tuple(t.roll(j, 0).contiguous() if isinstance(t, torch.Tensor) and t.is_floating_point()
                         and t.dim() > 0 and t.shape[0] > 1 else t for t in first))
    return out


def run_case(case: Case, modes: Sequence[str], provs: Sequence[str], device: str, env: dict, copy_gbps: float,
             *, rep_ms: float = 300.0, warmup_ms: float = 50.0, memory: bool = True, seed: int = 0,
             clock: str = "wall", log: Optional[Callable[[str], None]] = None) -> list:
    """Rows (dicts with :data:`COLUMNS`) for every provider x mode of one case."""
    rows = []
    provs = [p for p in provs if p not in case.skip]
    gen = torch.Generator().manual_seed(seed)
    base_inputs = _rotations(case, device, gen)
    for mode in modes:
        torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no cross-case reuse
        fns, errs = {}, {}
        for p in provs:
            inputs = [tuple(t.detach().clone() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                            for t in inp) for inp in base_inputs]
            try:
                fns[p] = _callable(case, p, inputs, mode)
                fns[p](0)
            except Exception as e:  # noqa: BLE001 - one failing provider must not stop the run
                errs[p] = f"{type(e).__name__}: {e}"
                fns.pop(p, None)
        times = time_fns(fns, device, rep_ms=rep_ms, warmup_ms=warmup_ms, clock=clock) if fns else {}
        nbytes = case.nbytes(base_inputs[0], mode)
        for p in provs:
            if p in errs:
                if log:
                    log(f"  {case.kernel} {mode} {p}: skipped ({errs[p].splitlines()[0][:160]})")
                continue
            y50, y20, y80 = times[p]
            gbps = nbytes / (y50 * 1e-3) / 1e9
            pk = peak_memory_mb(lambda fn=fns[p]: fn(1), device) if memory else float("nan")
            rows.append(dict(kernel=case.kernel, provider=p, mode=mode, metric=_metric(device, clock), unit="ms",
                             x=case.x, y50=y50, y20=y20, y80=y80, gpu=env["gpu"], version=env["version"], x_name=case.x_name,
                             layout=case.layout, dtype=case.dtype, shape=case.shape, mbytes=nbytes / 2**20,
                             gbps=gbps, pct_copy_bw=100.0 * gbps / copy_gbps, peak_mem_mb=pk, torch=env["torch"],
                             triton=env["triton"], commit=env["commit"], date=env["date"]))
        fns = {}  # free the recorded graphs before the next mode
    return rows


def _metric(device: str, clock: str) -> str:
    return "cpu_time" if clock == "cpu" and not device.startswith("cuda") else "time"


def environment(device: str) -> dict:
    env = versions()
    env["gpu"] = device_name(device)
    return env


def copy_row(device: str, env: dict, **kw) -> tuple:
    gbps, (y50, y20, y80) = copy_bandwidth(device, **kw)
    mb = (1024 if device.startswith("cuda") else 256) * 2
    row = dict(kernel="copy", provider="torch", mode="forward", metric=_metric(device, kw.get("clock", "wall")),
               unit="ms", x=mb / 2, y50=y50,
               y20=y20, y80=y80, gpu=env["gpu"], version=env["version"], x_name="MiB", layout="dense",
               dtype="bf16" if device.startswith("cuda") else "fp32", shape=f"{mb // 2}MiB", mbytes=mb, gbps=gbps,
               pct_copy_bw=100.0, peak_mem_mb=float("nan"), torch=env["torch"], triton=env["triton"],
               commit=env["commit"], date=env["date"])
    return gbps, row


def run_suite(cases: list, device: str, provs: Optional[Sequence[str]] = None, *, rep_ms: float = 300.0,
              warmup_ms: float = 50.0, memory: bool = True, log: Optional[Callable[[str], None]] = print,
              csv_path: Optional[str] = None, clock: str = "wall") -> list:
    """Measure the copy bandwidth, then every case; returns the rows (and appends them to ``csv_path``
    as they come, so an interrupted run keeps what it measured)."""
    env = environment(device)
    provs = list(provs) if provs is not None else providers(device)
    copy_gbps, crow = copy_row(device, env, rep_ms=rep_ms, warmup_ms=warmup_ms, clock=clock)
    if log:
        log(f"device {env['gpu']}; torch {env['torch']}, triton {env['triton']}, p2t {env['version']} "
            f"({env['commit']}); copy bandwidth {copy_gbps:.1f} GB/s; providers: {', '.join(provs)}"
            + (f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {clock} clock"
               if device == "cpu" else ""))
    rows = [crow]
    writer = _CsvAppender(csv_path) if csv_path else None
    if writer:
        writer.write([crow])
    for case, modes in cases:
        t0 = time.time()
        new = run_case(case, modes, provs, device, env, copy_gbps, rep_ms=rep_ms, warmup_ms=warmup_ms,
                       memory=memory, clock=clock, log=log)
        rows += new
        if writer:
            writer.write(new)
        if log:
            log(f"{case.kernel} {case.layout} {case.dtype} {case.shape} [{','.join(modes)}] "
                f"({time.time() - t0:.0f} s)")
            for line in format_table(new, header=False):
                log(line)
    return rows


class _CsvAppender:
    def __init__(self, path: str):
        self.path = path
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writeheader()

    def write(self, rows):
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_csv(rows: list, path: str) -> None:
    _CsvAppender(path).write(rows)


def read_csv(path: str) -> list:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("x", "y50", "y20", "y80", "mbytes", "gbps", "pct_copy_bw", "peak_mem_mb"):
            try:
                r[k] = float(r[k])
            except (KeyError, TypeError, ValueError):
                pass
    return rows


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def _key(r):
    return (r["kernel"], r["layout"], r["dtype"], r["shape"], r["mode"])


def ratios(rows: list) -> list:
    """Per case and mode, each fused backend's speed-up (median time ratio) over ``reference`` and the
    compile providers. Returns dicts: kernel, layout, dtype, shape, mode, provider, vs_<baseline>."""
    groups: dict = {}
    for r in rows:
        if r["kernel"] != "copy":
            groups.setdefault(_key(r), {})[r["provider"]] = r
    out = []
    for key, g in groups.items():
        for p, r in g.items():
            if p == "reference" or p in COMPILE_PROVIDERS:
                continue
            d = dict(zip(("kernel", "layout", "dtype", "shape", "mode"), key), provider=p)
            for b in ("reference",) + COMPILE_PROVIDERS:
                if b in g:
                    d[f"vs_{b}"] = g[b]["y50"] / r["y50"]
            out.append(d)
    return out


def format_table(rows: list, header: bool = True) -> list:
    """Text lines: one per row, with the speed-up of fused backends over the baselines of its case."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(_key(r), {})[r["provider"]] = r
    lines = []
    if header:
        lines.append(f"{'kernel':<21} {'layout':<6} {'dtype':<5} {'shape':<22} {'mode':<8} {'provider':<21} "
                     f"{'ms p50':>9} {'p20':>9} {'p80':>9} {'GB/s':>7} {'%copy':>6} {'peakMB':>8}  speed-up")
    for r in rows:
        g = groups[_key(r)]
        sp = ""
        if r["provider"] not in ("reference", "torch") + COMPILE_PROVIDERS:
            parts = [f"{g[b]['y50'] / r['y50']:.2f}x {'eager' if b == 'reference' else b.replace('torch_', '')}"
                     for b in ("reference",) + COMPILE_PROVIDERS if b in g]
            sp = ", ".join(parts)
        pk = r["peak_mem_mb"]
        lines.append(f"{r['kernel']:<21} {r['layout']:<6} {r['dtype']:<5} {r['shape']:<22} {r['mode']:<8} "
                     f"{r['provider']:<21} {r['y50']:>9.4f} {r['y20']:>9.4f} {r['y80']:>9.4f} {r['gbps']:>7.1f} "
                     f"{r['pct_copy_bw']:>6.1f} {pk:>8.1f}  {sp}")
    return lines


def target_lines(rows: list) -> list:
    """The core-ops speed target: C++ (cpu) attribution >= 10x eager and >= 0.8x torch.compile."""
    lines = []
    for d in ratios(rows):
        if d["kernel"] == "token_attribution" and d["provider"] == "cpu" and d["layout"] == "dense":
            ve, vc = d.get("vs_reference", float("nan")), d.get("vs_torch_compile", float("nan"))
            ok = ve >= 10 and vc >= 0.8
            lines.append(f"target cpu attribution {d['shape']} {d['dtype']} {d['mode']}: "
                         f"{ve:.1f}x eager (>=10), {vc:.2f}x torch.compile (>=0.8)"
                         + (f", {d['vs_torch_compile_dynamic']:.2f}x compile dynamic"
                            if "vs_torch_compile_dynamic" in d else "") + (" -> met" if ok else " -> NOT met"))
    return lines


def markdown_summary(rows: list, fused: Optional[Sequence[str]] = None) -> list:
    """Markdown lines: one row per case and mode, the median time of every provider, then each fused
    backend's GB/s, % of copy bandwidth and speed-up over eager and torch.compile (ratios of medians
    measured in the same run)."""
    cases: dict = {}
    for r in rows:
        if r["kernel"] != "copy":
            cases.setdefault(_key(r), {})[r["provider"]] = r
    provs = []
    for g in cases.values():
        for p in g:
            if p not in provs:
                provs.append(p)
    base = [p for p in ("reference",) + COMPILE_PROVIDERS if p in provs]
    fused = [p for p in (fused or provs) if p not in base]
    head = ["op", "layout", "dtype", "shape", "mode"] + [f"{p} ms" for p in base + fused]
    for f in fused:
        head += [f"{f} GB/s (% copy)"] + [f"{f} vs {'eager' if b == 'reference' else b.replace('torch_', '')}"
                                          for b in base]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, g in cases.items():
        cells = list(key)
        cells += [f"{g[p]['y50']:.3f}" if p in g else "" for p in base + fused]
        for f in fused:
            r = g.get(f)
            cells.append(f"{r['gbps']:.1f} ({r['pct_copy_bw']:.0f}%)" if r else "")
            cells += [f"{g[b]['y50'] / r['y50']:.2f}x" if r and b in g else "" for b in base]
        lines.append("| " + " | ".join(cells) + " |")
    copy = [r for r in rows if r["kernel"] == "copy"]
    if copy:
        lines.append("")
        lines.append(f"Device: {copy[0]['gpu']}; copy bandwidth {copy[0]['gbps']:.1f} GB/s measured in the same run; "
                     f"torch {copy[0]['torch']}, triton {copy[0]['triton']}, commit {copy[0]['commit']}, {copy[0]['date']}.")
    return lines
