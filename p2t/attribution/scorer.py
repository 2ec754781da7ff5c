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

from . import fused as fused_
from . import methods as M
from . import packing as packing_
from .batch import Assembly, PRMView, ScoredBatch
from .heads import KINDS, PRESETS
from .layout import AttributionWarning, Row, groups
from .methods import METHODS
from .plan import MicroBatch, plan
from .options import (NULLS, UNSET, check_advantages, check_call, check_ids, check_texts, default_max_length, embedding,
                      load_pretrained, resolve)

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

    Where the work lives: :mod:`.options` (these arguments checked and resolved, with the kind's preset),
    :mod:`.layout` (PRM inputs and the map onto policy tokens), :mod:`.heads`
    (how each kind reads its step log-odds), :mod:`.methods` (the attribution methods) and
    :mod:`.batch` (the output contract and :func:`token_rewards`).
    """

    def __init__(self, model, tokenizer, kind: Union[str, Callable] = "step_classifier", *,
                 policy_tokenizer=None, step_separator=UNSET, separator_suffix=UNSET, step_split=UNSET,
                 template=UNSET, system_prompt=UNSET, add_special_tokens: Optional[bool] = None,
                 null: Union[str, int] = "pad", objective: str = "logit", positive_label: int = 1,
                 value_index: int = 0, judge_tokens=("+", "-"), returns: str = "logit", read_at=UNSET,
                 micro_batch_tokens: int = 8192, max_length: Optional[int] = None, truncation: str = "steps",
                 ig_steps: int = 16, gradient_checkpointing: bool = False, autocast: Union[str, bool] = "auto",
                 output_device=None, packing: bool = False, pack_length: Optional[int] = None,
                 judge_logits: str = "all"):
        resolve(model, tokenizer, kind, policy_tokenizer=policy_tokenizer, step_separator=step_separator,
                separator_suffix=separator_suffix, step_split=step_split, template=template,
                system_prompt=system_prompt, add_special_tokens=add_special_tokens, null=null, objective=objective,
                positive_label=positive_label, value_index=value_index, judge_tokens=judge_tokens, returns=returns,
                read_at=read_at, micro_batch_tokens=micro_batch_tokens, max_length=max_length,
                truncation=truncation, ig_steps=ig_steps, gradient_checkpointing=gradient_checkpointing,
                autocast=autocast, output_device=output_device, packing=packing, pack_length=pack_length,
                judge_logits=judge_logits).apply(self)
        self._vmap_ok = True

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

    def _default_max_length(self) -> Optional[int]:
        return default_max_length(self.model, self.tokenizer)

    def _embedding(self):
        return embedding(self.model)

    @property
    def device(self) -> torch.device:
        return self._embedding().weight.device

    @property
    def _dtype(self) -> torch.dtype:
        """float64 for a float64 PRM, float32 otherwise: the dtype of scores and step rewards."""
        return torch.float64 if self._embedding().weight.dtype == torch.float64 else torch.float32

    # ------------------------------------------------------------------ model calls
    def _frozen(self):
        """Every parameter frozen and the modules in eval mode for the call (restored afterwards)."""
        return M.frozen(self.model, self.reward_fn, self.gradient_checkpointing)

    def _autocast(self):
        return M.autocast(self.device, self.autocast)

    def _margins(self, x, attn, ids, tstep, ro, prompt_mask, row_index) -> torch.Tensor:
        """Log-odds m_s [K] of every readout (row, position) (float32; float64 PRM: float64)."""
        return self.head.margins(self.model, x, attn, dict(input_ids=ids, step_index=tstep, readout_positions=ro,
                                                           prompt_mask=prompt_mask, row_index=row_index))

    def _attribute(self, mb: MicroBatch, method: str, ig_steps: int):
        """Attributions [b, L] and margins [K] of a micro-batch (``method=None``: ``None`` and margins)."""
        if mb.tensors is None:  # packed
            return packing_.attribute(self, mb.rows, method, ig_steps)
        return M.attribute(self, *self._micro_batch(mb), method, ig_steps)

    def _micro_batch(self, mb: MicroBatch):
        """(padded tensors, model inputs, ``inputs_embeds``) of a micro-batch."""
        t = mb.tensors
        inputs = {k: t[k] for k in ("input_ids", "step_index", "readout_positions", "prompt_mask", "row_index")}
        return t, inputs, self._inputs_embeds(mb.rows, t, inputs).detach()

    def _plan(self, live: List[Row], groups: List[List[int]], out: Assembly, packed: bool = False) -> List[MicroBatch]:
        return plan(live, groups, self._pad_id, self.device, out.dev, out.base, out.scores.shape[1], padded=not packed)

    def _inputs_embeds(self, rows: List[Row], t: dict, inputs: dict) -> torch.Tensor:
        """``inputs_embeds`` of a micro-batch: the embedding of its ids. The hook where a multimodal PRM
        merges its image features (:mod:`.multimodal`); it may add model inputs (``position_ids``) to
        ``inputs``."""
        return self._embedding()(t["input_ids"])

    def _groups(self, rows: List[Row], cost) -> List[List[int]]:
        return groups(rows, cost, self.micro_batch_tokens)

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

    def fuses(self, method: str = "taylor") -> bool:
        """Whether :meth:`advantages_ids` ends in the fused :func:`p2t.p2t_advantages` for ``method``
        (:func:`.fused.unfused_reason` says why not)."""
        return fused_.unfused_reason(self, method) is None

    def advantages_ids(self, prompts: Sequence[str], response_token_ids: Sequence[Sequence[int]], outcome_rewards,
                       *, group_size: int, alpha: float = 1.0, omega: float = 0.6, temperature: float = 1.0,
                       standardize: bool = False, normalize: str = "paper", scale: str = "group", eps: float = 1e-6,
                       mask: Optional[torch.Tensor] = None, length: Optional[int] = None, device=None,
                       method: str = "taylor", attributions: bool = True) -> ScoredBatch:
        """P2T token advantages ``A^_b + alpha * r_i`` of sampled completions, in one call.

        ``outcome_rewards`` ``[B]`` (``group_size`` consecutive responses per group), the options of
        :func:`p2t.p2t_advantages` and ``mask`` (``[B, N]``: where advantages are kept, e.g. the loss
        mask; 0 elsewhere; it does not change the steps; default: the response tokens). Returns the
        :meth:`score_ids` batch with ``advantages`` ``[B, N]`` float32 set. Where :meth:`fuses`, the call
        ends in :func:`p2t.p2t_advantages` on each micro-batch (:mod:`.fused`); otherwise
        in :meth:`ScoredBatch.token_rewards` and :func:`p2t.token_advantages` (equal within the ops'
        tolerances). ``attributions=False`` on the fused path leaves ``scores`` 0 (one read of the
        gradient and the embeddings per micro-batch instead of two).
        """
        check_ids(prompts, response_token_ids)
        dev = self._out_device(device)
        o, mask, length = check_advantages(outcome_rewards, len(prompts), group_size, scale, normalize, mask, length,
                                           dev)
        kw = dict(group_size=group_size, alpha=alpha, omega=omega, temperature=temperature, standardize=standardize,
                  normalize=normalize, scale=scale, eps=eps)
        if not self.fuses(method):
            sb = self.score_ids(prompts, response_token_ids, method=method, length=length, device=dev)
            return fused_.unfused(sb, o, mask, **kw)
        check_call(prompts, method, self.ig_steps)
        rows, lens, N, _ = self._rows(prompts, None, response_token_ids, length, dev, skip=True, stacklevel=4)
        with self._context(grad=True):
            return fused_.advantages(self, rows, lens, N, dev, o, mask, attributions=attributions, **kw)

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

    def _context(self, grad: bool):
        return M.call_context(self._frozen(), grad)

    def _score(self, prompts, responses, ids, method, ig_steps, length, device, skip: bool) -> ScoredBatch:
        """One scoring call; ``method=None``: the step rewards alone (no gradient)."""
        if method is not None:
            method, ig_steps = check_call(prompts, method, self.ig_steps if ig_steps is None else ig_steps)
        elif not prompts:
            raise ValueError("responses is empty")
        rows, lens, N, dev = self._rows(prompts, responses, ids, length, device, skip)
        live = [r for r in rows if r is not None]
        cost = ((lambda r: r.length * max(1, r.num_steps)) if method == "taylor_per_step"  # noqa: E731
                else (lambda r: r.length))
        with self._context(grad=method is not None):
            out = Assembly(rows, lens, N, dev, self._dtype, self.tokenizer)
            packed = self.packing and method not in ("exact", None)
            groups = (packing_.plan(self.model, live, self.pack_length, self.micro_batch_tokens,
                                    per_step=method == "taylor_per_step")
                      if packed and live else self._groups(live, cost))
            for mb in self._plan(live, groups, out, packed=packed):
                out.add(mb, *self._attribute(mb, method, ig_steps))
        return out.finish(method or "none", self.objective)

