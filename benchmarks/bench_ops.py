"""Every P2T op, every backend usable here vs the plain-PyTorch reference (eager) vs torch.compile
(static and dynamic shapes): forward / backward / full, N and D sweeps, padded, dense and packed
layouts, fp32 and bf16. One CSV (schema: ``p2t.bench.COLUMNS``) under ``benchmarks/results/``.

    python benchmarks/bench_ops.py                      # full suite on the default device
    python benchmarks/bench_ops.py --suite quick --ops token_attribution --dtypes fp32
    python benchmarks/bench_ops.py --device cuda --out $OUT/ops.csv

The per-op scripts (``bench_token_attribution.py`` ...) call this with ``--ops``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    from p2t import bench
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(HERE))
    from p2t import bench


def main(argv=None, ops=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--suite", default="full", choices=("tiny", "quick", "full"))
    ap.add_argument("--ops", default=",".join(ops or bench.OPS))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--modes", default="forward,backward,full")
    ap.add_argument("--layouts", default="dense,padded,packed")
    ap.add_argument("--providers", default=None, help="default: every usable backend + torch.compile (both)")
    ap.add_argument("--interpreted-triton", action="store_true",
                    help="include the Triton backend on CPU (TRITON_INTERPRET=1: a correctness path, not a speed one)")
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="CPU timer: wall time, or this process's CPU time (use with --threads 1 on a shared machine)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/ops_<device>.csv)")
    args = ap.parse_args(argv)

    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = bench.suite(args.suite, device, ops=tuple(args.ops.split(",")), dtypes=tuple(args.dtypes.split(",")),
                        modes=tuple(args.modes.split(",")), layouts=tuple(args.layouts.split(",")))
    provs = args.providers.split(",") if args.providers else bench.providers(
        device, interpreted_triton=args.interpreted_triton)
    name = "ops" if args.ops == ",".join(bench.OPS) else args.ops.replace(",", "+")
    out = args.out or os.path.join(HERE, "results", f"{name}_{bench.device_tag(device)}.csv")
    rep = args.rep_ms if args.rep_ms is not None else (100.0 if device.startswith("cuda") else 300.0)
    rows = bench.run_suite(cases, device, provs, rep_ms=rep, memory=not args.no_memory, csv_path=out, clock=args.clock)
    print()
    for line in bench.format_table(rows):
        print(line)
    for line in bench.target_lines(rows):
        print(line)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
