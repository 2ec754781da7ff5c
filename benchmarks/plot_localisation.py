"""Plot the lab's credit-localisation results per step length: the within-step AUROC of −I for the wrong
tokens, per attribution method and null, one group of bars per method, one panel per step length.

    python benchmarks/plot_localisation.py [--out benchmarks/results/lab_localisation.png]

Reads the JSON files `p2t localise --output` wrote (``benchmarks/results/lab_localisation.json`` for one addition
a line, ``lab_localisation_ops2.json`` for two); a (method, null) pair a file lacks is left blank.
"""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
FILES = (("one addition a line", "lab_localisation.json"), ("two additions a line", "lab_localisation_ops2.json"))


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    return {(r["method"], r["null"]): r["auroc_step"] for r in res["rows"]}


def plot(panels, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for _, d in panels for m, _ in d))
    nulls = list(dict.fromkeys(n for _, d in panels for _, n in d))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), sharey=True, squeeze=False)
    width = 0.8 / max(len(nulls), 1)
    for ax, (title, d) in zip(axes[0], panels):
        for j, n in enumerate(nulls):
            xs = [i + (j - (len(nulls) - 1) / 2) * width for i in range(len(methods))]
            ys = [d.get((m, n), float("nan")) for m in methods]
            ax.bar(xs, ys, width, label=f"null {n}")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([m.replace("integrated_gradients", "IG") for m in methods], rotation=20, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(title)
    axes[0][0].set_ylabel("AUROC of −I for wrong tokens (within step)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--out", default=os.path.join(RESULTS, "lab_localisation.png"))
    args = ap.parse_args(argv)
    panels = [(title, load(os.path.join(args.results, name))) for title, name in FILES
              if os.path.exists(os.path.join(args.results, name))]
    if not panels:
        raise SystemExit(f"no localisation results in {args.results}")
    plot(panels, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
