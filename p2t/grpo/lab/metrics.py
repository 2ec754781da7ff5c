"""What the lab's build measures and writes to ``lab_metrics.json``: the SFT policy's accuracy and what its
wrong steps got wrong, the PRM's step accuracy, recall and AUROC on policy samples; and the rank
statistics (AUROC, Spearman) they and :mod:`p2t.grpo.lab.localisation` use."""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from . import task
from .config import LabConfig
from .layout import pad, prm_example
from .sft import sample
from .tokenizer import CharTokenizer


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = v.argsort(kind="mergesort")
    sv = v[order]
    first = np.r_[True, sv[1:] != sv[:-1]]
    group = np.cumsum(first) - 1
    starts = np.nonzero(first)[0]
    ends = np.r_[starts[1:], len(v)]
    ranks = np.empty(len(v))
    ranks[order] = ((starts + ends + 1) / 2)[group]
    return ranks


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive outscores a negative), ties counting one half (Mann-Whitney U / n_pos n_neg)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = _ranks(np.concatenate([pos, neg]).astype(np.float64))
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); nan when either side is constant."""
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def policy_report(policy, tok: CharTokenizer, lab: LabConfig) -> dict:
    """The SFT policy on ``report_samples`` held-out problems: sampled (temperature 1) and greedy accuracy,
    the share of wrong steps and what the wrong steps got wrong (compare with the SFT noise: -10, -2, -1,
    +1, +2, +10 with equal odds)."""
    probs = task.problems(lab.seed + 2, lab.report_samples)
    prompts = [p.prompt for p in probs]
    torch.manual_seed(lab.seed + 2)
    sampled = [tok.decode(r) for r in sample(policy, tok, prompts, temperature=1.0)]
    greedy = [tok.decode(r) for r in sample(policy, tok, prompts, temperature=0.0)]
    acc = lambda resp: sum(task.outcome_reward(prompts, resp)) / max(len(prompts), 1)  # noqa: E731
    steps = [l for p, r in zip(probs, sampled) for l in task.step_labels(p, r, lab.ops_per_step)]
    kinds: dict = {}
    for p, r in zip(probs, sampled):
        for k in task.wrong_step_kinds(p, r, lab.ops_per_step):
            kinds[k] = kinds.get(k, 0) + 1
    n_wrong = max(sum(kinds.values()), 1)
    return {"sampled_accuracy": acc(sampled), "greedy_accuracy": acc(greedy),
            "wrong_step_share": 1 - sum(steps) / max(len(steps), 1), "steps": len(steps),
            "wrong_step_kinds": {k: round(v / n_wrong, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "samples": len(probs)}


@torch.no_grad()
def prm_step_metrics(prm, tok: CharTokenizer, data) -> dict:
    """Step accuracy, wrong-step recall and the AUROC of the step score for "wrong step" (how well R_s
    ranks wrong below right steps, whatever the threshold) of the PRM at separators on labelled inputs."""
    sep = tok.convert_tokens_to_ids(task.STEP_SEPARATOR)
    correct = total = wrong_hit = wrong = 0
    p_right: List[float] = []
    p_wrong: List[float] = []
    for i in range(0, len(data), 256):
        chunk = data[i:i + 256]
        ids = pad([b[0] for b in chunk], tok.pad_token_id)
        labels = pad([b[1] for b in chunk], -100)
        logits = prm(input_ids=ids, attention_mask=ids != tok.pad_token_id).logits.float()
        pred = logits.argmax(-1)
        prob = torch.softmax(logits, -1)[..., 1]
        m = (labels != -100) & (ids == sep)
        correct += int(((pred == labels) & m).sum())
        total += int(m.sum())
        wm = m & (labels == 0)
        wrong += int(wm.sum())
        wrong_hit += int(((pred == 0) & wm).sum())
        p_wrong += prob[wm].tolist()
        p_right += prob[m & (labels == 1)].tolist()
    return {"step_accuracy": correct / max(total, 1), "wrong_step_recall": wrong_hit / max(wrong, 1),
            "right_step_recall": (correct - wrong_hit) / max(total - wrong, 1),
            "step_auroc": auroc(-np.array(p_wrong), -np.array(p_right)), "steps": total, "wrong_steps": wrong}


@torch.no_grad()
def prm_report(prm, policy, tok: CharTokenizer, lab: LabConfig) -> dict:
    """PRM step metrics on ``report_samples`` fresh samples of the SFT policy (problems not trained on)."""
    probs = task.problems(lab.seed + 3, lab.report_samples)
    torch.manual_seed(lab.seed + 3)
    resp = sample(policy, tok, [p.prompt for p in probs], temperature=lab.prm_sample_temperature)
    out = prm_step_metrics(prm, tok, [prm_example(tok, p, tok.decode(r), lab.ops_per_step)
                                      for p, r in zip(probs, resp)])
    out["samples"] = len(probs)
    return out


def kinds_text(kinds: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in list(kinds.items())[:8])
