"""Credit localisation on the toy lab: do the PRM's token attributions point at the wrong tokens?

The lab knows the truth. In a wrong step, the tokens from the first character where the line leaves
the line the chain calls for (a wrong digit of the result, or whatever broke the line) are *wrong
tokens*; the tokens before it are right. P2T's premise is that the attribution ``I`` of a wrong token
is lower than that of the right tokens of its step, so that the within-step softmax moves the step's
reward away from it. Measured here without any RL noise, on the SFT policy's own samples:

* ``auroc_step``: AUROC of ``-I`` for "token is wrong" within each wrong step that has both kinds of
  tokens, averaged over those steps (what the within-step softmax sees; 0.5 = no information);
* ``auroc_pooled``: the same over all tokens of all wrong steps pooled;
* ``auroc_flagged``: ``auroc_step`` over the wrong steps the PRM flags (R_s < 0.5) only;
* ``top1``: share of those steps whose lowest-``I`` token is a wrong one;
* ``entropy``: mean normalised entropy of the paper's softmax ``softmax_{j in s}(I_j)`` over all
  steps with two or more tokens (1 = uniform: the redistribution then adds nothing to the process
  reward); ``entropy_std``: the same with attributions standardised within each step;
* ``spearman_exact``: Spearman correlation of ``I`` with the ``exact`` method's ``I`` (same null)
  over all step tokens, pooled.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from p2t.options import METHODS, NULLS

from . import task
from .cache import checkpoint_settings
from .layout import LAYOUT
from .metrics import auroc, spearman
from .sft import sample

#: what ``p2t localise`` measures by default (``integrated_gradients:K``: K interpolation steps)
DEFAULT_METHODS = ("taylor", "taylor_per_step", "integrated_gradients:4", "integrated_gradients:16", "exact")


def token_truth(problem: task.Problem, response: str, ops_per_step: int = 1) -> Tuple[List[int], List[bool]]:
    """Per character of ``response``: its line index, and whether it is a wrong token (in a wrong line,
    at or after the first character where the line stops matching the line the chain calls for). With
    several additions a line, the right characters before the first deviation (a right first result,
    say) stay right tokens of the wrong step."""
    labels = task.char_labels(problem, response, ops_per_step)[:len(response)]
    ok_lines = task.step_labels(problem, response, ops_per_step)
    line_of, wrong, line = [], [], 0
    for j, ch in enumerate(response):
        line_of.append(line)
        wrong.append(not ok_lines[line] and labels[j] == 0 and ch != task.STEP_SEPARATOR)
        if ch == task.STEP_SEPARATOR:
            line += 1
    return line_of, wrong


def _norm_entropy(values: np.ndarray, standardize: bool) -> float:
    v = values.astype(np.float64)
    if standardize:
        v = (v - v.mean()) / (v.std() + 1e-6)
    w = np.exp(v - v.max())
    w /= w.sum()
    return float(-(w * np.log(np.clip(w, 1e-300, None))).sum() / np.log(len(v)))


def step_records(batch, problems: Sequence[task.Problem], responses: Sequence[str],
                 ops_per_step: int = 1) -> List[dict]:
    """One record per step of every response: attributions, wrong-token flags, step reward."""
    out = []
    scores = batch.scores.float().cpu().numpy()
    seg = batch.segment_ids.cpu().numpy()
    rewards = batch.segment_rewards.float().cpu().numpy()
    base = 0
    for b, (p, r) in enumerate(zip(problems, responses)):
        line_of, wrong = token_truth(p, r, ops_per_step)
        ok_lines = task.step_labels(p, r, ops_per_step)
        n = min(len(r), seg.shape[1])
        for s in range(batch.steps_per_response[b]):
            cols = [j for j in range(n) if seg[b, j] == base + s]
            if not cols:
                continue
            line = line_of[cols[0]]
            out.append({"I": scores[b, cols], "wrong": np.array([wrong[j] for j in cols]),
                        "step_ok": ok_lines[line], "R": float(rewards[base + s])})
        base += batch.steps_per_response[b]
    return out


def summarise(steps: List[dict], exact_steps: Optional[List[dict]] = None) -> Dict[str, float]:
    wrong_steps = [s for s in steps if not s["step_ok"]]
    mixed = [s for s in wrong_steps if s["wrong"].any() and (~s["wrong"]).any()]
    per_step = [auroc(-s["I"][s["wrong"]], -s["I"][~s["wrong"]]) for s in mixed]
    flagged = [a for a, s in zip(per_step, mixed) if s["R"] < 0.5]
    top1 = [bool(s["wrong"][int(np.argmin(s["I"]))]) for s in mixed]
    pos = np.concatenate([s["I"][s["wrong"]] for s in wrong_steps]) if wrong_steps else np.zeros(0)
    neg = np.concatenate([s["I"][~s["wrong"]] for s in wrong_steps]) if wrong_steps else np.zeros(0)
    multi = [s for s in steps if len(s["I"]) > 1]
    out = {"auroc_step": float(np.mean(per_step)) if per_step else float("nan"),
           "auroc_pooled": auroc(-pos, -neg),
           "auroc_flagged": float(np.mean(flagged)) if flagged else float("nan"),
           "top1": float(np.mean(top1)) if top1 else float("nan"),
           "entropy": float(np.mean([_norm_entropy(s["I"], False) for s in multi])) if multi else 1.0,
           "entropy_std": float(np.mean([_norm_entropy(s["I"], True) for s in multi])) if multi else 1.0,
           "abs_I": float(np.mean(np.abs(np.concatenate([s["I"] for s in steps])))) if steps else 0.0,
           "wrong_steps": len(wrong_steps), "mixed_steps": len(mixed), "flagged_steps": len(flagged),
           "steps": len(steps)}
    if exact_steps is not None:
        a = np.concatenate([s["I"] for s in steps])
        b = np.concatenate([s["I"] for s in exact_steps])
        out["spearman_exact"] = spearman(a, b) if len(a) == len(b) else float("nan")
    return out


def measure(policy_path: str, prm_path: str, *, samples: int = 512, seed: int = 7,
            methods: Sequence[str] = DEFAULT_METHODS, nulls: Sequence[str] = NULLS, temperature: float = 1.0, log: Optional[Callable[[str], None]] = None,
            micro_batch_tokens: int = 16384, ops_per_step: Optional[int] = None) -> dict:
    """Sample ``samples`` responses of the policy on fresh problems and score each (method, null).
    ``ops_per_step``: the step length the truth is judged with (None: the one the policy was built for)."""
    from transformers import AutoModelForCausalLM

    from p2t.attribution import P2TScorer

    from .tokenizer import CharTokenizer

    log = log or (lambda s: None)
    for m in methods:
        if m.split(":")[0] not in METHODS:
            raise ValueError(f"unknown method {m!r}: choose from {', '.join(METHODS)} (integrated_gradients:K)")
    for n in nulls:
        if n not in NULLS:
            raise ValueError(f"unknown null {n!r}: choose from {', '.join(NULLS)}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if ops_per_step is None:
        ops_per_step = checkpoint_settings(policy_path).ops_per_step
    task.check_ops_per_step(ops_per_step)
    tok = CharTokenizer.from_pretrained(policy_path)
    policy = AutoModelForCausalLM.from_pretrained(policy_path).eval()
    problems = task.problems(seed, samples)
    torch.manual_seed(seed)
    ids = sample(policy, tok, [p.prompt for p in problems], temperature=temperature)
    responses = [tok.decode(r, skip_special_tokens=True) for r in ids]
    ok = [task.step_labels(p, r, ops_per_step) for p, r in zip(problems, responses)]
    log(f"localise: {samples} responses, {sum(map(len, ok))} steps, {sum(len(o) - sum(o) for o in ok)} wrong")
    rows, exact_cache = [], {}
    order = sorted(methods, key=lambda m: m != "exact")  # exact first: the others are compared with it
    for null in nulls:
        scorer = P2TScorer.from_pretrained(prm_path, kind="step_classifier", tokenizer=tok, null=null,
                                           micro_batch_tokens=micro_batch_tokens, **LAYOUT)
        for m in order:
            name, _, k = m.partition(":")
            t0 = time.time()
            batch = scorer.score([p.prompt for p in problems], responses, method=name, response_token_ids=ids,
                                 ig_steps=int(k) if k else None)
            steps = step_records(batch, problems, responses, ops_per_step)
            if m == "exact":
                exact_cache[null] = steps
            res = summarise(steps, exact_cache.get(null))
            res.update(method=m, null=null, seconds=round(time.time() - t0, 1))
            rows.append(res)
            log(f"localise: {m:24s} null {null:10s} AUROC(step) {res['auroc_step']:.3f} pooled "
                f"{res['auroc_pooled']:.3f} flagged {res['auroc_flagged']:.3f} entropy {res['entropy']:.3f} "
                f"({res['seconds']:.0f}s)")
    base = ("taylor", "taylor_per_step", "integrated_gradients", "exact")
    rows.sort(key=lambda r: (base.index(r["method"].split(":")[0]), int(r["method"].partition(":")[2] or 0),
                             NULLS.index(r["null"])))
    return {"samples": samples, "seed": seed, "temperature": temperature, "ops_per_step": ops_per_step, "rows": rows,
            "steps": sum(map(len, ok)), "wrong_steps": sum(len(o) - sum(o) for o in ok)}


def table(result: dict) -> str:
    lines = ["| method | null | AUROC within step | AUROC pooled | AUROC, PRM-flagged steps | lowest I is wrong | "
             "softmax entropy (paper) | entropy, standardized | mean abs I | Spearman vs exact | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sp = r.get("spearman_exact", float("nan"))
        lines.append(f"| {r['method']} | {r['null']} | {r['auroc_step']:.3f} | {r['auroc_pooled']:.3f} | "
                     f"{r['auroc_flagged']:.3f} | {r['top1']:.3f} | {r['entropy']:.3f} | {r['entropy_std']:.3f} | "
                     f"{r['abs_I']:.3f} | {'' if np.isnan(sp) else f'{sp:.2f}'} | {r['seconds']:.0f} |")
    r0 = result["rows"][0] if result["rows"] else {}
    lines.append("")
    lines.append(f"{result['samples']} policy samples (seed {result['seed']}, temperature {result['temperature']}), "
                 f"{r0.get('steps', 0)} steps, {r0.get('wrong_steps', 0)} wrong; {r0.get('mixed_steps', 0)} wrong steps "
                 f"have both right and wrong tokens, {r0.get('flagged_steps', 0)} of them flagged by the PRM "
                 "(R_s < 0.5, taylor/pad).")
    return "\n".join(lines) + "\n"
