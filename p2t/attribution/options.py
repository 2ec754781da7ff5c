"""The resolved options of a :class:`~p2t.attribution.P2TScorer`: the constructor's arguments
(:data:`DEFAULTS`, one declaration of every option and its default) checked, the kind's preset filled in
(:data:`~p2t.attribution.heads.PRESETS`), the PRM input :class:`Layout` and the head built, and the null
embedding taken from the model. :func:`resolve` does it once per scorer and returns the options
(:class:`ScorerOptions`) and the engine state (:class:`~p2t.attribution.engine.Engine`); every bad argument
is a ``ValueError`` or ``TypeError`` naming it. The redistribution and advantage options are not the
scorer's: they are a :class:`p2t.P2TOptions` per call (:meth:`P2TScorer.advantages_ids`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ..options import METHODS, NULLS, choice
from . import methods as M
from . import packing as packing_
from .engine import Engine, embedding
from .heads import HEADS, JUDGE_LOGITS, KINDS, PRESETS, CallableHead
from .layout import Layout
from .warn import warn_once

__all__ = ["ScorerOptions", "DEFAULTS", "resolve", "check_texts", "check_ids", "check_call", "NULLS", "OBJECTIVES",
           "UNSET"]

OBJECTIVES = ("logit", "prob")
UNSET: Any = object()  # "not passed": the kind's preset applies

# Every option of :class:`~p2t.attribution.P2TScorer` and its default (``UNSET``: the kind's preset); the
# scorer's docstring says what each does.
DEFAULTS: Dict[str, Any] = dict(
    policy_tokenizer=None, step_separator=UNSET, separator_suffix=UNSET, step_split=UNSET, template=UNSET,
    system_prompt=UNSET, add_special_tokens=None, null="pad", objective="logit", positive_label=1, value_index=0,
    judge_tokens=("+", "-"), returns="logit", read_at=UNSET, micro_batch_tokens=8192, max_length=None,
    truncation="steps", ig_steps=16, gradient_checkpointing=False, autocast="auto", output_device=None,
    packing=False, pack_length=None, judge_logits="all")


@dataclass(frozen=True)
class ScorerOptions:
    """Every option of a scorer after checking and presets (read through the scorer's attributes)."""
    kind: str
    policy_tokenizer: Any
    same_tokenizer: bool
    read_at: str
    step_separator: str
    separator_suffix: str
    step_split: Any
    template: Any
    system_prompt: Optional[str]
    add_special_tokens: bool
    objective: str
    returns: str
    positive_label: int
    value_index: int
    judge_tokens: Any
    judge_logits: str
    truncation: str
    micro_batch_tokens: int
    ig_steps: int
    gradient_checkpointing: bool
    autocast: Union[str, bool]
    output_device: Any
    max_length: Optional[int]
    packing: bool
    pack_length: Optional[int]
    null: Union[str, int]


def resolve(model, tokenizer, kind, options: Mapping[str, Any]) -> Tuple[ScorerOptions, Engine]:
    """Check the arguments of :class:`P2TScorer` (``options``: its keyword options, :data:`DEFAULTS` for
    the others; ``UNSET``: the kind's preset) and resolve them: the options and the engine state."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"P2TScorer got unknown option(s) {', '.join(map(repr, unknown))}; the options are "
                        f"{', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    if model is None or not hasattr(model, "get_input_embeddings"):
        raise TypeError("model must be a PRM module with get_input_embeddings() (a transformers model), "
                        f"got {type(model).__name__}")
    if tokenizer is None or not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "decode"):
        raise TypeError(f"tokenizer must be a tokenizer with encode() and decode(), got {type(tokenizer).__name__}")
    if callable(kind) and not isinstance(kind, str):
        reward_fn, kind_name = kind, "callable"
    else:
        reward_fn, kind_name = None, choice("kind", kind, KINDS)
    preset = PRESETS[kind_name]
    pick = lambda k: preset[k] if o[k] is UNSET else o[k]  # noqa: E731
    policy_tokenizer = tokenizer if o["policy_tokenizer"] is None else o["policy_tokenizer"]
    same = same_tokenizer(policy_tokenizer, tokenizer)
    read_at = choice("read_at", pick("read_at"), ("separator", "last"))
    sep = pick("step_separator")
    if sep is None and kind_name == "callable":
        sep = getattr(tokenizer, "sep_token", None) or "\n"
    if read_at == "last" and o["step_separator"] is UNSET:
        sep = ""
    if not isinstance(sep, str) or (not sep and read_at == "separator"):
        raise ValueError(f"step_separator must be a non-empty string, got {sep!r}")
    suffix = pick("separator_suffix") or ""
    split = pick("step_split")
    if not (split is None or callable(split) or (isinstance(split, str) and split)):
        raise ValueError(f"step_split must be a non-empty string, None or a callable, got {split!r}")
    template = pick("template")
    if not (template == "chat" or callable(template) or (isinstance(template, str) and "{response}" in template)):
        raise ValueError("template must be 'chat', a string with {prompt} and {response} placeholders or a "
                         f"callable prompt -> (before, after), got {template!r}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' but the PRM tokenizer has no chat template; pass a string template "
                         "such as template='{prompt}\\n{response}'")
    system_prompt = pick("system_prompt")
    specials = (template != "chat") if o["add_special_tokens"] is None else bool(o["add_special_tokens"])
    objective = choice("objective", o["objective"], OBJECTIVES)
    returns = choice("returns", o["returns"], ("logit", "prob"))
    positive_label, value_index = int(o["positive_label"]), int(o["value_index"])
    truncation = choice("truncation", o["truncation"], ("steps", "error"))
    for name in ("micro_batch_tokens", "ig_steps"):
        v = o[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    autocast = o["autocast"]
    if autocast not in ("auto", True, False):
        raise ValueError(f"autocast must be 'auto', True or False, got {autocast!r}")
    max_length = default_max_length(model, tokenizer) if o["max_length"] is None else int(o["max_length"])
    layout = Layout(tokenizer, policy_tokenizer, same, template=template, system_prompt=system_prompt,
                    add_special_tokens=specials, step_separator=sep, separator_suffix=suffix, step_split=split,
                    read_at=read_at, max_length=max_length, truncation=truncation)
    if read_at == "separator" and not layout.sep_ids:
        raise ValueError(f"step_separator={sep!r} encodes to no token with the PRM tokenizer "
                         f"({type(tokenizer).__name__}): the steps could not be read at it; pass a separator "
                         "the tokenizer keeps (e.g. its sep_token or a special token)")
    judge_logits = choice("judge_logits", o["judge_logits"], JUDGE_LOGITS)
    head = (CallableHead(kind, returns=returns) if kind_name == "callable" else
            HEADS[kind_name](positive_label=positive_label, value_index=value_index, returns=returns,
                             judge_tokens=o["judge_tokens"], judge_logits=judge_logits))
    head.check(model, tokenizer, layout.encode)
    packing, pack_length = bool(o["packing"]), o["pack_length"]
    offset = packing_.check(model, kind_name, pack_length) if packing else 0
    null = o["null"]
    null_embed = M.null_embedding(embedding(model), tokenizer, null)
    pad_id = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                   if t is not None), 0)
    resolved = ScorerOptions(
        kind=kind_name, policy_tokenizer=policy_tokenizer, same_tokenizer=same, read_at=read_at, step_separator=sep,
        separator_suffix=suffix, step_split=split, template=template, system_prompt=system_prompt,
        add_special_tokens=specials, objective=objective, returns=returns, positive_label=positive_label,
        value_index=value_index, judge_tokens=o["judge_tokens"], judge_logits=judge_logits, truncation=truncation,
        micro_batch_tokens=o["micro_batch_tokens"], ig_steps=o["ig_steps"],
        gradient_checkpointing=bool(o["gradient_checkpointing"]), autocast=autocast, output_device=o["output_device"],
        max_length=max_length, packing=packing, pack_length=pack_length, null=null)
    engine = Engine(model=model, tokenizer=tokenizer, reward_fn=reward_fn, head=head, layout=layout,
                    objective=objective, null_embed=null_embed, pad_id=pad_id,
                    micro_batch_tokens=resolved.micro_batch_tokens,
                    gradient_checkpointing=resolved.gradient_checkpointing, autocast=autocast, packing=packing,
                    pack_length=pack_length, position_offset=offset)
    return resolved, engine


def check_texts(prompts, responses, response_token_ids) -> None:
    """The arguments of :meth:`P2TScorer.score`: lists of strings of one length (and as many id rows)."""
    for name, seq in (("prompts", prompts), ("responses", responses)):
        if isinstance(seq, str) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list of strings, got {type(seq).__name__}")
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise TypeError(f"{name}[{i}] must be a string, got {type(s).__name__}")
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} prompts and "
                         f"{len(responses)} responses")
    if response_token_ids is not None and len(response_token_ids) != len(responses):
        raise ValueError(f"response_token_ids has {len(response_token_ids)} rows but there are "
                         f"{len(responses)} responses")


def check_ids(prompts, response_token_ids) -> None:
    """The arguments of :meth:`P2TScorer.score_ids`: a list of prompts and one id row per prompt."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(response_token_ids) != len(prompts):
        raise ValueError(f"response_token_ids has {len(response_token_ids)} rows but there are "
                         f"{len(prompts)} prompts")


def check_call(prompts, method, ig_steps):
    """The method and interpolation steps of one scoring call, checked; a call needs a response."""
    method = choice("method", method, METHODS)
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be a positive int, got {ig_steps!r}")
    if not prompts:
        raise ValueError("responses is empty")
    return method, ig_steps


def default_max_length(model, tokenizer) -> Optional[int]:
    """The smaller of the tokenizer's ``model_max_length`` and the model's position table
    (``max_position_embeddings`` / ``n_positions``); ``None`` when neither is known."""
    cfg = getattr(model, "config", None)
    limits = [getattr(tokenizer, "model_max_length", None)]
    limits += [getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions")]
    limits = [int(n) for n in limits if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 10 ** 7]
    return min(limits) if limits else None


def same_tokenizer(a, b) -> bool:
    """The same object, or two loads of the same tokenizer (same class and vocabulary). Tokenizers whose
    vocabulary cannot be read (``get_vocab`` not implemented) are taken as different, with a warning: the
    attributions are then mapped by character offsets and the fused path is off."""
    if a is b:
        return True
    if type(a) is not type(b) or not hasattr(a, "get_vocab"):
        return False
    try:
        return a.get_vocab() == b.get_vocab()
    except (NotImplementedError, AttributeError, TypeError) as e:  # a tokenizer without a vocabulary to compare
        warn_once(("same_tokenizer", type(a)), f"the policy and PRM tokenizers ({type(a).__name__}) are two objects "
                  f"whose vocabularies cannot be compared ({type(e).__name__}: {e}); they are taken as different "
                  "tokenizers (attributions mapped by character offsets, no fused advantages). Pass the same "
                  "tokenizer object (or policy_tokenizer=None) if they are one tokenizer", stacklevel=4)
        return False


def check_advantages(outcome_rewards, n: int, group_size, mask, length, device):
    """The arguments of :meth:`P2TScorer.advantages_ids` that the scorer uses itself, checked before
    any PRM call: ``(outcome_rewards float tensor on device, mask bool or None on device, length)``
    (the options are a checked :class:`p2t.P2TOptions`)."""
    o = outcome_rewards
    if not isinstance(o, torch.Tensor):
        o = torch.as_tensor(o, dtype=torch.float32)
    if o.dim() != 1 or o.shape[0] != n or not o.is_floating_point():
        raise ValueError(f"outcome_rewards must be a float tensor of shape ({n},) (one per response), got "
                         f"{o.dtype} {tuple(o.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"group_size must be a positive int dividing the {n} responses, got {group_size!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != n:
            raise ValueError(f"mask must be a [{n}, N] tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
        if length is not None and int(length) != mask.shape[1]:
            raise ValueError(f"length={length} but mask has {mask.shape[1]} columns")
        length, mask = mask.shape[1], mask.to(device).bool()
    return o.to(device), mask, length


def load_pretrained(cls, path_or_id: str, kind: str, *, tokenizer, policy_tokenizer, dtype, device,
                    trust_remote_code: bool, model_class, model_kwargs: Optional[dict], **options):
    """:meth:`P2TScorer.from_pretrained` (``cls``: the scorer class to build)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

    if not isinstance(kind, str):
        raise TypeError("kind: a callable reward has no checkpoint to load; build the model yourself and pass "
                        "P2TScorer(model, tokenizer, kind=reward_fn)")
    choice("kind", kind, KINDS)
    load_tok = lambda t: AutoTokenizer.from_pretrained(t, trust_remote_code=trust_remote_code)  # noqa: E731
    tok = load_tok(path_or_id) if tokenizer is None else (load_tok(tokenizer) if isinstance(tokenizer, str)
                                                            else tokenizer)
    if isinstance(policy_tokenizer, str):
        policy_tokenizer = load_tok(policy_tokenizer)
    if model_class is None:
        model_class = AutoModelForCausalLM if kind == "lm_judge" else AutoModelForTokenClassification
    kw = dict(model_kwargs or {})
    if dtype is not None:
        kw["dtype"] = dtype
    model = model_class.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, **kw)
    if device is not None:
        model.to(device)
    # the model loaded here is the scorer's own: frozen and in eval mode once, so that the freeze around
    # each scoring call finds nothing to switch (it walks the modules and flips nothing)
    model.eval().requires_grad_(False)
    return cls(model, tok, kind, policy_tokenizer=policy_tokenizer, **options)
