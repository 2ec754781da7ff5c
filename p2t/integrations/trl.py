"""TRL integration: ``P2TGRPOTrainer``, TRL's ``GRPOTrainer`` with P2T token-level advantages.

TRL generates completions, runs the reward functions and computes one GRPO advantage per
completion, ``A^_b``, with its own group statistics (rewards gathered across processes, its
``scale_rewards``, ``multi_objective_aggregation`` and unscorable-completion handling). This trainer
then scores each process's own completions with a :class:`p2t.P2TScorer` and hands TRL's loss a
``(B, T)`` tensor::

    A~[b, i] = A^_b + alpha * r_i        (0 on padding and masked tokens)

with ``r_i`` the P2T token rewards (``mode="p2t"``), or the step reward ``R_s`` of the token's step
(``mode="process"``). ``mode="outcome"`` leaves TRL's advantages as they are. On one process with
``multi_objective_aggregation="sum_then_normalize"`` this equals
``p2t.token_advantages(rewards, r, group_size=num_generations, alpha=alpha, scale=scale_rewards, eps=1e-4)``.

Example::

    from p2t import P2TScorer
    from p2t.integrations.trl import P2TGRPOTrainer
    scorer = P2TScorer(prm, prm_tokenizer, kind="step_classifier", policy_tokenizer=tokenizer)
    trainer = P2TGRPOTrainer(model=policy, reward_funcs=[correct], args=GRPOConfig(...),
                             train_dataset=ds, processing_class=tokenizer,
                             scorer=scorer, mode="p2t", omega=0.6, alpha=0.1)
    trainer.train()
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

try:
    import trl
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("p2t.integrations.trl needs TRL: pip install 'trl>=1.13'") from e

from ._common import P2TOptions, check_scorer, token_rewards

__all__ = ["P2TGRPOTrainer"]


def _version_tuple(v: str):
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


_MIN_TRL = (1, 13)


def check_liger(args, trainer_cls, mode: str) -> None:
    """``use_liger_kernel=True`` works when TRL's loss still takes ``(B, T)`` advantages (TRL versions
    whose Liger option only swaps layer kernels); with TRL's fused Liger GRPO loss, which takes one
    advantage per sequence, token advantages cannot reach the loss: raise at construction."""
    if mode == "outcome" or args is None or not getattr(args, "use_liger_kernel", False):
        return
    if callable(getattr(trainer_cls, "compute_liger_loss", None)):
        raise ValueError(
            f"use_liger_kernel=True is not supported with mode={mode!r} on TRL {trl.__version__}: its fused Liger "
            "GRPO loss takes one advantage per sequence (B,), so P2T token advantages (B, T) cannot reach it. "
            "Set use_liger_kernel=False, or use mode='outcome'.")


class P2TGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss receives P2T token-level advantages ``(B, T)``.

    Takes every argument of ``trl.GRPOTrainer`` plus (keyword only):

    Args:
        scorer: a :class:`p2t.P2TScorer` (any object with the same ``score`` method); required unless
            ``mode="outcome"``. When the PRM's tokenizer differs from the policy's, build the scorer
            with ``policy_tokenizer=`` the trainer's tokenizer so rewards land on the policy's tokens.
        mode: ``"p2t"`` (default), ``"process"`` or ``"outcome"``.
        alpha: token-reward weight in ``A^_b + alpha * r_i``.
        omega, temperature, standardize, normalize: redistribution options of
            :func:`p2t.segment_redistribute`.
        method: attribution method for ``scorer.score`` (``"taylor"`` by default).
        score_kwargs: extra keyword arguments for ``scorer.score``.
        backend: ops backend for the redistribution.

    After each generation, ``trainer.p2t_last`` holds the tensors of the local batch: ``token_rewards``
    ``[B, T]``, ``sequence_advantages`` ``[B]`` (TRL's), ``advantages`` ``[B, T]`` (what the loss gets),
    ``completion_mask`` and ``rewards_per_func`` (TRL's rewards gathered across processes).
    """

    def __init__(self, model, reward_funcs=None, args=None, *positional, scorer=None, mode: str = "p2t",
                 alpha: float = 0.1, omega: float = 0.6, temperature: float = 1.0, standardize: bool = False,
                 normalize: str = "paper", method: str = "taylor", score_kwargs: Optional[Dict[str, Any]] = None,
                 backend: str = "auto", **kwargs):
        if _version_tuple(trl.__version__) < _MIN_TRL:
            raise ImportError(f"P2TGRPOTrainer needs trl>={'.'.join(map(str, _MIN_TRL))} "
                              f"(its loss must accept (B, T) advantages), found trl {trl.__version__}")
        self.p2t_options = P2TOptions(mode=mode, alpha=alpha, omega=omega, temperature=temperature,
                                      standardize=standardize, normalize=normalize, method=method,
                                      score_kwargs=dict(score_kwargs or {}), backend=backend)
        check_scorer(scorer, mode)
        check_liger(args, type(self), mode)
        self.p2t_scorer = scorer
        self.p2t_last: Optional[Dict[str, Any]] = None
        self._p2t_prompts = None
        self._p2t_rewards_per_func = None
        super().__init__(model, reward_funcs, args, *positional, **kwargs)

    # TRL calls this with the local prompts/completions and returns rewards gathered across processes.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._p2t_prompts = list(prompts)
        self._p2t_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        opts = self.p2t_options
        if opts.mode == "outcome":
            return out
        completion_ids, completion_mask = out["completion_ids"], out["completion_mask"]
        mask = completion_mask.bool()
        if out.get("tool_mask") is not None:
            mask = mask & out["tool_mask"].bool()
        seq_adv = out["advantages"]
        if seq_adv.dim() != 1:
            raise RuntimeError(f"expected TRL's advantages of shape (B,), got {tuple(seq_adv.shape)}")
        prompts = self._p2t_prompts
        if prompts is None or len(prompts) != completion_ids.shape[0]:
            raise RuntimeError("P2TGRPOTrainer: the prompts of this batch were not seen by _calculate_rewards")

        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        lengths = completion_mask.sum(dim=1).tolist()
        ids = [completion_ids[b, :int(n)].tolist() for b, n in enumerate(lengths)]
        responses = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        r = token_rewards(self.p2t_scorer, prompts, responses, ids, length=completion_ids.shape[1],
                          options=opts, device=seq_adv.device)
        adv = torch.where(mask, seq_adv.float().unsqueeze(1) + opts.alpha * r, torch.zeros_like(r))
        out["advantages"] = adv

        m = "train" if self.model.training else "eval"
        n_tok = mask.sum()
        mean_r = (r * mask).sum() / n_tok.clamp(min=1)
        std_r = (((r - mean_r) * mask) ** 2).sum().div(n_tok.clamp(min=1)).sqrt()
        stats = self.accelerator.gather(torch.stack([mean_r, std_r]).unsqueeze(0)).mean(dim=0)
        self._metrics[m]["p2t/token_reward_mean"].append(stats[0].item())
        self._metrics[m]["p2t/token_reward_std"].append(stats[1].item())
        self.p2t_last = {"token_rewards": r, "sequence_advantages": seq_adv, "advantages": adv,
                         "completion_mask": completion_mask, "rewards_per_func": self._p2t_rewards_per_func,
                         "prompts": prompts, "completion_ids": ids}
        return out
