"""verl integration: the ``"p2t"`` advantage estimator and the ``"p2t"`` reward manager.

verl hands an advantage estimator one ``(B, T)`` tensor, ``token_level_rewards``, plus
``response_mask`` and ``index`` (the uid of each row's prompt group). The P2T reward manager
therefore writes both parts of the P2T advantage into that one tensor:

* the outcome reward ``o_b`` at the last response-mask token (in single-turn rows the last response
  token, where verl's own reward managers put it),
* ``alpha * r_i`` on every other response token (``r_i``: the P2T token rewards; ``R_s`` of the
  token's step with ``mode="process"``).

The estimator reads them back and returns ``A~[b, i] = A^_b + alpha * r_i`` with ``A^_b`` the GRPO
advantage of ``o_b`` within its uid group (unbiased std, ``algorithm.norm_adv_by_std_in_grpo``
honoured, a group of one as verl's GRPO: ``A^ = o``), 0 outside ``response_mask``. Scores that verl's
managers put on masked tokens after the last response-mask token (multi-turn rows ending in tool
output) count as the outcome, so with no token rewards the estimator equals verl's ``grpo``. The last
token gets ``A^_b`` (its own token reward, usually that of an EOS token, which is in no step, is not
carried). With ``algorithm.use_kl_in_reward=True``
the per-token KL penalty verl subtracts lands in the token part, i.e. directly in the advantage.

Importing this module registers both under the name ``"p2t"``; the ``verl.plugins`` entry point of
the p2t package imports it when verl starts, so ``algorithm.adv_estimator=p2t`` and
``reward.reward_manager.name=p2t`` work without code changes. Options of the reward manager come
from ``reward.reward_kwargs``: the :class:`p2t.P2TOptions` fields (``mode``, ``alpha``, ``omega``,
``omega_neg``, ``temperature``, ``standardize``, ``normalize``, ``method``, ``null``), ``prm``, ``prm_kind``,
``prm_url``, ``prm_timeout``, ``score_kwargs``, ``backend``; any other key goes to
``P2TScorer.from_pretrained``.
verl passes the rows on through the agent loop of its V1 trainer (verl's default) with this module's
``P2TAgentLoopManager``, or from the reward loop's batch pass of its V0 trainer (see
:func:`check_reward_routing` for the settings); the estimator reads the layout above whoever writes it.
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ..ops import token_advantages
from ..options import P2TOptions
from ._common import RewardSetup, check_scorer, completion_rewards, last_valid_index

try:
    from verl.trainer.ppo import core_algos as _core_algos
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("p2t.integrations.verl needs verl: pip install verl") from e

__all__ = ["compute_p2t_advantage", "split_token_level_rewards", "group_index", "p2t_reward_rows",
           "P2TRewardManager", "check_reward_routing", "register", "session_rows", "carry_row", "row_output_class",
           "AGENT_LOOP_MANAGER"]

NAME = "p2t"


def group_index(index) -> torch.Tensor:
    """Dense group ids ``[B]`` (0, 1, ... in order of first appearance) from verl's ``index`` (uids of
    any hashable type, groups need not be contiguous)."""
    if index is None:
        raise ValueError("index is required: the uid of each row's prompt group (verl passes "
                         "data.non_tensor_batch['uid'])")
    seen: Dict[Any, int] = {}
    ids = [seen.setdefault(u.item() if isinstance(u, np.generic) else u, len(seen)) for u in np.asarray(index,
                                                                                                     dtype=object)]
    return torch.tensor(ids, dtype=torch.int64)


def split_token_level_rewards(token_level_rewards: torch.Tensor, response_mask: torch.Tensor):
    """``(outcome [B], token part [B, T])`` from the layout the P2T reward manager writes: the outcome at
    the last response-mask token, ``alpha * r_i`` on the others.

    Values on masked tokens *after* the last response-mask token (a multi-turn row that ends in tool or
    observation tokens, where verl's managers put the score on the row's last token) are added to the
    outcome, so a row with a single score anywhere from the last response-mask token on reads as verl's
    GRPO reads it (the row sum). A row with no response-mask token has outcome = its row sum (0 for an
    empty row), as in verl's GRPO."""
    tl = token_level_rewards.float()
    last = last_valid_index(response_mask)
    pos = torch.arange(tl.shape[1], device=tl.device).expand_as(tl)
    tail = pos >= last.unsqueeze(1)            # from the last response-mask token on (all of an empty row)
    outcome = torch.where(tail, tl, torch.zeros_like(tl)).sum(dim=1)
    token = torch.where(tail, torch.zeros_like(tl), tl)
    return outcome, token


