"""The timing half of benchmarks/gpu_check.sh: every backend vs the eager reference vs torch.compile
at the shapes of PERF.md (plus an odd D and packed variable lengths), the copy bandwidth measured in
the same run, one CSV, and the issue's targets checked last.

    python benchmarks/gpu_check.py --out DIR [--device cuda] [--tiny] [--budget-s 300]

``--tiny`` runs small shapes (a smoke test of this script on CPU, with the backends usable there).
Cases run in order of importance and stop when the time budget is spent, so a slow machine still
leaves the CSV of what was measured.

Predictions before the first GPU run (from ../shared/PERF.md, H100 80GB HBM3, copy 3.0 TB/s):
attribution 64x2048x1536 bf16 ~0.27-0.28 ms (>=97% of copy bandwidth) for both fused backends, 8x8192x3584
~0.32 ms; p2t_advantages dense = attribution + one small launch (+5-10 us, <=1.05x); the segment +
advantage stage at 64x2048 a few us of device time in a CUDA graph (3 small launches), while through the
public API the Python layer (argument checks, dispatch) dominates.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import p2t  # noqa: E402
from p2t import bench  # noqa: E402


def cases(device: str, tiny: bool) -> list:
    """(case, compile?) in order of importance."""
    kw = dict(device=device)
    if tiny:
        return [
            (bench.attribution_case(2, 37, 300, "bf16", "dense", **kw), True),
            (bench.attribution_case(2, 37, 301, "bf16", "dense", **kw), False),
            (bench.attribution_case(2, 37, 300, "bf16", "packed", **kw), False),
            (bench.segment_case(4, 64, 4, "fp32", "padded", **kw), True),
            (bench.segment_case(4, 64, 4, "fp32", "packed", **kw), False),
            (bench.pipeline_case(8, 37, 300, 4, "bf16", group_size=4, layout="dense", **kw), True),
            (bench.advantages_case(8, 64, group_size=4, **kw), False),
        ]
    return [
        (bench.attribution_case(64, 2048, 1536, "bf16", "dense", **kw), True),
        (bench.pipeline_case(64, 2048, 1536, 16, "bf16", layout="dense", **kw), True),
        (bench.segment_case(64, 2048, 16, "fp32", "padded", **kw), True),
        (bench.attribution_case(8, 8192, 3584, "bf16", "dense", **kw), True),
        (bench.segment_case(256, 8192, 32, "fp32", "padded", **kw), True),
        (bench.attribution_case(64, 2048, 1531, "bf16", "dense", x_name="D", **kw), True),  # odd D
        (bench.attribution_case(64, 2048, 1536, "bf16", "packed", **kw), False),  # variable lengths, packed
        (bench.segment_case(64, 2048, 16, "fp32", "packed", **kw), False),
        (bench.pipeline_case(64, 2048, 1536, 16, "bf16", layout="padded", **kw), False),
        (bench.advantages_case(64, 2048, **kw), False),
    ]


def op_level(device: str, env: dict, copy_gbps: float, rep: float, warm: float) -> list:
    """The segment + advantage stage at 64x2048 (16 steps per row) without the public API's Python
    layer: each backend's registered op called directly, and the same call replayed from a CUDA graph
    (device time plus one graph launch). Rows with provider ``<backend>:op`` / ``<backend>:graph``."""
    if not device.startswith("cuda"):
        return []
    from triton.testing import do_bench

    case = bench.segment_case(64, 2048, 16, "fp32", "padded", device=device)
    s, ids, r = case.make(torch.Generator().manual_seed(0))
    B, N = s.shape
    o = torch.rand(B, device=device)
    ns = {"cuda": "p2t", "triton": "p2t_triton"}
    rows = []
    for backend in [b for b in ("cuda", "triton") if b in p2t.available_backends("cuda")]:
        ops = getattr(torch.ops, ns[backend])
        out = torch.empty(B, N, device=device)

        def stage(ops=ops, out=out):
            tr = ops.segment_redistribute(s.reshape(-1), ids.reshape(-1), r, 0.6, 1.0, False, False)
            ops.token_advantages_out(o, tr.reshape(B, N), None, 8, 0.1, 0, 1e-6, out)

        for kind in ("op", "graph"):
            try:
                fn = stage
                if kind == "graph":
                    stage()
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        stage()
                    fn = graph.replay
                fn()
                torch.cuda.synchronize()
                q = do_bench(fn, warmup=warm, rep=rep, quantiles=[0.5, 0.2, 0.8])
            except Exception as e:  # noqa: BLE001
                print(f"segment stage {backend}:{kind} failed: {type(e).__name__}: {e}", flush=True)
                continue
            rows.append(dict(kernel="segment+advantages", provider=f"{backend}:{kind}", mode="forward", metric="time",
                             unit="ms", x=N, y50=q[0], y20=q[1], y80=q[2], gpu=env["gpu"], version=env["version"],
                             x_name="N", layout="padded", dtype="fp32", shape="64x2048,16steps",
                             mbytes=float("nan"), gbps=float("nan"), pct_copy_bw=float("nan"),
                             peak_mem_mb=float("nan"), torch=env["torch"], triton=env["triton"], commit=env["commit"],
                             date=env["date"]))
            print(f"segment+advantages 64x2048,16steps {backend}:{kind}: {q[0] * 1e3:.1f} us", flush=True)
    return rows


def targets(rows: list) -> list:
    """The GPU issue's targets, from the measured rows."""
    by = {}
    for r in rows:
        by.setdefault((r["kernel"], r["layout"], r["dtype"], r["shape"]), {})[r["provider"]] = r
    lines = []
    fused = ("cuda", "triton")
    for (kernel, layout, dtype, shape), g in by.items():
        comp = g.get("torch_compile")
        for p in fused:
            if p not in g:
                continue
            r = g[p]
            if kernel == "token_attribution" and layout == "dense":
                vc = comp["y50"] / r["y50"] if comp else float("nan")
                ok = r["pct_copy_bw"] >= 97 and (comp is None or vc >= 1.0)
                lines.append(f"attribution {shape} {dtype} {p}: {r['pct_copy_bw']:.1f}% of copy bw (>=97), "
                             f"{vc:.2f}x torch.compile (>=1.0) -> {'met' if ok else 'NOT met'}")
            if kernel == "segment_redistribute" and layout == "padded" and shape.startswith("64x2048"):
                us = r["y50"] * 1e3
                lines.append(f"segment stage {shape} {p}: {us:.1f} us (<=15) -> {'met' if us <= 15 else 'NOT met'}")
            if kernel == "p2t_advantages" and layout == "dense":
                att = by.get(("token_attribution", "dense", dtype, shape.split(",")[0]), {}).get(p)
                if att:
                    ratio = r["y50"] / att["y50"]
                    lines.append(f"p2t_advantages {shape} {dtype} {p}: {ratio:.3f}x the attribution alone (<=1.05) "
                                 f"-> {'met' if ratio <= 1.05 else 'NOT met'}")
    for r in rows:
        if r["kernel"] == "segment+advantages":
            us = r["y50"] * 1e3
            lines.append(f"segment+advantages stage {r['shape']} {r['provider']}: {us:.1f} us (<=15) -> "
                         f"{'met' if us <= 15 else 'NOT met'}")
    # the faster fused backend per op, for the dispatch table
    best = {}
    for (kernel, layout, dtype, shape), g in by.items():
        cand = [(g[p]["y50"], p) for p in fused if p in g]
        if cand:
            best.setdefault(kernel, []).append(f"{min(cand)[1]}@{layout}/{dtype}/{shape}")
    for k, v in best.items():
        lines.append(f"faster fused backend, {k}: " + ", ".join(v))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new cases after this")
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    a = ap.parse_args(argv)
    t_start = time.time()
    os.makedirs(a.out, exist_ok=True)
    env = bench.environment(a.device)
    tag = env["gpu"].replace(" ", "_").replace("/", "_") if a.device.startswith("cuda") else "cpu"
    csv_path = os.path.join(a.out, f"gpu_check_{tag}.csv")
    cuda = a.device.startswith("cuda")
    rep = a.rep_ms or (60.0 if cuda else 50.0)
    warm = 15.0 if cuda else 10.0
    backends = [b for b in p2t.available_backends(a.device.split(":")[0])
                if not (b == "triton" and not cuda and os.environ.get("TRITON_INTERPRET") != "1")]
    print(f"device {env['gpu']}; torch {env['torch']}, triton {env['triton']}; backends {backends}; "
          f"unavailable: {p2t.ops._backends.unavailable_backends()}", flush=True)
    copy_gbps, crow = bench.copy_row(a.device, env, rep_ms=rep, warmup_ms=warm, **({} if cuda else {"mbytes": 8}))
    print(f"copy bandwidth {copy_gbps:.1f} GB/s", flush=True)
    writer = bench._CsvAppender(csv_path)
    writer.write([crow])
    rows = [crow]
    for case, with_compile in cases(a.device, a.tiny):
        if time.time() - t_start > a.budget_s:
            print(f"time budget of {a.budget_s:.0f} s spent: skipping {case.kernel} {case.layout} {case.shape}",
                  flush=True)
            continue
        provs = backends + (["torch_compile"] if with_compile and not a.no_compile else [])
        t0 = time.time()
        try:
            new = bench.run_case(case, ("forward",), provs, a.device, env, copy_gbps, rep_ms=rep, warmup_ms=warm,
                                 memory=cuda, log=lambda s: print(s, flush=True))
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
            print(f"{case.kernel} {case.layout} {case.shape}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        writer.write(new)
        rows += new
        print(f"{case.kernel} {case.layout} {case.dtype} {case.shape} ({time.time() - t0:.0f} s)", flush=True)
        for line in bench.format_table(new, header=False):
            print(line, flush=True)
    if time.time() - t_start < a.budget_s:
        try:
            new = op_level(a.device, env, copy_gbps, rep, warm)
            writer.write(new)
            rows += new
        except Exception as e:  # noqa: BLE001
            print(f"op-level segment timing failed: {type(e).__name__}: {e}", flush=True)
    print(f"\nCSV: {csv_path}\n")
    print("\n".join(bench.format_table(rows)))
    print()
    print("\n".join(targets(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
