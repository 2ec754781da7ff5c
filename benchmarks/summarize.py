"""Markdown tables (for NOTES.md / README) from ``bench_ops.py`` CSVs: per case and mode, every
provider's median time and each fused backend's GB/s, % of copy bandwidth and speed-ups.

    python benchmarks/summarize.py benchmarks/results/ops_cpu-2core.csv [--kernel token_attribution]
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    from p2t import bench
except ImportError:
    sys.path.insert(0, os.path.dirname(HERE))
    from p2t import bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--kernel", default=None)
    ap.add_argument("--mode", default=None)
    ap.add_argument("--fused", default=None, help="comma-separated fused providers to show (default: all)")
    args = ap.parse_args(argv)
    for path in args.csv:
        rows = [r for r in bench.read_csv(path) if r.kernel == "copy" or (
            (args.kernel is None or r.kernel == args.kernel) and (args.mode is None or r.mode == args.mode))]
        print(f"### {os.path.basename(path)}\n")
        for line in bench.markdown_summary(rows, args.fused.split(",") if args.fused else None):
            print(line)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
