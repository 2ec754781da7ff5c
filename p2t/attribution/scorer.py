"""P2TScorer: prompt/response text (or policy token ids) -> per-token PRM attributions I, segment ids
and step rewards R_s, aligned to the policy's tokens.

One scoring call:

1. builds each PRM input (:mod:`.layout`): the prompt through a template, the response split into
   steps, a separator after every step (the step is read there);
2. runs the PRM with ``inputs_embeds`` as the only tensor that requires a gradient (every PRM
   parameter is frozen for the call and its ``requires_grad`` flag restored afterwards), in
   micro-batches of sequences sorted by length under a token budget;
3. reduces ``(inputs_embeds - e_null) . dF/d(inputs_embeds)`` (:mod:`.methods`);
4. scatters the attributions onto the policy's tokens on the output device (identity when both share
   a tokenizer, overlap of character spans otherwise) and numbers steps globally across the batch.

:meth:`P2TScorer.advantages_ids` goes on to the token advantages (fused: :mod:`.fused`);
:meth:`P2TScorer.rewards_ids` stops at the step rewards (one forward, no gradient).

What is differentiated (``objective``): each step's log-odds ``m_s = log(R_s / (1 - R_s))`` (the
logit margin, ``"logit"``, the default) or its probability ``R_s`` (``"prob"``). The margin does not
saturate: when the PRM is confident (R_s near 0 or 1) the gradient of R_s vanishes as R_s(1 - R_s),
and so would every attribution of a confident step; the margin keeps them comparable across steps.
Step rewards are reported as probabilities in both cases.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch

from ..options import METHODS, NULLS, P2TOptions
from ..rewards import get_mode
from . import fused as fused_
from . import methods as M
from . import packing as packing_
from .batch import Assembly, PRMView, ScoredBatch
from .engine import Engine
from .heads import KINDS, PRESETS
from .layout import Row
from .options import (ScorerOptions, check_advantages, check_call, check_ids, check_texts, load_pretrained,
                      resolve)
from .plan import MicroBatch
from .warn import AttributionWarning

__all__ = ["P2TScorer", "ScoredBatch", "PRMView", "AttributionWarning", "KINDS", "METHODS", "NULLS", "PRESETS"]


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
        max_length: the PRM's maximum input length (default: the smaller of the tokenizer's
            ``model_max_length`` and the model's position table).
        truncation: ``"steps"`` (drop trailing steps that do not fit, with an :class:`AttributionWarning`;
            their tokens get segment id -1 and score 0) or ``"error"``.
        ig_steps: default number of interpolation steps of ``integrated_gradients``.
        gradient_checkpointing: recompute activations in the backward (transformers models).
        autocast: ``"auto"`` (bf16 autocast when the PRM is on a GPU), ``True``/``False``.
        output_device: device of the returned tensors (default: the PRM's; ``score(device=)`` overrides it).
        packing: lay several PRM inputs end to end in one row, ``position_ids`` restarting per input
            (:mod:`.packing`; decoder PRMs whose attention separates packed inputs; not the ``exact`` method).
        pack_length: tokens of a packed row (default: the longest input of the call; the token budget
            under flash-attention).
        judge_logits: ``lm_judge`` logits at every position (``"all"``) or at the readout positions only
            (``"readout"``: no ``[L, vocab]`` logits, for long responses).

    Unknown options are a ``TypeError`` naming them (:data:`.options.DEFAULTS` lists every option and its
    default).

    Where the work lives: :mod:`.options` (these arguments checked and resolved, with the kind's preset,
    into :attr:`settings` and the :class:`~.engine.Engine` :attr:`engine` that every room receives),
    :mod:`.layout` (PRM inputs and the map onto policy tokens), :mod:`.heads` (how each kind reads its step
    log-odds), :mod:`.methods` (the attribution methods), :mod:`.plan` (micro-batches), :mod:`.packing`,
    :mod:`.fused` (the fused advantages) and :mod:`.batch` (the output contract).
    """

    def __init__(self, model, tokenizer, kind: Union[str, Callable] = "step_classifier", **options):
        self._options, engine = resolve(model, tokenizer, kind, options)
        self._engine = self._adapt(engine)

    def _adapt(self, engine: Engine) -> Engine:
        """The engine this scorer runs: the resolved one (a subclass returns its own variant, e.g. a
        vision-language PRM's layout and ``inputs_embeds``)."""
        return engine

    @classmethod
    def from_pretrained(cls, path_or_id: str, kind: str = "step_classifier", *, tokenizer=None, policy_tokenizer=None,
                        dtype=None, device=None, trust_remote_code: bool = False, model_class=None,
                        model_kwargs: Optional[dict] = None, **options) -> "P2TScorer":
        """Load a PRM and its tokenizer (local directory or hub id) and wrap them.

        ``kind`` picks the model class (token classification for ``step_classifier`` and
        ``value_head``, causal LM for ``lm_judge``; ``model_class`` overrides it). ``tokenizer`` and
        ``policy_tokenizer`` may be tokenizers or paths. ``trust_remote_code`` stays off unless asked.
        Other keyword options go to :class:`P2TScorer`. The loaded model is the scorer's own: it is
        returned in eval mode with every parameter frozen (``requires_grad=False``).
        """
        return load_pretrained(cls, path_or_id, kind, tokenizer=tokenizer, policy_tokenizer=policy_tokenizer,
                               dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                               model_class=model_class, model_kwargs=model_kwargs, **options)

    # ------------------------------------------------------------------ state (read-only)
    @property
    def engine(self) -> Engine:
        """The resolved engine state that every scoring call hands to the rooms (:mod:`.engine`)."""
        return self._engine

    @property
    def settings(self) -> ScorerOptions:
        """The scorer's options, checked and with the kind's preset filled in (the per-call redistribution
        and advantage options are a :class:`p2t.P2TOptions`)."""
        return self._options

    model = property(lambda self: self._engine.model, doc="The PRM.")
    tokenizer = property(lambda self: self._engine.tokenizer, doc="The PRM's tokenizer.")
    head = property(lambda self: self._engine.head, doc="How the PRM's output becomes step log-odds.")
    layout = property(lambda self: self._engine.layout, doc="The PRM inputs and their map onto policy tokens.")
    reward_fn = property(lambda self: self._engine.reward_fn, doc="The callable reward (kind a callable), or None.")
    kind = property(lambda self: self._options.kind)
    policy_tokenizer = property(lambda self: self._options.policy_tokenizer)
    same_tokenizer = property(lambda self: self._options.same_tokenizer)
    objective = property(lambda self: self._options.objective)
    null = property(lambda self: self._options.null)
    step_separator = property(lambda self: self._options.step_separator)
    step_split = property(lambda self: self._options.step_split)
    template = property(lambda self: self._options.template)
    read_at = property(lambda self: self._options.read_at)
    max_length = property(lambda self: self._options.max_length)
    truncation = property(lambda self: self._options.truncation)
    micro_batch_tokens = property(lambda self: self._options.micro_batch_tokens)
    ig_steps = property(lambda self: self._options.ig_steps)
    packing = property(lambda self: self._options.packing)
    pack_length = property(lambda self: self._options.pack_length)
    output_device = property(lambda self: self._options.output_device)

    @property
    def null_embedding(self) -> torch.Tensor:
        """e_null ``[D]`` in the space of the PRM's ``inputs_embeds``."""
        return self._engine.null_embed

    _null_embed = null_embedding  # the older name, read by callers

    @property
    def device(self) -> torch.device:
        return self._engine.device

    # ------------------------------------------------------------------ public
    def score(self, prompts: Sequence[str], responses: Sequence[str], *, method: str = "taylor",
              response_token_ids: Optional[Sequence[Sequence[int]]] = None, ig_steps: Optional[int] = None,
              length: Optional[int] = None, device=None) -> ScoredBatch:
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
            length: columns of the output (default: the longest response); shorter responses are padded.
            device: device of the output (default: ``output_device``, else the PRM's).
        Returns:
            a :class:`ScoredBatch`.
        """
        check_texts(prompts, responses, response_token_ids)
        return self._score(prompts, responses, response_token_ids, method, ig_steps, length, device, skip=False)

    def score_ids(self, prompts: Sequence[str], response_token_ids: Sequence[Sequence[int]], *,
                  method: str = "taylor", ig_steps: Optional[int] = None, length: Optional[int] = None,
                  device=None) -> ScoredBatch:
        """:meth:`score` for callers that hold the policy's token ids (sampled completions): the
        response text is decoded from the ids (never re-tokenized) and the output is aligned to them,
        ``length`` columns on ``device``. A response without a step (no token, only whitespace or
        special tokens) is not sent to the PRM: its tokens get segment id -1 and score 0, its view is
        ``None``."""
        check_ids(prompts, response_token_ids)
        return self._score(prompts, None, response_token_ids, method, ig_steps, length, device, skip=True)

    def rewards_ids(self, prompts: Sequence[str], response_token_ids: Sequence[Sequence[int]], *,
                    length: Optional[int] = None, device=None) -> ScoredBatch:
        """:meth:`score_ids` without attributions (``scores`` 0): the step rewards that process rewards
        need, from one forward per micro-batch under ``torch.no_grad`` (no backward, no activations kept)."""
        check_ids(prompts, response_token_ids)
        return self._score(prompts, None, response_token_ids, None, None, length, device, skip=True)

    def fuses(self, method: str = "taylor", options: Optional[P2TOptions] = None) -> bool:
        """Whether :meth:`advantages_ids` ends in the fused :func:`p2t.p2t_advantages` for ``method``
        under ``options`` (:meth:`unfused_reason` says why not)."""
        return self.unfused_reason(options, method=method) is None

    def unfused_reason(self, options: Optional[P2TOptions] = None, **overrides) -> Optional[str]:
        """Why :meth:`advantages_ids` under ``options`` (with ``overrides``) does not end in the fused op
        (``None``: it does)."""
        return fused_.unfused_reason(self._engine, P2TOptions.build(options, **overrides))

    def advantages_ids(self, prompts: Sequence[str], response_token_ids: Sequence[Sequence[int]], outcome_rewards,
                       *, group_size: int, options: Optional[P2TOptions] = None, mask: Optional[torch.Tensor] = None,
                       length: Optional[int] = None, device=None, attributions: bool = True,
                       **overrides) -> ScoredBatch:
        """Token advantages ``A^_b + alpha * r_i`` of sampled completions, in one call.

        ``outcome_rewards`` ``[B]`` (``group_size`` consecutive responses per group); ``options`` a
        :class:`p2t.P2TOptions` (default: its defaults) with ``overrides`` (its field names: ``mode``,
        ``omega``, ``omega_neg``, ``temperature``, ``standardize``, ``normalize``, ``alpha``, ``scale``,
        ``eps``, ``method``; the null embedding is the scorer's own); ``mask`` (``[B, N]``: where
        advantages are kept, e.g. the loss mask; 0 elsewhere; it does not change the steps; default: the
        response tokens). Returns the :meth:`score_ids` batch with ``advantages`` ``[B, N]`` float32 set.
        Where :meth:`fuses`, the call ends in :func:`p2t.p2t_advantages` on each micro-batch
        (:mod:`.fused`); otherwise in :func:`p2t.rewards.token_advantages_of` (equal within the ops'
        tolerances; a mode that reads no attribution, such as ``process``, takes :meth:`rewards_ids`'s one
        forward). ``attributions=False`` on the fused path leaves ``scores`` 0 (one read of the gradient
        and the embeddings per micro-batch instead of two).
        """
        opts = P2TOptions.build(options, **overrides)
        check_ids(prompts, response_token_ids)
        dev = self._out_device(device)
        o, mask, length = check_advantages(outcome_rewards, len(prompts), group_size, mask, length, dev)
        if fused_.unfused_reason(self._engine, opts) is not None:
            method = opts.method if get_mode(opts.mode).needs_attributions else None  # None: one forward
            sb = self._score(prompts, None, response_token_ids, method, None, length, dev, skip=True)
            return fused_.unfused(sb, o, mask, opts, group_size=group_size)
        check_call(prompts, opts.method, self.ig_steps)
        rows, lens, N, _ = self._rows(prompts, None, response_token_ids, length, dev, skip=True, stacklevel=4)
        with self._engine.context(grad=True):
            return fused_.advantages(self._engine, rows, lens, N, dev, o, mask, opts, group_size=group_size,
                                     attributions=attributions)

    # ------------------------------------------------------------------ one call
    def _rows(self, prompts, responses, ids, length, device, skip: bool, stacklevel: int = 5):
        """The PRM inputs, the response lengths, the output's columns and device of one call."""
        rows = self.layout.rows(prompts, responses, ids, hint=not skip, skip_empty=skip, stacklevel=stacklevel)
        lens = [r.num_policy if r is not None else len(ids[i]) for i, r in enumerate(rows)]
        N = max(lens) if length is None else int(length)
        if max(lens) > N:
            raise ValueError(f"a response has {max(lens)} tokens but length={N}")
        return rows, lens, N, self._out_device(device)

    def _out_device(self, device) -> torch.device:
        return torch.device(device if device is not None else (self.output_device or self.device))

    def _attribute(self, mb: MicroBatch, method: Optional[str], ig_steps: int):
        """Attributions [b, L] and margins [K] of a micro-batch (``method=None``: ``None`` and margins)."""
        if mb.tensors is None:  # packed
            return packing_.attribute(self._engine, mb.rows, method, ig_steps)
        return M.attribute(self._engine, *self._engine.micro_batch(mb), method, ig_steps)

    def _score(self, prompts, responses, ids, method, ig_steps, length, device, skip: bool) -> ScoredBatch:
        """One scoring call; ``method=None``: the step rewards alone (no gradient)."""
        if method is not None:
            method, ig_steps = check_call(prompts, method, self.ig_steps if ig_steps is None else ig_steps)
        elif not prompts:
            raise ValueError("responses is empty")
        rows, lens, N, dev = self._rows(prompts, responses, ids, length, device, skip)
        live: List[Row] = [r for r in rows if r is not None]
        cost = ((lambda r: r.length * max(1, r.num_steps)) if method == "taylor_per_step"  # noqa: E731
                else (lambda r: r.length))
        engine = self._engine
        with engine.context(grad=method is not None):
            out = Assembly(rows, lens, N, dev, engine.dtype, engine.tokenizer)
            packed = engine.packing and method not in ("exact", None)
            groups = (packing_.plan(engine.model, live, engine.pack_length, engine.micro_batch_tokens,
                                    per_step=method == "taylor_per_step")
                      if packed and live else engine.groups(live, cost))
            for mb in engine.plan(live, groups, out, packed=packed):
                out.add(mb, *self._attribute(mb, method, ig_steps))
        return out.finish(method or "none", engine.objective)
