"""Bandwidth against size per provider, one PNG per (kernel, mode, dtype), from ``bench_ops.py`` CSVs.

    python benchmarks/plot.py benchmarks/results/ops_cpu-2core.csv [--out-dir benchmarks/results/plots]

x: megabytes a pass moves (log scale), y: GB/s at the median time; the dashed line is the device's copy
bandwidth measured in the same run. Dense and padded layouts share a panel (markers differ); the
p20-p80 spread is drawn as error bars.
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

MARKERS = {"dense": "o", "padded": "s", "packed": "^"}


def plot(rows: list, out_dir: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    copy = [r for r in rows if r.kernel == "copy"]
    copy_gbps = copy[0].gbps if copy else None  # the first CSV's, when several are drawn together
    device = rows[0].gpu if rows else "?"
    groups: dict = {}
    for r in rows:
        if r.kernel != "copy":
            groups.setdefault((r.kernel, r.mode, r.dtype), []).append(r)
    written = []
    for (kernel, mode, dtype), rs in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colors = {p: f"C{i}" for i, p in enumerate(sorted({r.provider for r in rows if r.kernel != "copy"}))}
        for prov in sorted({r.provider for r in rs}):
            for layout in sorted({r.layout for r in rs}):
                pts = sorted((r.mbytes, r) for r in rs if r.provider == prov and r.layout == layout)
                if not pts:
                    continue
                xs = [m for m, _ in pts]
                ys = [r.gbps for _, r in pts]
                # time p20 is the fast end: the highest bandwidth
                lo = [y - r.mbytes * 2**20 / (r.y80 * 1e-3) / 1e9 for y, (_, r) in zip(ys, pts)]
                hi = [r.mbytes * 2**20 / (r.y20 * 1e-3) / 1e9 - y for y, (_, r) in zip(ys, pts)]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker=MARKERS.get(layout, "x"), capsize=2, color=colors[prov],
                            ls={"dense": "-", "padded": "--", "packed": ":"}.get(layout, "-"), label=f"{prov} ({layout})")
        if copy_gbps:
            ax.axhline(copy_gbps, ls="--", color="gray", label=f"copy {copy_gbps:.0f} GB/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("MB moved per pass")
        ax.set_ylabel("GB/s (median)")
        ax.set_title(f"{kernel} {mode} {dtype} on {device}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        path = os.path.join(out_dir, f"{kernel}_{mode}_{dtype}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--out-dir", default=None,
                    help="default: <csv dir>/plots_<csv name> per CSV; when given, the CSVs' rows are drawn together")
    args = ap.parse_args(argv)
    if args.out_dir:
        rows = [r for path in args.csv for r in bench.read_csv(path)]
        for p in plot(rows, args.out_dir):
            print(p)
        return 0
    for path in args.csv:
        rows = bench.read_csv(path)
        out = args.out_dir or os.path.join(os.path.dirname(path) or ".",
                                           "plots_" + os.path.splitext(os.path.basename(path))[0])
        for p in plot(rows, out):
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
