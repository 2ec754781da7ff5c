"""PRM attribution engine: prompt/response text -> per-token attributions, segment ids and step rewards.

``P2TScorer`` wraps a process reward model (a step classifier, a value head, an LM judge or a reward
function of your own) and returns a :class:`ScoredBatch` whose ``scores``, ``segment_ids`` and
``segment_rewards`` go straight into :func:`p2t.segment_redistribute` / :func:`p2t.p2t_advantages`;
:func:`token_rewards` turns it into the token rewards of each mode (outcome / process / p2t).
"""
from __future__ import annotations

from ..options import METHODS, MODES, NORMALIZE, NULLS, SCALES  # noqa: F401  (the option values, defined once)
from ..rewards import token_rewards  # noqa: F401
from .engine import Engine  # noqa: F401
from .scorer import KINDS, PRESETS, AttributionWarning, P2TScorer, PRMView, ScoredBatch  # noqa: F401

__all__ = ["P2TScorer", "ScoredBatch", "PRMView", "AttributionWarning", "Engine", "KINDS", "METHODS", "NULLS",
           "PRESETS",
           "MiniLMStepReward", "MultimodalP2TScorer", "token_rewards", "MODES", "NORMALIZE", "SCALES"]


def __getattr__(name):
    if name == "MiniLMStepReward":
        from .minilm import MiniLMStepReward
        return MiniLMStepReward
    if name == "MultimodalP2TScorer":
        from .multimodal import MultimodalP2TScorer
        return MultimodalP2TScorer
    raise AttributeError(f"module 'p2t.attribution' has no attribute {name!r}")
