"""Packed vs sorted-padded micro-batches in the attribution engine, on a mixed-length batch.

The product (:class:`p2t.P2TScorer`, ``score_ids`` + ``token_rewards`` as in ``e2e_reward_step.py``,
same random-init Qwen2 step classifier, same batch builder) run twice per batch: ``padded`` (the
default: inputs sorted by length and grouped under the token budget, each padded to its group's
longest) and ``packed`` (``packing=True``: inputs laid end to end in rows, positions restarting per
input). Per row: median / p20 / p80 time, tokens/s (real tokens, not padding), peak memory (CUDA:
``max_memory_allocated``; CPU: the allocations the profiler records over one step), the tokens the
model was run on (padding included) and the results' largest difference (they must agree).

    python benchmarks/attribution_packed.py --tiny --threads 1      # CPU, ~1 min
    python benchmarks/attribution_packed.py --device cuda           # 1.5B shape, mixed 256-4096, bf16
    python benchmarks/attribution_packed.py --device cuda --attn flash_attention_2   # varlen packed rows
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import p2t  # noqa: F401
except ImportError:  # source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(HERE))
from p2t import bench
from p2t.attribution import P2TScorer
from p2t.attribution import packing


def _e2e():
    spec = importlib.util.spec_from_file_location("e2e_reward_step", os.path.join(HERE, "e2e_reward_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# CPU shape: large enough that the PRM, not the host, dominates; small enough for a 2-core machine
CPU_SHAPE = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192, rope_theta=1e6,
                 rms_norm_eps=1e-6)


def padded_tokens(scorer, rows, method="taylor") -> int:
    """Tokens the model runs on (rows x padded length, summed over the micro-batches)."""
    if scorer.packing:
        cap = packing.row_length(scorer.model, rows, scorer.pack_length, scorer.micro_batch_tokens)
        total = 0
        for g in packing.plan(scorer.model, rows, scorer.pack_length, scorer.micro_batch_tokens):
            bins = packing.split([rows[i].length for i in g], cap)
            total += len(bins) * max(sum(rows[g[i]].length for i in b) for b in bins)
        return total
    return sum(len(g) * max(rows[i].length for i in g) for g in scorer.engine.groups(rows, lambda r: r.length))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="CPU shape, 24 responses of 64-1024 tokens")
    ap.add_argument("--responses", type=int, default=None)
    ap.add_argument("--min-len", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--mb-tokens", type=int, default=None, help="token budget per micro-batch")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    e2e = _e2e()
    device, cuda = args.device, args.device.startswith("cuda")
    shape = CPU_SHAPE if (args.tiny or not cuda) else e2e.QWEN2_1P5B
    dtype = torch.bfloat16 if cuda else torch.float32
    n = args.responses or (24 if not cuda else 64)
    lo, hi = args.min_len or (64 if not cuda else 256), args.max_len or (1024 if not cuda else 4096)
    budget = args.mb_tokens or (2048 if not cuda else 16384)
    r = random.Random(2)
    lens = [r.randint(lo, hi) for _ in range(n)]
    batch = e2e.Batch(f"mixed{n}", lens, shape["vocab_size"], seed=2, prompt=16 if not cuda else e2e.PROMPT,
                      steps=8 if not cuda else e2e.STEPS, group=1)  # a prompt per response (as recorded)
    from transformers import Qwen2Config, Qwen2ForTokenClassification
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForTokenClassification(Qwen2Config(num_labels=2, attn_implementation=args.attn, **shape)).to(dtype)
    model.eval()
    tok = e2e.id_tokenizer(shape["vocab_size"])
    prompts, ids, N = e2e.scorer_inputs(batch, tok)
    env = bench.environment(device)
    print(f"device {env['gpu']}; torch {env['torch']}; threads {torch.get_num_threads()}; Qwen2 hidden "
          f"{shape['hidden_size']} x {shape['num_hidden_layers']} layers, {str(dtype)[6:]}, {args.attn}; "
          f"{n} responses of {lo}-{hi} tokens ({batch.tokens} tokens), budget {budget} tokens/micro-batch")
    results, jobs = {}, []
    for name, packed in (("padded", False), ("packed", True)):
        s = P2TScorer(model, tok, "step_classifier", step_separator="\n", step_split="\n",
                      template="{prompt}\n{response}", add_special_tokens=False, micro_batch_tokens=budget,
                      max_length=1 << 20, packing=packed)
        rows = s.layout.rows(prompts, None, ids, hint=False, skip_empty=True)
        results[name] = dict(run=padded_tokens(s, rows), out=s.score_ids(prompts, ids, length=N, device=device))

        def step(s=s):
            sb = s.score_ids(prompts, ids, length=N, device=device)
            return sb.token_rewards(mode="p2t")
        jobs.append((name, step))
    diff = (results["packed"]["out"].scores - results["padded"]["out"].scores).abs().max().item()
    scale = results["padded"]["out"].scores.abs().max().item()
    meas = e2e.measure(jobs, device, args.reps)
    print(f"\n{'engine':<8} {'ms':>9} {'p20':>9} {'p80':>9} {'tokens/s':>10} {'peak MiB':>9} {'run on':>8} "
          f"{'x padded tok/s':>15} {'peak/padded':>12}")
    base = meas["padded"]
    for name, (q, peak) in meas.items():
        tps = batch.tokens / q[0]
        rel = peak / base[1] if base[1] else float("nan")
        print(f"{name:<8} {q[0] * 1e3:9.1f} {q[1] * 1e3:9.1f} {q[2] * 1e3:9.1f} {tps:10.0f} {peak * 1024:9.1f} "
              f"{results[name]['run']:8d} {base[0][0] / q[0]:15.2f} {rel:12.2f}")
    print(f"max |packed - padded| = {diff:.2e} (largest |score| {scale:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
