"""A lean GRPO trainer with token advantages of any registered mode (outcome, process, P2T), and the
embedded toy lab.

>>> from p2t.grpo import GRPOConfig, GRPOTrainer
>>> trainer = GRPOTrainer(GRPOConfig(mode="p2t", num_updates=50))   # the lab: tiny policy + PRM
>>> records = trainer.train()                                        # metrics.jsonl, curves.png, checkpoint.pt

Modules: :mod:`.config` (the settings), :mod:`.setup` (what a run trains and rewards, resolved from the
config; :class:`GRPOTrainer`), :mod:`.trainer` (the loop, which knows neither the set-up nor the lab),
:mod:`.advantages`, :mod:`.logprobs`, :mod:`.loss`, :mod:`.sampling`, :mod:`.metrics`, :mod:`.checkpoint`,
:mod:`.lab` (the toy lab).
"""
from __future__ import annotations

from .config import LOSS_TYPES, MODES, SCALES, GRPOConfig
from .lab import LabConfig, ensure_lab
from .loss import aggregate, per_token_loss
from .setup import GRPOTrainer, Setup, resolve
from .trainer import GRPOLoop, Rollout

__all__ = ["GRPOConfig", "GRPOTrainer", "GRPOLoop", "Setup", "resolve", "Rollout", "LabConfig", "ensure_lab",
           "per_token_loss", "aggregate", "MODES", "LOSS_TYPES", "SCALES"]
