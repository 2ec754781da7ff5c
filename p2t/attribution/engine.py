"""The engine state: everything a scoring call needs, resolved once per scorer.

:class:`Engine` is what :class:`~p2t.attribution.P2TScorer` hands to its rooms (:mod:`.methods`,
:mod:`.fused`, :mod:`.packing`, :mod:`.multimodal`): the PRM and its head, the input layout, the null
embedding, the token budget, the autocast and packing settings, and the few steps every call repeats
(the freeze, the micro-batch plan, the ``inputs_embeds`` of a micro-batch). It is frozen; the one thing
a scorer learns while it runs (whether the PRM's backward can be vmapped) lives in its mutable
:class:`RunState`.

This module builds no engine itself: :func:`p2t.attribution.options.resolve` checks the scorer's
arguments and returns one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from . import methods as M
from .heads import Head
from .layout import Layout, Row, groups
from .plan import MicroBatch, plan

__all__ = ["Engine", "RunState", "Embeds", "embedding"]

# ``inputs_embeds`` of a padded micro-batch: (its rows, its tensors, the model inputs) -> ``[b, L, D]``; it may
# add model inputs (a vision-language PRM's ``position_ids``) to the third argument
Embeds = Callable[[List[Row], dict, dict], torch.Tensor]
INPUT_KEYS = ("input_ids", "step_index", "readout_positions", "prompt_mask", "row_index")


def embedding(model):
    """The PRM's input embedding module (one with a ``weight``)."""
    emb = model.get_input_embeddings()
    if emb is None or not hasattr(emb, "weight"):
        raise TypeError("model.get_input_embeddings() must return an embedding module with a weight")
    return emb


@dataclass
class RunState:
    """What a scorer learns while it runs: ``vmap_ok``, whether the PRM's backward takes batched gradient
    outputs (``taylor_per_step``; set False the first time it does not)."""
    vmap_ok: bool = True


@dataclass(frozen=True)
class Engine:
    """The resolved state of one scorer (see the module docstring).

    model, tokenizer: the PRM and its tokenizer; reward_fn: the callable reward (``kind`` a callable), else
        ``None``; head: how the PRM's output becomes step log-odds (:mod:`.heads`); layout: the PRM inputs
        and their map onto the policy's tokens (:mod:`.layout`).
    objective: ``"logit"`` or ``"prob"`` (what is differentiated); null_embed: e_null ``[D]``; pad_id: the id
        that pads micro-batches.
    micro_batch_tokens: the token budget of one forward; gradient_checkpointing, autocast: as the scorer's
        options.
    packing, pack_length: packed rows (:mod:`.packing`); position_offset: the position of a packed input's
        first token (0; ``padding_idx + 1`` for RoBERTa-family encoders).
    embeds: the ``inputs_embeds`` of a padded micro-batch (``None``: the token embeddings; a vision-language
        PRM merges its image features there, :mod:`.multimodal`).
    state: :class:`RunState`.
    """
    model: Any
    tokenizer: Any
    reward_fn: Optional[Callable]
    head: Head
    layout: Layout
    objective: str
    null_embed: torch.Tensor
    pad_id: int
    micro_batch_tokens: int
    gradient_checkpointing: bool
    autocast: Union[str, bool]
    packing: bool
    pack_length: Optional[int]
    position_offset: int = 0
    embeds: Optional[Embeds] = None
    state: RunState = field(default_factory=RunState)

    # ------------------------------------------------------------------ the model
    def embedding(self):
        return embedding(self.model)

    @property
    def device(self) -> torch.device:
        return self.embedding().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """float64 for a float64 PRM, float32 otherwise: the dtype of scores and step rewards."""
        return torch.float64 if self.embedding().weight.dtype == torch.float64 else torch.float32

    def margins(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor], inputs: dict) -> torch.Tensor:
        """Log-odds ``[K]`` of every readout (float32; float64 PRM: float64)."""
        return self.head.margins(self.model, x, attention_mask, inputs)

    def null(self, x: torch.Tensor) -> torch.Tensor:
        """e_null on ``x``'s device and in its dtype."""
        return self.null_embed.to(device=x.device, dtype=x.dtype)

    # ------------------------------------------------------------------ one call
    def context(self, grad: bool) -> contextlib.ExitStack:
        """One scoring call: out of inference mode, autograd on (off for step rewards alone), the PRM frozen
        and in eval mode (restored afterwards)."""
        return M.call_context(M.frozen(self.model, self.reward_fn, self.gradient_checkpointing), grad)

    def autocast_context(self):
        return M.autocast(self.device, self.autocast)

    def groups(self, rows: Sequence[Row], cost) -> List[List[int]]:
        """Padded micro-batches: rows sorted by length under the token budget."""
        return groups(rows, cost, self.micro_batch_tokens)

    def plan(self, live: Sequence[Row], groups_: Sequence[Sequence[int]], out,
             packed: bool = False) -> List[MicroBatch]:
        """The micro-batches of a call (``out``: its :class:`~p2t.attribution.batch.Assembly`)."""
        return plan(live, groups_, self.pad_id, self.device, out.dev, out.base, out.scores.shape[1], padded=not packed)

    def micro_batch(self, mb: MicroBatch):
        """(padded tensors, model inputs, ``inputs_embeds``) of a padded micro-batch."""
        t = mb.tensors
        inputs = {k: t[k] for k in INPUT_KEYS}
        x = self.embeds(mb.rows, t, inputs) if self.embeds is not None else self.embedding()(t["input_ids"])
        return t, inputs, x.detach()
