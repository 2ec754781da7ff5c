"""TRL integration: ``P2TGRPOTrainer``, TRL's ``GRPOTrainer`` with P2T token-level advantages, and
``P2TGRPOConfig``, TRL's ``GRPOConfig`` with the P2T options.

TRL generates completions, runs the reward functions and computes one GRPO advantage per
completion, ``A^_b``, with its own group statistics (rewards gathered across processes, its
``scale_rewards``, ``multi_objective_aggregation`` and unscorable-completion handling). This trainer
then scores each process's own completions with a :class:`p2t.P2TScorer` and hands TRL's loss a
``(B, T)`` tensor::

    A~[b, i] = A^_b + alpha * r_i        (0 on padding and masked tokens)

with ``r_i`` the P2T token rewards (``mode="p2t"``; ``p2t_omega_neg > 0`` adds the signed blame term), or
the step reward ``R_s`` of the token's step (``mode="process"``). ``mode="outcome"`` leaves TRL's advantages
as they are. The options are one :class:`p2t.P2TOptions` (``trainer.p2t_options``). On one process with
``multi_objective_aggregation="sum_then_normalize"`` this equals
``p2t.token_advantages(rewards, r, group_size=num_generations, alpha=alpha, scale=scale_rewards, eps=1e-4)``.

Example::

    from p2t.integrations.trl import P2TGRPOConfig, P2TGRPOTrainer
    args = P2TGRPOConfig(output_dir="out", num_generations=8, p2t_prm="path/to/prm", p2t_alpha=0.1)
    trainer = P2TGRPOTrainer(model=policy, reward_funcs=[correct], args=args, train_dataset=ds,
                             processing_class=tokenizer)
    trainer.train()

Every ``p2t_*`` option can come from YAML or the command line through ``trl.TrlParser`` and is saved with
the training arguments. The trainer's keyword arguments (``scorer=``, ``mode=``, ``alpha=``, ...) still work:
a keyword given explicitly overrides the config field, and the config then records the value used.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("p2t.integrations.trl needs TRL: pip install 'trl>=1.13'") from e

from ..options import DEFAULTS, METHODS, MODES, NORMALIZE, P2TOptions
from ..rewards import get_mode
from ._common import RewardSetup, check_scorer, completion_rewards, prompt_text

__all__ = ["P2TGRPOTrainer", "P2TGRPOConfig", "ALPHA_SCHEDULES", "alpha_at", "weighted_token_stats", "prm_device"]

ALPHA_SCHEDULES = ("constant", "linear_warmup", "linear_decay")


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
    if not get_mode(mode).needs_prm or args is None or not getattr(args, "use_liger_kernel", False):
        return
    if callable(getattr(trainer_cls, "compute_liger_loss", None)):
        raise ValueError(
            f"use_liger_kernel=True is not supported with mode={mode!r} on TRL {trl.__version__}: its fused Liger "
            "GRPO loss takes one advantage per sequence (B,), so P2T token advantages (B, T) cannot reach it. "
            "Set use_liger_kernel=False, or use mode='outcome'.")


def check_importance_sampling(args, mode: str) -> None:
    """Token advantages need token-level importance ratios. With ``importance_sampling_level="sequence"``
    (GSPO) TRL multiplies one ratio per sequence by the ``(B, T)`` advantages, and the gradient of that
    ratio spreads every token's advantage over all tokens of the sequence: the token credit reduces to its
    mean. TRL's ``GRPOTrainer`` has no ``"sequence_token"`` level (GSPO-token), so raise for anything but
    ``"token"`` unless ``mode="outcome"``."""
    level = getattr(args, "importance_sampling_level", "token") if args is not None else "token"
    if not get_mode(mode).needs_prm or level == "token":
        return
    if level == "sequence":
        raise ValueError(
            f"importance_sampling_level='sequence' is not supported with mode={mode!r}: one importance ratio per "
            "sequence spreads each token's advantage over the whole sequence in the gradient, so P2T's token "
            "credit reduces to its mean. Set importance_sampling_level='token', or use mode='outcome'.")
    raise ValueError(
        f"importance_sampling_level={level!r} is not implemented by trl.GRPOTrainer {trl.__version__} (GSPO-token, "
        "'sequence_token', lives in TRL's experimental trainers, which P2TGRPOTrainer does not extend). Set "
        "importance_sampling_level='token'.")


def alpha_at(alpha: float, schedule: str, step: int, steps: int) -> float:
    """The token-reward weight at optimizer step ``step``: ``"constant"`` (``alpha``), ``"linear_warmup"``
    (0 at step 0 rising linearly to ``alpha`` at ``steps``, then ``alpha``) or ``"linear_decay"`` (``alpha``
    at step 0 falling linearly to 0 at ``steps``, then 0)."""
    if schedule not in ALPHA_SCHEDULES:
        raise ValueError(f"alpha_schedule must be one of {', '.join(ALPHA_SCHEDULES)}, got {schedule!r}")
    if schedule == "constant":
        return float(alpha)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the {schedule} alpha schedule needs a positive number of steps, got {steps!r}")
    frac = min(max(step, 0) / steps, 1.0)
    return float(alpha) * (frac if schedule == "linear_warmup" else 1.0 - frac)


def weighted_token_stats(values: Dict[str, torch.Tensor], mask: torch.Tensor,
                         gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, tuple]:
    """``{name: (mean, std)}`` of each ``[B, T]`` tensor over the True tokens of ``mask``, pooled over all
    processes: each process contributes its token count, sum and sum of squares (``gather`` concatenates
    a ``[1, K]`` tensor across processes, e.g. ``accelerator.gather``), so a process with more tokens
    weighs more. ``(0, 0)`` when there is no token anywhere."""
    names = list(values)
    m = mask.bool()
    parts = [m.sum().double()]
    for k in names:
        v = torch.where(m, values[k].double(), torch.zeros((), dtype=torch.float64, device=m.device))
        parts += [v.sum(), (v * v).sum()]
    local = torch.stack(parts).unsqueeze(0)
    tot = (gather(local) if gather is not None else local).reshape(-1, local.shape[1]).sum(dim=0)
    n = float(tot[0])
    out = {}
    for j, k in enumerate(names):
        if n == 0:
            out[k] = (0.0, 0.0)
            continue
        mean = float(tot[1 + 2 * j]) / n
        var = max(float(tot[2 + 2 * j]) / n - mean * mean, 0.0)
        out[k] = (mean, math.sqrt(var))
    return out


def prm_device(spec: Optional[str], policy_device, local_rank: int) -> torch.device:
    """Where a PRM loaded from ``p2t_prm`` runs: ``spec`` with ``{local_rank}`` replaced (e.g.
    ``"cuda:{local_rank}"``, or a spare GPU ``"cuda:7"``), or the policy's device when ``spec`` is None."""
    if spec is None:
        return torch.device(policy_device)
    return torch.device(str(spec).replace("{local_rank}", str(int(local_rank))))


