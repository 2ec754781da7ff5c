"""The token-reward modes: one registry, one :func:`token_rewards`.

A mode turns a scored batch (anything with ``scores`` ``[B, N]``, ``segment_ids`` ``[B, N]``,
``segment_rewards`` ``[S]`` and optionally ``response_mask``) and a :class:`~p2t.options.P2TOptions`
into per-token rewards ``[B, N]``. Registered here: ``outcome`` (zeros: the group advantage alone),
``process`` (R_s on every token of step s) and ``p2t`` (:func:`p2t.segment_redistribute`, with the
signed blame term when ``omega_neg > 0``). Adding a mode is one function::

    @register_mode("mine", needs_prm=True, needs_attributions=False)
    def mine(batch, options, backend):
        return ...   # [B, N] token rewards

This module knows the ops and the options; it knows nothing of PRMs or trainers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import ops
from .options import MODES, P2TOptions

__all__ = ["Mode", "register_mode", "get_mode", "token_rewards", "token_advantages_of", "MODES"]


@dataclass(frozen=True)
class Mode:
    """A registered mode: its token-reward function and what it needs from the scorer.

    needs_prm: the step rewards R_s are read (False: no PRM call at all).
    needs_attributions: the attributions I are read (False: the scorer's forward-only ``rewards_ids``).
    fusable: ``P2TScorer.advantages_ids`` may end in the fused :func:`p2t.p2t_advantages`.
    """
    name: str
    fn: Callable
    needs_prm: bool
    needs_attributions: bool
    fusable: bool = False


def register_mode(name: str, *, needs_prm: bool, needs_attributions: bool, fusable: bool = False):
    """Register ``fn(batch, options, backend) -> [B, N] token rewards`` as mode ``name``."""
    def deco(fn):
        if name in MODES:
            raise ValueError(f"mode {name!r} is already registered")
        MODES[name] = Mode(name, fn, needs_prm, needs_attributions, fusable)
        return fn
    return deco


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {name!r}")
    return MODES[name]


def _zeros(batch) -> torch.Tensor:
    dtype = batch.scores.dtype if getattr(batch, "scores", None) is not None else torch.float32
    return torch.zeros(batch.segment_ids.shape, dtype=dtype, device=batch.segment_ids.device)


def _validate(batch) -> bool:
    # a scorer's batch carries ids it built itself (in [-1, S), a step inside its response): checking
    # them again would read them back to the host (a device sync per call); other batches are checked
    return not getattr(batch, "ids_checked", False)


@register_mode("outcome", needs_prm=False, needs_attributions=False)
def _outcome(batch, options: P2TOptions, backend: str) -> torch.Tensor:
    return _zeros(batch)


@register_mode("process", needs_prm=True, needs_attributions=False)
def _process(batch, options: P2TOptions, backend: str) -> torch.Tensor:
    mask = getattr(batch, "response_mask", None)
    return ops.process_token_rewards(batch.segment_ids, batch.segment_rewards,
                                     mask=None if mask is None else mask.bool(), validate=_validate(batch))


@register_mode("p2t", needs_prm=True, needs_attributions=True, fusable=True)
def _p2t(batch, options: P2TOptions, backend: str) -> torch.Tensor:
    ids, mask = batch.segment_ids, getattr(batch, "response_mask", None)
    if mask is not None:
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, -1))
    return ops.segment_redistribute(batch.scores, ids, batch.segment_rewards, backend=backend,
                                    validate=_validate(batch), **options.redistribution)


def token_rewards(batch, options: Optional[P2TOptions] = None, *, backend: str = "auto", **overrides) -> torch.Tensor:
    """Per-token rewards ``[B, N]`` of a scored batch under ``options`` (``overrides``: option fields,
    e.g. ``mode="process"``), on the batch's device. Tokens in no step and padding get 0; a batch with
    no step at all gives zeros in every mode."""
    opts = P2TOptions.build(options, **overrides)
    mode = get_mode(opts.mode)
    if not mode.needs_prm or batch.segment_rewards.numel() == 0:
        return _zeros(batch)
    return mode.fn(batch, opts, backend)


def token_advantages_of(batch, outcome_rewards: torch.Tensor, options: Optional[P2TOptions] = None, *,
                        group_size: int, mask: Optional[torch.Tensor] = None, backend: str = "auto",
                        **overrides) -> torch.Tensor:
    """``Â + α·r`` of a scored batch: :func:`token_rewards` then :func:`p2t.token_advantages`
    (``mask``: where advantages are kept; default the batch's ``response_mask``)."""
    opts = P2TOptions.build(options, **overrides)
    r = token_rewards(batch, opts, backend=backend)
    if mask is None:
        mask = getattr(batch, "response_mask", None)
    return ops.token_advantages(outcome_rewards.to(r.device), r, group_size=group_size,
                                mask=None if mask is None else mask.bool(), backend=backend, **opts.advantage)
