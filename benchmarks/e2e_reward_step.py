"""End-to-end P2T reward step on a random-init Qwen2 PRM with a step-classifier head.

Batches: ``8x2048`` (8 responses of 2048 tokens) and ``mixed64`` (64 responses, lengths uniform in
256-4096); 16 steps per response, each read at its last token (the separator), a 128-token prompt
shared by each group of 8 responses, as in GRPO (``--distinct-prompts``: one per response).
Methods, in one run on one model:

* ``forward``: the PRM forward alone (no grad), padded batch, in the naive method's micro-batches.
* ``naive``: forward + backward with parameter gradients (the model as loaded), padded to the batch's
  longest response, micro-batches of ``--naive-rows`` rows; then the eager reference reduction
  (``backend="reference"``: fp32 upcast attribution, segment redistribution, token advantages).
* ``engine``: the product: :class:`p2t.P2TScorer` with the policy ids in (``score_ids``: a tokenizer
  built here maps every model id to one character, so the PRM input is the same token sequence), its
  token budget ``--mb-tokens`` (parameters frozen, gradients w.r.t. ``inputs_embeds`` only, rows sorted
  by length and grouped under the budget, fused ops per micro-batch), then ``token_rewards("p2t")`` and
  :func:`p2t.token_advantages` once per batch. ``engine@16384``: the same with a larger budget.
* ``engine_packed`` (``--methods ...,packed``): the engine with ``packing=True`` (responses laid end
  to end in rows, positions restarting per response; :mod:`p2t.attribution.packing`).
* ``engine_fused`` (``--methods ...,fused``): the trainer's path, ``advantages_ids``: the engine's
  micro-batches, each ending in the fused :func:`p2t.p2t_advantages` (groups of 8 responses).
* ``engine_liger`` (``--liger``, CUDA): the engine after Liger-Kernel's Qwen2 patches (RoPE, RMSNorm,
  SwiGLU) -- applied last, since they patch the transformers module for the whole process.
* ``host``: the engine's work outside the PRM (input layout from the ids, micro-batch tensors, the
  scatter onto policy tokens, token rewards and advantages), measured by running the same ``score_ids``
  call on a PRM whose forward costs almost nothing (an embedding and a 2-class linear head) minus that
  null PRM's own embedding lookup, forward and backward (replayed at the shapes it was called with), per 16k
  tokens beside the PRM step it would add to; ``host_fused``: the same for ``advantages_ids``. On CPU the
  row also says how much of it is p2t's own op kernels (self time of the ``p2t::`` ops under
  torch.profiler): device work on a GPU, where the host only launches them; and how much of it comes before
  the PRM's first forward (layout, freeze, plan): on a GPU the host work of later micro-batches runs while
  the device works on earlier ones.
* ``exact``: leave-one-out attribution (each response token replaced by the null embedding, one
  forward each), extrapolated from the measured forward's cost per token forwarded (padding included):
  sum_b n_b * L_b tokens forwarded, n_b response tokens of a response of L_b tokens.

Per method: median / p20 / p80 time, tokens/s (real response+prompt tokens, not padding), peak memory
(``torch.cuda.max_memory_allocated`` on CUDA, whole process; on CPU the allocations recorded by the
profiler over one step, above the model's weights), and ratios against ``naive``. Rows follow the op
benchmarks' CSV schema (``p2t.bench.COLUMNS``) with metric time / throughput / peak_memory.

    python benchmarks/e2e_reward_step.py --tiny                   # CPU, < 1 min
    python benchmarks/e2e_reward_step.py --device cuda --liger    # H100/H200, 1.5B shape, bf16, sdpa
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import p2t
except ImportError:  # source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(HERE))
    import p2t
from p2t import bench

QWEN2_1P5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6)
PROMPT, STEPS, GROUP = 128, 16, 8


# ---------------------------------------------------------------------------------------------
# Model and batches
# ---------------------------------------------------------------------------------------------
def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    cfg = Qwen2Config(num_labels=2, attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForTokenClassification(cfg).to(dtype)
    model.eval()  # no dropout; parameters keep requires_grad=True (the model as a user loads it)
    return model


class Batch:
    """Token ids, per-row lengths, readout positions (last token of each step), segment ids.

    ``group``: consecutive rows that share their prompt, as a GRPO group does (its first row's first
    ``p`` ids, ``p = min(prompt, shortest row of the group // 4)``); 1: every row a prompt of its own."""

    def __init__(self, name: str, lens: list, vocab: int, seed: int, prompt: int = PROMPT, steps: int = STEPS,
                 group: int = GROUP):
        g = torch.Generator().manual_seed(seed)
        self.name, self.lens = name, list(lens)
        self.B, self.N = len(lens), max(lens)
        self.ids = torch.randint(3, vocab, (self.B, self.N), generator=g)
        self.seg = torch.full((self.B, self.N), -1, dtype=torch.long)
        self.readout = []  # (row, position) per step, step ids in this order
        self.prompt_len = []
        group = max(1, int(group))
        for g0 in range(0, self.B, group):
            p = min(prompt, min(lens[g0:g0 + group]) // 4)
            self.prompt_len += [p] * len(lens[g0:g0 + group])
            self.ids[g0 + 1:g0 + group, :p] = self.ids[g0, :p].clone()
        s = 0
        for b, L in enumerate(lens):
            p = self.prompt_len[b]
            k = min(steps, L - p)
            cuts = sorted(random.Random(seed * 7919 + b).sample(range(p + 1, L), k - 1)) + [L]
            start = p
            for c in cuts:
                self.seg[b, start:c] = s
                self.readout.append((b, c - 1))
                start, s = c, s + 1
        self.S = s
        self.outcome = torch.rand(self.B, generator=g)
        self.tokens = sum(lens)

    def rows(self, idx: list, device: str):
        """ids, attention mask, readout (local row, position) and step ids of rows ``idx``, padded to
        their own longest length."""
        L = max(self.lens[i] for i in idx)
        ids = self.ids[idx, :L].clone()
        attn = torch.zeros(len(idx), L, dtype=torch.long)
        for j, i in enumerate(idx):
            attn[j, :self.lens[i]] = 1
            ids[j, self.lens[i]:] = 0
        where = {i: j for j, i in enumerate(idx)}
        ro = [(where[b], p, k) for k, (b, p) in enumerate(self.readout) if b in where]
        ro_t = torch.tensor([(r, p) for r, p, _ in ro], dtype=torch.long)
        steps = torch.tensor([k for _, _, k in ro], dtype=torch.long)
        return ids.to(device), attn.to(device), ro_t.to(device), steps.to(device)


def batches(tiny: bool, vocab: int, which: list, group: int = GROUP) -> list:
    """The benchmark's batches; ``group``: rows per shared prompt (1: a prompt per row)."""
    out = []
    if "8x2048" in which:
        out.append(Batch("8x2048", [64] * 4 if tiny else [2048] * 8, vocab, seed=1,
                         prompt=16 if tiny else PROMPT, steps=4 if tiny else STEPS, group=group))
    if "mixed64" in which:
        r = random.Random(2)
        lens = [r.randint(16, 128) for _ in range(8)] if tiny else [r.randint(256, 4096) for _ in range(64)]
        out.append(Batch("mixed64", lens, vocab, seed=2, prompt=16 if tiny else PROMPT, steps=4 if tiny else STEPS,
                         group=group))
    return out


def margins(model, x, attn, ro):
    """The naive baseline's step log-odds m_s = logit_1 - logit_0 at each readout position, float32."""
    logits = model(inputs_embeds=x, attention_mask=attn).logits
    sel = logits[ro[:, 0], ro[:, 1]].float()
    return sel[:, 1] - sel[:, 0]


# ---------------------------------------------------------------------------------------------
# Methods: each returns token advantages [B, N] (forward: the step rewards)
# ---------------------------------------------------------------------------------------------
def _chunks(idx: list, rows: int) -> list:
    return [idx[i:i + rows] for i in range(0, len(idx), rows)]


def run_forward(model, batch: Batch, device: str, rows: int):
    emb = model.get_input_embeddings()
    out = torch.empty(batch.S, device=device)
    with torch.no_grad():
        for idx in _chunks(list(range(batch.B)), rows):
            ids, attn, ro, steps = batch.rows(idx, device)
            # the naive method's padding: every row to the batch's longest response
            pad = batch.N - ids.shape[1]
            ids = torch.nn.functional.pad(ids, (0, pad))
            attn = torch.nn.functional.pad(attn, (0, pad))
            out[steps] = torch.sigmoid(margins(model, emb(ids), attn, ro))
    return out


def _finish(batch: Batch, scores, rewards, device: str, backend: str):
    seg = batch.seg.to(device)
    mask = torch.arange(batch.N, device=device)[None, :] < torch.tensor(batch.lens, device=device)[:, None]
    r = p2t.segment_redistribute(scores, seg, rewards, validate=False, backend=backend)
    return p2t.token_advantages(batch.outcome.to(device), r, group_size=min(GROUP, batch.B), mask=mask,
                                backend=backend)


def run_naive(model, batch: Batch, device: str, rows: int):
    """Parameter gradients on (the model as loaded), padded to the batch max, eager reduction."""
    emb = model.get_input_embeddings()
    null = emb.weight[0].detach()
    scores = torch.zeros(batch.B, batch.N, device=device)
    rewards = torch.empty(batch.S, device=device)
    for idx in _chunks(list(range(batch.B)), rows):
        ids, attn, ro, steps = batch.rows(idx, device)
        pad = batch.N - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, pad))
        attn = torch.nn.functional.pad(attn, (0, pad))
        x = emb(ids)
        x.retain_grad()
        m = margins(model, x, attn, ro)
        m.sum().backward()
        scores[idx] = p2t.token_attribution(x.grad, x.detach(), null, mask=attn.bool(), backend="reference")
        rewards[steps] = torch.sigmoid(m.detach())
    model.zero_grad(set_to_none=True)
    return _finish(batch, scores, rewards, device, "reference")


# --- the product: P2TScorer with the policy ids in -------------------------------------------
_SKIP = set(range(0xD800, 0xE000)) | set(range(0xFDD0, 0xFDF0))


def id_tokenizer(vocab: int):
    """A tokenizer whose id i (i >= 3) is one character of its own; 0 <pad>, 1 <unk>, 2 the step
    separator ``\n``. Random model ids become text with exactly one PRM token per id. A BPE model without
    merges and without a pre-tokenizer (every character its own token, as a byte-level BPE tokenizer's
    model runs on a pre-tokenized word): a per-character pre-tokenizer (``Split``) gives the same ids
    2.5x slower than the BPE tokenizers PRMs ship."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars, c = [], 0x4E00
    while len(chars) < vocab - 3:
        ch = chr(c)
        if c not in _SKIP and (c & 0xFFFE) != 0xFFFE and not ch.isspace():
            chars.append(ch)
        c += 1
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(["<pad>", "<unk>", "\n"] + chars)}, [], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>")


def scorer_inputs(batch: Batch, tok):
    """Prompt texts and response ids with the batch's layout: the prompt (its first p - 1 ids; the
    template's newline is the p-th token), then each step's ids with the step's last token replaced by
    the separator (the PRM reads the step there), so the PRM input has the batch's tokens and lengths."""
    sep = tok.convert_tokens_to_ids("\n")
    prompts, ids, N = [], [], 0
    for b, L in enumerate(batch.lens):
        p = batch.prompt_len[b]
        row = batch.ids[b, :L].tolist()
        prompts.append(tok.decode(row[:p - 1]))
        resp = list(row[p:L])
        seg = batch.seg[b, p:L].tolist()
        for j in range(len(resp)):
            if j + 1 == len(resp) or seg[j + 1] != seg[j]:
                resp[j] = sep
        ids.append(resp)
        N = max(N, len(resp))
    return prompts, ids, N


def make_engine_step(model, batch: Batch, device: str, budget: int, tok=None, fused: bool = False, **options):
    """The product's reward step: ``score_ids`` + ``token_rewards("p2t")`` + :func:`p2t.token_advantages`
    (micro-batches sorted by length), or with ``fused`` the trainer's ``advantages_ids`` (the same
    micro-batches, each ending in :func:`p2t.p2t_advantages`; groups of ``GROUP`` rows)."""
    from p2t.attribution import P2TScorer

    tok = tok or id_tokenizer(model.config.vocab_size)
    scorer = P2TScorer(model, tok, "step_classifier", step_separator="\n", step_split="\n",
                       template="{prompt}\n{response}", add_special_tokens=False, null="pad",
                       micro_batch_tokens=budget, max_length=1 << 20, **options)
    prompts, ids, N = scorer_inputs(batch, tok)
    o = batch.outcome.to(device)
    group = min(GROUP, batch.B)

    def step():
        if fused:
            return scorer.advantages_ids(prompts, ids, o, group_size=group, length=N, device=device).advantages
        sb = scorer.score_ids(prompts, ids, length=N, device=device)
        return p2t.token_advantages(o, sb.token_rewards(mode="p2t"), group_size=group, mask=sb.response_mask)
    step.scorer, step.inputs = scorer, (prompts, ids, N)
    return step


class NullPRM(torch.nn.Module):
    """A PRM whose forward costs (almost) nothing: an embedding and a 2-class head on it. It records the
    shape of every ``inputs_embeds`` it is called with (``calls``), so that its own work can be replayed.
    ``shape``: it also holds that Qwen2 PRM's modules and parameters on the meta device (never run, no
    memory), parameters flagged as loaded, so that the host work that walks the PRM's modules on every
    call (freezing it for the call) is counted at the real PRM's size."""

    def __init__(self, vocab: int, dim: int = 8, shape: Optional[dict] = None, device: str = "cpu"):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim, device=device)
        self.head = torch.nn.Linear(dim, 2, device=device)
        self.calls = []
        self.clock, self.stamps = None, []  # with a clock: when each forward started
        if shape is not None:
            from transformers import Qwen2Config, Qwen2ForTokenClassification
            with torch.device("meta"):
                self.tree = Qwen2ForTokenClassification(Qwen2Config(num_labels=2, **shape)).eval()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds=None, attention_mask=None):
        if self.clock is not None:
            self.stamps.append(self.clock())
        self.calls.append(tuple(inputs_embeds.shape))
        return (self.head(inputs_embeds),)


