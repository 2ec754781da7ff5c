"""`p2t train`: GRPO with outcome / process / P2T advantages; by default the embedded toy lab in P2T mode.

    p2t train                                   # the lab, P2T mode, default settings
    p2t train --mode process --num-updates 100
    p2t train --config my.yaml --learning-rate 1e-5
    p2t train --policy Qwen/Qwen2.5-0.5B-Instruct --prm Qwen/Qwen2.5-Math-PRM-7B \\
              --train-data prompts.jsonl --reward mypkg.rewards:exact_match
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .checks import check_file, check_model, loading


def configure(parser: argparse.ArgumentParser):
    from p2t.grpo.config import add_arguments
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__
    add_arguments(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def check_paths(config) -> None:
    """The paths and hub ids a resolved config names (from flags or its file): one line naming a bad one."""
    check_model("--policy", config.policy)
    check_model("--prm", config.prm)
    check_file("--train-data", config.train_data)
    check_file("--eval-data", config.eval_data)


def run(args) -> int:
    from p2t.grpo.config import from_args
    check_file("--config", getattr(args, "config", None))
    try:
        config = from_args(args)
    except (ValueError, TypeError) as e:
        print(f"p2t train: {e}", file=sys.stderr)
        return 2
    check_paths(config)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    from p2t.grpo import GRPOTrainer
    from p2t.grpo.setup import resolve
    t0 = time.time()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        with loading(policy=config.policy, prm=config.prm):
            setup = resolve(config, log=log)
    except ValueError as e:            # what the run needs and the config does not give (a PRM, data, a reward)
        print(f"p2t train: {e}", file=sys.stderr)
        return 2
    trainer = GRPOTrainer(config, setup, log=log)
    t_setup = time.time() - t0
    records = trainer.train()
    trainer.save_pretrained(os.path.join(config.output_dir, "policy"))
    total = time.time() - t0
    evals = [r for r in records if "eval_accuracy" in r]
    summary = {"mode": config.mode, "updates": trainer.update, "setup_s": round(t_setup, 1),
               "total_s": round(total, 1), "output_dir": config.output_dir}
    if evals:
        start, final = evals[0]["eval_accuracy"], evals[-1]["eval_accuracy"]
        best = max(r["eval_accuracy"] for r in evals)
        summary.update(eval_accuracy_start=start, eval_accuracy_final=final, eval_accuracy_gain=round(final - start, 4),
                       eval_accuracy_best=best)
        n = len(trainer.eval_rows) * config.eval_samples_per_prompt
        log(f"held-out sampled accuracy ({n} samples): {start:.3f} -> {final:.3f} after {trainer.update} updates "
            f"(gain {final - start:+.3f}, best {best:.3f}) in {total:.0f}s")
    with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return 0
