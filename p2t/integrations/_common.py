"""What every trainer integration shares: the scorer-level settings and the PRM -> token rewards step.

The redistribution and advantage options are :class:`p2t.P2TOptions` (one declaration, one check);
:class:`RewardSetup` holds them together with what only a trainer needs (extra ``score`` arguments, the
ops backend). The token rewards of a scored batch come from the mode registry
(:func:`p2t.rewards.token_rewards`); this module only calls the scorer and places its rows.

Plain torch and the public API only; no trainer framework is imported here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Sequence

import torch

from ..options import P2TOptions
from ..rewards import get_mode, token_rewards

__all__ = ["RewardSetup", "check_scorer", "prompt_text", "completion_rewards", "last_valid_index"]


@dataclass(frozen=True)
class RewardSetup:
    """A trainer's token-reward settings: the :class:`p2t.P2TOptions` and how the scorer is called.

    options: mode, ω, ω⁻, τ, standardize, normalize, α, method, null (see :class:`p2t.P2TOptions`).
    score_kwargs: extra keyword arguments for the scorer's ``score`` / ``score_ids``.
    backend: the ops backend (``"auto"`` picks the fastest for the device).
    """
    options: P2TOptions = field(default_factory=P2TOptions)
    score_kwargs: Dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.options, P2TOptions):
            raise TypeError(f"options must be a p2t.P2TOptions, got {type(self.options).__name__}")
        if not isinstance(self.score_kwargs, dict):
            raise TypeError(f"score_kwargs must be a dict, got {type(self.score_kwargs).__name__}")
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a string, got {type(self.backend).__name__}")

    @property
    def needs_prm(self) -> bool:
        return get_mode(self.options.mode).needs_prm


def check_scorer(scorer, mode: str):
    """The scorer is required (and must have ``score``) when the mode reads step rewards."""
    if not get_mode(mode).needs_prm:
        return
    if scorer is None:
        raise ValueError(f"scorer is required with mode={mode!r} (pass a p2t.P2TScorer, or use mode='outcome')")
    if not callable(getattr(scorer, "score", None)):
        raise TypeError(f"scorer must have a score(prompts, responses, ...) method (a p2t.P2TScorer), "
                        f"got {type(scorer).__name__}")


def prompt_text(prompt) -> str:
    """The question text for the PRM: a string prompt as is; for a conversation, the last user turn."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        msg = users[-1] if users else (prompt[-1] if prompt else {"content": ""})
        content = msg.get("content", "") if isinstance(msg, dict) else msg
        if isinstance(content, list):  # multimodal content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        return str(content)
    raise TypeError(f"prompts must be strings or conversations (lists of messages), got {type(prompt).__name__}")


def completion_rewards(scorer, prompts: Sequence[Any], responses: Sequence[str],
                       response_ids: Sequence[Sequence[int]], *, length: int, setup: RewardSetup,
                       device=None) -> torch.Tensor:
    """Per-token rewards ``[B, length]`` (float32) of the policy tokens ``response_ids`` under ``setup``.

    Row b holds ``r_i`` for the tokens ``response_ids[b]`` left-aligned, 0 after them and on tokens in no
    step; what ``r_i`` is comes from the registered mode (:func:`p2t.rewards.token_rewards`). A mode that
    reads no step reward makes no scorer call; one that reads no attribution uses the scorer's forward-only
    ``rewards_ids`` where it has one. Rows with no token or only whitespace are not sent to the PRM (their
    rewards are 0).
    """
    B = len(response_ids)
    if not (len(prompts) == len(responses) == B):
        raise ValueError(f"prompts, responses and response_ids must have the same length, got "
                         f"{len(prompts)}, {len(responses)} and {B}")
    out = torch.zeros(B, length, dtype=torch.float32, device=device)
    opts = setup.options
    mode = get_mode(opts.mode)
    if not mode.needs_prm:
        return out
    if callable(getattr(scorer, "score_ids", None)):  # a P2TScorer: one call, aligned and padded to length on device
        longest = max((len(x) for x in response_ids), default=0)
        if longest > length:
            raise ValueError(f"a response has {longest} tokens but the reward tensor has room for {length}")
        texts, ids = [prompt_text(p) for p in prompts], [list(map(int, x)) for x in response_ids]
        if not mode.needs_attributions and callable(getattr(scorer, "rewards_ids", None)):
            batch = scorer.rewards_ids(texts, ids, length=length, device=out.device)
        else:
            batch = scorer.score_ids(texts, ids, method=opts.method, length=length, device=out.device,
                                     **setup.score_kwargs)
        return token_rewards(batch, opts, backend=setup.backend).to(torch.float32)
    # any other object with score(): the rows it scored, placed into the reward tensor
    # rows without a token or with only whitespace/special tokens have no step: not sent to the PRM
    rows = [b for b in range(B) if len(response_ids[b]) > 0 and str(responses[b]).strip()]
    if not rows:
        return out
    longest = max(len(response_ids[b]) for b in rows)
    if longest > length:
        raise ValueError(f"a response has {longest} tokens but the reward tensor has room for {length}")
    batch = scorer.score([prompt_text(prompts[b]) for b in rows], [responses[b] for b in rows],
                         method=opts.method, response_token_ids=[list(map(int, response_ids[b])) for b in rows],
                         **setup.score_kwargs)
    r = token_rewards(batch, opts, backend=setup.backend)
    n = min(r.shape[1], length)
    out[torch.tensor(rows, device=out.device), :n] = r[:, :n].to(device=out.device, dtype=torch.float32)
    return out


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True per row of a ``[B, T]`` mask (-1 for an all-False row)."""
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(dim=-1).values
