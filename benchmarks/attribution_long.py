"""One long response through the attribution engine: peak memory and time vs length, and the fit.

An LM-judge PRM (random-init Llama causal LM, read at a step tag every ``--step`` tokens) scores one
response of each length in ``--lengths`` through :class:`p2t.P2TScorer` (``score_ids``), two ways:

* ``full``: the defaults -- LM-head logits over the whole vocabulary at every position, every
  layer's activations kept for the backward;
* ``bounded``: ``judge_logits="readout"`` (the LM head at the step tags only) and
  ``gradient_checkpointing=True`` (one layer's activations at a time, the layer inputs kept).

Per length: time of one scoring call (median of ``--reps``) and peak memory (CUDA:
``max_memory_allocated`` above the weights; CPU: the allocations the profiler records over one call).
Then the fits ``peak = a + b L`` (bytes per token) and ``time = c L + d L^2``, and, with ``--predict``,
the 7B shape at 16k tokens from the per-token costs measured on an H100 (``docs/performance.md``: NVIDIA H100 80GB HBM3, 2026-11-26).

    python benchmarks/attribution_long.py --threads 1                     # CPU, tiny model, 1k-16k
    python benchmarks/attribution_long.py --lengths 1024,2048 --configs bounded
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import p2t  # noqa: F401
except ImportError:  # source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(HERE))
from p2t import bench
from p2t.attribution import P2TScorer

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=8192, max_position_embeddings=1 << 16, tie_word_embeddings=False)
CONFIGS = {"full": dict(), "bounded": dict(judge_logits="readout", gradient_checkpointing=True)}

# Qwen2-7B shape and its measured costs on an H100 (bf16, sdpa; docs/performance.md, 2026-11-26):
# 1 x 4096 tokens, forward without grad 122 ms / 14.3 GiB, forward + input-embedding backward 269 ms / 31.1 GiB
Q7B = dict(hidden=3584, intermediate=18944, layers=28, kv_dim=512, vocab=152064, weights_gib=14.2)
PERF_7B = dict(tokens=4096, fwd_ms=122.0, step_ms=269.0, step_gib=31.1)


def id_tokenizer(vocab: int):
    """One character per id (ids >= 3); 0 <pad>, 1 <unk>, 2 the step tag ``\\n``: the e2e benchmark's."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("e2e_reward_step", os.path.join(HERE, "e2e_reward_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.id_tokenizer(vocab)


