"""What a GRPO run trains and rewards, resolved from its config in one place: the device, the policy and
its tokenizer, the PRM scorer, the outcome reward, the training prompts, the evaluation rows and the
extra per-update metrics; and :class:`GRPOTrainer`, the loop (:class:`p2t.grpo.trainer.GRPOLoop`) built
from a config.

The toy lab is used for everything the config leaves unset: no ``policy`` (the lab's SFT policy), or a
``policy`` directory saved by an earlier lab run (its character tokenizer says so), so that a run can
continue from a saved lab policy. :func:`uses_lab` is the one place that decides it (it reads that
directory; the config's own checks read nothing from disk), :func:`check` the one place that checks
what a run of one's own needs (a PRM, prompts, a reward).

    trainer = GRPOTrainer(config)                      # resolve, then build the loop
    setup = resolve(config); trainer = GRPOTrainer(config, setup)   # the same, in two steps
"""
from __future__ import annotations

import importlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..rewards import get_mode
from .config import GRPOConfig
from .lab import LAYOUT as LAB_LAYOUT
from .lab import CharTokenizer, ensure_lab, task
from .trainer import GRPOLoop

__all__ = ["GRPOTrainer", "Setup", "resolve", "check", "uses_lab", "is_lab_policy", "LabPrompts", "DatasetPrompts",
           "scorer_options", "lab_metrics"]


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
    """The run uses the toy lab's PRM, reward, prompts and evaluation set: no policy of the user's own
    (none named, or a directory saved by a lab run)."""
    return config.uses_lab or is_lab_policy(config.policy)


def check(config: GRPOConfig, *, scorer=None, reward_fn=None, prompt_source=None) -> bool:
    """What a run of one's own policy needs, checked before anything is loaded: a PRM for a mode that
    reads one, training prompts and an outcome reward (from the config, or passed in). Returns
    :func:`uses_lab`. A ``ValueError`` names what is missing."""
    c = config.validate()
    lab = uses_lab(c)
    if not lab:
        if get_mode(c.mode).needs_prm and c.prm is None and scorer is None:
            raise ValueError(f"mode={c.mode!r} needs a process reward model: set prm (an HF id or a local path) "
                             "or use mode='outcome'")
        if c.train_data is None and prompt_source is None:
            raise ValueError("a policy of your own needs train_data (a JSONL of prompts) and a reward")
        if c.reward is None and reward_fn is None:
            raise ValueError("set reward='module:function' (the outcome reward)")
    return lab


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
        opts = dict(tokenizer=policy_tokenizer, **LAB_LAYOUT)
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


def lab_metrics(lab_config) -> List[Callable[[Any], Dict[str, float]]]:
    """The toy lab's per-update metrics: the true step accuracy of the training samples (the task's own
    step labels, which the PRM only estimates)."""
    ops = lab_config.ops_per_step

    def step_accuracy(rollout) -> Dict[str, float]:
        labels = [ok for p, s in zip(rollout.prompts, rollout.responses)
                  for ok in task.step_labels(task.parse_prompt(p), s, ops)]
        return {"step_accuracy": sum(labels) / max(len(labels), 1)}
    return [step_accuracy]


@dataclass
class Setup:
    """Everything a :class:`~p2t.grpo.trainer.GRPOLoop` needs besides its config."""
    device: torch.device
    policy: Any
    tokenizer: Any
    scorer: Any
    reward_fn: Callable[..., Sequence[Any]]   # fn(prompts, responses, **columns): floats or (reward, correct) pairs
    prompt_source: Callable[[int, int], List[dict]]
    eval_rows: List[dict]
    lab: bool
    metrics: List[Callable[[Any], Dict[str, float]]] = field(default_factory=list)  # fn(rollout) -> record entries


