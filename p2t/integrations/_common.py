"""What every trainer integration shares: option checks and the PRM -> token rewards step.

Plain torch and the public ops only; no trainer framework is imported here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Sequence

import torch

from ..attribution.batch import MODES, NORMALIZE  # noqa: F401  (the option values, defined once)
from ..attribution.batch import token_rewards as scored_token_rewards


@dataclass(frozen=True)
class P2TOptions:
    """How PRM step rewards become token rewards and how they enter the advantages.

    mode: ``"outcome"`` (the outcome advantage only, no PRM call), ``"process"`` (every token of step s
        gets R_s: no redistribution inside the step), ``"p2t"`` (r_i from :func:`p2t.segment_redistribute`).
    alpha: weight of the token rewards in ``A~[b, i] = A^_b + alpha * r_i``.
    omega, temperature, standardize, normalize: the redistribution options of
        :func:`p2t.segment_redistribute` (used by ``mode="p2t"`` only).
    method: the attribution method passed to ``P2TScorer.score``.
    score_kwargs: extra keyword arguments for ``P2TScorer.score``.
    backend: the ops backend (``"auto"`` picks the fastest for the device).
    """

    mode: str = "p2t"
    alpha: float = 0.1
    omega: float = 0.6
    temperature: float = 1.0
    standardize: bool = False
    normalize: str = "paper"
    method: str = "taylor"
    score_kwargs: Dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("alpha", "omega", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.standardize, bool):
            raise TypeError(f"standardize must be a bool, got {type(self.standardize).__name__}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
        if not isinstance(self.method, str):
            raise TypeError(f"method must be a string, got {type(self.method).__name__}")
        if not isinstance(self.score_kwargs, dict):
            raise TypeError(f"score_kwargs must be a dict, got {type(self.score_kwargs).__name__}")


def check_scorer(scorer, mode: str):
    """The scorer is required (and must have ``score``) unless mode is ``"outcome"``."""
    if mode == "outcome":
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


def token_rewards(scorer, prompts: Sequence[Any], responses: Sequence[str], response_ids: Sequence[Sequence[int]],
                  *, length: int, options: P2TOptions, device=None) -> torch.Tensor:
    """Per-token rewards ``[B, length]`` (float32) for the policy tokens ``response_ids``.

    Row b holds ``r_i`` for the tokens ``response_ids[b]`` left-aligned, 0 after them and on tokens in no
    step. ``mode="process"`` gives ``R_s`` on every token of step s; ``mode="p2t"`` redistributes R_s
    inside the step with :func:`p2t.segment_redistribute`; ``mode="outcome"`` gives zeros. Rows with
    no token or only whitespace are not sent to the PRM (their rewards are 0).
    """
    B = len(response_ids)
    if not (len(prompts) == len(responses) == B):
        raise ValueError(f"prompts, responses and response_ids must have the same length, got "
                         f"{len(prompts)}, {len(responses)} and {B}")
    out = torch.zeros(B, length, dtype=torch.float32, device=device)
    if options.mode == "outcome":
        return out
    if callable(getattr(scorer, "score_ids", None)):  # a P2TScorer: one call, aligned and padded to length on device
        longest = max((len(x) for x in response_ids), default=0)
        if longest > length:
            raise ValueError(f"a response has {longest} tokens but the reward tensor has room for {length}")
        batch = scorer.score_ids([prompt_text(p) for p in prompts], [list(map(int, x)) for x in response_ids],
                                 method=options.method, length=length, device=out.device, **options.score_kwargs)
        return rewards_from_scored(batch, options).to(torch.float32)
    # any other object with score(): the rows it scored, placed into the reward tensor
    # rows without a token or with only whitespace/special tokens have no step: not sent to the PRM
    rows = [b for b in range(B) if len(response_ids[b]) > 0 and str(responses[b]).strip()]
    if not rows:
        return out
    longest = max(len(response_ids[b]) for b in rows)
    if longest > length:
        raise ValueError(f"a response has {longest} tokens but the reward tensor has room for {length}")
    batch = scorer.score([prompt_text(prompts[b]) for b in rows], [responses[b] for b in rows],
                         method=options.method, response_token_ids=[list(map(int, response_ids[b])) for b in rows],
                         **options.score_kwargs)
    r = rewards_from_scored(batch, options)
    n = min(r.shape[1], length)
    out[torch.tensor(rows, device=out.device), :n] = r[:, :n].to(device=out.device, dtype=torch.float32)
    return out


def rewards_from_scored(batch, options: P2TOptions) -> torch.Tensor:
    """Token rewards ``[B, N]`` from a scored batch (``scores``, ``segment_ids``, ``segment_rewards``,
    ``response_mask``): ``R_s`` per step token (``"process"``) or the redistributed ``r_i`` (``"p2t"``)."""
    return scored_token_rewards(batch, options.mode, omega=options.omega, temperature=options.temperature,
                                standardize=options.standardize, normalize=options.normalize,
                                backend=options.backend)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True per row of a ``[B, T]`` mask (-1 for an all-False row)."""
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(dim=-1).values