def response(L: int, step: int, vocab: int, seed: int = 0):
    """Prompt text and response ids: L tokens, a step tag (id 2) closing every ``step`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (L,), generator=g)
    ids[step - 1::step] = 2
    ids[-1] = 2
    return ids.tolist()


def predict_7b(L: int, bytes_per_token_ckpt: float = None) -> dict:
    """7B shape at L tokens, from PERF.md's 4096-token step: time scaled with the matmul FLOPs (linear)
    and the causal attention FLOPs (quadratic); memory = weights + per-token activations."""
    H, I, n, kv, V = Q7B["hidden"], Q7B["intermediate"], Q7B["layers"], Q7B["kv_dim"], Q7B["vocab"]
    lin = 2 * n * (2 * H * H + 2 * H * kv + 3 * H * I)        # matmul FLOPs per token, forward
    att = lambda l: 2 * n * l * H                              # causal attention FLOPs per token, forward
    l0 = PERF_7B["tokens"]
    a0 = att(l0) / (lin + att(l0))
    scale = lambda l: (1 - a0) * l / l0 + a0 * (l / l0) ** 2  # noqa: E731
    step = PERF_7B["step_ms"] * scale(L)
    ckpt = (PERF_7B["step_ms"] + PERF_7B["fwd_ms"]) * scale(L)  # checkpointing: one more forward
    act = (PERF_7B["step_gib"] - Q7B["weights_gib"]) * 2**30 / l0  # bytes per token kept for the backward
    # checkpointed: each layer's input (bf16) + one layer's activations + the embeddings and their gradient
    per_tok_ckpt = n * H * 2 + act / n + H * (2 + 4)
    logits = V * 2 * 2  # bf16 logits at every position and their gradient
    return dict(step_ms=step, ckpt_ms=ckpt, full_gib=Q7B["weights_gib"] + L * (act + logits) / 2**30,
                bounded_gib=Q7B["weights_gib"] + L * per_tok_ckpt / 2**30, act_kib=act / 1024,
                ckpt_kib=per_tok_ckpt / 1024, attn_share_4k=a0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--configs", default="full,bounded")
    ap.add_argument("--step", type=int, default=256, help="tokens per step")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--predict", action="store_true", help="also the 7B-shape prediction from PERF.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, cuda = args.device, args.device.startswith("cuda")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **TINY))
    model.eval()
    tok = id_tokenizer(TINY["vocab_size"])
    env = bench.environment(device)
    print(f"device {env['gpu']}; torch {env['torch']}; threads {torch.get_num_threads()}; Llama hidden "
          f"{TINY['hidden_size']} x {TINY['num_hidden_layers']} layers, vocab {TINY['vocab_size']}, fp32, sdpa; "
          f"one response, a step every {args.step} tokens")
    lengths = [int(x) for x in args.lengths.split(",")]
    res = {}
    print(f"{'config':<8} {'tokens':>7} {'s':>8} {'peak MiB':>9}")
    for name in args.configs.split(","):
        s = P2TScorer(model, tok, "lm_judge", step_separator="\n", step_split="\n", separator_suffix="",
                      template="{prompt}\n{response}", add_special_tokens=False, judge_tokens=(3, 4),
                      max_length=1 << 20, micro_batch_tokens=1 << 20, **CONFIGS[name])
        for L in lengths:
            ids = response(L, args.step, TINY["vocab_size"])
            fn = lambda: s.score_ids(["q"], [ids])  # noqa: E731
            fn()
            ts = []
            for _ in range(args.reps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            t = float(np.median(ts))
            peak = bench.peak_memory_mb(fn, device)
            res[(name, L)] = (t, peak)
            print(f"{name:<8} {L:7d} {t:8.2f} {peak:9.1f}", flush=True)
    for name in args.configs.split(","):
        Ls = np.asarray([L for L in lengths if (name, L) in res], dtype=np.float64)
        if Ls.size < 2:
            continue
        t = np.asarray([res[(name, L)][0] for L in Ls])
        m = np.asarray([res[(name, L)][1] for L in Ls]) * 2**20
        (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(Ls), Ls], 1), m, rcond=None)
        r2 = 1 - ((m - a - b * Ls) ** 2).sum() / max(((m - m.mean()) ** 2).sum(), 1e-30)
        (c, d), *_ = np.linalg.lstsq(np.stack([Ls, Ls ** 2], 1), t, rcond=None)
        growth = np.log(m[-1] / m[0]) / np.log(Ls[-1] / Ls[0])
        print(f"fit {name:<8} peak = {a / 2**20:.1f} MiB + {b / 1024:.2f} KiB x L (R^2 {r2:.4f}; "
              f"log-log slope {growth:.2f}); time = {c * 1e6:.1f} us x L + {d * 1e9:.3f} ns x L^2")
    if args.predict:
        for L in (4096, 16384, 32768):
            p = predict_7b(L)
            print(f"7B shape, {L} tokens (H100, from PERF.md): step {p['step_ms'] / 1e3:.2f} s, with checkpointing "
                  f"{p['ckpt_ms'] / 1e3:.2f} s; peak full (all-position logits, no checkpointing) "
                  f"{p['full_gib']:.1f} GiB, bounded {p['bounded_gib']:.1f} GiB "
                  f"({p['act_kib']:.0f} vs {p['ckpt_kib']:.0f} KiB/token of activations; attention "
                  f"{p['attn_share_4k']:.1%} of the FLOPs at 4k)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
