"""Time and peak memory per 1k attributed tokens of the P2TScorer methods on a tiny PRM.

Each method runs in its own subprocess so peak memory is its own: on CPU, the process's peak RSS
(``ru_maxrss``) minus its RSS right before scoring; on CUDA, ``torch.cuda.max_memory_allocated``
minus the allocation before scoring. Time is the median of ``--repeats`` calls after one warm-up.

    python benchmarks/attribution_cost.py                       # taylor vs exact, CPU
    python benchmarks/attribution_cost.py --methods taylor taylor_per_step integrated_gradients exact
    python benchmarks/attribution_cost.py --device cuda --hidden 512 --layers 8
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import string
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>"] + list(string.printable))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def _data(batch: int, tokens: int, seed: int = 0):
    import random
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(batch):
        nums = [rng.randint(10, 99) for _ in range(3)]
        prompts.append("+".join(map(str, nums)) + "=")
        lines, n = [], 0
        while n < tokens:
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            line = f"{a}+{b}={a + b}"
            lines.append(line)
            n += len(line) + 1
        responses.append("\n".join(lines))
    return prompts, responses


def worker(args) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    import p2t

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tok = _char_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=max(1, args.hidden // 32), num_key_value_heads=max(1, args.hidden // 64),
                      intermediate_size=2 * args.hidden, max_position_embeddings=4096, num_labels=2)
    model = Qwen2ForTokenClassification(cfg).to(args.device).eval()
    scorer = p2t.P2TScorer(model, tok, "step_classifier", template="{prompt}{response}", step_separator="\n",
                           step_split="\n", micro_batch_tokens=args.micro_batch_tokens, ig_steps=args.ig_steps)
    prompts, responses = _data(args.batch, args.tokens)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2 ** 20
    else:
        base = _rss_mib()
    t0 = time.perf_counter()
    batch = scorer.score(prompts, responses, method=args.method)  # also the warm-up
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) - base
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        scorer.score(prompts, responses, method=args.method)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    attributed = int((batch.segment_ids >= 0).sum())
    prm_tokens = sum(len(v.input_ids) for v in batch.prm)
    sec = statistics.median(times) if times else first
    return dict(method=args.method, device=args.device, hidden=args.hidden, layers=args.layers, batch=args.batch,
                attributed_tokens=attributed, prm_tokens=prm_tokens, seconds=sec,
                seconds_per_1k_tokens=sec / attributed * 1000, peak_mib=peak,
                peak_mib_per_1k_tokens=peak / attributed * 1000, threads=args.threads)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["taylor", "exact"])
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="response characters (= tokens) per response")
    p.add_argument("--micro-batch-tokens", type=int, default=8192)
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.method:
        print(json.dumps(worker(args)))
        return 0
    results = []
    for m in args.methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--method", m] + [
            a for a in (argv if argv is not None else sys.argv[1:]) if a]
        cmd = [c for c in cmd]
        # drop --methods and its values from the child's command line
        out, skip = [], False
        for c in cmd:
            if c == "--methods":
                skip = True
                continue
            if skip and not c.startswith("--"):
                continue
            skip = False
            out.append(c)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
        res = subprocess.run(out, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
            return res.returncode
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(f"{'method':<22}{'device':<8}{'tokens':>8}{'s':>9}{'s/1k tok':>10}{'peak MiB':>10}{'MiB/1k tok':>11}")
    for r in results:
        print(f"{r['method']:<22}{r['device']:<8}{r['attributed_tokens']:>8}{r['seconds']:>9.3f}"
              f"{r['seconds_per_1k_tokens']:>10.3f}{r['peak_mib']:>10.1f}{r['peak_mib_per_1k_tokens']:>11.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
