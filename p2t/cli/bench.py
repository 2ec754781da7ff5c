"""`p2t bench`: a short benchmark of every backend usable here vs the plain-PyTorch reference (eager)
vs torch.compile (static and dynamic shapes), on the current device; a table, and a CSV with ``--out``.

The same code (:mod:`p2t.bench`) runs the full suites in ``benchmarks/``.
"""
from __future__ import annotations

from .checks import ArgumentError, check_output


def configure(parser):
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible)")
    parser.add_argument("--suite", default="quick", choices=("tiny", "quick", "full"),
                        help="quick (default, ~1-2 min on a 2-core CPU): headline shapes, forward")
    parser.add_argument("--ops", default=None, help="comma-separated op names (default: all)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--modes", default="forward,backward,full", help="modes the suite may use")
    parser.add_argument("--providers", default=None,
                        help="comma-separated (default: every available backend, torch_compile, torch_compile_dynamic)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    parser.add_argument("--rep-ms", type=float, default=None, help="timed milliseconds per provider and case")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--host-time", action="store_true",
                        help="also measure the host time per call (on a GPU: the Python layer and launches)")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="CPU timer: wall time, or this process's CPU time (use with --threads 1 on a shared "
                             "machine)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", default=None, help="write the rows as CSV here")


def run(args) -> int:
    check_output("--out", args.out)
    import torch

    from p2t import bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = tuple(args.ops.split(",")) if args.ops else bench.OPS
    unknown = set(ops) - set(bench.OPS)
    if unknown:
        raise ArgumentError(f"--ops: unknown op(s) {', '.join(sorted(unknown))}; choose from {', '.join(bench.OPS)}")
    cases = bench.suite(args.suite, device, ops=ops, dtypes=tuple(args.dtypes.split(",")),
                        modes=tuple(args.modes.split(",")))
    if args.providers:
        provs = args.providers.split(",")
    else:
        provs = bench.providers(device, () if args.no_compile else bench.COMPILE_PROVIDERS)
    if device == "cpu" and args.clock == "wall" and torch.get_num_threads() > 1:
        import os
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:
            print(f"note: load average {load:.1f} on {cores} CPUs; with several threads every parallel region waits "
                  f"for all of them to be scheduled, which distorts the ratios: consider --threads 1 --clock cpu")
    rep = args.rep_ms if args.rep_ms is not None else (100.0 if device.startswith("cuda") else 300.0)
    rows = bench.run_suite(cases, device, provs, rep_ms=rep, memory=not args.no_memory, log=print,
                           csv_path=args.out, clock=args.clock, host=args.host_time)
    print()
    for line in bench.format_table(rows):
        print(line)
    targets = bench.target_lines(rows)
    if targets:
        print()
        for line in targets:
            print(line)
    elif "cpu" not in provs and device == "cpu":
        print("\n(the C++ backend is not built: `python setup.py build_ext --inplace`; only the baselines ran)")
    if args.out:
        print(f"\nwrote {args.out}")
    return 0