def _null_value(v):
    """``p2t_null`` from YAML/CLI: a token id given as digits becomes an int."""
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return v


@dataclass
class P2TGRPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the P2T options (every ``p2t_*`` field), so they come from YAML or the command
    line through ``trl.TrlParser`` and are saved with the training arguments. Accepted wherever a
    ``GRPOConfig`` is (it is one)."""

    p2t_mode: str = field(default=DEFAULTS.mode, metadata={
        "help": "'p2t' (A^ + alpha * r_i, r_i redistributed inside each step), 'process' (A^ + alpha * R_s on every "
                "token of step s) or 'outcome' (TRL's advantages, no PRM call).", "choices": list(MODES)})
    p2t_alpha: float = field(default=DEFAULTS.alpha, metadata={
        "help": "Weight of the token rewards: A^_b + alpha * r_i."})
    p2t_alpha_schedule: str = field(default="constant", metadata={
        "help": "'constant', 'linear_warmup' (0 -> alpha over p2t_alpha_steps) or 'linear_decay' (alpha -> 0).",
        "choices": list(ALPHA_SCHEDULES)})
    p2t_alpha_steps: Optional[int] = field(default=None, metadata={
        "help": "Optimizer steps of the alpha warm-up/decay (default: the run's total steps)."})
    p2t_omega: float = field(default=DEFAULTS.omega, metadata={
        "help": "omega of the redistribution r_i = R_s + omega R_s w_i."})
    p2t_omega_neg: float = field(default=DEFAULTS.omega_neg, metadata={
        "help": "omega_neg of the signed blame term - omega_neg (1 - R_s) softmax(-I/tau)_i added to r_i "
                "(0: the paper's formula)."})
    p2t_temperature: float = field(default=DEFAULTS.temperature, metadata={
        "help": "Softmax temperature of the within-step weights w_i (not the sampling temperature)."})
    p2t_standardize: bool = field(default=DEFAULTS.standardize, metadata={
        "help": "Standardize the attributions within each step before the softmax."})
    p2t_normalize: str = field(default=DEFAULTS.normalize, metadata={
        "help": "'paper' (r_i = R_s + omega R_s w_i) or 'sum' (divided by n_s + omega: a step's rewards sum to R_s).",
        "choices": list(NORMALIZE)})
    p2t_method: str = field(default=DEFAULTS.method, metadata={
        "help": "Attribution method: 'taylor', 'taylor_per_step', 'integrated_gradients' or 'exact'.",
        "choices": list(METHODS)})
    p2t_null: Optional[str] = field(default=None, metadata={
        "help": "Null embedding e_null of a PRM loaded from p2t_prm: 'pad', 'eos', 'vocab_mean', 'zero' or a token "
                "id (default: the scorer's, 'pad'). With a scorer passed to the trainer, it must match its null."})
    p2t_prm: Optional[str] = field(default=None, metadata={
        "help": "PRM path or id; the trainer loads it with P2TScorer.from_pretrained when no scorer is passed."})
    p2t_prm_kind: str = field(default="step_classifier", metadata={"help": "PRM kind for P2TScorer.from_pretrained."})
    p2t_prm_kwargs: Optional[str] = field(default=None, metadata={
        "help": "More P2TScorer.from_pretrained options for p2t_prm, as a mapping (YAML) or a JSON object string "
                "(command line), e.g. '{\"step_split\": \" \", \"system_prompt\": null}'."})
    p2t_prm_device: Optional[str] = field(default=None, metadata={
        "help": "Device of a PRM loaded from p2t_prm (default: each process's policy device); '{local_rank}' is "
                "replaced by the process's local rank, e.g. 'cuda:{local_rank}' or a spare GPU 'cuda:7'."})
    p2t_backend: str = field(default="auto", metadata={"help": "Ops backend of the redistribution."})
    p2t_log_heatmap: bool = field(default=False, metadata={
        "help": "At each logging step, write an HTML token heatmap of one scored completion to "
                "<output_dir>/p2t_heatmaps/step_<N>.html (needs a P2TScorer, whose batches carry the PRM views)."})

    def __post_init__(self):
        self.p2t_null = _null_value(self.p2t_null)
        if isinstance(self.p2t_prm_kwargs, str):
            try:
                self.p2t_prm_kwargs = json.loads(self.p2t_prm_kwargs)
            except ValueError as e:
                raise ValueError(f"p2t_prm_kwargs must be a mapping or a JSON object string: {e}") from None
        if self.p2t_prm_kwargs is not None and not isinstance(self.p2t_prm_kwargs, dict):
            raise TypeError(f"p2t_prm_kwargs must be a mapping, got {type(self.p2t_prm_kwargs).__name__}")
        self.p2t_settings()   # the one check of the p2t_* fields
        super().__post_init__()

    def p2t_settings(self) -> "P2TSettings":
        """The resolved P2T settings of this config (the options object and the alpha schedule)."""
        return resolve_settings({k: getattr(self, "p2t_" + k) for k in KEYWORDS}, prefix="p2t_", null=self.p2t_null)


@dataclass(frozen=True)
class P2TSettings:
    """What a :class:`P2TGRPOConfig` (or the trainer's keywords) resolve to: the token-reward settings
    (:class:`p2t.integrations._common.RewardSetup`, holding the :class:`p2t.P2TOptions`) and the alpha
    schedule."""
    setup: RewardSetup
    alpha_schedule: str = "constant"
    alpha_steps: Optional[int] = None

    @property
    def options(self) -> P2TOptions:
        return self.setup.options

    def keywords(self) -> Dict[str, Any]:
        """The settings by keyword name (:data:`KEYWORDS`), as resolved."""
        own = {"alpha_schedule": self.alpha_schedule, "alpha_steps": self.alpha_steps, "backend": self.setup.backend}
        return {k: own[k] if k in own else getattr(self.options, k) for k in KEYWORDS}


# the trainer's P2T keywords: each is the config field p2t_<name>. The P2TOptions fields a config carries
# (the null is fixed when the scorer is built: it is a config field only), then the trainer's own settings.
_RUN_KEYWORDS = ("alpha_schedule", "alpha_steps", "backend")
KEYWORDS = tuple(n for n in P2TOptions.names() if n != "null" and "p2t_" + n in P2TGRPOConfig.__dataclass_fields__) \
    + _RUN_KEYWORDS
_DEFAULTS = {k: P2TGRPOConfig.__dataclass_fields__["p2t_" + k].default for k in KEYWORDS}


def resolve_settings(values: Dict[str, Any], *, prefix: str = "", score_kwargs: Optional[Dict[str, Any]] = None,
                     null=None) -> P2TSettings:
    """The one check of the P2T keywords/fields (``values``: name -> value, names as in :data:`KEYWORDS`;
    a missing or ``None`` value takes the default). Errors name the field (``prefix`` + name)."""
    vals = {k: (_DEFAULTS[k] if values.get(k) is None else values[k]) for k in KEYWORDS}
    opt_names = [k for k in KEYWORDS if k not in _RUN_KEYWORDS]
    try:
        opts = P2TOptions.build(**{k: vals[k] for k in opt_names}, null=null)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise type(e)(prefix + msg if msg.split(" ")[0] in P2TOptions.names() else msg) from None
    schedule, steps = vals["alpha_schedule"], vals["alpha_steps"]
    if schedule not in ALPHA_SCHEDULES:
        raise ValueError(f"{prefix}alpha_schedule must be one of {', '.join(ALPHA_SCHEDULES)}, got {schedule!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"{prefix}alpha_steps must be a positive int, got {steps!r}")
    return P2TSettings(RewardSetup(opts, dict(score_kwargs or {}), vals["backend"]), schedule, steps)


def _one_row(batch, b: int):
    """Row ``b`` of a :class:`p2t.ScoredBatch` as a batch of its own (for the heatmap)."""
    from ..attribution import ScoredBatch
    first = sum(batch.steps_per_response[:b])
    k = batch.steps_per_response[b]
    seg = batch.segment_ids[b:b + 1]
    seg = torch.where(seg >= 0, seg - first, seg)
    return ScoredBatch(batch.scores[b:b + 1], seg, batch.segment_rewards[first:first + k],
                       batch.segment_logits[first:first + k], batch.response_mask[b:b + 1], [k], [batch.prm[b]],
                       batch.method, batch.objective)


class _Recorder:
    """The scorer, seen through: its scoring calls (``score``, and ``score_ids``/``rewards_ids`` where the scorer has
    them) go
    through unchanged and the last batch and prompts are kept (for the heatmap); other attributes are the
    scorer's."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.last = None
        self.last_prompts = None

    def score(self, prompts, *args, **kw):
        return self._keep(prompts, self.scorer.score(prompts, *args, **kw))

    def __getattr__(self, name):
        attr = getattr(self.scorer, name)
        if name in ("score_ids", "rewards_ids") and callable(attr):
            return lambda prompts, *args, **kw: self._keep(prompts, attr(prompts, *args, **kw))
        return attr

    def _keep(self, prompts, batch):
        self.last, self.last_prompts = batch, list(prompts)
        return batch


class P2TGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss receives P2T token-level advantages ``(B, T)``.

    Takes every argument of ``trl.GRPOTrainer``; ``args`` may be a :class:`P2TGRPOConfig` (the P2T options
    as ``p2t_*`` fields) or a plain ``GRPOConfig``. Keyword only, each overriding the config field of the
    same name (``p2t_<name>``) when given:

    Args:
        scorer: a :class:`p2t.P2TScorer`, or any object with the same ``score`` method (e.g.
            :class:`p2t.integrations.scorers.CallableScorer` around a remote PRM service). Required unless
            ``mode="outcome"`` or the config names ``p2t_prm`` (then each process loads the PRM on
            ``p2t_prm_device``, default its policy device). When the PRM's tokenizer differs from the
            policy's, build the scorer with ``policy_tokenizer=`` the trainer's tokenizer.
        mode: ``"p2t"`` (default), ``"process"`` or ``"outcome"``.
        alpha: token-reward weight in ``A^_b + alpha * r_i``; ``alpha_schedule`` (``"constant"``,
            ``"linear_warmup"``, ``"linear_decay"``) over ``alpha_steps`` optimizer steps (default: the run).
        omega, omega_neg, temperature, standardize, normalize: redistribution options of
            :func:`p2t.segment_redistribute` (:class:`p2t.P2TOptions`).
        method: attribution method for ``scorer.score`` (``"taylor"`` by default).
        score_kwargs: extra keyword arguments for ``scorer.score``.
        backend: ops backend for the redistribution.

    After each generation, ``trainer.p2t_last`` holds the tensors of the local batch: ``token_rewards``
    ``[B, T]``, ``sequence_advantages`` ``[B]`` (TRL's), ``advantages`` ``[B, T]`` (what the loss gets),
    ``completion_mask``, ``rewards_per_func`` (TRL's rewards gathered across processes) and ``alpha``.
    """

    def __init__(self, model, reward_funcs=None, args=None, *positional, scorer=None,
                 score_kwargs: Optional[Dict[str, Any]] = None, **kwargs):
        if _version_tuple(trl.__version__) < _MIN_TRL:
            raise ImportError(f"P2TGRPOTrainer needs trl>={'.'.join(map(str, _MIN_TRL))} "
                              f"(its loss must accept (B, T) advantages), found trl {trl.__version__}")
        given = {k: kwargs.pop(k) for k in KEYWORDS if k in kwargs}
        from_config = isinstance(args, P2TGRPOConfig)
        values = {k: getattr(args, "p2t_" + k) for k in KEYWORDS} if from_config else {}
        values.update({k: v for k, v in given.items() if v is not None})
        null = getattr(args, "p2t_null", None) if from_config else None
        settings = resolve_settings(values, score_kwargs=score_kwargs, null=null)
        self.p2t_setup = settings.setup
        self.p2t_options = settings.options
        self.p2t_alpha_schedule, self.p2t_alpha_steps = settings.alpha_schedule, settings.alpha_steps
        if from_config:   # the config records what is used, and is saved with the training arguments
            for k, v in settings.keywords().items():
                setattr(args, "p2t_" + k, v)
        prm = getattr(args, "p2t_prm", None) if from_config else None
        if scorer is None and prm is not None and self.p2t_setup.needs_prm:
            pass                                    # loaded below, once the tokenizer is known
        else:
            check_scorer(scorer, self.p2t_options.mode)
            if scorer is not None and null is not None and getattr(scorer, "null", null) != null:
                raise ValueError(f"p2t_null={null!r} but the scorer passed uses null={scorer.null!r}: set them alike "
                                 "(the null embedding is fixed when the scorer is built)")
        check_liger(args, type(self), self.p2t_options.mode)
        check_importance_sampling(args, self.p2t_options.mode)
        self.p2t_scorer = scorer
        self.p2t_last: Optional[Dict[str, Any]] = None
        self._p2t_prompts = None
        self._p2t_rewards_per_func = None
        self._p2t_seq_adv = None
        super().__init__(model, reward_funcs, args, *positional, **kwargs)
        if self.p2t_scorer is None and prm is not None and self.p2t_setup.needs_prm:
            self.p2t_scorer = self._p2t_load_scorer(args)
        self._p2t_recorder = _Recorder(self.p2t_scorer) if self.p2t_scorer is not None else None

    def _p2t_load_scorer(self, args):
        from ..attribution import P2TScorer
        device = prm_device(args.p2t_prm_device, self.accelerator.device, self.accelerator.local_process_index)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        extra = dict(args.p2t_prm_kwargs or {})
        if args.p2t_null is not None:
            extra["null"] = args.p2t_null
        return P2TScorer.from_pretrained(args.p2t_prm, kind=args.p2t_prm_kind, policy_tokenizer=tokenizer,
                                         device=device, **extra)

    def p2t_alpha(self) -> float:
        """The token-reward weight for the current optimizer step (the alpha schedule)."""
        opts = self.p2t_options
        if self.p2t_alpha_schedule == "constant":
            return float(opts.alpha)
        steps = self.p2t_alpha_steps or int(getattr(self.state, "max_steps", 0) or 0) or \
            int(getattr(self.args, "max_steps", 0) or 0)
        return alpha_at(opts.alpha, self.p2t_alpha_schedule, int(self.state.global_step), max(steps, 1))

    # TRL calls this with the local prompts/completions and returns rewards gathered across processes.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._p2t_prompts = list(prompts)
        self._p2t_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.p2t_setup.needs_prm:
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
        # the scorer's tensors (on the PRM's device) are moved once, onto the policy's
        r = completion_rewards(self._p2t_recorder, prompts, responses, ids, length=completion_ids.shape[1],
                               setup=self.p2t_setup, device=seq_adv.device)
        alpha = self.p2t_alpha()
        adv = torch.where(mask, seq_adv.float().unsqueeze(1) + alpha * r, torch.zeros_like(r))
        out["advantages"] = adv
        if getattr(self, "off_policy_mask_threshold", None) is not None:
            # the off-policy sequence mask keeps or drops whole sequences by their sequence advantage
            out["p2t_sequence_advantages"] = seq_adv.float()

        m = "train" if self.model.training else "eval"
        stats = weighted_token_stats({"r": r, "adv": adv}, mask, gather=self.accelerator.gather)
        self._metrics[m]["p2t/token_reward_mean"].append(stats["r"][0])
        self._metrics[m]["p2t/token_reward_std"].append(stats["r"][1])
        self._metrics[m]["p2t/token_advantage_mean"].append(stats["adv"][0])
        self._metrics[m]["p2t/token_advantage_std"].append(stats["adv"][1])
        self._metrics[m]["p2t/alpha"].append(alpha)
        if getattr(self, "log_completions", False) and "extra" in getattr(self, "_logs", {}):
            # completions table: the token advantages' range next to TRL's per-sequence advantage
            from accelerate.utils import gather_object
            n = mask.sum(dim=1).clamp(min=1)
            big = torch.finfo(adv.dtype).max
            cols = {"p2t_token_adv_mean": ((adv * mask).sum(dim=1) / n).tolist(),
                    "p2t_token_adv_min": torch.where(mask, adv, big).min(dim=1).values.tolist(),
                    "p2t_token_adv_max": torch.where(mask, adv, -big).max(dim=1).values.tolist()}
            for k in sorted(cols):
                vals = [v if mask[b].any() else None for b, v in enumerate(cols[k])]
                self._logs["extra"][k].extend(gather_object(vals))
        self.p2t_last = {"token_rewards": r, "sequence_advantages": seq_adv, "advantages": adv,
                         "completion_mask": completion_mask, "rewards_per_func": self._p2t_rewards_per_func,
                         "prompts": prompts, "completion_ids": ids, "alpha": alpha}
        return out

    def _compute_loss(self, model, inputs):
        self._p2t_seq_adv = inputs.get("p2t_sequence_advantages")
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._p2t_seq_adv = None

    def get_off_policy_mask(self, advantages, per_token_logps, sampling_per_token_logps, mask,
                            off_policy_threshold):
        """TRL's off-policy sequence mask (keep a sequence if its advantage is >= 0 or its mean KL is below
        the threshold), decided on the sequence advantage ``A^_b``: with ``(B, T)`` token advantages TRL's
        test ``advantages >= 0`` would keep or drop single tokens of a sequence. Returns ``(B, 1)``."""
        seq = self._p2t_seq_adv
        if seq is not None and seq.shape[0] == advantages.shape[0]:
            advantages = seq.to(advantages.device).unsqueeze(1)
        return GRPOTrainer.get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask,
                                               off_policy_threshold)

    def log(self, logs, start_time=None):
        if (getattr(self.args, "p2t_log_heatmap", False) and self.model.training and
                self.accelerator.is_main_process):
            self._p2t_write_heatmap()
        return super().log(logs, start_time)

    def _p2t_write_heatmap(self):
        rec = self._p2t_recorder
        batch = getattr(rec, "last", None) if rec is not None else None
        if batch is None:
            return
        if not hasattr(batch, "prm"):
            if not getattr(self, "_p2t_heatmap_warned", False):
                warnings.warn("p2t_log_heatmap: the scorer's batches carry no PRM views (not a P2TScorer); "
                              "no heatmap is written", stacklevel=2)
                self._p2t_heatmap_warned = True
            return
        from ..attribution.render import html_report
        b = next((i for i, view in enumerate(batch.prm) if view is not None), None)
        if b is None:                               # no completion of this batch had a step
            return
        # the legend names the scorer's own null (the options' is the config's, which may be unset)
        opts = self.p2t_options.replace(null=getattr(rec.scorer, "null", None))
        page = html_report(_one_row(batch, b), [prompt_text(rec.last_prompts[b])],
                           title=f"p2t attribution, step {self.state.global_step}", options=opts)
        d = os.path.join(self.args.output_dir, "p2t_heatmaps")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"step_{self.state.global_step:06d}.html"), "w", encoding="utf-8") as f:
            f.write(page)
