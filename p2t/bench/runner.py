"""Running cases: the providers usable on a device, one callable per (case, provider, mode), and the
loops that time them into :class:`~p2t.bench.report.BenchmarkRow` rows."""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional, Sequence

import torch

import p2t

from .cases import COMPILE_PROVIDERS, Case, _nb
from .report import BenchmarkRow, CsvWriter, format_table
from .timing import copy_bandwidth, copy_mbytes, environment, host_quantiles, llc_bytes, peak_memory_mb, time_fns


def providers(device: str, compile_modes: Sequence[str] = COMPILE_PROVIDERS, interpreted_triton: bool = False) -> list:
    """Backends usable on ``device`` (Triton on CPU only when asked: the interpreter is not a kernel),
    then the torch.compile providers."""
    dev = device.split(":")[0]
    names = [b for b in p2t.available_backends(dev) if not (b == "triton" and dev == "cpu" and not interpreted_triton)]
    return names + [c for c in compile_modes if c in COMPILE_PROVIDERS]


# torch.compile backend of the compile providers: "inductor" measures what a user gets; a rehearsal on
# CPU (benchmarks/gpu_check.sh --dry-run) sets P2T_BENCH_COMPILE_BACKEND=eager: traced, no code generated
COMPILE_BACKEND = os.environ.get("P2T_BENCH_COMPILE_BACKEND", "inductor")


def _compiled(fn, dynamic: bool):
    # backward mode replays one recorded graph (retain_graph=True), which donated buffers forbid
    try:
        torch._functorch.config.donated_buffer = False
    except AttributeError:  # pragma: no cover - older torch
        pass
    return torch.compile(fn, dynamic=dynamic, fullgraph=False, backend=COMPILE_BACKEND)


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


callable_for = _callable


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


def _metric(device: str, clock: str) -> str:
    return "cpu_time" if clock == "cpu" and not device.startswith("cuda") else "time"


def run_case(case: Case, modes: Sequence[str], provs: Sequence[str], device: str, env: dict, copy_gbps: float,
             *, rep_ms: float = 300.0, warmup_ms: float = 50.0, memory: bool = True, seed: int = 0,
             clock: str = "wall", host: bool = False, host_calls: int = 30, timer_kw: Optional[dict] = None,
             log: Optional[Callable[[str], None]] = None) -> list:
    """Rows (:class:`BenchmarkRow`) for every provider x mode of one case. ``host=True`` adds the host
    time per call (:func:`~p2t.bench.timing.host_quantiles` over ``host_calls`` calls, median) to each
    row; ``timer_kw`` goes to the timer (e.g. ``min_samples`` for a rehearsal with tiny shapes)."""
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
        times = time_fns(fns, device, rep_ms=rep_ms, warmup_ms=warmup_ms, clock=clock, **(timer_kw or {})) if fns else {}
        nbytes = case.nbytes(base_inputs[0], mode)
        for p in provs:
            if p in errs:
                if log:
                    log(f"  {case.kernel} {mode} {p}: skipped ({errs[p].splitlines()[0][:160]})")
                continue
            y50, y20, y80 = times[p]
            gbps = nbytes / (y50 * 1e-3) / 1e9
            pk = peak_memory_mb(lambda fn=fns[p]: fn(1), device) if memory else float("nan")
            hm = host_quantiles(fns[p], device, calls=host_calls)[0] if host else float("nan")
            rows.append(BenchmarkRow.measured(
                env, kernel=case.kernel, provider=p, mode=mode, metric=_metric(device, clock), unit="ms", x=case.x,
                y50=y50, y20=y20, y80=y80, x_name=case.x_name, layout=case.layout, dtype=case.dtype,
                shape=case.shape, mbytes=nbytes / 2**20, gbps=gbps, pct_copy_bw=100.0 * gbps / copy_gbps,
                peak_mem_mb=pk, host_ms=hm))
        fns = {}  # free the recorded graphs before the next mode
    return rows


def copy_row(device: str, env: dict, mbytes: Optional[float] = None, **kw) -> tuple:
    """(GB/s, row) of the copy bandwidth (:func:`~p2t.bench.timing.copy_bandwidth`)."""
    mb = mbytes or copy_mbytes(device)
    gbps, (y50, y20, y80) = copy_bandwidth(device, mb, **kw)
    row = BenchmarkRow.measured(
        env, kernel="copy", provider="torch", mode="forward", metric=_metric(device, kw.get("clock", "wall")),
        unit="ms", x=mb, y50=y50, y20=y20, y80=y80, x_name="MiB", layout="dense",
        dtype="bf16" if device.startswith("cuda") else "fp32", shape=f"{mb:g}MiB", mbytes=2 * mb, gbps=gbps,
        pct_copy_bw=100.0)
    return gbps, row


def run_suite(cases: list, device: str, provs: Optional[Sequence[str]] = None, *, rep_ms: float = 300.0,
              warmup_ms: float = 50.0, memory: bool = True, log: Optional[Callable[[str], None]] = print,
              csv_path: Optional[str] = None, clock: str = "wall", host: bool = False) -> list:
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
    writer = CsvWriter(csv_path) if csv_path else None
    if writer:
        writer.write([crow])
    for case, modes in cases:
        t0 = time.time()
        new = run_case(case, modes, provs, device, env, copy_gbps, rep_ms=rep_ms, warmup_ms=warmup_ms,
                       memory=memory, clock=clock, host=host, log=log)
        rows += new
        if writer:
            writer.write(new)
        if log:
            log(f"{case.kernel} {case.layout} {case.dtype} {case.shape} [{','.join(modes)}] "
                f"({time.time() - t0:.0f} s)")
            for line in format_table(new, header=False):
                log(line)
    return rows
