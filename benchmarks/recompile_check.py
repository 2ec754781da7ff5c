"""Recompilation check: 10 calls with 10 different sequence lengths.

1. ``torch.compile(dynamic=True, fullgraph=True)``'d callers of every public op (the redistribution with the
   signed term, ``omega_neg=0.5``), for every backend usable here: graphs compiled per call, counted with ``torch._dynamo.utils.counters``. After the first call
   there must be none (the ops' fake implementations handle symbolic lengths). ``--auto`` adds the
   default ``dynamic=None`` (automatic dynamic shapes: one recompile at the second length is expected).
2. The Triton backend's kernels: on a GPU, compilations counted at Triton's JIT (each in-memory cache miss);
   on CPU under ``TRITON_INTERPRET=1`` nothing compiles, so the check replays Triton's specialization
   rules on the arguments each launch receives (integers on ``== 1`` and ``% 16 == 0`` unless listed in
   ``do_not_specialize``, pointers on 16-byte alignment, constexpr values) and counts the distinct keys:
   the compilations the same calls would cause on a GPU.

    python benchmarks/recompile_check.py [--device cuda] [--auto] [--out results/recompile_<device>.csv]

Exit status 1 when any call after the first compiled.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import p2t
except ImportError:  # source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(HERE))
    import p2t
from p2t import bench

LENGTHS = (97, 130, 211, 256, 301, 389, 512, 577, 640, 777)  # none is 1 (a size dynamo specialises)


def inputs(op: str, N: int, device: str, gen: torch.Generator, D: int = 64, B: int = 4):
    lens = torch.randint(N // 2, N + 1, (B,), generator=gen)
    mask = (torch.arange(N)[None, :] < lens[:, None]).to(device)
    ids, S = bench.segment_ids(lens, N, 4, gen)
    ids = ids.to(device)
    g = torch.randn(B, N, D, generator=gen).to(device) * 1e-2
    e = torch.randn(B, N, D, generator=gen).to(device) * 0.05
    null = torch.randn(D, generator=gen).to(device) * 0.05
    rewards = torch.rand(S, generator=gen).to(device)
    o = torch.rand(B, generator=gen).to(device)
    if op == "token_attribution":
        return (g, e, null, mask)
    if op == "segment_redistribute":
        return (torch.randn(B, N, generator=gen).to(device), ids, rewards)
    if op == "token_advantages":
        return (o, torch.randn(B, N, generator=gen).to(device), mask)
    return (g, e, null, ids, rewards, o, mask)


def caller(op: str, backend: str):
    if op == "token_attribution":
        return lambda g, e, null, mask: p2t.token_attribution(g, e, null, mask=mask, backend=backend)
    if op == "segment_redistribute":
        return lambda s, ids, r: p2t.segment_redistribute(s, ids, r, omega_neg=0.5, validate=False, backend=backend)
    if op == "token_advantages":
        return lambda o, tr, mask: p2t.token_advantages(o, tr, group_size=2, mask=mask, backend=backend)
    return lambda g, e, null, ids, r, o, mask: p2t.p2t_advantages(g, e, null, ids, r, o, group_size=2, mask=mask,
                                                                   omega_neg=0.5, validate=False, backend=backend)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def dynamo_check(op: str, backend: str, dynamic, device: str) -> list:
    torch._dynamo.reset()
    f = torch.compile(caller(op, backend), dynamic=dynamic, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    counts = []
    for N in LENGTHS:
        args = inputs(op, N, device, gen)
        before = graphs_compiled()
        with torch.no_grad():
            f(*args)
        counts.append(graphs_compiled() - before)
    return counts


# ---- Triton -------------------------------------------------------------------------------------
class TritonCounter:
    """Counts Triton compilations (GPU: JIT cache misses) or emulated specialisations (interpreter)."""

    def __init__(self):
        self.n = 0
        self.keys = set()
        self.mode = None
        self._undo = []

    def __enter__(self):
        import triton.runtime.jit as jit

        if os.environ.get("TRITON_INTERPRET") == "1":
            from triton.runtime.interpreter import InterpretedFunction

            self.mode = "emulated"
            orig = InterpretedFunction.run
            counter = self

            def run(fn_self, *args, grid, warmup, **kwargs):
                counter._record(fn_self, args, kwargs)
                return orig(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

            InterpretedFunction.run = run
            self._undo.append(lambda: setattr(InterpretedFunction, "run", orig))
        else:
            self.mode = "compiled"
            orig = jit.JITFunction._do_compile
            counter = self

            def _do_compile(fn_self, *a, **k):
                counter.n += 1
                return orig(fn_self, *a, **k)

            jit.JITFunction._do_compile = _do_compile
            self._undo.append(lambda: setattr(jit.JITFunction, "_do_compile", orig))
        return self

    def __exit__(self, *exc):
        for u in self._undo:
            u()

    def _record(self, fn_self, args, kwargs):
        sig = inspect.signature(fn_self.fn)
        dns = set(fn_self.kwargs.get("do_not_specialize") or ())
        dnsa = set(fn_self.kwargs.get("do_not_specialize_on_alignment") or ())
        bound = dict(zip(sig.parameters, args))
        bound.update({k: v for k, v in kwargs.items() if k in sig.parameters})
        key = [fn_self.fn.__qualname__]
        for i, (name, p) in enumerate(sig.parameters.items()):
            v = bound.get(name, p.default)
            constexpr = "constexpr" in str(p.annotation)
            if constexpr:
                key.append((name, repr(v)))
            elif isinstance(v, bool) or v is None:
                key.append((name, v))
            elif isinstance(v, int):
                if name in dns or i in dns:
                    key.append((name, "i64" if abs(v) >= 2**31 else "i32"))
                else:
                    key.append((name, "i64" if abs(v) >= 2**31 else "i32", v == 1, v % 16 == 0))
            elif isinstance(v, float):
                key.append((name, "fp32"))
            elif isinstance(v, torch.Tensor):
                align = None if (name in dnsa or i in dnsa) else v.data_ptr() % 16 == 0
                key.append((name, str(v.dtype), align))
            else:
                key.append((name, type(v).__name__))
        key.append(tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k not in sig.parameters)))
        key = tuple(key)
        if key not in self.keys:
            self.keys.add(key)
            self.n += 1


def triton_check(op: str, device: str) -> tuple:
    gen = torch.Generator().manual_seed(0)
    f = caller(op, "triton")
    counts = []
    with TritonCounter() as tc:
        for N in LENGTHS:
            args = inputs(op, N, device, gen)
            before = tc.n
            with torch.no_grad():
                f(*args)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            counts.append(tc.n - before)
    return counts, tc.mode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", default=",".join(bench.OPS))
    ap.add_argument("--auto", action="store_true", help="also torch.compile(dynamic=None) (automatic dynamic)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = args.device
    backends = p2t.available_backends(device.split(":")[0])
    rows, bad = [], []
    print(f"device {bench.device_name(device)}; torch {torch.__version__}; backends here: {', '.join(backends)}; "
          f"lengths {LENGTHS}")
    dyn_modes = [("dynamic=True", True)] + ([("dynamic=None", None)] if args.auto else [])
    for op in args.ops.split(","):
        for backend in backends:
            for label, dyn in dyn_modes:
                check = f"torch.compile({label}, fullgraph=True)"
                try:
                    counts = dynamo_check(op, backend, dyn, device)
                except Exception as e:  # noqa: BLE001
                    print(f"{op:<21} {backend:<10} {check}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    rows.append(dict(check=check, op=op, backend=backend, first=-1, after_first=-1, per_call="error"))
                    bad.append((op, backend, check))
                    continue
                after = sum(counts[1:])
                # automatic dynamic recompiles once, at the second length, by design
                allowed = 1 if dyn is None else 0
                ok = after <= allowed
                if not ok:
                    bad.append((op, backend, check))
                rows.append(dict(check=check, op=op, backend=backend, first=counts[0], after_first=after,
                                 per_call=" ".join(map(str, counts))))
                print(f"{op:<21} {backend:<10} {check}: graphs per call {counts} -> {after} after the first"
                      + ("" if ok else "  <-- RECOMPILES"))
        if "triton" in backends:
            try:
                counts, mode = triton_check(op, device)
            except Exception as e:  # noqa: BLE001
                print(f"{op:<21} triton     kernels: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                bad.append((op, "triton", "kernels"))
                continue
            after = sum(counts[1:])
            check = f"triton kernels ({mode})"
            rows.append(dict(check=check, op=op, backend="triton", first=counts[0], after_first=after,
                             per_call=" ".join(map(str, counts))))
            if after:
                bad.append((op, "triton", check))
            print(f"{op:<21} triton     {check}: compilations per call {counts} -> {after} after the first"
                  + ("" if after == 0 else "  <-- RECOMPILES"))
    if "triton" not in backends:
        why = p2t.ops._backends.unavailable_backends().get("triton", "not registered")
        print(f"triton kernels: not checked, the backend is unavailable here ({why})"
              + ("" if device.startswith("cuda") else "; on CPU set TRITON_INTERPRET=1"))
    out = args.out or os.path.join(HERE, "results", f"recompile_{bench.device_tag(device)}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=("check", "op", "backend", "first", "after_first", "per_call"))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    print("OK: no recompilation after the first call" if not bad else f"RECOMPILES or fails: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
