"""The Python steps of benchmarks/gpu_check.sh (the one command of a GPU window): a preflight, then the
timings, headline targets first, each printed as soon as it is measured.

    python3 benchmarks/gpu_check.py preflight                 # exit 0: the CUDA kernels can be built, 3: not
    python3 benchmarks/gpu_check.py timings --out DIR [--budget-s 200] [--no-compile]
    python3 benchmarks/gpu_check.py timings --dry-run --out DIR   # the same code on CPU, tiny shapes

Timings, in this order (each case: every fused backend usable here, device time by
``triton.testing.do_bench`` and host time per call beside it):

1. the copy bandwidth (1 GiB bf16), the 100% of every ``% copy bw`` below;
2. headline targets, each with ``torch.compile`` of the plain-PyTorch math in the same run:
   attribution 64x2048x1536 bf16 (>= 97% of copy bandwidth and >= 1.0x torch.compile); the segment stage
   (``segment_redistribute`` + ``token_advantages``) at 64x2048 with 16 steps per row (<= 15 us), through
   the public API, as direct op calls and replayed from a CUDA graph; ``p2t_advantages`` fused vs the
   attribution alone (<= 1.05x); attribution 8x8192x3584;
3. without torch.compile, while the budget lasts: odd D (1531), padded (masked rows), packed, fp32, the
   stage's parts, the stage at 256x8192 with 32 steps per row, the padded pipeline.

``--dry-run`` runs the same steps on CPU with tiny shapes (Triton under ``TRITON_INTERPRET=1``,
torch.compile traced with its ``eager`` backend), so that a typo fails here and not in the GPU window.
One CSV (``gpu_check_<device>.csv``, schema ``p2t.bench.COLUMNS``) is written row by row.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

NS = {"cuda": "p2t", "cpu": "p2t", "triton": "p2t_triton"}  # op namespace of each fused backend
FUSED = ("cuda", "triton", "cpu")


# ---------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "missing"


def _nvcc(cuda_home: str) -> str:
    for cand in ([os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []) + [shutil.which("nvcc") or ""]:
        if cand and os.access(cand, os.X_OK):
            return cand
    return ""


def preflight() -> int:
    """Prints what the check depends on; exit status 0 when the CUDA kernels can be built, 3 when not
    (the check then goes on with the Triton and reference backends)."""
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    try:
        import torch
    except ImportError as e:
        print(f"torch cannot be imported by {sys.executable}: {e} (set PYTHON to the interpreter that has it)")
        return 1
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); cuda available: {torch.cuda.is_available()}"
          + (f"; {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} (sm_"
             f"{''.join(map(str, torch.cuda.get_device_capability(0)))})" if torch.cuda.is_available() else ""))
    print("packages: " + ", ".join(f"{d} {_version(d)}" for d in
                                   ("triton", "transformers", "numpy", "pytest", "pytest-timeout", "setuptools", "ninja")))
    cuda_home = os.environ.get("CUDA_HOME", "")
    nvcc = _nvcc(cuda_home)
    nvcc_v = ""
    if nvcc:
        try:
            nvcc_v = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
            nvcc_v = nvcc_v.splitlines()[-1] if nvcc_v else "?"
        except (OSError, subprocess.SubprocessError) as e:
            nvcc_v = f"failed: {e}"
    py_h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    tools = {t: shutil.which(t) or "" for t in ("ninja", "c++", "gcc", "git", "nvidia-smi")}
    print(f"CUDA_HOME={cuda_home or '(unset)'}; nvcc: {nvcc or 'not found'} {nvcc_v}")
    print(f"Python.h: {py_h if os.path.exists(py_h) else 'MISSING (' + py_h + ')'}")
    print("tools: " + ", ".join(f"{t} {p or 'MISSING'}" for t, p in tools.items()))
    why = []
    if torch.version.cuda is None:
        why.append("torch is not a CUDA build")
    if not nvcc:
        why.append("no nvcc (set CUDA_HOME)")
    if not os.path.exists(py_h):
        why.append("no Python.h")
    if not tools["c++"]:
        why.append("no C++ compiler")
    if not os.path.exists(py_h) or not tools["gcc"]:
        print("warning: Triton compiles its launcher with gcc against Python.h: the triton backend and "
              "torch.compile may fail")
    if not tools["ninja"]:
        print("note: ninja missing: the extension builds one file at a time (slower)")
    if why:
        print(f"build: NO ({'; '.join(why)}): timings and tests go on with the Triton and reference backends")
        return 3
    print("build: yes")
    return 0


# ---------------------------------------------------------------------------------------------
# Timings
# ---------------------------------------------------------------------------------------------
def plan(bench, device: str, dry: bool) -> list:
    """(case, with torch.compile) in order: headline targets first."""
    kw = dict(device=device)
    if dry:
        return [
            (bench.attribution_case(4, 16, 64, "bf16", "dense", **kw), True),
            (bench.stage_case(4, 32, 2, group_size=2, **kw), True),
            (bench.pipeline_case(4, 16, 64, 2, "bf16", group_size=2, layout="dense", **kw), True),
            (bench.attribution_case(2, 64, 301, "bf16", "dense", x_name="D", **kw), False),
            (bench.attribution_case(2, 37, 304, "bf16", "padded", **kw), False),
            (bench.segment_case(4, 32, 2, "fp32", "padded", **kw), False),
        ]
    return [
        (bench.attribution_case(64, 2048, 1536, "bf16", "dense", **kw), True),
        (bench.stage_case(64, 2048, 16, **kw), True),
        (bench.pipeline_case(64, 2048, 1536, 16, "bf16", layout="dense", **kw), True),
        (bench.attribution_case(8, 8192, 3584, "bf16", "dense", **kw), True),
        (bench.attribution_case(64, 2048, 1531, "bf16", "dense", x_name="D", **kw), False),  # odd D
        (bench.attribution_case(64, 2048, 1536, "bf16", "padded", **kw), False),  # masked rows
        (bench.attribution_case(64, 2048, 1536, "bf16", "packed", **kw), False),
        (bench.attribution_case(64, 2048, 1536, "fp32", "dense", **kw), False),
        (bench.segment_case(64, 2048, 16, "fp32", "padded", **kw), False),
        (bench.advantages_case(64, 2048, **kw), False),
        (bench.stage_case(256, 8192, 32, **kw), False),
        (bench.pipeline_case(64, 2048, 1536, 16, "bf16", layout="padded", **kw), False),
    ]


def timer_kw(dry: bool) -> dict:
    """A rehearsal on CPU times each call a few times only (the Triton interpreter is slow)."""
    return dict(min_samples=1, max_samples=2, min_sample_ms=0.0) if dry else {}


def stage_direct(bench, device: str, env: dict, backends: list, rep: float, warm: float, dry: bool) -> list:
    """The segment stage without the public API's Python layer: each fused backend's registered ops
    called directly (``<backend>:op``), that call replayed from a CUDA graph (``<backend>:graph``), and the
    public API captured in a CUDA graph (``<backend>:api-graph``); device and host time per call."""
    import torch

    cuda = device.startswith("cuda")
    B, N, S, G = (4, 32, 2, 2) if dry else (64, 2048, 16, 8)
    case = bench.stage_case(B, N, S, group_size=G, device=device)
    s, ids, r, o, mask = case.make(torch.Generator().manual_seed(0))
    public = case.public
    rows = []
    for backend in [b for b in backends if b in NS]:
        ops = getattr(torch.ops, NS[backend])
        out = torch.empty(B, N, device=device)

        def direct(i=0, ops=ops, out=out):
            tr = ops.segment_redistribute(s.reshape(-1), ids.reshape(-1), r, 0.6, 1.0, False, False, 0.0)
            ops.token_advantages_out(o, tr.reshape(B, N), mask, G, 0.1, 0, 1e-6, out)
            return out

        api = public(backend)
        kinds = [("op", direct)]
        if cuda:
            kinds += [("graph", direct), ("api-graph", lambda i=0, api=api: api(s, ids, r, o, mask))]
        for kind, fn in kinds:
            try:
                call = fn
                if kind.endswith("graph"):
                    fn()  # warm-up outside the capture (Triton compiles here)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fn()
                    call = lambda i=0, graph=graph: graph.replay()  # noqa: E731
                call(0)
                q = bench.time_fns({kind: call}, device, rep_ms=rep, warmup_ms=warm, **timer_kw(dry))[kind]
                host = bench.host_quantiles(call, device, calls=2 if dry else 30)[0]
            except Exception as e:  # noqa: BLE001 - one failing path must not lose the others
                print(f"segment stage {backend}:{kind} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                      flush=True)
                continue
            rows.append(bench.BenchmarkRow.measured(
                env, kernel="segment_stage", provider=f"{backend}:{kind}", mode="forward", metric="time", unit="ms",
                x=N, y50=q[0], y20=q[1], y80=q[2], x_name="N", layout="padded", dtype="fp32", shape=case.shape,
                host_ms=host))
    return rows


def target_lines(rows: list, stage_shape: str = "64x2048,16steps,G8") -> list:
    """The GPU targets, from the measured rows: attribution >= 97% of copy bandwidth and >= 1.0x
    torch.compile; the segment stage at ``stage_shape`` <= 15 us (device time; host time beside it);
    p2t_advantages <= 1.05x the attribution alone (same backend, shape and dtype)."""
    by: dict = {}
    for r in rows:
        by.setdefault((r.kernel, r.layout, r.dtype, r.shape), {})[r.provider] = r
    lines = []
    for (kernel, layout, dtype, shape), g in by.items():
        comp = g.get("torch_compile")
        for p, r in g.items():
            if p in ("reference", "torch") or p.startswith("torch_compile"):
                continue
            host = f", host {r.host_ms * 1e3:.1f} us/call" if r.host_ms == r.host_ms else ""
            vc = comp.y50 / r.y50 if comp else float("nan")
            if kernel == "token_attribution" and layout == "dense":
                ok = r.pct_copy_bw >= 97 and (comp is None or vc >= 1.0)
                lines.append(f"attribution {shape} {dtype} {p}: {r.pct_copy_bw:.1f}% of copy bw (>=97)"
                             + (f", {vc:.2f}x torch.compile (>=1.0)" if comp else "")
                             + f"{host} -> {'met' if ok else 'NOT met'}")
            elif kernel == "segment_stage" and shape == stage_shape:
                us = r.y50 * 1e3
                lines.append(f"segment stage {shape} {p}: {us:.1f} us device (<=15){host}"
                             + (f", {vc:.2f}x torch.compile" if comp else "")
                             + f" -> {'met' if us <= 15 else 'NOT met'}")
            elif kernel == "p2t_advantages" and layout == "dense":
                att = by.get(("token_attribution", "dense", dtype, shape.split(",")[0]), {}).get(p)
                if att:
                    ratio = r.y50 / att.y50
                    lines.append(f"p2t_advantages {shape} {dtype} {p}: {ratio:.3f}x the attribution alone (<=1.05)"
                                 f"{host} -> {'met' if ratio <= 1.05 else 'NOT met'}")
    return lines


def faster_backend_lines(rows: list) -> list:
    by: dict = {}
    for r in rows:
        if r.provider in ("cuda", "triton"):
            by.setdefault(r.kernel, []).append(r)
    lines = []
    for kernel, rs in by.items():
        cases: dict = {}
        for r in rs:
            cases.setdefault((r.layout, r.dtype, r.shape), {})[r.provider] = r.y50
        lines.append(f"faster fused backend, {kernel}: " + ", ".join(
            f"{min(g, key=g.get)}@{layout}/{dtype}/{shape}" + (f" ({max(g.values()) / min(g.values()):.2f}x)"
                                                               if len(g) > 1 else "")
            for (layout, dtype, shape), g in cases.items()))
    return lines


def timings(argv) -> int:
    ap = argparse.ArgumentParser(description="timings of the GPU check")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreted, compile traced only")
    ap.add_argument("--budget-s", type=float, default=200.0, help="start no new case after this many seconds")
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    a = ap.parse_args(argv)
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        os.environ.setdefault("P2T_BENCH_COMPILE_BACKEND", "eager")
    sys.path.insert(0, ROOT)
    import torch

    import p2t
    from p2t import bench

    t_start = time.time()
    device = "cpu" if a.dry_run else "cuda"
    if not a.dry_run and not torch.cuda.is_available():
        print("timings: no GPU visible (use --dry-run on a machine without one)", flush=True)
        return 2
    cuda = device == "cuda"
    os.makedirs(a.out, exist_ok=True)
    env = bench.environment(device)
    csv_path = os.path.join(a.out, f"gpu_check_{'dry-run_' if a.dry_run else ''}{bench.device_tag(device)}.csv")
    rep = a.rep_ms or (60.0 if cuda else 1.0)
    warm = 15.0 if cuda else 0.0
    backends = [b for b in p2t.available_backends(device) if b in FUSED]
    print(f"device {env['gpu']}; torch {env['torch']}, triton {env['triton']}; p2t {env['version']} ({env['commit']}); "
          f"fused backends: {backends or 'none'}; unavailable: {p2t.ops._backends.unavailable_backends()}", flush=True)
    copy_gbps, crow = bench.copy_row(device, env, None if cuda else 8.0, rep_ms=rep, warmup_ms=warm)
    print(f"copy bandwidth {copy_gbps:.1f} GB/s", flush=True)
    writer = bench.CsvWriter(csv_path)
    writer.write([crow])
    rows, shown = [crow], set()
    cases = plan(bench, device, a.dry_run)
    stage_shape = next(c.shape for c, _ in cases if c.kernel == "segment_stage")

    def report(new):
        writer.write(new)
        rows.extend(new)
        for line in bench.format_table(new, header=False):
            print(line, flush=True)
        for line in target_lines(rows, stage_shape):
            if line not in shown:
                shown.add(line)
                print("TARGET " + line, flush=True)

    for case, with_compile in cases:
        label = f"{case.kernel} {case.layout} {case.dtype} {case.shape}"
        if time.time() - t_start > a.budget_s:
            print(f"time budget of {a.budget_s:.0f} s spent: skipping {label}", flush=True)
            continue
        provs = backends + (["torch_compile"] if with_compile and not a.no_compile else [])
        if not with_compile and not backends:
            provs = ["reference"]
        t0 = time.time()
        try:
            new = bench.run_case(case, ("forward",), provs, device, env, copy_gbps, rep_ms=rep, warmup_ms=warm,
                                 memory=cuda, host=True, host_calls=2 if a.dry_run else 30,
                                 timer_kw=timer_kw(a.dry_run), log=lambda s: print(s, flush=True))
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
            print(f"{label}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        print(f"{label} ({time.time() - t0:.0f} s)", flush=True)
        report(new)
        if case.kernel == "segment_stage" and case.shape == stage_shape:
            try:
                report(stage_direct(bench, device, env, backends, rep, warm, a.dry_run))
            except Exception as e:  # noqa: BLE001
                print(f"segment stage, direct calls: FAILED {type(e).__name__}: {e}", flush=True)
    print(f"\nCSV: {csv_path} ({time.time() - t_start:.0f} s)\n")
    print("\n".join(bench.format_table(rows)))
    print()
    print("\n".join(["TARGET " + s for s in target_lines(rows, stage_shape)] + faster_backend_lines(rows)))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("preflight", "timings"):
        print(__doc__)
        return 2
    return preflight() if argv[0] == "preflight" else timings(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