def _grouped_sequence_advantages(outcome: torch.Tensor, gid: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    """GRPO advantages for groups of any sizes, as verl's GRPO estimator computes them: unbiased std; a
    group of one (``rollout.n=1``) has mean 0 and std 1, so its advantage is its outcome (``o / (1 + eps)``
    with the std scaling)."""
    n = int(gid.max().item()) + 1 if gid.numel() else 0
    o = outcome.double()
    cnt = torch.zeros(n, dtype=torch.float64, device=o.device).index_add_(0, gid, torch.ones_like(o))
    mean = torch.zeros_like(cnt).index_add_(0, gid, o) / cnt
    single = cnt[gid] == 1
    dev = torch.where(single, o, o - mean[gid])
    var = torch.zeros_like(cnt).index_add_(0, gid, (o - mean[gid]) ** 2) / (cnt - 1).clamp(min=1)
    std = torch.where(single, torch.ones_like(o), var.sqrt()[gid])
    adv = dev if scale == "none" else dev / (std + eps)
    return adv.float()


def compute_p2t_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index=None,
                          config=None, epsilon: float = 1e-6, norm_adv_by_std_in_grpo: Optional[bool] = None,
                          **kwargs) -> tuple:
    """verl advantage estimator ``"p2t"``: ``A~[b, i] = A^_b + alpha * r_i``.

    Args:
        token_level_rewards: float ``[B, T]`` as the P2T reward manager writes it (outcome at the last
            response token, ``alpha * r_i`` elsewhere).
        response_mask: ``[B, T]``, 1 on response tokens.
        index: ``[B]`` uids of the prompt groups (any order; groups need not be contiguous).
        config: verl's algorithm config; ``norm_adv_by_std_in_grpo`` is read from it (default True).
        epsilon: added to the group std.
    Returns:
        ``(advantages, returns)``, both the float32 ``[B, T]`` token advantages.

    Groups of one (``rollout.n=1``) get verl's GRPO value ``A^ = o`` (divided by ``1 + epsilon`` with the std
    scaling), so with no token rewards this estimator equals verl's ``grpo`` on every batch.
    """
    if not isinstance(token_level_rewards, torch.Tensor) or token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards must be a [B, T] tensor, got "
                         f"{getattr(token_level_rewards, 'shape', type(token_level_rewards).__name__)}")
    if not isinstance(response_mask, torch.Tensor) or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"response_mask must be a tensor of shape {tuple(token_level_rewards.shape)}, got "
                         f"{getattr(response_mask, 'shape', type(response_mask).__name__)}")
    B = token_level_rewards.shape[0]
    gid = group_index(index).to(token_level_rewards.device)
    if gid.numel() != B:
        raise ValueError(f"index has {gid.numel()} entries but token_level_rewards has {B} rows")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = True if config is None else bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
    scale = "group" if norm_adv_by_std_in_grpo else "none"
    mask = response_mask.bool()
    with torch.no_grad():
        outcome, token = split_token_level_rewards(token_level_rewards, mask)
        counts = torch.bincount(gid)
        if B and bool((counts == counts[0]).all()) and int(counts[0]) > 1:
            # equal-sized groups (the usual rollout.n): sort rows so groups are contiguous, one fused call
            G = int(counts[0].item())
            perm = torch.argsort(gid, stable=True)
            adv_sorted = token_advantages(outcome[perm], token[perm], group_size=G, alpha=1.0, mask=mask[perm],
                                          scale=scale, eps=epsilon)
            adv = torch.empty_like(adv_sorted)
            adv[perm] = adv_sorted
        else:
            seq = _grouped_sequence_advantages(outcome, gid, scale, epsilon)
            adv = torch.where(mask, seq.unsqueeze(1) + token, torch.zeros_like(token))
    return adv, adv


