"""What a GRPO run trains and rewards, resolved from its config in one place: the device, the policy and
its tokenizer, the PRM scorer, the outcome reward, the training prompts and the evaluation rows.

The toy lab is used for everything the config leaves unset: no ``policy`` (the lab's SFT policy), or a
``policy`` directory saved by an earlier lab run (its character tokenizer says so), so that a run can
continue from a saved lab policy. :func:`uses_lab` is the one place that decides it.
"""
from __future__ import annotations

import importlib
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch

from .config import GRPOConfig

__all__ = ["Setup", "resolve", "uses_lab", "is_lab_policy", "LabPrompts", "DatasetPrompts", "scorer_options"]


def is_lab_policy(path: Optional[str]) -> bool:
    """A directory holding a policy saved by the toy lab (its tokenizer is the lab's character tokenizer)."""
    if not path or not os.path.isdir(path):
        return False
    try:
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            return json.load(f).get("tokenizer_class") == "CharTokenizer"
    except (OSError, ValueError):
        return False


def uses_lab(config: GRPOConfig) -> bool:
    """The run uses the toy lab's PRM, reward, prompts and evaluation set: no policy of the user's own."""
    return config.policy is None or is_lab_policy(config.policy)


def import_fn(spec: str) -> Callable:
    if ":" not in spec:
        raise ValueError(f"reward must look like 'module:function', got {spec!r}")
    mod, name = spec.split(":", 1)
    return getattr(importlib.import_module(mod), name)


def read_jsonl(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows or any("prompt" not in r for r in rows):
        raise ValueError(f"{path}: every line must be a JSON object with a 'prompt'")
    return rows


class LabPrompts:
    """The lab's prompt source: fresh addition chains per update, never one of the evaluation prompts."""

    def __init__(self, seed: int, eval_prompts: Sequence[str]):
        self.seed = seed
        self.held_out = set(eval_prompts)

    def __call__(self, update: int, n: int) -> List[dict]:
        from .lab import task
        rng = random.Random(self.seed * 1_000_003 + update)
        out = []
        while len(out) < n:
            p = task.sample_problem(rng)
            if p.prompt not in self.held_out:
                out.append({"prompt": p.prompt, "answer": p.answer})
        return out


class DatasetPrompts:
    """Rows of a JSONL file, reshuffled every epoch from (seed, epoch)."""

    def __init__(self, rows: List[dict], seed: int):
        self.rows, self.seed = rows, seed

    def __call__(self, update: int, n: int) -> List[dict]:
        out, k = [], update * n
        while len(out) < n:
            epoch, i = divmod(k, len(self.rows))
            order = list(range(len(self.rows)))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            out.append(self.rows[order[i]])
            k += 1
        return out


def scorer_options(config: GRPOConfig, policy_tokenizer, lab: bool) -> dict:
    """P2TScorer options: the kind's conventions unless the config overrides them. The lab's PRM reads
    ``BOS prompt step\\n step\\n ...`` and shares the policy's tokenizer (identity token mapping)."""
    c = config
    if lab and c.prm is None:
        opts = dict(tokenizer=policy_tokenizer, step_separator="\n", step_split="\n", template="{prompt}{response}")
    else:
        opts = dict(policy_tokenizer=policy_tokenizer)
    for key, value in (("step_separator", c.step_separator), ("step_split", c.step_split),
                       ("template", c.prm_template)):
        if value is not None:
            opts[key] = value
    opts.update(packing=c.prm_packing, gradient_checkpointing=c.prm_gradient_checkpointing,
                judge_logits=c.prm_judge_logits)
    if c.prm_null is not None:
        opts["null"] = c.prm_null
    return opts


@dataclass
class Setup:
    """Everything a :class:`~p2t.grpo.GRPOTrainer` needs besides its config."""
    device: torch.device
    policy: Any
    tokenizer: Any
    scorer: Any
    reward_fn: Callable[..., List[float]]
    prompt_source: Callable[[int, int], List[dict]]
    eval_rows: List[dict]
    lab: bool


def resolve(config: GRPOConfig, *, policy=None, tokenizer=None, scorer=None, reward_fn=None, prompt_source=None,
            eval_rows: Optional[List[dict]] = None, log: Optional[Callable[[str], None]] = None) -> Setup:
    """Fill in what the caller did not pass, from the config (the lab's pieces where it says nothing)."""
    c = config
    log = log or (lambda s: None)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device)
    if c.bf16 and device.type != "cuda":
        raise ValueError("bf16=True needs a GPU (device cuda)")
    lab = uses_lab(c)
    lab_paths = None
    if lab and policy is None:
        from .lab.models import ensure_lab
        lab_paths = ensure_lab(c.lab, c.lab_cache, log=log, packaged=c.lab_packaged)
    if policy is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = c.policy or lab_paths["policy"]
        policy = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=c.trust_remote_code)
        if tokenizer is None and lab:
            from .lab.tokenizer import CharTokenizer
            tokenizer = CharTokenizer.from_pretrained(path)
        elif tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=c.trust_remote_code)
    if tokenizer is None:
        raise ValueError("a policy passed as a model needs its tokenizer")
    policy = policy.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if c.mode != "outcome" and scorer is None:
        if c.prm is None and lab_paths is None:
            raise ValueError(f"mode={c.mode!r} needs a process reward model: pass scorer= or set prm "
                             "(an HF id or a local path), or use mode='outcome'")
        from p2t.attribution import MultimodalP2TScorer, P2TScorer
        cls = MultimodalP2TScorer if c.prm_image_column is not None else P2TScorer
        scorer = cls.from_pretrained(c.prm or lab_paths["prm"], kind=c.prm_kind, device=device,
                                     **scorer_options(c, tokenizer, lab))
    elif scorer is not None and c.prm_null is not None and getattr(scorer, "null", c.prm_null) != c.prm_null:
        raise ValueError(f"prm_null={c.prm_null!r} but the scorer passed was built with null={scorer.null!r}; "
                         "build it with that null or leave prm_null unset")
    if reward_fn is None:
        if c.reward is not None:
            reward_fn = import_fn(c.reward)
        elif lab:
            from .lab.task import outcome_reward as reward_fn
        else:
            raise ValueError("set reward='module:function' (the outcome reward)")
    if eval_rows is None:
        if c.eval_data:
            eval_rows = read_jsonl(c.eval_data)
        elif lab:
            from .lab import task
            eval_rows = [{"prompt": p.prompt, "answer": p.answer} for p in task.problems(c.eval_seed, c.eval_prompts)]
        else:
            eval_rows = []
    eval_rows = eval_rows[:c.eval_prompts]
    if prompt_source is None:
        if c.train_data:
            prompt_source = DatasetPrompts(read_jsonl(c.train_data), c.seed)
        else:
            prompt_source = LabPrompts(c.seed, [r["prompt"] for r in eval_rows])
    return Setup(device, policy, tokenizer, scorer, reward_fn, prompt_source, eval_rows, lab)
