"""Tiny lab settings for the GRPO tests: a few-step warm-up, a handful of prompts, short completions."""
from __future__ import annotations

from p2t.grpo import GRPOConfig, LabConfig

# The trained PRM (prm_kind="trained"): on a policy after 2 SFT steps the verifier PRM flags nearly every
# token, so every step reward is ~0 and the token rewards could not be seen reaching the loss. The
# verifier is tested on the shipped lab and rebuilt on this one (test_lab_rebuild_is_identical).
TINY_LAB = LabConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, sft_steps=2, sft_batch_size=16,
                     prm_steps=2, prm_batch_size=16, prm_samples=16, prm_kind="trained")


def digit_reward(prompts, responses, **columns):
    """A reward that varies across samples even for an untrained policy: share of digits in the response."""
    return [sum(ch.isdigit() for ch in r) / max(len(r), 1) for r in responses]


def tiny_config(tmp_path, cache, **changes) -> GRPOConfig:
    base = dict(num_updates=1, prompts_per_update=2, group_size=4, max_new_tokens=12, eval_every=0,
                eval_prompts=4, eval_samples_per_prompt=2, output_dir=str(tmp_path / "run"), lab=TINY_LAB,
                lab_cache=str(cache), progress=False, save_every=0, seed=3,
                mask_truncated_completions=False)
    base.update(changes)
    return GRPOConfig(**base)
