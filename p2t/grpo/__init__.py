"""A lean GRPO trainer with outcome, process or P2T token advantages, and the embedded toy lab.

>>> from p2t.grpo import GRPOConfig, GRPOTrainer
>>> trainer = GRPOTrainer(GRPOConfig(mode="p2t", num_updates=50))   # the lab: tiny policy + PRM
>>> records = trainer.train()                                        # metrics.jsonl, curves.png, checkpoint.pt
"""
from __future__ import annotations

from .advantages import compute_advantages, token_rewards
from .config import LOSS_TYPES, MODES, SCALES, GRPOConfig
from .lab.models import LabConfig, ensure_lab
from .loss import aggregate, per_token_loss
from .trainer import GRPOTrainer, Rollout

__all__ = ["GRPOConfig", "GRPOTrainer", "Rollout", "LabConfig", "ensure_lab", "compute_advantages",
           "token_rewards", "per_token_loss", "aggregate", "MODES", "LOSS_TYPES", "SCALES"]
