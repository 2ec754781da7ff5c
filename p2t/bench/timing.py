"""Timers and the measuring context: device names, versions, quantile timers (CPU and CUDA), host time
per call, peak memory and the device's copy bandwidth."""
from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from typing import Callable, Optional, Sequence

import torch

import p2t


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


def environment(device: str) -> dict:
    """What every row records besides its measurement: gpu (the device's name), torch, triton, version
    (p2t's), commit, date."""
    env = versions()
    env["gpu"] = device_name(device)
    return env


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


quantiles = _quantiles

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
    """Median, p20, p80 (ms) of each ``fns[name](i)`` with ``triton.testing.do_bench`` (device time:
    CUDA events around each call, the L2 cache flushed between calls)."""
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
    """Median, p20, p80 (ms) per function: device time on CUDA, ``clock`` time on CPU."""
    if device.startswith("cuda"):
        kw.pop("clock", None)
        return cuda_quantiles(fns, **kw)
    return cpu_quantiles(fns, **kw)


def host_quantiles(fn: Callable[[int], object], device: str, *, calls: int = 30, start: int = 0) -> tuple:
    """Median, p20, p80 (ms) of the host time of one ``fn(i)``: the wall time until the call returns,
    with the device idle before it (synchronised, not timed). On a GPU this is what the Python layer,
    the dispatcher and the launches cost the CPU -- the floor of a call's latency when the device work is
    shorter, and what a CUDA graph removes. On CPU it is the whole call."""
    cuda = device.startswith("cuda")
    ts = []
    for i in range(calls):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        fn(start + i)
        ts.append((time.perf_counter_ns() - t0) / 1e6)
    if cuda:
        torch.cuda.synchronize()
    return _quantiles(ts)


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


def copy_mbytes(device: str) -> float:
    """MiB copied by :func:`copy_bandwidth` by default: 1 GiB of bf16 on CUDA (as in PERF.md), 256 MiB
    of fp32 on CPU (8x a typical last-level cache)."""
    return 1024.0 if device.startswith("cuda") else 256.0


def copy_bandwidth(device: str, mbytes: Optional[float] = None, **kw) -> tuple:
    """(GB/s, (y50, y20, y80) ms) of ``dst.copy_(src)``: bytes read + bytes written per time."""
    cuda = device.startswith("cuda")
    nbytes = int((mbytes or copy_mbytes(device)) * 2**20)
    dt = torch.bfloat16 if cuda else torch.float32
    n = nbytes // torch.tensor([], dtype=dt).element_size()
    src = torch.randn(n, device=device).to(dt)
    dst = torch.empty_like(src)
    q = time_fns({"copy": lambda i: dst.copy_(src)}, device, **kw)["copy"]
    return 2 * nbytes / (q[0] * 1e-3) / 1e9, q
