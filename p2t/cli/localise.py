"""`p2t localise`: does each attribution method point at the wrong tokens? Measured on the toy lab.

    p2t localise                                   # 512 samples, every method x null
    p2t localise --samples 1000 --methods taylor,exact --nulls pad
    p2t localise --ops-per-step 2                  # the lab with two additions per step
    p2t localise --output benchmarks/results/lab_localisation

Samples the lab's SFT policy on fresh problems, scores every response with the lab's PRM through
:class:`p2t.P2TScorer`, and reports per (method, null) the AUROC of ``-I`` for "token is wrong" within
wrong steps and the normalised entropy of the paper's within-step softmax (see
:mod:`p2t.grpo.lab.localisation`). Writes ``<output>.md`` and ``<output>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .checks import check_model, loading


def configure(parser: argparse.ArgumentParser):
    from p2t.grpo.lab.localisation import DEFAULT_METHODS
    from p2t.options import NULLS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__
    parser.add_argument("--samples", type=int, default=512, help="policy samples (default 512)")
    parser.add_argument("--seed", type=int, default=7, help="problems and sampling seed")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated, from: " + ", ".join(DEFAULT_METHODS) + " (integrated_gradients:K for "
                             "any K)")
    parser.add_argument("--nulls", default=",".join(NULLS), help="comma-separated, from: " + ", ".join(NULLS))
    parser.add_argument("--policy", help="policy checkpoint (default: the lab's SFT policy)")
    parser.add_argument("--prm", help="PRM checkpoint (default: the lab's PRM)")
    parser.add_argument("--ops-per-step", type=int, default=None,
                        help="the lab's step length (additions per line) whose checkpoints are used (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--output", default="runs/localise", help="writes OUTPUT.md and OUTPUT.json")


def run(args) -> int:
    from p2t.grpo.lab.localisation import measure, table
    check_model("--policy", args.policy)
    check_model("--prm", args.prm)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    nulls = [n.strip() for n in args.nulls.split(",") if n.strip()]
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    policy, prm = args.policy, args.prm
    try:
        if policy is None or prm is None:
            from p2t.grpo.lab import LabConfig, ensure_lab
            lab = LabConfig() if args.ops_per_step is None else LabConfig(ops_per_step=args.ops_per_step)
            paths = ensure_lab(lab, log=log)
            policy, prm = policy or paths["policy"], prm or paths["prm"]
        t0 = time.time()
        with loading(policy=args.policy, prm=args.prm):
            result = measure(policy, prm, samples=args.samples, seed=args.seed, methods=methods, nulls=nulls, log=log)
    except (ValueError, TypeError) as e:
        print(f"p2t localise: {e}", file=sys.stderr)
        return 2
    result["wall_s"] = round(time.time() - t0, 1)
    result["policy"], result["prm"] = policy, prm
    md = table(result)
    parent = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(parent, exist_ok=True)
    with open(args.output + ".md", "w") as f:
        f.write(md)
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(md)
    return 0
