"""Where one GRPO update on the toy lab goes: sampling, PRM scoring + advantages, the policy's forward and
backward, and one evaluation; the decode loop against HF ``generate`` in the same process.

    python benchmarks/grpo_update.py --mode p2t --repeats 3 --threads 1

Each repeat runs one update and one evaluation per sampler, the samplers alternating, so that both see
the same load; the median per part is printed as JSON lines (seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="p2t", help="outcome | process | p2t")
    ap.add_argument("--samplers", default="fast,hf")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny lab built in seconds (a smoke run, not a measurement)")
    args = ap.parse_args(argv)
    import torch
    from p2t.grpo import GRPOConfig, GRPOTrainer
    from p2t.grpo import advantages as adv_mod
    samplers = args.samplers.split(",")
    tmp = tempfile.mkdtemp()
    extra = {}
    if args.tiny:
        from p2t.grpo import LabConfig
        extra = dict(lab=LabConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, sft_steps=2,
                                   sft_batch_size=16, prm_steps=2, prm_batch_size=16, prm_samples=16),
                     lab_cache=os.path.join(tmp, "lab"), prompts_per_update=2, group_size=4, max_new_tokens=12,
                     eval_prompts=4, eval_samples_per_prompt=2)
    trainer = GRPOTrainer(GRPOConfig(mode=args.mode, num_updates=10 ** 6, progress=False, threads=args.threads,
                                     output_dir=os.path.join(tmp, "run"), **extra))
    parts: dict = {}

    def timed(obj, name, key):
        f = getattr(obj, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = f(*a, **k)
            parts[key] = parts.get(key, 0.0) + time.perf_counter() - t0
            return out
        setattr(obj, name, wrapper)

    timed(trainer, "_generate", "sampling")
    timed(adv_mod, "rollout_advantages", "scoring")
    timed(trainer, "optimize", "policy")
    for s in samplers:  # warm-up
        trainer.config.sampler = s
        trainer.step()
    res = {s: {} for s in samplers}
    for _ in range(args.repeats):
        for s in samplers:
            trainer.config.sampler = s
            parts.clear()
            t0 = time.perf_counter()
            trainer.step()
            row = dict(parts, update=time.perf_counter() - t0)
            if not args.no_eval:
                t0 = time.perf_counter()
                trainer.evaluate()
                row["evaluation"] = time.perf_counter() - t0
            for k, v in row.items():
                res[s].setdefault(k, []).append(v)
    for s, r in res.items():
        print(json.dumps({"mode": args.mode, "sampler": s, "threads": torch.get_num_threads(),
                          "load": os.getloadavg()[0], **{k: round(statistics.median(v), 4) for k, v in r.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
