"""Peak memory and time of one policy update's log-probs in the lean GRPO loop: the eager log-softmax over
``[B, N, V]`` logits against TRL's chunked kernel (:mod:`p2t.grpo.logprobs`), on a random-init policy of
Qwen2.5-0.5B's shape (hidden 896, vocabulary 151,936, tied embeddings; 2 layers instead of 24).

    python benchmarks/policy_logprobs.py                       # 4x64, 4x128, 4x256 completions, CPU (~4 min)
    python benchmarks/policy_logprobs.py --lengths 512,1024    # longer (eager: ~5 and ~10 GB)
    python benchmarks/policy_logprobs.py --dry-run             # tiny shapes, both paths checked equal

One update = the policy's forward on prompt + completion, the completion log-probs
(:func:`p2t.grpo.logprobs.completion_logprobs`), a masked surrogate ``-(logp * A).sum() / n`` and its
backward. Each (path, length) runs in a process of its own: its resident-set high-water mark (Linux
``VmHWM``, reset after the model is built and warmed up) is the update's peak; ``peak_mib`` is that peak
above the resident memory before the update (the parameters' gradients, the same in both paths, are part
of it). Both paths start from the same weights and inputs; the log-prob sum and the gradient norm are
printed beside each row and checked to agree.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # a source checkout without `pip install -e .`


@dataclass
class Row:
    """One CSV row: one path at one batch shape."""
    path: str            # eager | chunked
    rows: int            # B
    length: int          # N, completion tokens per row
    prompt: int          # P
    vocab: int
    hidden: int
    layers: int
    threads: int
    repeats: int
    time_s: float        # median over repeats of forward + backward
    peak_mib: float      # resident-memory peak of the update above the memory before it
    rss_mib: float       # the process's resident-memory peak
    logp_sum: float
    grad_norm: float
    device: str
    date: str
    torch: str
    trl: str


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def worker(a) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from p2t.grpo import logprobs

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      tie_word_embeddings=True, max_position_embeddings=4096)
    model = Qwen2ForCausalLM(cfg).float().train()
    chunked_vocab = 0 if a.path == "chunked" else a.vocab + 1
    assert logprobs.path(model, chunked_vocab) == a.path, "TRL's kernel is not installed (pip install trl>=1.16)"
    B, P, N = a.rows, a.prompt, a.length
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (B, P + N), generator=g)
    attn = torch.ones(B, P + N, dtype=torch.long)
    attn[0, :P // 4] = 0                      # a left-padded prompt
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[-1, N // 2:] = False                 # a completion that ended early
    adv = torch.randn(B, N, generator=g)

    def update(k: int):  # the first k completion tokens
        model.zero_grad(set_to_none=True)
        logp = logprobs.completion_logprobs(model, ids[:, :P + k], attn[:, :P + k], P, temperature=0.9,
                                            chunked_vocab=chunked_vocab, tile_columns=a.tile_columns)
        loss = -(logp * adv[:, :k] * mask[:, :k]).sum() / mask[:, :k].sum()
        loss.backward()
        return logp.detach()

    update(4)  # warm-up
    model.zero_grad(set_to_none=True)
    times = []
    for _ in range(a.repeats):
        gc.collect()
        reset = _reset_peak()
        before = _status("VmRSS")
        t0 = time.perf_counter()
        logp = update(N)
        times.append(time.perf_counter() - t0)
        peak = _status("VmHWM")
    grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))
    import trl
    return dict(time_s=round(statistics.median(times), 4), peak_mib=round(peak - before, 1) if reset else float("nan"),
                rss_mib=round(peak, 1), logp_sum=float(logp[mask].double().sum()), grad_norm=grad_norm,
                torch=torch.__version__, trl=trl.__version__)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--lengths", default="64,128,256", help="completion lengths N (comma-separated)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--paths", default="eager,chunked")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--intermediate", type=int, default=4864)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--tile-columns", type=int, default=None, help="vocabulary columns per tile (chunked)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "policy_logprobs_cpu.csv"))
    ap.add_argument("--append", action="store_true", help="add the rows to --out instead of replacing it")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes (a smoke run, not a measurement)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.dry_run:
        a.vocab, a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads = 3001, 64, 128, 1, 4, 2
        a.lengths, a.prompt, a.tile_columns = "8,16", 6, a.tile_columns or 512
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    rows = []
    for n in [int(x) for x in a.lengths.split(",")]:
        for path in a.paths.split(","):
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                     if k in ("rows", "prompt", "vocab", "hidden", "intermediate", "layers", "heads", "kv_heads",
                              "threads", "repeats") or (k == "tile_columns" and v)]
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--path={path}", f"--length={n}"] + flags
            p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
            if p.returncode:
                print(p.stdout + p.stderr, file=sys.stderr)
                return 1
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(Row(path, a.rows, n, a.prompt, a.vocab, a.hidden, a.layers, a.threads, a.repeats, r["time_s"],
                            r["peak_mib"], r["rss_mib"], r["logp_sum"], r["grad_norm"], "cpu",
                            datetime.date.today().isoformat(), r["torch"], r["trl"]))
            print(json.dumps(dataclasses.asdict(rows[-1])), flush=True)
    ok = True
    for n in {r.length for r in rows}:
        same = [r for r in rows if r.length == n]
        for r in same[1:]:
            for k in ("logp_sum", "grad_norm"):
                x, y = getattr(same[0], k), getattr(r, k)
                if abs(x - y) > 1e-4 * max(1.0, abs(x)):
                    print(f"MISMATCH N={n} {k}: {same[0].path} {x} vs {r.path} {y}", file=sys.stderr)
                    ok = False
    for n in sorted({r.length for r in rows}):
        by = {r.path: r for r in rows if r.length == n}
        if {"eager", "chunked"} <= set(by):
            e, c = by["eager"], by["chunked"]
            print(f"{a.rows}x{n}: peak {e.peak_mib:.0f} -> {c.peak_mib:.0f} MiB "
                  f"({c.peak_mib / e.peak_mib:.2f}x), time {e.time_s:.2f} -> {c.time_s:.2f} s "
                  f"({c.time_s / e.time_s:.2f}x)")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    new = not (a.append and os.path.exists(a.out))
    with open(a.out, "w" if new else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Row)])
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))
    print(f"wrote {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