def resolve(config: GRPOConfig, *, policy=None, tokenizer=None, scorer=None, reward_fn=None, prompt_source=None,
            eval_rows: Optional[List[dict]] = None, metrics: Optional[list] = None,
            log: Optional[Callable[[str], None]] = None) -> Setup:
    """Fill in what the caller did not pass, from the config (the lab's pieces where it says nothing);
    :func:`check` first. Sets torch's CPU threads (``config.threads``; 1 for the toy lab)."""
    c = config
    log = log or (lambda s: None)
    lab = check(c, scorer=scorer, reward_fn=reward_fn, prompt_source=prompt_source)
    threads = c.threads or (1 if lab else None)  # see GRPOConfig.threads
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device)
    if c.bf16 and device.type != "cuda":
        raise ValueError("bf16=True needs a GPU (device cuda)")
    lab_paths = None
    if lab and policy is None:
        lab_paths = ensure_lab(c.lab, c.lab_cache, log=log, packaged=c.lab_packaged)
    if policy is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = c.policy or lab_paths["policy"]
        policy = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=c.trust_remote_code)
        if tokenizer is None and lab:
            tokenizer = CharTokenizer.from_pretrained(path)
        elif tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=c.trust_remote_code)
    if tokenizer is None:
        raise ValueError("a policy passed as a model needs its tokenizer")
    policy = policy.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if get_mode(c.mode).needs_prm and scorer is None:
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
            reward_fn = task.outcome_reward
        else:
            raise ValueError("set reward='module:function' (the outcome reward)")
    if eval_rows is None:
        if c.eval_data:
            eval_rows = read_jsonl(c.eval_data)
        elif lab:
            eval_rows = [{"prompt": p.prompt, "answer": p.answer} for p in task.problems(c.eval_seed, c.eval_prompts)]
        else:
            eval_rows = []
    eval_rows = eval_rows[:c.eval_prompts]
    if prompt_source is None:
        if c.train_data:
            prompt_source = DatasetPrompts(read_jsonl(c.train_data), c.seed)
        else:
            prompt_source = LabPrompts(c.seed, [r["prompt"] for r in eval_rows])
    if metrics is None:
        metrics = lab_metrics(c.lab) if lab else []
    return Setup(device, policy, tokenizer, scorer, reward_fn, prompt_source, eval_rows, lab, list(metrics))


class GRPOTrainer(GRPOLoop):
    """The lean GRPO loop (:class:`~p2t.grpo.trainer.GRPOLoop`) built from its config.

    Args:
        config: the settings (:class:`~p2t.grpo.GRPOConfig`).
        setup: a :class:`Setup` resolved earlier (:func:`resolve`); then none of the pieces below.
        policy, tokenizer: a loaded causal LM and its tokenizer (default: loaded from ``config.policy``,
            or the lab's SFT policy).
        scorer: a :class:`p2t.P2TScorer` (default: built from ``config.prm``, or the lab's PRM).
        reward_fn: outcome reward ``fn(prompts, responses, **columns)``: a float per response, or a
            ``(reward, correct)`` pair per response (floats: correct when ``>= config.correct_threshold``).
        prompt_source: ``fn(update, n) -> list of {"prompt": ..., other columns}``.
        eval_rows: evaluation prompts (rows like the above).
        metrics: callables ``fn(rollout) -> dict`` added to each update's record (default: the toy
            lab's step accuracy when training the lab).
        log: where progress lines go (e.g. the lab's build).
    """

    def __init__(self, config: GRPOConfig, setup: Optional[Setup] = None, *, policy=None, tokenizer=None,
                 scorer=None, reward_fn=None, prompt_source=None, eval_rows: Optional[List[dict]] = None,
                 metrics: Optional[list] = None, log: Optional[Callable[[str], None]] = None):
        pieces = dict(policy=policy, tokenizer=tokenizer, scorer=scorer, reward_fn=reward_fn,
                      prompt_source=prompt_source, eval_rows=eval_rows, metrics=metrics)
        if setup is None:
            setup = resolve(config, log=log, **pieces)
        elif any(v is not None for v in pieces.values()):
            given = ", ".join(k for k, v in pieces.items() if v is not None)
            raise TypeError(f"pass a resolved setup or the pieces to resolve ({given}), not both")
        super().__init__(config, setup, log=log)
