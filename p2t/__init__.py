"""p2t: process-to-token reward attribution for GRPO, with fused kernels.

The public ops live in :mod:`p2t.ops`; the PRM attribution engine (:class:`P2TScorer`) is imported
lazily so that ``import p2t`` stays light.
"""
from __future__ import annotations

from .ops import (available_backends, group_advantages, p2t_advantages, process_token_rewards,
                  segment_redistribute, token_advantages, token_attribution)
from .options import DEFAULTS, P2TOptions
from .rewards import register_mode, token_advantages_of, token_rewards

__version__ = "0.1.0"

__all__ = [
    "token_attribution", "segment_redistribute", "process_token_rewards", "group_advantages", "token_advantages", "p2t_advantages",
    "available_backends", "P2TScorer", "P2TOptions", "DEFAULTS", "token_rewards", "token_advantages_of",
    "register_mode", "__version__",
]


def __getattr__(name):
    if name in ("P2TScorer", "ScoredBatch"):
        from . import attribution
        return getattr(attribution, name)
    raise AttributeError(f"module 'p2t' has no attribute {name!r}")
