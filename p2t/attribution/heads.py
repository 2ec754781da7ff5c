"""How a PRM's output becomes step log-odds: one small class per kind of PRM.

A head knows the conventions of its kind (:attr:`Head.preset`: separator, step split, template, where
the step is read), checks its options against the model at construction and turns one forward into
the log-odds ``m_s`` of every readout ``(row, position)`` (:meth:`Head.margins`). A new kind of PRM is
one more class in :data:`HEADS`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["forward_takes", "model_logits", "Head", "StepClassifierHead", "ValueHead", "LMJudgeHead", "CallableHead", "HEADS", "KINDS", "PRESETS",
           "QWEN_PRM_SYSTEM", "JUDGE_LOGITS"]

# lm_judge logits: at every position ("all") or at the readout positions only ("readout", logits_to_keep)
JUDGE_LOGITS = ("all", "readout")
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def _precise(t: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (a float64 PRM keeps its precision); anything else becomes float32."""
    return t if t.dtype == torch.float64 else t.float()


def forward_takes(model, name: str) -> bool:
    """Whether the model's forward has a parameter ``name`` (``False`` where its signature cannot be read)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def model_logits(model, x: torch.Tensor, attention_mask: Optional[torch.Tensor], position_ids=None,
                 **kw) -> torch.Tensor:
    """The model's logits; packed rows (``position_ids`` given) are called without a mask and without
    a cache, so that transformers separates the inputs by their restarting positions."""
    if position_ids is not None:
        kw.update(position_ids=position_ids, use_cache=False)
    out = model(inputs_embeds=x, attention_mask=attention_mask, **kw)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits


class Head:
    """Base class: ``margins(model, x, attention_mask, batch)`` -> ``[K]`` log-odds, float32 (float64
    for a float64 PRM). ``batch`` holds ``input_ids``, ``step_index``, ``readout_positions`` ``[K, 2]``,
    ``prompt_mask`` and ``row_index``."""

    kind = ""
    preset: Dict[str, Any] = {}

    def check(self, model, tokenizer, encode: Callable[[str], list]) -> None:
        """Validate the options against the model and tokenizer (at construction)."""

    def read(self, sel: torch.Tensor) -> torch.Tensor:
        """Log-odds from the model's outputs at the readout positions ``[K, C]``."""
        raise NotImplementedError

    def margins(self, model, x, attention_mask, batch: dict) -> torch.Tensor:
        ro = batch["readout_positions"]
        logits = model_logits(model, x, attention_mask, batch.get("position_ids"))
        return self.read(_precise(logits[ro[:, 0], ro[:, 1]]))