def _cfg_get(config, key, default):
    if hasattr(config, "get"):
        try:
            return config.get(key, default)
        except Exception:  # noqa: BLE001 - dataclass configs without a dict interface
            pass
    return getattr(config, key, default)


def _register_estimator() -> None:
    existing = _core_algos.ADV_ESTIMATOR_REGISTRY.get(NAME)
    if existing is not None and (getattr(existing, "__module__", None), getattr(existing, "__qualname__", None)) == \
            (compute_p2t_advantage.__module__, compute_p2t_advantage.__qualname__):
        _core_algos.ADV_ESTIMATOR_REGISTRY[NAME] = compute_p2t_advantage   # this module imported again
    else:
        _core_algos.register_adv_est(NAME)(compute_p2t_advantage)        # raises if another "p2t" exists


# registered before the reward manager's imports, so the estimator is usable even where verl's reward loop
# cannot be imported
_register_estimator()


def p2t_reward_rows(scorer, prompts: Sequence[Any], responses: Sequence[str], response_ids: Sequence[Sequence[int]],
                    outcome_rewards: Sequence[float], *, length: int, setup: RewardSetup) -> torch.Tensor:
    """The ``[B, length]`` reward tensor in the estimator's layout, for a batch of responses:
    ``alpha * r_i`` on the response tokens, the outcome reward on each response's last token."""
    if len(outcome_rewards) != len(response_ids):
        raise ValueError(f"outcome_rewards has {len(outcome_rewards)} entries but response_ids has "
                         f"{len(response_ids)}")
    rows = setup.options.alpha * completion_rewards(scorer, prompts, responses, response_ids, length=length,
                                                    setup=setup)
    for b, ids in enumerate(response_ids):
        if len(ids):
            rows[b, len(ids) - 1] = float(outcome_rewards[b])
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Reward manager (verl's reward loop): outcome reward from verl's compute_score, token rewards from the PRM.

# reward_kwargs keys besides the P2TOptions fields that stay with the manager (the rest go to from_pretrained)
_SETUP_KEYS = ("score_kwargs", "backend")


def _reward_kwargs(config) -> Dict[str, Any]:
    if config is None:
        return {}
    reward = _cfg_get(config, "reward", None)
    kw = _cfg_get(reward, "reward_kwargs", None) if reward is not None else None
    if kw is None:
        return {}
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(kw):
            kw = OmegaConf.to_container(kw, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(kw)


from verl.experimental.reward_loop.reward_manager import NaiveRewardManager as _NaiveRewardManager  # noqa: E402
from verl.experimental.reward_loop.reward_manager import register as _register_reward_manager  # noqa: E402


def check_reward_routing(config) -> None:
    """Raise unless verl will hand the p2t manager's per-token rows to the advantage estimator.

    verl 0.9's default trainer (``trainer.use_v1=True``, V1): the reward of each trajectory is computed
    inside the agent loop as it finishes (no colocated reward model, or a reward model with its own
    resource pool) and stored as one float on its last token; :class:`P2TAgentLoopManager` (set as
    ``actor_rollout_ref.rollout.agent.agent_loop_manager_class``) stores the p2t row instead. V1's other
    route, the batch pass of a colocated reward model, hands the reward loop only ``prompts``,
    ``responses``, ``attention_mask`` and ``raw_prompt`` (no ``data_source`` and no ground truth, so no outcome
    reward can be computed) and is refused.

    V0 trainer (``trainer.use_v1=False``): rewards computed inside the agent loop are one float per sequence;
    the reward loop's batch pass (``RewardLoopManager.compute_rm_score``, used when
    ``reward.reward_model.enable=True`` without a separate resource pool) lays the rows out with
    :meth:`P2TRewardManager.assemble_rm_scores`, calling the manager's ``run_single`` when
    ``reward.custom_reward_function.path`` is set (otherwise verl sends the sample to its own reward model
    server).

    A config without a ``reward.reward_model`` section (direct use, tests) is not checked; one without a
    ``trainer`` section is taken as ``trainer.use_v1=False``.
    """
    reward = _cfg_get(config, "reward", None) if config is not None else None
    rm = _cfg_get(reward, "reward_model", None) if reward is not None else None
    if rm is None:
        return
    crf = _cfg_get(reward, "custom_reward_function", None)
    has_crf = crf is not None and _cfg_get(crf, "path", None) is not None
    enable = bool(_cfg_get(rm, "enable", False))
    pool = bool(_cfg_get(rm, "enable_resource_pool", False))
    trainer = _cfg_get(config, "trainer", None)
    problems = []
    if trainer is not None and bool(_cfg_get(trainer, "use_v1", False)):
        rollout = _cfg_get(_cfg_get(config, "actor_rollout_ref", None) or {}, "rollout", None) or {}
        agent = _cfg_get(rollout, "agent", None) or {}
        if _cfg_get(agent, "agent_loop_manager_class", None) != AGENT_LOOP_MANAGER:
            problems.append(f"+actor_rollout_ref.rollout.agent.agent_loop_manager_class={AGENT_LOOP_MANAGER}")
        if enable and not pool:
            problems.append("reward.reward_model.enable=False (or reward.reward_model.enable_resource_pool=True)")
        if enable and not has_crf:
            problems.append("reward.custom_reward_function.path=<file with your outcome compute_score>")
        if problems:
            raise ValueError(
                "on verl's V1 trainer (trainer.use_v1=True) the p2t manager's per-token rows reach the advantage "
                "estimator only through the agent loop, with p2t's agent-loop manager; V1's colocated reward-model "
                "pass hands the reward manager no data_source or ground truth. Set " + ", ".join(problems) +
                " (or use the V0 trainer: trainer.use_v1=False with a colocated reward model, see "
                "docs/integrations.md).")
        return
    if not enable:
        problems.append("reward.reward_model.enable=True")
    if pool:
        problems.append("reward.reward_model.enable_resource_pool=False")
    if not has_crf:
        problems.append("reward.custom_reward_function.path=<file with your outcome compute_score>")
    if problems:
        raise ValueError(
            "the p2t reward manager writes one reward per token, which verl's V0 trainer (trainer.use_v1=False) "
            "passes on only from the reward loop's batch pass, not from rewards computed inside the agent loop "
            "(one float per sequence). Set " + ", ".join(problems) + " (reward.reward_model.model_path: the "
            "PRM), or use the V1 trainer with p2t's agent-loop manager (see docs/integrations.md).")


class P2TRewardManager(_NaiveRewardManager):
    """verl reward-loop manager ``"p2t"``: the outcome reward of verl's naive manager (``compute_score``)
    on the last response token and ``alpha * r_i`` from a :class:`p2t.P2TScorer` on the others.

    ``run_single`` returns the whole row as ``reward_score`` and :meth:`assemble_rm_scores` lays the rows
    into ``rm_scores``. The PRM is loaded once per worker process from ``reward.reward_kwargs.prm``
    (default ``reward.reward_model.model_path``; ``prm_kind`` for its kind, ``device`` for where it runs),
    reached as a service at ``reward.reward_kwargs.prm_url`` (:func:`p2t.integrations.scorers.http_scorer`,
    ``prm_timeout`` seconds), or passed as ``scorer=``.
    The rows reach ``rm_scores`` through :class:`P2TAgentLoopManager`'s workers (V1 trainer) or the reward
    loop's batch pass (V0 trainer): see :func:`check_reward_routing`, which the constructor runs on verl's
    config.
    """

    _shared_scorer = None
    _score_lock = threading.Lock()

    def __init__(self, config, tokenizer, compute_score, reward_router_address=None, reward_model_tokenizer=None,
                 scorer=None, **options):
        check_reward_routing(config)
        super().__init__(config, tokenizer, compute_score, reward_router_address=reward_router_address,
                         reward_model_tokenizer=reward_model_tokenizer)
        kw = _reward_kwargs(config)
        kw.update(options)
        null_given = kw.get("null") is not None
        opts = P2TOptions.from_mapping({k: kw.pop(k) for k in P2TOptions.names() if k in kw})
        if null_given:                      # the null embedding is also the scorer's (fixed when it is built)
            kw["null"] = opts.null
        self.p2t_setup = RewardSetup(opts, **{k: kw.pop(k) for k in _SETUP_KEYS if k in kw})
        self.p2t_options = opts
        prm = kw.pop("prm", None)
        if prm is None and config is not None:   # default: verl's reward model path
            rm = _cfg_get(_cfg_get(config, "reward", None) or {}, "reward_model", None)
            prm = _cfg_get(rm, "model_path", None) if rm is not None else None
        prm_kind = kw.pop("prm_kind", "step_classifier")
        prm_url = kw.pop("prm_url", None)
        prm_timeout = float(kw.pop("prm_timeout", 120.0))
        if scorer is None and prm_url is not None and self.p2t_setup.needs_prm:
            from .scorers import http_scorer      # a PRM service elsewhere: nothing is loaded here
            scorer = http_scorer(str(prm_url), timeout=prm_timeout)
        if scorer is None and self.p2t_setup.needs_prm:
            if type(self)._shared_scorer is None:
                if prm is None:
                    raise ValueError("the p2t reward manager needs a PRM: set reward.reward_kwargs.prm (or "
                                     "reward.reward_model.model_path) to a path or id, reward.reward_kwargs.prm_kind "
                                     "to its kind, or pass scorer=")
                from ..attribution import P2TScorer
                type(self)._shared_scorer = P2TScorer.from_pretrained(prm, kind=prm_kind, policy_tokenizer=tokenizer,
                                                                      **kw)
            scorer = type(self)._shared_scorer
        check_scorer(scorer, self.p2t_options.mode)
        self.p2t_scorer = scorer

    async def run_single(self, data) -> dict:
        result = await super().run_single(data)
        outcome = float(result["reward_score"])
        item = data[-1:][0]
        response_ids = item.batch["responses"]
        n = int(item.batch["attention_mask"][-response_ids.shape[-1]:].sum().item())
        response_len = item.non_tensor_batch.get("response_len", None)
        if response_len is not None:
            # verl's agent loop says how long the response is: in a multi-output session the inputs are
            # padded to the session's longest, so the attention mask's last columns need not be the response
            n = min(int(response_len), response_ids.shape[-1])
        ids = response_ids[:n].tolist()
        prompt = self._prompt(item)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)

        def score_row():
            # the reward loop runs samples concurrently; one PRM forward/backward at a time (the scorer
            # freezes and restores the PRM's parameters around each call)
            with type(self)._score_lock:
                return p2t_reward_rows(self.p2t_scorer, [prompt], [text], [ids], [outcome], length=max(n, 1),
                                       setup=self.p2t_setup)

        row = (await self.loop.run_in_executor(None, score_row))[0, :n]
        rmask = item.batch.get("response_mask", None) if hasattr(item.batch, "get") else None
        if rmask is not None and n > 0:
            # multi-turn rows: tool/observation tokens (response_mask 0) get no token reward, and the outcome
            # goes on the last policy token, where the estimator reads it
            keep = rmask[:n].bool().to(row.device)
            if bool(keep.any()):
                row = torch.where(keep, row, torch.zeros_like(row))
                row[int(last_valid_index(keep.unsqueeze(0))[0])] = outcome
        result["reward_score"] = row.tolist()
        result.setdefault("reward_extra_info", {})["p2t_outcome"] = outcome
        return result

    def _prompt(self, item):
        raw = item.non_tensor_batch.get("raw_prompt", None)
        if raw is not None:
            return list(raw) if not isinstance(raw, str) else raw
        prompt_ids = item.batch["prompts"]
        keep = item.batch["attention_mask"][:prompt_ids.shape[-1]].bool()   # left- or right-padded prompts
        return self.tokenizer.decode(prompt_ids[keep].tolist(), skip_special_tokens=True)

    @classmethod
    def assemble_rm_scores(cls, data, scores) -> torch.Tensor:
        """``rm_scores [B, T]`` from per-sample rows (lists from :meth:`run_single`) or plain floats (put on
        the last response token, as verl does)."""
        prompt_length = data.batch["prompts"].size(1)
        valid = data.batch["attention_mask"][:, prompt_length:].sum(dim=1)
        rm = torch.zeros_like(data.batch["responses"], dtype=torch.float32)
        for b, s in enumerate(scores):
            n = int(valid[b].item())
            if isinstance(s, (list, tuple, np.ndarray, torch.Tensor)):
                row = torch.as_tensor(np.asarray(s, dtype=np.float32))
                if row.numel() != n:
                    raise ValueError(f"reward row {b} has {row.numel()} values for {n} response tokens")
                rm[b, :n] = row.to(rm.device)
            elif n > 0:
                rm[b, n - 1] = float(s)
        return rm


def _register_reward_manager_cls() -> None:
    from verl.experimental.reward_loop.reward_manager import registry as _rm_registry
    old = _rm_registry.REWARD_MANAGER.get(NAME)
    if old is not None and (old.__module__, old.__qualname__) == (P2TRewardManager.__module__,
                                                                  P2TRewardManager.__qualname__):
        _rm_registry.REWARD_MANAGER[NAME] = P2TRewardManager
    else:
        _register_reward_manager(NAME)(P2TRewardManager)


def register() -> None:
    """Register the estimator and the reward manager under ``"p2t"`` (done on import; idempotent)."""
    _register_estimator()
    _register_reward_manager_cls()


_register_reward_manager_cls()


# ---------------------------------------------------------------------------------------------------------------
# verl's V1 trainer: token rows through the agent loop (actor_rollout_ref.rollout.agent.agent_loop_manager_class).

AGENT_LOOP_MANAGER = "p2t.integrations.verl.P2TAgentLoopManager"


def session_rows(row: Sequence[float], outcome: float, response_mask: Sequence[int]) -> list:
    """A trajectory's ``rm_scores`` row from the p2t manager's row (over all response tokens): no token reward
    on tool/observation tokens (``response_mask`` 0), the outcome on the last policy token (the last token
    when no token is the policy's)."""
    n = len(response_mask)
    if len(row) != n:
        raise ValueError(f"the p2t reward row has {len(row)} values for {n} response tokens")
    out = [float(v) if m else 0.0 for v, m in zip(row, response_mask)]
    if n:
        last = max((i for i, m in enumerate(response_mask) if m), default=n - 1)
        out[last] = float(outcome)
    return out


def row_output_class(base):
    """``base`` (verl's ``AgentLoopOutput`` or a subclass of it) with an ``as_dict`` whose ``rm_scores`` is the
    row in ``extra_fields["p2t_row"]`` instead of one float on the last token. The subclass adds no field, so
    an instance of ``base`` can take it as its class (see :func:`carry_row`). One class per base, cached."""
    cached = _ROW_CLASSES.get(base)
    if cached is not None:
        return cached

    def as_dict(self):
        row = self.extra_fields.pop("p2t_row", None)
        out = base.as_dict(self)
        if row is not None:
            out["rm_scores"] = torch.tensor(row, dtype=torch.float32)
            out.get("extra_fields", {}).pop("p2t_row", None)
        return out

    name = "P2T" + base.__name__.lstrip("_")
    cls = type(name, (base,), {"as_dict": as_dict, "__module__": __name__, "__qualname__": name,
                               "__doc__": f"verl's {base.__name__} whose ``rm_scores`` is the p2t row."})
    _ROW_CLASSES[base] = cls
    return cls


_ROW_CLASSES: Dict[type, type] = {}


def carry_row(output, row: Sequence[float]) -> None:
    """Make verl's agent-loop ``output`` write ``row`` as its ``rm_scores``.

    verl 0.9's agent loop keeps a trajectory's reward as one float (``AgentLoopOutput.reward_score``, which
    ``as_dict`` puts on the last token) and offers no hook for a per-token row; the worker runs ``as_dict``
    on the very objects its ``_compute_score`` received. So the output's class becomes
    :func:`row_output_class` of its class: the same fields and layout, one method overridden. Python refuses
    the assignment when the layouts differ, and that is raised here with verl's version (the tests check the
    shape of verl's class that this relies on)."""
    output.extra_fields["p2t_row"] = [float(v) for v in row]
    cls = row_output_class(type(output)) if type(output) not in _ROW_CLASSES.values() else type(output)
    try:
        object.__setattr__(output, "__class__", cls)   # (pydantic's __setattr__ takes fields only)
    except TypeError as e:
        import verl
        raise RuntimeError(f"p2t: cannot give verl {verl.__version__}'s {type(output).__name__} a per-token "
                           f"rm_scores row ({e}); this verl's agent-loop output has changed shape") from e


def _agent_loop_classes():
    """``(P2TAgentLoopManager, P2TAgentLoopWorker, P2TAgentLoopOutput)``, built on first use (verl's V1 agent
    loop imports Ray and TransferQueue)."""
    cached = globals().get("_V1_CLASSES")
    if cached is not None:
        return cached
    import ray
    from verl.experimental.agent_loop.agent_loop import AgentLoopOutput
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ, AgentLoopWorkerTQ

    worker_base = getattr(AgentLoopWorkerTQ, "__ray_actor_class__", AgentLoopWorkerTQ)

    class P2TAgentLoopWorker(worker_base):
        """verl's V1 agent-loop worker; a trajectory's reward from the p2t manager (a row of per-token rewards)
        becomes its ``rm_scores`` row. Other outputs of a multi-output session get the outcome on their last
        token, as verl gives them the session's score."""

        async def _compute_score(self, outputs, kwargs):
            await super()._compute_score(outputs, kwargs)
            final = outputs[-1]
            score = final.reward_score
            if not isinstance(score, (list, tuple, np.ndarray, torch.Tensor)):
                return
            row = [float(v) for v in (score.tolist() if hasattr(score, "tolist") else score)]
            info = final.extra_fields.get("reward_extra_info", None) or {}
            outcome = float(info.get("p2t_outcome", row[-1] if row else 0.0))
            final.reward_score = outcome
            carry_row(final, session_rows(row, outcome, final.response_mask))
            if len(outputs) > 1 and not getattr(type(self), "_p2t_warned", False):
                type(self)._p2t_warned = True
                warnings.warn("p2t: an agent loop returned several outputs for one session; each output is a row "
                              "of its uid group for the 'p2t' estimator (verl's GRPO groups only the session's "
                              "final output), and only the final output carries token rewards", stacklevel=2)

    class P2TAgentLoopManager(AgentLoopManagerTQ):
        """verl's V1 agent-loop manager with :class:`P2TAgentLoopWorker` workers: set
        ``+actor_rollout_ref.rollout.agent.agent_loop_manager_class=p2t.integrations.verl.P2TAgentLoopManager``."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.agent_loop_workers_class = ray.remote(P2TAgentLoopWorker)

    globals()["_V1_CLASSES"] = (P2TAgentLoopManager, P2TAgentLoopWorker, row_output_class(AgentLoopOutput))
    return globals()["_V1_CLASSES"]


def __getattr__(name):
    if name in ("P2TAgentLoopManager", "P2TAgentLoopWorker", "P2TAgentLoopOutput"):
        manager, worker, output = _agent_loop_classes()
        return {"P2TAgentLoopManager": manager, "P2TAgentLoopWorker": worker, "P2TAgentLoopOutput": output}[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
