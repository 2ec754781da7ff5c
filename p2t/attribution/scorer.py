"""P2TScorer: prompt/response text -> per-token PRM attributions I, segment ids and step rewards R_s.

One scoring call:

1. builds each PRM input: the prompt through a template, the response split into steps, a separator
   after every step (the step is read there) and the character span of every PRM token in the
   response;
2. runs the PRM with ``inputs_embeds`` as the only tensor that requires a gradient (every PRM
   parameter is frozen for the call and its ``requires_grad`` flag restored afterwards), in
   micro-batches of sequences sorted by length under a token budget;
3. reduces ``(inputs_embeds - e_null) . dF/d(inputs_embeds)`` with :func:`p2t.token_attribution`;
4. maps PRM-token attributions onto the policy's tokens (identity when both share a tokenizer,
   overlap of character spans otherwise) and numbers steps globally across the batch.

What is differentiated (``objective``): each step's log-odds ``m_s = log(R_s / (1 - R_s))`` (the
logit margin, ``"logit"``, the default) or its probability ``R_s`` (``"prob"``). The margin does not
saturate: when the PRM is confident (R_s near 0 or 1) the gradient of R_s vanishes as R_s(1 - R_s),
and so would every attribution of a confident step; the margin keeps them comparable across steps.
Step rewards are reported as probabilities in both cases. Measured on the toy lab's trained PRM
(24 responses, 618 step tokens, null="pad"): mean |I| is 0.098 with the margin and 0.014 with the
probability; Spearman(taylor, exact) is 0.03 and 0.06, i.e. on a character-level PRM replacing one
token by the null embedding is far outside the first-order regime whichever objective is used.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .align import Span, assign_steps, encode_with_offsets, offsets_from_ids, overlap_map, special_ids, split_steps

__all__ = ["P2TScorer", "ScoredBatch", "PRMView", "AttributionWarning", "KINDS", "METHODS", "NULLS", "PRESETS"]

KINDS = ("step_classifier", "value_head", "lm_judge")
METHODS = ("taylor", "taylor_per_step", "integrated_gradients", "exact")
NULLS = ("pad", "eos", "vocab_mean", "zero")
OBJECTIVES = ("logit", "prob")

QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# Conventions of the public PRMs of each kind; every entry can be overridden by a keyword option.
PRESETS: Dict[str, Dict[str, Any]] = {
    # Qwen2.5-Math-PRM / ReasonFlux-PRM-7B: chat template, question as the user turn, steps split on
    # blank lines, joined by <extra_0> with a trailing one; 2-class head, positive class 1.
    "step_classifier": dict(step_separator="<extra_0>", separator_suffix="", step_split="\n\n", template="chat",
                            system_prompt=QWEN_PRM_SYSTEM, read_at="separator"),
    # Skywork-o1-Open-PRM / ReasonFlux-PRM-1.5B: BOS + question + newline, one step per line, the
    # scalar value read at each line end through a sigmoid.
    "value_head": dict(step_separator="\n", separator_suffix="", step_split="\n", template="{prompt}\n{response}",
                       system_prompt=None, read_at="separator"),
    # Math-Shepherd / VisualPRM: a step tag after every step, P("+") against P("-") at the tag.
    "lm_judge": dict(step_separator=" ки", separator_suffix="\n", step_split="\n", template="{prompt} {response}",
                     system_prompt=None, read_at="separator"),
    # a reward function of the user's own
    "callable": dict(step_separator=None, separator_suffix="", step_split="\n\n", template="{prompt}\n{response}",
                     system_prompt=None, read_at="separator"),
}

_UNSET: Any = object()


class AttributionWarning(UserWarning):
    """Something in the inputs was changed to make them fit (truncation, re-decoded responses)."""


@dataclass
class PRMView:
    """The PRM-level view of one response, for inspection.

    ``input_ids``/``tokens``: the PRM input (prompt template, steps, separators); ``attributions``:
    float32 ``[L]`` per PRM token (0 outside steps); ``step_index``: ``[L]`` local step of each PRM
    token, -1 for prompt, separators and template; ``readout_positions``: where each step is read;
    ``step_rewards``/``step_logits``: R_s and its log-odds per step; ``step_spans``: character spans of
    the steps in ``response_text``; ``policy_spans``: character spans of the policy tokens.
    """
    input_ids: List[int]
    tokens: List[str]
    attributions: torch.Tensor
    step_index: torch.Tensor
    readout_positions: List[int]
    step_rewards: torch.Tensor
    step_logits: torch.Tensor
    step_spans: List[Span]
    response_text: str
    policy_spans: List[Span]
    prompt_length: int


@dataclass
class ScoredBatch:
    """Attributions on the policy's tokens, ready for :func:`p2t.segment_redistribute` /
    :func:`p2t.p2t_advantages`.

    scores: float32 ``[B, N]`` attribution per policy response token (N = longest response, left
        aligned: column 0 is the first response token), 0 on padding.
    segment_ids: int64 ``[B, N]`` global step ids (each step one contiguous run, ids in ``[0, S)``),
        -1 for tokens in no step (separators, whitespace between steps, truncated steps, padding).
    segment_rewards: float32 ``[S]`` step rewards R_s as probabilities in [0, 1].
    segment_logits: float32 ``[S]`` their log-odds (what ``objective="logit"`` differentiates).
    response_mask: bool ``[B, N]``, True on the response's tokens.
    steps_per_response: number of steps of each response (ids of response b follow those of b-1).
    prm: one :class:`PRMView` per response.
    """
    scores: torch.Tensor
    segment_ids: torch.Tensor
    segment_rewards: torch.Tensor
    segment_logits: torch.Tensor
    response_mask: torch.Tensor
    steps_per_response: List[int]
    prm: List[PRMView] = field(repr=False)
    method: str = "taylor"
    objective: str = "logit"

    def to(self, device) -> "ScoredBatch":
        """The same batch with its tensors (not the PRM views) on ``device``."""
        return ScoredBatch(self.scores.to(device), self.segment_ids.to(device), self.segment_rewards.to(device),
                           self.segment_logits.to(device), self.response_mask.to(device),
                           list(self.steps_per_response), self.prm, self.method, self.objective)


@dataclass
class _Row:
    index: int
    input_ids: List[int]
    token_step: List[int]
    readout: List[int]
    prompt_length: int
    prm_spans: List[Optional[Span]]
    map_prm: List[int]
    map_policy: List[int]
    map_weight: List[float]
    policy_step: List[int]
    policy_spans: List[Span]
    steps: List[Span]
    text: str


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def _choice(name, value, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


class P2TScorer:
    """Per-token attributions of a process reward model, on the policy's own tokens.

    Args:
        model: the PRM (a transformers model, or any module with ``get_input_embeddings()`` whose
            forward accepts ``inputs_embeds`` and ``attention_mask``).
        tokenizer: the PRM's tokenizer.
        kind: ``"step_classifier"`` (2-class token classification read at each separator, R_s the
            positive-class probability), ``"value_head"`` (a scalar per position through a sigmoid, read
            at each separator, or at the last token with ``read_at="last"``), ``"lm_judge"`` (a causal
            LM read at each step tag: R_s = P(+) / (P(+) + P(-))) or a callable
            ``reward_fn(inputs_embeds, attention_mask, **batch)`` returning one score per step
            (``[K]`` in readout order) or per position (``[B, L]``, read at the readout positions);
            ``batch`` holds ``input_ids``, ``step_index`` (``[B, L]`` local step per token, -1
            elsewhere), ``readout_positions`` (``[K, 2]`` row, position), ``prompt_mask`` (``[B, L]``)
            and ``row_index`` (``[B]``, the response's index in the scoring call).
        policy_tokenizer: the policy's tokenizer when it differs from the PRM's (attributions are
            mapped by character offsets); ``None`` or a tokenizer of the same class and vocabulary: the
            PRM's (identity mapping, no extra cost).
        step_separator: text inserted after every step; the step is read at its last token (a special
            token such as ``"<extra_0>"`` or ordinary text such as ``"\\n"``).
        separator_suffix: text after the separator's readout token (Math-Shepherd's newline after the tag).
        step_split: text between steps in the response (``"\\n\\n"``: blank lines; ``"\\n"``: one step
            per line), ``None`` (one step), or a callable ``text -> [(start, end), ...]``.
        template: ``"chat"`` (the tokenizer's chat template, the prompt as the user turn and the steps
            as the assistant turn), a string with ``{prompt}`` and ``{response}`` placeholders, or a
            callable ``prompt -> (text_before_response, text_after_response)``.
        system_prompt: system turn of the chat template (``None``: none).
        add_special_tokens: wrap string templates in the tokenizer's special tokens (BOS, CLS/SEP);
            default True for string templates, False for the chat template (it has its own).
        null: the null embedding e_null: ``"pad"``, ``"eos"``, ``"vocab_mean"``, ``"zero"`` or a token id.
        objective: ``"logit"`` (the step's log-odds, default: no saturation) or ``"prob"``.
        positive_label: positive class of ``step_classifier``.
        value_index: output channel of ``value_head``.
        judge_tokens: ``(positive, negative)`` token texts or ids of ``lm_judge``.
        returns: ``"logit"`` (the head's output goes through a sigmoid) or ``"prob"`` (it already is a
            probability) for ``value_head`` and callables.
        read_at: ``"separator"`` or ``"last"`` (``value_head`` models that score whole trajectories:
            the response is one step, read at the last token).
        micro_batch_tokens: token budget of one forward (rows x padded length; the ``exact`` method's
            perturbed copies count too).
        max_length: the PRM's maximum input length (default: the tokenizer's or the model config's).
        truncation: ``"steps"`` (drop trailing steps that do not fit, with an :class:`AttributionWarning`;
            their tokens get segment id -1 and score 0) or ``"error"``.
        ig_steps: default number of interpolation steps of ``integrated_gradients``.
        gradient_checkpointing: recompute activations in the backward (transformers models).
        autocast: ``"auto"`` (bf16 autocast when the PRM is on a GPU), ``True``/``False``.
        output_device: device of the returned tensors (default: the PRM's).
    """

    def __init__(self, model, tokenizer, kind: Union[str, Callable] = "step_classifier", *,
                 policy_tokenizer=None, step_separator=_UNSET, separator_suffix=_UNSET, step_split=_UNSET,
                 template=_UNSET, system_prompt=_UNSET, add_special_tokens: Optional[bool] = None,
                 null: Union[str, int] = "pad", objective: str = "logit", positive_label: int = 1,
                 value_index: int = 0, judge_tokens=("+", "-"), returns: str = "logit", read_at=_UNSET,
                 micro_batch_tokens: int = 8192, max_length: Optional[int] = None, truncation: str = "steps",
                 ig_steps: int = 16, gradient_checkpointing: bool = False, autocast: Union[str, bool] = "auto",
                 output_device=None):
        if model is None or not hasattr(model, "get_input_embeddings"):
            raise TypeError("model must be a PRM module with get_input_embeddings() (a transformers model), "
                            f"got {type(model).__name__}")
        if tokenizer is None or not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "decode"):
            raise TypeError(f"tokenizer must be a tokenizer with encode() and decode(), got {type(tokenizer).__name__}")
        if callable(kind) and not isinstance(kind, str):
            self.reward_fn, self.kind = kind, "callable"
        else:
            self.reward_fn, self.kind = None, _choice("kind", kind, KINDS)
        preset = PRESETS[self.kind]
        pick = lambda v, k: preset[k] if v is _UNSET else v  # noqa: E731
        self.model, self.tokenizer = model, tokenizer
        self.policy_tokenizer = tokenizer if policy_tokenizer is None else policy_tokenizer
        self.same_tokenizer = _same_tokenizer(self.policy_tokenizer, tokenizer)
        self.read_at = _choice("read_at", pick(read_at, "read_at"), ("separator", "last"))
        sep = pick(step_separator, "step_separator")
        if sep is None and self.kind == "callable":
            sep = getattr(tokenizer, "sep_token", None) or "\n"
        if self.read_at == "last" and step_separator is _UNSET:
            sep = ""
        if not isinstance(sep, str) or (not sep and self.read_at == "separator"):
            raise ValueError(f"step_separator must be a non-empty string, got {sep!r}")
        self.step_separator = sep
        self.separator_suffix = pick(separator_suffix, "separator_suffix") or ""
        self.step_split = pick(step_split, "step_split")
        if not (self.step_split is None or callable(self.step_split) or
                (isinstance(self.step_split, str) and self.step_split)):
            raise ValueError(f"step_split must be a non-empty string, None or a callable, got {self.step_split!r}")
        self.template = pick(template, "template")
        if not (self.template == "chat" or callable(self.template) or
                (isinstance(self.template, str) and "{response}" in self.template)):
            raise ValueError("template must be 'chat', a string with {prompt} and {response} placeholders or a "
                             f"callable prompt -> (before, after), got {self.template!r}")
        if self.template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' but the PRM tokenizer has no chat template; pass a string template "
                             "such as template='{prompt}\\n{response}'")
        self.system_prompt = pick(system_prompt, "system_prompt")
        self.add_special_tokens = (self.template != "chat") if add_special_tokens is None else bool(add_special_tokens)
        self.objective = _choice("objective", objective, OBJECTIVES)
        self.returns = _choice("returns", returns, ("logit", "prob"))
        self.positive_label, self.value_index = int(positive_label), int(value_index)
        self.truncation = _choice("truncation", truncation, ("steps", "error"))
        if not isinstance(micro_batch_tokens, int) or micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be a positive int, got {micro_batch_tokens!r}")
        self.micro_batch_tokens = micro_batch_tokens
        if not isinstance(ig_steps, int) or ig_steps < 1:
            raise ValueError(f"ig_steps must be a positive int, got {ig_steps!r}")
        self.ig_steps = ig_steps
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if autocast not in ("auto", True, False):
            raise ValueError(f"autocast must be 'auto', True or False, got {autocast!r}")
        self.autocast = autocast
        self.output_device = output_device
        self.max_length = self._default_max_length() if max_length is None else int(max_length)

        self._sep_ids = self._encode(self.step_separator) if self.step_separator else []
        if self.read_at == "separator" and not self._sep_ids:
            raise ValueError(f"step_separator={self.step_separator!r} encodes to no token with the PRM tokenizer "
                             f"({type(tokenizer).__name__}): the steps could not be read at it; pass a separator "
                             "the tokenizer keeps (e.g. its sep_token or a special token)")
        self._sep_suffix_ids = self._encode(self.separator_suffix) if self.separator_suffix else []
        if self.kind == "lm_judge":
            self._judge_ids = [self._token_id("judge_tokens", t) for t in judge_tokens]
            if len(self._judge_ids) != 2:
                raise ValueError(f"judge_tokens must be (positive, negative), got {judge_tokens!r}")
            vocab = _output_size(model)
            for t in self._judge_ids:
                if not 0 <= t < (vocab or t + 1):
                    raise ValueError(f"judge_tokens: token id {t} is outside the PRM's output vocabulary [0, {vocab})")
        if self.kind in ("step_classifier", "value_head"):
            n_out = _num_labels(model)
            name, idx = (("positive_label", self.positive_label) if self.kind == "step_classifier"
                         else ("value_index", self.value_index))
            if n_out is not None and not 0 <= idx < n_out:
                raise ValueError(f"{name}={idx} but the PRM's head has {n_out} output(s)")
        self._specials = self._special_wrap()
        self.null = null
        self._null_embed = self._make_null(null)
        self._pad_id = next((t for t in (getattr(tokenizer, "pad_token_id", None),
                                         getattr(tokenizer, "eos_token_id", None)) if t is not None), 0)
        self._vmap_ok = True
        self._policy_vocab = _vocab_size(self.policy_tokenizer)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(cls, path_or_id: str, kind: str = "step_classifier", *, tokenizer=None, policy_tokenizer=None,
                        dtype=None, device=None, trust_remote_code: bool = False, model_class=None,
                        model_kwargs: Optional[dict] = None, **options) -> "P2TScorer":
        """Load a PRM and its tokenizer (local directory or hub id) and wrap them.

        ``kind`` picks the model class (token classification for ``step_classifier`` and
        ``value_head``, causal LM for ``lm_judge``; ``model_class`` overrides it). ``tokenizer`` and
        ``policy_tokenizer`` may be tokenizers or paths. ``trust_remote_code`` stays off unless asked.
        Other keyword options go to :class:`P2TScorer`.
        """
        from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer

        if not isinstance(kind, str):
            raise TypeError("kind: a callable reward has no checkpoint to load; build the model yourself and pass "
                            "P2TScorer(model, tokenizer, kind=reward_fn)")
        _choice("kind", kind, KINDS)
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
        return cls(model, tok, kind, policy_tokenizer=policy_tokenizer, **options)

    def _default_max_length(self) -> Optional[int]:
        """The smaller of the tokenizer's ``model_max_length`` and the model's position table
        (``max_position_embeddings`` / ``n_positions``); ``None`` when neither is known."""
        cfg = getattr(self.model, "config", None)
        limits = [getattr(self.tokenizer, "model_max_length", None)]
        limits += [getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions")]
        limits = [int(n) for n in limits if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 10 ** 7]
        return min(limits) if limits else None

    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _token_id(self, name, t) -> int:
        if isinstance(t, int):
            return t
        ids = self._encode(t)
        if len(ids) != 1:
            raise ValueError(f"{name}: {t!r} is {len(ids)} tokens for the PRM tokenizer, expected one; pass token ids")
        return ids[0]

    def _special_wrap(self) -> Tuple[List[int], List[int]]:
        """Special tokens the tokenizer puts before and after a single sequence (BOS, CLS ... SEP)."""
        if not self.add_special_tokens:
            return [], []
        core = self._encode("a")
        full = list(self.tokenizer.encode("a", add_special_tokens=True))
        for i in range(len(full) - len(core) + 1):
            if full[i:i + len(core)] == core:
                return full[:i], full[i + len(core):]
        return [], []

    def _embedding(self):
        emb = self.model.get_input_embeddings()
        if emb is None or not hasattr(emb, "weight"):
            raise TypeError("model.get_input_embeddings() must return an embedding module with a weight")
        return emb

    def _make_null(self, null) -> torch.Tensor:
        """e_null in the space of ``get_input_embeddings()`` outputs (what ``inputs_embeds`` holds): token
        ids go through the embedding module, so embeddings that scale their output (Gemma) agree."""
        emb = self._embedding()
        weight = emb.weight
        if isinstance(null, bool) or not isinstance(null, (str, int)):
            raise TypeError(f"null must be one of {', '.join(map(repr, NULLS))} or a token id, got {null!r}")
        if isinstance(null, int):
            tid = null
        elif null == "zero":
            return torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
        elif null == "vocab_mean":
            scale = getattr(emb, "embed_scale", None)
            mean = weight.detach().float().mean(0)
            return (mean * (float(scale) if scale is not None else 1.0)).to(weight.dtype)
        elif null in ("pad", "eos"):
            tid = getattr(self.tokenizer, f"{null}_token_id", None)
            if tid is None:
                raise ValueError(f"null={null!r} but the PRM tokenizer has no {null} token; pass null='eos', "
                                 "'vocab_mean', 'zero' or a token id (e.g. null=tokenizer.unk_token_id)")
        else:
            raise ValueError(f"null must be one of {', '.join(map(repr, NULLS))} or a token id, got {null!r}")
        if not 0 <= tid < weight.shape[0]:
            raise ValueError(f"null token id {tid} is outside the PRM vocabulary [0, {weight.shape[0]})")
        return emb(torch.tensor([tid], device=weight.device))[0].detach().clone()

    @property
    def _dtype(self) -> torch.dtype:
        """float64 for a float64 PRM, float32 otherwise: the dtype of scores and step rewards."""
        return torch.float64 if self._embedding().weight.dtype == torch.float64 else torch.float32

    @property
    def device(self) -> torch.device:
        return self._embedding().weight.device

    # ------------------------------------------------------------------ inputs
    def _template_parts(self, prompt: str) -> Tuple[List[int], List[int]]:
        if self.template == "chat":
            mark = "\u2063P2T_RESPONSE\u2063"
            msgs = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
            msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": mark}]
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
            if text.count(mark) != 1:
                raise ValueError("template='chat': the chat template does not render the assistant turn verbatim; "
                                 "pass a string template")
            before, after = text.split(mark)
        elif callable(self.template):
            before, after = self.template(prompt)
        else:
            before, after = self.template.split("{response}", 1)
            before, after = before.replace("{prompt}", prompt), after.replace("{prompt}", prompt)
        head, tail = self._specials
        return (head + (self._encode(before) if before else []),
                (self._encode(after) if after else []) + tail)

    def _build_row(self, i: int, prompt: str, response: str, policy_ids: Optional[Sequence[int]]) -> _Row:
        ptok = self.policy_tokenizer
        if policy_ids is None:
            if not response:
                raise ValueError(f"responses[{i}] is empty")
            text = response
            ids, pspans = encode_with_offsets(ptok, response)
        else:
            if len(policy_ids) == 0:
                raise ValueError(f"response_token_ids[{i}] is empty")
            bad = [t for t in policy_ids if not 0 <= t < self._policy_vocab]
            if bad:
                raise ValueError(f"response_token_ids[{i}] holds the id {bad[0]}, outside the policy tokenizer's "
                                 f"vocabulary [0, {self._policy_vocab})")
            text, pspans = offsets_from_ids(ptok, policy_ids, text=response)
            ids = list(policy_ids)
            if text != response:
                warnings.warn(f"responses[{i}] differs from the decoded response_token_ids[{i}]; steps are taken "
                              "from the decoded tokens", AttributionWarning, stacklevel=3)
            if not text:
                raise ValueError(f"response_token_ids[{i}] decodes to an empty response")
        steps = split_steps(text, None if self.read_at == "last" else self.step_split)
        if not steps:
            raise ValueError(f"responses[{i}] has no step: nothing but whitespace between the step splits "
                             f"({self.step_split!r})")
        special = special_ids(ptok)
        has_text = [b > a or t not in special for t, (a, b) in zip(ids, pspans)]
        policy_step = assign_steps(pspans, steps, has_text)

        # PRM tokens of each step: (id, response char span, policy index or None)
        step_tokens: List[List[Tuple[int, Span, Optional[int]]]] = []
        if self.same_tokenizer:
            step_tokens = [[] for _ in steps]
            for j, k in enumerate(policy_step):
                if k >= 0 and has_text[j]:  # tokens without text (special tokens) stay out of the PRM input
                    step_tokens[k].append((ids[j], pspans[j], j))
        else:
            for a, b in steps:
                sids, sspans = encode_with_offsets(self.tokenizer, text[a:b])
                step_tokens.append([(t, (a + s0, a + s1), None) for t, (s0, s1) in zip(sids, sspans)])

        head, tail = self._template_parts(prompt)
        per_step = [len(t) + len(self._sep_ids) + len(self._sep_suffix_ids) for t in step_tokens]
        keep = len(steps)
        if self.max_length is not None:
            total = len(head) + sum(per_step) + len(tail)
            if total > self.max_length:
                if self.truncation == "error":
                    raise ValueError(f"responses[{i}]: the PRM input has {total} tokens, more than max_length="
                                     f"{self.max_length}; shorten it or pass truncation='steps'")
                while keep > 0 and len(head) + sum(per_step[:keep]) + len(tail) > self.max_length:
                    keep -= 1
                if keep == 0:
                    raise ValueError(f"responses[{i}]: not even its first step fits in the PRM's max_length="
                                     f"{self.max_length} ({len(head) + per_step[0] + len(tail)} tokens with the "
                                     "prompt)")
                warnings.warn(f"responses[{i}]: the PRM input has {total} tokens, more than max_length="
                              f"{self.max_length}; kept the first {keep} of {len(steps)} steps (the rest get "
                              "segment id -1 and score 0)", AttributionWarning, stacklevel=3)
        steps = steps[:keep]
        policy_step = [k if k < keep else -1 for k in policy_step]

        input_ids = list(head)
        token_step = [-1] * len(head)
        prm_spans: List[Optional[Span]] = [None] * len(head)
        readout: List[int] = []
        map_prm: List[int] = []
        map_policy: List[int] = []
        map_weight: List[float] = []
        for k in range(keep):
            for t, span, j in step_tokens[k]:
                if j is not None:
                    map_prm.append(len(input_ids))
                    map_policy.append(j)
                    map_weight.append(1.0)
                input_ids.append(t)
                token_step.append(k)
                prm_spans.append(span)
            if self.read_at == "separator":
                input_ids += self._sep_ids
                token_step += [-1] * len(self._sep_ids)
                prm_spans += [None] * len(self._sep_ids)
                readout.append(len(input_ids) - 1)
                input_ids += self._sep_suffix_ids
                token_step += [-1] * len(self._sep_suffix_ids)
                prm_spans += [None] * len(self._sep_suffix_ids)
            else:
                input_ids += self._sep_ids
                token_step += [-1] * len(self._sep_ids)
                prm_spans += [None] * len(self._sep_ids)
        input_ids += tail
        token_step += [-1] * len(tail)
        prm_spans += [None] * len(tail)
        if self.read_at == "last":
            readout = [len(input_ids) - 1]
        if not self.same_tokenizer:
            pos = [p for p, s in enumerate(token_step) if s >= 0]
            for src, dst, w in overlap_map([prm_spans[p] for p in pos], pspans):
                map_prm.append(pos[src])
                map_policy.append(dst)
                map_weight.append(w)
        return _Row(i, input_ids, token_step, readout, len(head), prm_spans, map_prm, map_policy, map_weight,
                    policy_step, pspans, steps, text)

    # ------------------------------------------------------------------ model calls
    @contextlib.contextmanager
    def _frozen(self):
        modules = [self.model] + ([self.reward_fn] if isinstance(self.reward_fn, torch.nn.Module) else [])
        params = [p for m in modules for p in m.parameters()]
        flags = [p.requires_grad for p in params]
        modes = [(m, m.training) for mod in modules for m in mod.modules()]
        ckpt_on = False
        try:
            for p in params:
                p.requires_grad_(False)
            for m in modules:
                m.eval()
            if self.gradient_checkpointing and not getattr(self.model, "is_gradient_checkpointing", False):
                if not getattr(self.model, "supports_gradient_checkpointing", False):
                    raise ValueError("gradient_checkpointing=True but the PRM does not support it")
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                ckpt_on = True
            if self.gradient_checkpointing:
                # transformers checkpoints a layer only in training mode: flag the layers alone, so
                # dropout and every other submodule stay in eval mode
                for m in self.model.modules():
                    if hasattr(m, "gradient_checkpointing") and type(m).__name__.endswith("Layer"):
                        m.training = True
            yield
        finally:
            if ckpt_on:
                self.model.gradient_checkpointing_disable()
            for m, mode in modes:
                m.training = mode
            for p, f in zip(params, flags):
                p.requires_grad_(f)

    def _autocast(self):
        dev = self.device
        on = self.autocast is True or (self.autocast == "auto" and dev.type == "cuda")
        if on and dev.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if on and self.autocast is True:
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _margins(self, x, attn, ids, tstep, ro, prompt_mask, row_index) -> torch.Tensor:
        """Log-odds m_s [K] of every readout (row, position) of the batch, in float32."""
        rows, pos = ro[:, 0], ro[:, 1]
        if self.kind == "callable":
            z = self.reward_fn(x, attn, input_ids=ids, step_index=tstep, readout_positions=ro,
                               prompt_mask=prompt_mask, row_index=row_index)
            if not isinstance(z, torch.Tensor):
                raise TypeError(f"reward_fn must return a tensor, got {type(z).__name__}")
            if z.dim() == 3 and z.shape[-1] == 1:
                z = z[..., 0]
            if z.dim() == 2:
                z = z[rows, pos]
            if z.shape != (ro.shape[0],):
                raise ValueError(f"reward_fn must return [K={ro.shape[0]}] step scores or [B, L] per-position scores, "
                                 f"got shape {tuple(z.shape)}")
            z = z if z.dtype == torch.float64 else z.float()
            return z if self.returns == "logit" else _logit(z)
        out = self.model(inputs_embeds=x, attention_mask=attn)
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
        sel = logits[rows, pos]
        sel = sel if sel.dtype == torch.float64 else sel.float()
        if self.kind == "step_classifier":
            c = sel.shape[-1]
            if not 0 <= self.positive_label < c or c < 2:
                raise ValueError(f"positive_label={self.positive_label} but the PRM has {c} classes")
            others = [j for j in range(c) if j != self.positive_label]
            return sel[:, self.positive_label] - torch.logsumexp(sel[:, others], dim=-1)
        if self.kind == "value_head":
            if sel.dim() == 2 and not 0 <= self.value_index < sel.shape[-1]:
                raise ValueError(f"value_index={self.value_index} but the PRM's head has {sel.shape[-1]} output(s)")
            v = sel[:, self.value_index] if sel.dim() == 2 else sel
            return v if self.returns == "logit" else _logit(v)
        plus, minus = self._judge_ids
        return sel[:, plus] - sel[:, minus]

    def _objective(self, m):
        return m if self.objective == "logit" else torch.sigmoid(m)

    def _groups(self, rows: List[_Row], cost) -> List[List[int]]:
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r].input_ids))
        groups, cur = [], []
        for r in order:
            if cur and (len(cur) + 1) * cost(rows[cur[0]]) > self.micro_batch_tokens:
                groups.append(cur)
                cur = []
            cur.append(r)
        if cur:
            groups.append(cur)
        return groups

    def _tensors(self, rows: List[_Row]):
        dev, b = self.device, len(rows)
        L = max(len(r.input_ids) for r in rows)
        ids = torch.full((b, L), self._pad_id, dtype=torch.long)
        attn = torch.zeros((b, L), dtype=torch.long)
        tstep = torch.full((b, L), -1, dtype=torch.long)
        pmask = torch.zeros((b, L), dtype=torch.bool)
        ro = []
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n] = torch.tensor(r.input_ids)
            attn[i, :n] = 1
            tstep[i, :n] = torch.tensor(r.token_step)
            pmask[i, :r.prompt_length] = True
            ro += [(i, p) for p in r.readout]
        ro = torch.tensor(ro, dtype=torch.long).reshape(-1, 2)
        row_index = torch.tensor([r.index for r in rows], dtype=torch.long)
        return [t.to(dev) for t in (ids, attn, tstep, pmask, ro, row_index)]

    def _attribute(self, rows: List[_Row], method: str, ig_steps: int):
        """Attributions [b, L] (float32) and margins [K] of a micro-batch."""
        ids, attn, tstep, pmask, ro, row_index = self._tensors(rows)
        amask = tstep >= 0
        x = self._embedding()(ids).detach()
        null = self._null_embed.to(device=x.device, dtype=x.dtype)
        call = lambda xx: self._margins(xx, attn, ids, tstep, ro, pmask, row_index)  # noqa: E731
        with self._autocast():
            if method == "taylor":
                xg = x.clone().requires_grad_(True)
                m = call(xg)
                g, = torch.autograd.grad(self._objective(m).sum(), xg)
            elif method == "taylor_per_step":
                xg = x.clone().requires_grad_(True)
                m = call(xg)
                g = self._per_step_grad(self._objective(m), xg, ro, tstep, rows)
            elif method == "integrated_gradients":
                g = torch.zeros(x.shape, dtype=self._dtype, device=x.device)
                for j in range(1, ig_steps + 1):
                    a = j / ig_steps
                    xa = x if j == ig_steps else torch.where(amask[..., None], null + a * (x - null), x)
                    xa = xa.detach().clone().requires_grad_(True)
                    mj = call(xa)
                    gj, = torch.autograd.grad(self._objective(mj).sum(), xa)
                    g += gj.to(self._dtype)
                    m = mj
                g /= ig_steps
            else:
                return self._exact(rows, x, null, attn, ids, tstep, pmask, ro, row_index, amask)
        if self._dtype == torch.float64:  # the ops reduce in float32: keep a float64 PRM's precision
            scores = ((x.double() - null.double()) * g.double()).sum(-1) * amask
        else:
            scores = _token_attribution(g, x, null, amask)
        return scores.detach(), m.detach()

    def _per_step_grad(self, f, xg, ro, tstep, rows):
        """dF_s/dx for the step s of every token, from one forward: K batched gradient outputs (the
        k-th step of every row at once; rows do not interact), one backward each when the model's
        backward cannot be vmapped."""
        local = torch.tensor([k for r in rows for k in range(len(r.readout))], dtype=torch.long, device=f.device)
        K = int(local.max().item()) + 1
        go = torch.zeros((K, f.shape[0]), dtype=f.dtype, device=f.device)
        go[local, torch.arange(f.shape[0], device=f.device)] = 1
        grads = None
        if self._vmap_ok and K > 1:
            try:
                grads, = torch.autograd.grad(f, xg, grad_outputs=go, is_grads_batched=True, retain_graph=True)
            except (RuntimeError, NotImplementedError):
                self._vmap_ok = False
        if grads is None:
            grads = torch.stack([torch.autograd.grad(f, xg, grad_outputs=go[k], retain_graph=k + 1 < K)[0]
                                 for k in range(K)])
        b, L = tstep.shape
        idx = tstep.clamp(min=0)
        return grads[idx, torch.arange(b, device=xg.device)[:, None], torch.arange(L, device=xg.device)[None, :]]

    def _exact(self, rows, x, null, attn, ids, tstep, pmask, ro, row_index, amask):
        """I_i = F(x) - F(x with token i replaced by e_null), F = sum of the row's step objectives;
        perturbed copies batched under the token budget. Nothing requires a gradient here, so no
        graph is recorded."""
        m0 = self._margins(x, attn, ids, tstep, ro, pmask, row_index)
        f0 = torch.zeros(len(rows), dtype=self._dtype, device=x.device).index_add(0, ro[:, 0], self._objective(m0))
        b, L, D = x.shape
        scores = torch.zeros((b, L), dtype=self._dtype, device=x.device)
        chunk = max(1, self.micro_batch_tokens // L)
        for r in range(b):
            P = amask[r].nonzero().flatten()
            ro_r = ro[ro[:, 0] == r]
            for c0 in range(0, P.numel(), chunk):
                pc = P[c0:c0 + chunk]
                c = pc.numel()
                xs = x[r:r + 1].expand(c, L, D).clone()
                xs[torch.arange(c, device=x.device), pc] = null
                ro_c = torch.stack([torch.arange(c, device=x.device).repeat_interleave(ro_r.shape[0]),
                                    ro_r[:, 1].repeat(c)], dim=1)
                m = self._margins(xs, attn[r:r + 1].expand(c, L), ids[r:r + 1].expand(c, L),
                                  tstep[r:r + 1].expand(c, L), ro_c, pmask[r:r + 1].expand(c, L),
                                  row_index[r:r + 1].expand(c))
                fc = torch.zeros(c, dtype=self._dtype, device=x.device).index_add(0, ro_c[:, 0], self._objective(m))
                scores[r, pc] = f0[r] - fc
        return scores, m0

    # ------------------------------------------------------------------ public
    def score(self, prompts: Sequence[str], responses: Sequence[str], *, method: str = "taylor",
              response_token_ids: Optional[Sequence[Sequence[int]]] = None,
              ig_steps: Optional[int] = None) -> ScoredBatch:
        """Attribute the PRM's step rewards to the tokens of each response.

        Args:
            prompts, responses: lists of strings of the same length.
            method: ``"taylor"`` (one forward and one backward w.r.t. inputs_embeds, all step
                objectives summed), ``"taylor_per_step"`` (the tokens of step s with dF_s only),
                ``"integrated_gradients"`` (``ig_steps`` points ``e_null + (j/k)(x - e_null)``,
                j = 1..k, on the step tokens; k = 1 is ``"taylor"``), ``"exact"`` (each step token
                replaced by e_null and the PRM re-run: the oracle).
            response_token_ids: the policy token ids of each response (e.g. the sampled completion);
                the output is aligned to them. Without it responses are tokenized with the policy
                tokenizer.
            ig_steps: overrides the scorer's ``ig_steps`` for this call.
        Returns:
            a :class:`ScoredBatch`.
        """
        method = _choice("method", method, METHODS)
        ig_steps = self.ig_steps if ig_steps is None else ig_steps
        if not isinstance(ig_steps, int) or ig_steps < 1:
            raise ValueError(f"ig_steps must be a positive int, got {ig_steps!r}")
        for name, seq in (("prompts", prompts), ("responses", responses)):
            if isinstance(seq, str) or not isinstance(seq, (list, tuple)):
                raise TypeError(f"{name} must be a list of strings, got {type(seq).__name__}")
            for i, s in enumerate(seq):
                if not isinstance(s, str):
                    raise TypeError(f"{name}[{i}] must be a string, got {type(s).__name__}")
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} prompts and "
                             f"{len(responses)} responses")
        if not responses:
            raise ValueError("responses is empty")
        if response_token_ids is not None:
            if len(response_token_ids) != len(responses):
                raise ValueError(f"response_token_ids has {len(response_token_ids)} rows but there are "
                                 f"{len(responses)} responses")
            response_token_ids = [t.tolist() if isinstance(t, torch.Tensor) else list(t) for t in response_token_ids]
        rows = [self._build_row(i, p, r, None if response_token_ids is None else response_token_ids[i])
                for i, (p, r) in enumerate(zip(prompts, responses))]

        per_row: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(rows)
        if method == "taylor_per_step":
            cost = lambda r: len(r.input_ids) * max(1, len(r.readout))  # noqa: E731
        else:
            cost = lambda r: len(r.input_ids)  # noqa: E731
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(self._frozen())
            for group in self._groups(rows, cost):
                grows = [rows[g] for g in group]
                scores, m = self._attribute(grows, method, ig_steps)
                scores, m = scores.to(self._dtype).cpu(), m.to(self._dtype).cpu()
                k0 = 0
                for i, g in enumerate(group):
                    n, k = len(rows[g].input_ids), len(rows[g].readout)
                    per_row[g] = (scores[i, :n].clone(), m[k0:k0 + k].clone())
                    k0 += k
        return self._assemble(rows, per_row, method)

    def _assemble(self, rows: List[_Row], per_row, method: str) -> ScoredBatch:
        B = len(rows)
        N = max(len(r.policy_spans) for r in rows)
        scores = torch.zeros((B, N), dtype=self._dtype)
        seg = torch.full((B, N), -1, dtype=torch.long)
        mask = torch.zeros((B, N), dtype=torch.bool)
        logits, views, steps = [], [], []
        base = 0
        for b, (r, (attr, m)) in enumerate(zip(rows, per_row)):
            n = len(r.policy_spans)
            mask[b, :n] = True
            if r.map_prm:
                vals = attr[torch.tensor(r.map_prm)] * torch.tensor(r.map_weight, dtype=self._dtype)
                scores[b].index_add_(0, torch.tensor(r.map_policy), vals)
            ps = torch.tensor(r.policy_step, dtype=torch.long)
            seg[b, :n] = torch.where(ps >= 0, ps + base, ps)
            base += len(r.readout)
            steps.append(len(r.readout))
            logits.append(m)
            conv = getattr(self.tokenizer, "convert_ids_to_tokens", None)
            tokens = list(conv(r.input_ids)) if conv else [self.tokenizer.decode([t]) for t in r.input_ids]
            views.append(PRMView(r.input_ids, tokens, attr, torch.tensor(r.token_step), list(r.readout),
                                 torch.sigmoid(m), m, list(r.steps), r.text, list(r.policy_spans), r.prompt_length))
        logits = torch.cat(logits)
        dev = self.device if self.output_device is None else torch.device(self.output_device)
        return ScoredBatch(scores.to(dev), seg.to(dev), torch.sigmoid(logits).to(dev), logits.to(dev), mask.to(dev),
                           steps, views, method, self.objective)


def _vocab_size(tokenizer) -> int:
    """Number of token ids of a tokenizer (added tokens included)."""
    try:
        return int(len(tokenizer))
    except TypeError:
        n = getattr(tokenizer, "vocab_size", None)
        return int(n) if isinstance(n, int) else 1 << 62


def _num_labels(model) -> Optional[int]:
    """Output channels of a token-classification head (``config.num_labels``), or ``None`` when unknown."""
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


def _same_tokenizer(a, b) -> bool:
    """The same object, or two loads of the same tokenizer (same class and vocabulary)."""
    if a is b:
        return True
    if type(a) is not type(b) or not hasattr(a, "get_vocab"):
        return False
    try:
        return a.get_vocab() == b.get_vocab()
    except Exception:  # noqa: BLE001 - tokenizers of the user's own without a usable vocabulary
        return False


def _token_attribution(grad, embeds, null, mask):
    from .. import ops
    return ops.token_attribution(grad, embeds, null, mask=mask)