def _num_labels(model) -> Optional[int]:
    """Output channels of a token-classification head (``config.num_labels``), ``None`` when unknown."""
    cfg = getattr(model, "config", None)
    if cfg is None or type(model).__name__.endswith("ForCausalLM"):
        return None
    n = getattr(cfg, "num_labels", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _output_size(model) -> Optional[int]:
    """Vocabulary size of a causal LM's output layer (or its input embeddings), ``None`` when unknown."""
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        emb = model.get_input_embeddings()
    w = getattr(emb, "weight", None)
    return int(w.shape[0]) if w is not None else None


class StepClassifierHead(Head):
    """Token classification read at each separator; R_s = P(positive class) (Qwen2.5-Math-PRM,
    ReasonFlux-PRM-7B: chat template, steps on blank lines joined by ``<extra_0>``)."""

    kind = "step_classifier"
    preset = dict(step_separator="<extra_0>", separator_suffix="", step_split="\n\n", template="chat",
                  system_prompt=QWEN_PRM_SYSTEM, read_at="separator")

    def __init__(self, positive_label: int = 1, **_):
        self.positive_label = int(positive_label)

    def check(self, model, tokenizer, encode):
        n = _num_labels(model)
        if n is not None and not 0 <= self.positive_label < n:
            raise ValueError(f"positive_label={self.positive_label} but the PRM's head has {n} output(s)")

    def read(self, sel):
        c = sel.shape[-1]
        if not 0 <= self.positive_label < c or c < 2:
            raise ValueError(f"positive_label={self.positive_label} but the PRM has {c} classes")
        if c == 2:  # the other class alone: its logit is the log-sum-exp
            return sel[:, self.positive_label] - sel[:, 1 - self.positive_label]
        others = [j for j in range(c) if j != self.positive_label]
        return sel[:, self.positive_label] - torch.logsumexp(sel[:, others], dim=-1)


class ValueHead(Head):
    """A scalar per position through a sigmoid, read at each line end (Skywork-o1-Open-PRM,
    ReasonFlux-PRM-1.5B: BOS + question + newline, one step per line)."""

    kind = "value_head"
    preset = dict(step_separator="\n", separator_suffix="", step_split="\n", template="{prompt}\n{response}",
                  system_prompt=None, read_at="separator")

    def __init__(self, value_index: int = 0, returns: str = "logit", **_):
        self.value_index, self.returns = int(value_index), returns

    def check(self, model, tokenizer, encode):
        n = _num_labels(model)
        if n is not None and not 0 <= self.value_index < n:
            raise ValueError(f"value_index={self.value_index} but the PRM's head has {n} output(s)")

    def read(self, sel):
        if sel.dim() == 2 and not 0 <= self.value_index < sel.shape[-1]:
            raise ValueError(f"value_index={self.value_index} but the PRM's head has {sel.shape[-1]} output(s)")
        v = sel[:, self.value_index] if sel.dim() == 2 else sel
        return v if self.returns == "logit" else _logit(v)


class LMJudgeHead(Head):
    """A causal LM read at each step tag: R_s = P(+) / (P(+) + P(-)) (Math-Shepherd, VisualPRM)."""

    kind = "lm_judge"
    preset = dict(step_separator=" ки", separator_suffix="\n", step_split="\n", template="{prompt} {response}",
                  system_prompt=None, read_at="separator")

    def __init__(self, judge_tokens=("+", "-"), judge_logits: str = "all", **_):
        if judge_logits not in JUDGE_LOGITS:
            raise ValueError(f"judge_logits must be one of {', '.join(map(repr, JUDGE_LOGITS))}, got {judge_logits!r}")
        self.judge_tokens, self.judge_logits = judge_tokens, judge_logits
        self.ids = None

    def check(self, model, tokenizer, encode):
        def token_id(t) -> int:
            if isinstance(t, int):
                return t
            ids = encode(t)
            if len(ids) != 1:
                raise ValueError(f"judge_tokens: {t!r} is {len(ids)} tokens for the PRM tokenizer, expected one; "
                                 "pass token ids")
            return ids[0]
        self.ids = [token_id(t) for t in self.judge_tokens]
        if len(self.ids) != 2:
            raise ValueError(f"judge_tokens must be (positive, negative), got {self.judge_tokens!r}")
        vocab = _output_size(model)
        for t in self.ids:
            if not 0 <= t < (vocab or t + 1):
                raise ValueError(f"judge_tokens: token id {t} is outside the PRM's output vocabulary [0, {vocab})")
        if self.judge_logits == "readout":
            if not forward_takes(model, "logits_to_keep"):
                raise ValueError(f"judge_logits='readout' but the PRM ({type(model).__name__}) takes no "
                                 "logits_to_keep: its logits cannot be restricted to the readout positions; use "
                                 "judge_logits='all'")

    def margins(self, model, x, attention_mask, batch):
        if self.judge_logits == "all":
            return super().margins(model, x, attention_mask, batch)
        # the LM head at the readout positions only (the union over the rows): [b, P, V] logits, not [b, L, V]
        ro = batch["readout_positions"]
        keep, col = torch.unique(ro[:, 1], sorted=True, return_inverse=True)
        logits = model_logits(model, x, attention_mask, batch.get("position_ids"), logits_to_keep=keep)
        return self.read(_precise(logits[ro[:, 0], col]))

    def read(self, sel):
        plus, minus = self.ids
        return sel[:, plus] - sel[:, minus]


class CallableHead(Head):
    """A reward function of the user's own: ``reward_fn(inputs_embeds, attention_mask, **batch)``
    returning ``[K]`` step scores or ``[B, L]`` per-position scores (read at the readout positions)."""

    kind = "callable"
    preset = dict(step_separator=None, separator_suffix="", step_split="\n\n", template="{prompt}\n{response}",
                  system_prompt=None, read_at="separator")

    def __init__(self, reward_fn: Callable, returns: str = "logit", **_):
        self.reward_fn, self.returns = reward_fn, returns

    def margins(self, model, x, attention_mask, batch):
        ro = batch["readout_positions"]
        z = self.reward_fn(x, attention_mask, **batch)
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"reward_fn must return a tensor, got {type(z).__name__}")
        if z.dim() == 3 and z.shape[-1] == 1:
            z = z[..., 0]
        if z.dim() == 2:
            z = z[ro[:, 0], ro[:, 1]]
        if z.shape != (ro.shape[0],):
            raise ValueError(f"reward_fn must return [K={ro.shape[0]}] step scores or [B, L] per-position scores, "
                             f"got shape {tuple(z.shape)}")
        z = _precise(z)
        return z if self.returns == "logit" else _logit(z)


HEADS = {h.kind: h for h in (StepClassifierHead, ValueHead, LMJudgeHead)}
KINDS = tuple(HEADS)
# Conventions of the public PRMs of each kind; every entry can be overridden by a keyword option.
PRESETS: Dict[str, Dict[str, Any]] = {**{k: dict(h.preset) for k, h in HEADS.items()},
                                      "callable": dict(CallableHead.preset)}