def host_overhead(batch: Batch, device: str, budget: int, tok, reps: int, clock: str = "wall",
                  shape: Optional[dict] = None) -> dict:
    """Milliseconds of the engine's work outside the PRM for this batch, on :class:`NullPRM`: the whole
    call (``total``: ``score_ids`` + token rewards + advantages; ``fused``: ``advantages_ids``, the
    trainer's path), its input layout alone (host only), and the null PRM's own forward and backward
    (``prm``: its embedding lookup, forward and backward replayed at the recorded shapes), which a real PRM
    replaces; the host work outside the PRM is the call minus ``prm``."""
    torch.manual_seed(0)
    prm = NullPRM(tok.vocab_size if hasattr(tok, "vocab_size") else len(tok), shape=shape, device=device)
    prm.eval()  # parameters keep requires_grad=True, as build_model's
    step = make_engine_step(prm, batch, device, budget, tok=tok)
    fused = make_engine_step(prm, batch, device, budget, tok=tok, fused=True)
    prompts, ids, _ = step.inputs
    layout = step.scorer.layout

    def replay(shapes):  # the PRM's embedding lookup, forward and backward at the recorded shapes
        ids = [torch.randint(prm.embed.num_embeddings, s[:2], device=device) for s in shapes]

        def run():  # frozen, as in the scorer's call
            own = [*prm.embed.parameters(), *prm.head.parameters()]
            for p in own:
                p.requires_grad_(False)
            for i in ids:
                x = prm.embed(i).requires_grad_(True)
                torch.autograd.grad(prm(inputs_embeds=x)[0][..., 1].sum(), x)
            for p in own:
                p.requires_grad_(True)
        return run
    now = time.process_time if clock == "cpu" and not device.startswith("cuda") else time.perf_counter
    jobs = {"total": step, "fused": fused,
            "layout": lambda: layout.rows(prompts, None, ids, hint=False, skip_empty=True)}
    for name in ("total", "fused"):
        prm.calls = []
        jobs[name]()
        jobs[f"prm_{name}"] = replay(list(prm.calls))
    t = {name: [] for name in [*jobs, "lead_total", "lead_fused"]}
    for fn in jobs.values():
        fn()
    sync(device)
    prm.clock = now
    for _ in range(max(reps, 3)):  # interleaved, so that load from other processes hits every part alike
        for name, fn in jobs.items():
            sync(device)
            prm.stamps = []
            t0 = now()
            fn()
            sync(device)
            t[name].append(now() - t0)
            if name in ("total", "fused"):  # the host work before the PRM's first forward
                t[f"lead_{name}"].append(prm.stamps[0] - t0)
    prm.clock = None
    out = {name: sorted(xs)[len(xs) // 2] * 1e3 for name, xs in t.items()}
    if not device.startswith("cuda"):  # on a GPU these kernels are device work, off the host's path
        out.update({f"kernels_{name}": op_kernel_ms(jobs[name], max(reps, 3)) for name in ("total", "fused")})
    return out


def op_kernel_ms(fn, reps: int) -> float:
    """Milliseconds per call of ``fn`` inside p2t's own op kernels: the self CPU time of the ``p2t::`` ops
    under torch.profiler (its own overhead stays outside them)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("p2t::")) / reps / 1e3


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(jobs: list, device: str, reps: int, warmup: int = 1, clock: str = "wall") -> dict:
    """{name: ((y50, y20, y80) seconds, peak GiB)} of each ``fn()``; methods interleaved rep by rep so
    that load from other processes hits them alike. Peak memory from a separate call per method.
    ``clock="cpu"`` (CPU only): process CPU time instead of wall time (see ``p2t.bench.cpu_quantiles``)."""
    now = time.process_time if clock == "cpu" and not device.startswith("cuda") else time.perf_counter
    out, ts = {}, {}
    ok = []
    for name, fn in jobs:
        try:
            for _ in range(warmup):
                fn()
            sync(device)
            ok.append((name, fn))
            ts[name] = []
        except torch.cuda.OutOfMemoryError as e:
            print(f"  {name:<14} out of memory ({str(e).splitlines()[0][:120]})")
            torch.cuda.empty_cache()
    for _ in range(reps):
        for name, fn in ok:
            sync(device)
            t0 = now()
            fn()
            sync(device)
            ts[name].append(now() - t0)
    for name, fn in ok:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fn()
            sync(device)
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = bench.peak_memory_mb(fn, device) / 1024
        out[name] = (bench._quantiles(ts[name]), peak)
    return out


def liger_runs(model, table, rows_out, device, args, budget, tok):
    """The engine (and forward) again after Liger-Kernel's Qwen2 patches."""
    cuda = device.startswith("cuda")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    except ImportError as e:
        print(f"\n--liger: Liger-Kernel is not installed ({e}); `pip install liger-kernel`")
    else:
        apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
        print("\nafter Liger-Kernel's Qwen2 patches (RoPE, RMSNorm, SwiGLU):")
        for batch, res in table:
            nr = args.naive_rows or (8 if batch.name == "8x2048" else 4)
            jobs = [("forward_liger", lambda: run_forward(model, batch, device, nr)),
                    ("engine_liger", make_engine_step(model, batch, device, budget, tok=tok))]
            for name, (q, peak) in measure(jobs, device, args.reps, clock=args.clock).items():
                res[name] = dict(t=q, peak=peak, tps=batch.tokens / q[0])
                print(f"  {batch.name:<8} {name:<14} {q[0] * 1e3:10.1f} ms  {batch.tokens / q[0]:12.0f} tokens/s  "
                      f"peak {peak:8.3f} GiB", flush=True)
                for metric, unit, v in (("time", "s", q), ("throughput", "tokens/s", (batch.tokens / q[0],) * 3),
                                        ("peak_memory", "GiB", (peak,) * 3)):
                    base = next(r for r in rows_out if r.mode == batch.name)
                    rows_out.append(dataclasses.replace(base, provider=name, metric=metric, unit=unit, y50=v[0],
                                                        y20=v[1], y80=v[2], peak_mem_mb=peak * 1024))
                if cuda:
                    torch.cuda.empty_cache()


def target_lines(rows: list) -> list:
    """The targets of the full-size run, each PASS or MISS from the measured rows (or not measured): 8x2048
    engine >= 1.8x naive tokens/s and <= 1/3 of its peak memory; mixed64 engine >= 2.5x naive tokens/s; the
    host work outside the PRM (score_ids and the fused advantages_ids) <= 5 ms per 16k tokens (2% of a
    ~290 ms H100 1.5B-shape step)."""
    by = {(r.mode, r.provider, r.metric): r.y50 for r in rows}
    verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    lines = []
    for batch, speedup, memory in (("8x2048", 1.8, 1 / 3), ("mixed64", 2.5, None)):
        eng, nv = by.get((batch, "engine", "throughput")), by.get((batch, "naive", "throughput"))
        if eng is None or nv is None:
            lines.append(f"{batch} engine >= {speedup}x naive tokens/s: not measured (--methods engine,naive)")
        else:
            lines.append(f"{batch} engine {eng / nv:.2f}x naive tokens/s (>= {speedup}) -> "
                         f"{verdict(eng / nv >= speedup)}")
        if memory is not None:
            pe, pn = by.get((batch, "engine", "peak_memory")), by.get((batch, "naive", "peak_memory"))
            if pe is None or pn is None or not pn > 0:
                lines.append(f"{batch} engine peak <= 1/3 of naive: not measured")
            else:
                lines.append(f"{batch} engine peak {pe / pn:.2f} of naive (<= 0.33) -> {verdict(pe / pn <= memory)}")
    for batch in dict.fromkeys(r.mode for r in rows if r.metric == "host_time"):
        for provider, what in (("host", "score_ids"), ("host_fused", "fused advantages_ids")):
            ms = by.get((batch, provider, "host_time"))
            if ms is not None:
                lines.append(f"{batch} host work outside the PRM, {what}: {ms:.2f} ms per 16k tokens (<= 5) -> "
                             f"{verdict(ms <= 5)}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny Qwen2 shape and batches (CPU smoke run, < 1 min)")
    ap.add_argument("--dtype", default=None, help="bf16 (default on CUDA) or fp32 (default on CPU)")
    ap.add_argument("--batches", default="8x2048,mixed64")
    ap.add_argument("--methods", default="forward,naive,engine,exact,host")
    ap.add_argument("--liger", action="store_true", help="also the engine after Liger-Kernel's Qwen2 patches")
    ap.add_argument("--naive-rows", type=int, default=None, help="rows per naive micro-batch (default 8; 4 for mixed64)")
    ap.add_argument("--mb-tokens", default=None,
                    help="engine token budget(s) per micro-batch, comma-separated; the first is 'engine', the others "
                         "'engine@<budget>' (default on CUDA 4096,16384: 2 and 8 rows of 2048; --tiny: 256)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--distinct-prompts", action="store_true",
                    help=f"a prompt per response (default: groups of {GROUP} responses share one, as in GRPO)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"), help="CPU timer (see p2t bench --clock)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    device = args.device
    cuda = device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = bench.DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    shape = TINY if args.tiny else QWEN2_1P5B
    budgets = [int(b) for b in (args.mb_tokens or ("256" if args.tiny else "4096,16384")).split(",")]
    budget = budgets[0]
    methods = args.methods.split(",")
    # the PRM itself is only needed by the methods that run it (``host`` alone runs on a null PRM)
    model = build_model(shape, device, dtype) if set(methods) - {"host"} or args.liger else None
    env = bench.environment(device)
    try:
        import transformers
        tv = transformers.__version__
    except ImportError:  # pragma: no cover
        tv = "?"
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30 if model is not None else 0
    print(f"device {env['gpu']}; torch {env['torch']}, transformers {tv}, p2t {env['version']} ({env['commit']}); "
          f"Qwen2 {'tiny' if args.tiny else '1.5B'} shape, {str(dtype).replace('torch.', '')}, sdpa, "
          f"{weights_gib:.2f} GiB of weights; backends {p2t.available_backends(device.split(':')[0])}")
    tok = id_tokenizer(shape["vocab_size"]) if ({"engine", "host"} & set(methods) or args.liger) else None
    host_rows = []  # the host work outside the PRM, per 16k tokens (metric "host_time")
    out = args.out or os.path.join(HERE, "results", f"e2e{'_tiny' if args.tiny else ''}_{bench.device_tag(device)}.csv")
    rows_out, table = [], []
    for batch in batches(args.tiny, shape["vocab_size"], args.batches.split(","),
                         group=1 if args.distinct_prompts else GROUP):
        naive_rows = args.naive_rows or (8 if batch.name == "8x2048" else 4)
        padded = batch.B * batch.N
        print(f"\n{batch.name}: {batch.B} responses, {batch.tokens} tokens ({padded} padded), {batch.S} steps; "
              f"naive micro-batch {naive_rows} rows, engine budget {budget} tokens"
              + "".join(f", engine@{b}" for b in budgets[1:]))
        res = {}

        def record(name, q, peak, tokens_per_s=None):
            tps = tokens_per_s if tokens_per_s is not None else batch.tokens / q[0]
            res[name] = dict(t=q, peak=peak, tps=tps)
            print(f"  {name:<14} {q[0] * 1e3:10.1f} ms (p20 {q[1] * 1e3:.1f}, p80 {q[2] * 1e3:.1f})  "
                  f"{tps:12.0f} tokens/s  peak {peak:8.3f} GiB", flush=True)

        jobs = []
        if "forward" in methods or "exact" in methods:
            jobs.append(("forward", lambda: run_forward(model, batch, device, naive_rows)))
        if "naive" in methods:
            jobs.append(("naive", lambda: run_naive(model, batch, device, naive_rows)))
        if "engine" in methods:
            for i, bt in enumerate(budgets):
                jobs.append(("engine" if i == 0 else f"engine@{bt}", make_engine_step(model, batch, device, bt,
                                                                                        tok=tok)))
        if "fused" in methods:  # the trainer's path: the fused op at the end of every micro-batch
            jobs.append(("engine_fused", make_engine_step(model, batch, device, budget, tok=tok, fused=True)))
        if "packed" in methods:  # the engine with packed rows (positions restarting per response)
            jobs.append(("engine_packed", make_engine_step(model, batch, device, budget, tok=tok, packing=True)))
        for name, (q, peak) in measure(jobs, device, args.reps, clock=args.clock).items():
            record(name, q, peak)
        if "host" in methods:
            h = host_overhead(batch, device, budget, tok, args.reps, clock=args.clock, shape=shape)
            per16k = 16384 / batch.tokens
            eng = res.get("engine", {}).get("t", (float("nan"),))[0] * 1e3
            out_u, out_f = h["total"] - h["prm_total"], h["fused"] - h["prm_fused"]
            k_u, k_f = h.get("kernels_total", float("nan")), h.get("kernels_fused", float("nan"))
            for name, ms in (("host", out_u), ("host_fused", out_f), ("host_layout", h["layout"]),
                             ("host_kernels", k_u), ("host_fused_kernels", k_f), ("host_lead", h["lead_total"]),
                             ("host_fused_lead", h["lead_fused"]), ("engine", eng)):
                host_rows.append(bench.BenchmarkRow.measured(
                    env, kernel="p2t_reward_step", provider=name, mode=batch.name, metric="host_time",
                    unit="ms/16k tokens", x=batch.tokens, y50=ms * per16k, y20=ms * per16k, y80=ms * per16k,
                    x_name="tokens", layout="padded", host_ms=ms))
            print(f"  host (outside the PRM): score_ids path {out_u * per16k:.2f} ms per 16k tokens (call "
                  f"{h['total'] * per16k:.2f} - null PRM {h['prm_total'] * per16k:.2f}), fused advantages_ids "
                  f"{out_f * per16k:.2f} (call {h['fused'] * per16k:.2f} - null PRM {h['prm_fused'] * per16k:.2f}); "
                  f"input layout {h['layout'] * per16k:.2f}; before the first forward {h['lead_total'] * per16k:.2f} / "
                  f"{h['lead_fused'] * per16k:.2f}; p2t op kernels {k_u * per16k:.2f} / {k_f * per16k:.2f}; "
                  f"{100 * out_u / eng:.1f}% of this engine step", flush=True)
            for name, ms in (("host", out_u), ("host_fused", out_f)):
                res[name] = dict(t=(ms / 1e3,) * 3, peak=float("nan"), tps=batch.tokens / (ms / 1e3))
        if "exact" in methods and "forward" in res:
            # one forward per response token (prompt excluded), each of the response's full length, at the
            # measured forward's cost per token forwarded (its rows are padded to the batch's longest)
            per_token = res["forward"]["t"][0] / (batch.B * batch.N)
            work = sum((L - min(PROMPT if not args.tiny else 16, L // 4)) * L for L in batch.lens)
            t = work * per_token
            record("exact (extrap.)", (t, t, t), res["forward"]["peak"])
        table.append((batch, res))
        for name, r in res.items():
            base = {"time": r["t"], "throughput": (r["tps"],) * 3, "peak_memory": (r["peak"],) * 3}
            units = {"time": "s", "throughput": "tokens/s", "peak_memory": "GiB"}
            for metric, (y50, y20, y80) in base.items():
                rows_out.append(bench.BenchmarkRow.measured(
                    env, kernel="p2t_reward_step", provider=name, mode=batch.name, metric=metric, unit=units[metric],
                    x=batch.tokens, y50=y50, y20=y20, y80=y80, x_name="tokens", layout="padded",
                    dtype=str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32"),
                    shape=f"Qwen2-{'tiny' if args.tiny else '1.5B'},B={batch.B},N={batch.N}",
                    peak_mem_mb=r["peak"] * 1024,
                    host_ms=r["t"][0] * 1e3 if name.startswith("host") else float("nan")))
        bench.write_csv(rows_out, out)  # after every batch: a timeout keeps what was measured
    if args.liger:
        try:
            liger_runs(model, table, rows_out, device, args, budget, tok)
        except Exception as e:  # noqa: BLE001 - the HF results above stand on their own
            print(f"\n--liger failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    print(f"\n{'batch':<8} {'method':<16} {'ms':>10} {'tokens/s':>12} {'peak GiB':>9} {'x naive tok/s':>14} "
          f"{'peak / naive':>13} {'x forward time':>15}")
    for batch, res in table:
        nv = res.get("naive")
        fw = res.get("forward")
        for name, r in res.items():
            sp = f"{r['tps'] / nv['tps']:.2f}x" if nv else ""
            mem = f"{r['peak'] / nv['peak']:.2f}" if nv and nv["peak"] > 0 else ""
            xf = f"{r['t'][0] / fw['t'][0]:.2f}x" if fw else ""
            print(f"{batch.name:<8} {name:<16} {r['t'][0] * 1e3:10.1f} {r['tps']:12.0f} {r['peak']:9.3f} {sp:>14} "
                  f"{mem:>13} {xf:>15}")
    for name in dict.fromkeys(r.mode for r in host_rows):
        h = {r.provider: r.y50 for r in host_rows if r.mode == name}
        print(f"host work outside the PRM, {name}: {h['host']:.2f} ms per 16k tokens (fused advantages_ids "
              f"{h['host_fused']:.2f}; input layout {h['host_layout']:.2f} ms; before the PRM's first forward "
              f"{h['host_lead']:.2f} / {h['host_fused_lead']:.2f} ms; p2t's op kernels {h['host_kernels']:.2f} / "
              f"{h['host_fused_kernels']:.2f} ms, device work on a GPU); the engine step is {h['engine']:.1f} ms per "
              "16k tokens here")
    if not args.tiny:
        for line in target_lines(rows_out + host_rows):
            print("TARGET " + line)
    bench.write_csv(rows_out + host_rows, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
