"""The lean GRPO loop with outcome, process or P2T token advantages.

One update:
  1. take ``prompts_per_update`` prompts, sample ``group_size`` responses each (:mod:`p2t.grpo.sampling`:
     a KV-cached decode loop for Qwen2/Llama-style policies, else HF ``generate``);
  2. outcome rewards, and which responses are correct, from the user's reward function (:func:`outcomes`);
  3. (modes that read a PRM) one scorer call (:func:`p2t.grpo.advantages.rollout_advantages`): step rewards
     (and, in p2t mode, per-token attributions) aligned to the completion columns, on the policy's device;
  4. token rewards (:func:`p2t.token_rewards`) and advantages (p2t mode: the fused :func:`p2t.p2t_advantages`
     where the scorer can fuse), under the config's :class:`p2t.P2TOptions`;
  5. ``num_iterations`` passes of the clipped surrogate over the batch (old log-probs stored when > 1),
     ``gradient_accumulation_steps`` micro-batches per optimiser step, gradient clipping; the policy's
     log-probs from :func:`p2t.grpo.logprobs.completion_logprobs` (chunked for large vocabularies).

Each update's prompts and sampling noise are seeded from (seed, update index), so a run resumed from a
checkpoint continues exactly as an uninterrupted one would. What is trained and rewarded (models,
tokenizer, scorer, reward, prompts, extra metrics) comes in a resolved set-up (:mod:`p2t.grpo.setup`,
whose :class:`~p2t.grpo.setup.GRPOTrainer` builds this loop from a config alone); this module knows
neither the set-up nor the toy lab.
"""
from __future__ import annotations

import copy
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import advantages as adv_mod
from . import loss as loss_mod
from . import sampling
from ..rewards import get_mode
from .checkpoint import load_checkpoint, save_checkpoint
from .config import GRPOConfig
from .logprobs import completion_logprobs
from .metrics import MetricsLog, plot_curves

__all__ = ["GRPOLoop", "Rollout", "outcomes"]

RewardFn = Callable[..., Sequence[Any]]


def outcomes(values, n: int, threshold: float) -> Tuple[List[float], List[bool]]:
    """The reward function's contract: for ``n`` responses it returns ``n`` floats (a response is
    correct when its reward ``>= threshold``, the config's ``correct_threshold``) or ``n``
    ``(reward, correct)`` pairs (the function says which responses are correct). Returns (rewards,
    correct) as lists."""
    values = list(values)
    if len(values) != n:
        raise ValueError(f"the reward function returned {len(values)} values for {n} responses")
    pairs = [isinstance(v, (tuple, list)) for v in values]
    if any(pairs):
        if not all(pairs) or any(len(v) != 2 for v in values):
            raise ValueError("the reward function must return a float per response or a (reward, correct) pair "
                             "per response, not a mix")
        return [float(r) for r, _ in values], [bool(ok) for _, ok in values]
    rewards = [float(v) for v in values]
    return rewards, [r >= threshold for r in rewards]


@dataclass
class Rollout:
    """One batch of sampled completions and everything the loss needs."""
    prompts: List[str]
    responses: List[str]
    columns: Dict[str, list]
    input_ids: torch.Tensor         # [B, P + N] left-padded prompt + completion
    attention_mask: torch.Tensor    # [B, P + N]
    prompt_len: int                 # P
    completion_mask: torch.Tensor   # [B, N] completion tokens up to and including EOS
    outcome_rewards: torch.Tensor   # [B]
    correct: torch.Tensor           # [B] bool: the response is correct (the reward function's contract)
    advantages: torch.Tensor        # [B, N]
    token_rewards: torch.Tensor     # [B, N]
    scored: Any = None              # the P2TScorer batch (modes that read a PRM)
    segment_ids: Optional[torch.Tensor] = None  # [B, N] aligned to the completion
    token_scores: Optional[torch.Tensor] = None     # [B, N] attributions aligned to the completion
    segment_rewards: Optional[torch.Tensor] = None  # [S]
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None


class GRPOLoop:
    """GRPO on a HF causal LM with token advantages of any registered mode, over a resolved set-up.

    Args:
        config: the settings (:class:`GRPOConfig`).
        setup: what is trained and rewarded, resolved (a :class:`p2t.grpo.setup.Setup`: device, policy,
            tokenizer, scorer, reward function, prompt source, evaluation rows, whether it is the toy lab,
            and ``metrics``: callables ``fn(rollout) -> dict`` whose entries join each update's record).

    Most code builds it as :class:`p2t.grpo.GRPOTrainer` ``(config)``, which resolves the set-up first.
    """

    def __init__(self, config: GRPOConfig, setup, *, log: Optional[Callable[[str], None]] = None):
        config.validate()
        self.config = c = config
        self.log = log or (lambda s: None)
        self.setup = setup
        self.device, self.policy, self.tokenizer = setup.device, setup.policy, setup.tokenizer
        self.scorer, self.reward_fn, self.prompt_source = setup.scorer, setup.reward_fn, setup.prompt_source
        self.eval_rows, self.lab = setup.eval_rows, setup.lab
        self.metrics = list(setup.metrics)
        self.options = c.p2t_options(lab=setup.lab)  # every advantage option, checked once
        self.reads_prm = get_mode(self.options.mode).needs_prm
        self.ref_model = None
        if c.beta > 0:  # frozen copy of the starting policy; nothing is loaded when beta == 0
            self.ref_model = copy.deepcopy(self.policy).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=c.learning_rate,
                                           betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay)
        self.update = 0          # completed updates
        self.last_rollout: Optional[Rollout] = None
        self.history: List[dict] = []

    @property
    def run_config(self) -> GRPOConfig:
        """The config with what the set-up resolved written in (``alpha``): what the run used."""
        return self.config.replace(alpha=self.options.alpha)

    # ------------------------------------------------------------------ sampling
    def _generate(self, prompts: List[str], num_samples: int, temperature: float, seed: int):
        """Sampled completions of every prompt, ``num_samples`` each (rows grouped by prompt). Returns
        ``(input_ids [B, P + N], attention_mask [B, P + N], P, completion_mask [B, N], response texts,
        response token ids without the EOS (lists), prompt of each row)``."""
        tok = self.tokenizer
        expanded = [p for p in prompts for _ in range(num_samples)]
        enc = tok(expanded, return_tensors="pt", padding=True).to(self.device)
        P = enc["input_ids"].shape[1]
        self.policy.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.no_grad(), self._autocast():
                out = sampling.sample(self.policy, enc["input_ids"], enc["attention_mask"],
                                      max_new_tokens=self.config.max_new_tokens, temperature=temperature,
                                      top_p=self.config.top_p, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, sampler=self.config.sampler)
        comp = out[:, P:]
        is_eos = comp == tok.eos_token_id
        # completion tokens: everything up to and including the first EOS
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
        cmask = ~after_eos
        ids_wo_eos = [[t for t, m, e in zip(r, mr, er) if m and not e] for r, mr, er in
                      zip(comp.tolist(), cmask.tolist(), is_eos.tolist())]
        responses = tok.batch_decode(ids_wo_eos, skip_special_tokens=True)
        attn = torch.cat([enc["attention_mask"], cmask.long()], dim=1)
        return out, attn, P, cmask, responses, ids_wo_eos, expanded

    def _autocast(self):
        if self.config.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # ------------------------------------------------------------------ log-probs
    def _logps(self, model, input_ids, attention_mask, prompt_len: int) -> torch.Tensor:
        """Log-probabilities ``[B, N]`` of the completion tokens (logits divided by the sampling temperature;
        TRL's chunked kernel for large vocabularies: :mod:`p2t.grpo.logprobs`)."""
        return completion_logprobs(model, input_ids, attention_mask, prompt_len, temperature=self.config.temperature,
                                   chunked_vocab=self.config.chunked_logprobs_vocab, autocast=self._autocast())

    def _outcomes(self, prompts: List[str], responses: List[str], columns: Dict[str, list]):
        """(rewards, correct) lists of the responses: the reward function under its contract (:func:`outcomes`)."""
        return outcomes(self.reward_fn(prompts, responses, **columns), len(responses), self.config.correct_threshold)

    # ------------------------------------------------------------------ rollout
    def rollout(self, update: int) -> Rollout:
        c = self.config
        rows = self.prompt_source(update, c.prompts_per_update)
        prompts = [r["prompt"] for r in rows]
        ids, attn, P, cmask, responses, resp_ids, expanded = self._generate(
            prompts, c.group_size, c.temperature, seed=c.seed * 1_000_003 + update)
        columns = {k: [r[k] for r in rows for _ in range(c.group_size)] for k in rows[0] if k != "prompt"}
        rewards, correct = self._outcomes(expanded, responses, columns)
        o = torch.tensor(rewards, dtype=torch.float32, device=self.device)
        if c.mask_truncated_completions:  # no EOS: cut at max_new_tokens, left out of the loss (TRL's meaning)
            cmask = cmask & (ids[:, P:] == self.tokenizer.eos_token_id).any(-1, keepdim=True)
        images = {}
        if self.reads_prm and c.prm_image_column is not None:  # a vision-language PRM reads each image
            if c.prm_image_column not in columns:
                raise ValueError(f"prm_image_column={c.prm_image_column!r} is not a column of the prompts "
                                 f"(columns: {', '.join(sorted(columns)) or 'none'})")
            images = dict(images=columns[c.prm_image_column])
        # one scorer call, aligned to the completion columns, on the policy's device (p2t: the fused op)
        adv, tr, scored = adv_mod.rollout_advantages(self.scorer, self.options, expanded, resp_ids, o, cmask,
                                                     group_size=c.group_size, fused=c.fused_advantages,
                                                     device=self.device, extra=images)
        r = Rollout(expanded, responses, columns, ids, attn, P, cmask, o,
                    torch.tensor(correct, dtype=torch.bool, device=self.device), adv, tr, scored)
        if scored is not None:
            r.segment_ids, r.token_scores, r.segment_rewards = scored.segment_ids, scored.scores, scored.segment_rewards
        with torch.no_grad():
            if c.num_iterations > 1:
                r.old_logp = self._logps(self.policy, ids, attn, P)
            if self.ref_model is not None:
                r.ref_logp = self._logps(self.ref_model, ids, attn, P)
        return r

    # ------------------------------------------------------------------ optimisation
    def compute_loss(self, r: Rollout, rows: slice, num_items_in_batch: int):
        """Loss of one micro-batch (rows of the rollout) and its statistics."""
        c = self.config
        mask = r.completion_mask[rows]
        logp = self._logps(self.policy, r.input_ids[rows], r.attention_mask[rows], r.prompt_len)
        old = r.old_logp[rows] if r.old_logp is not None else logp.detach()
        ref = r.ref_logp[rows] if r.ref_logp is not None else None
        per_tok, parts = loss_mod.per_token_loss(logp, old, r.advantages[rows], epsilon=c.epsilon,
                                                 epsilon_high=c.clip_high, beta=c.beta, ref_logp=ref)
        loss = loss_mod.aggregate(per_tok, mask, c.loss_type, max_completion_length=c.max_new_tokens,
                                  gradient_accumulation_steps=c.gradient_accumulation_steps,
                                  num_items_in_batch=num_items_in_batch)
        m = mask.float()
        stats = {"clip_ratio": float((parts["clipped"].float() * m).sum() / m.sum().clamp(min=1)),
                 "kl": float((parts["kl"] * m).sum() / m.sum().clamp(min=1)) if "kl" in parts else 0.0}
        return loss, stats

    def optimize(self, r: Rollout) -> Dict[str, float]:
        c = self.config
        B = r.input_ids.shape[0]
        mb = B // c.gradient_accumulation_steps
        n_items = int(r.completion_mask.sum())
        self.policy.train()
        losses, clips, kls, norms = [], [], [], []
        lr = c.learning_rate * min(1.0, (self.update + 1) / max(c.warmup_updates, 1))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for _ in range(c.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for k in range(c.gradient_accumulation_steps):
                loss, st = self.compute_loss(r, slice(k * mb, (k + 1) * mb), n_items)
                loss.backward()
                losses.append(loss.item())
                clips.append(st["clip_ratio"])
                kls.append(st["kl"])
            norms.append(float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.max_grad_norm)))
            self.optimizer.step()
        self.policy.eval()
        per_pass = c.gradient_accumulation_steps
        return {"loss": sum(losses[:per_pass]),  # the first pass's batch loss (ratio 1 there)
                "clip_ratio": sum(clips) / len(clips), "kl": sum(kls) / len(kls), "grad_norm": norms[0]}

    def step(self) -> Dict[str, Any]:
        """One full update; returns its metrics."""
        t0 = time.time()
        update = self.update
        r = self.rollout(update)
        self.last_rollout = r
        t_roll = time.time() - t0
        opt = self.optimize(r)
        self.update += 1
        c = self.config
        lengths = r.completion_mask.sum(-1).float()
        rec = {"update": self.update, "mode": c.mode, "reward": r.outcome_rewards.mean().item(),
               "accuracy": r.correct.float().mean().item(),
               "completion_length": lengths.mean().item(), **opt,
               "rollout_s": round(t_roll, 3), "update_s": round(time.time() - t0, 3)}
        if r.scored is not None:  # the scorer's results reach the CPU here, once, for the log
            rec.update(adv_mod.scored_stats(r.scored, temperature=self.options.temperature,
                                            standardize=self.options.standardize))
        for metric in self.metrics:  # the set-up's own (the toy lab: the true step accuracy)
            rec.update(metric(r))
        return rec

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Sampled accuracy (and mean reward) on the evaluation prompts, with a fixed sampling seed."""
        c = self.config
        if not self.eval_rows:
            return {}
        prompts = [r["prompt"] for r in self.eval_rows]
        _, _, _, _, responses, _, expanded = self._generate(prompts, c.eval_samples_per_prompt, c.eval_temperature,
                                                            seed=c.eval_seed)
        cols = {k: [r[k] for r in self.eval_rows for _ in range(c.eval_samples_per_prompt)]
                for k in self.eval_rows[0] if k != "prompt"}
        rew, correct = self._outcomes(expanded, responses, cols)
        return {"eval_accuracy": sum(correct) / len(rew), "eval_reward": sum(rew) / len(rew)}

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.config.output_dir, "checkpoint.pt")

    def save(self):
        save_checkpoint(self.checkpoint_path, {
            "update": self.update, "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
            "config": self.run_config.to_dict()})

    def load(self, path: Optional[str] = None) -> bool:
        path = path or self.checkpoint_path
        if not os.path.exists(path):
            return False
        state = load_checkpoint(path, map_location=self.device)
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.update = int(state["update"])
        return True

    # ------------------------------------------------------------------ the loop
    def train(self) -> List[dict]:
        c = self.config
        os.makedirs(c.output_dir, exist_ok=True)
        self.run_config.save(os.path.join(c.output_dir, "config.json"))
        metrics = MetricsLog(os.path.join(c.output_dir, "metrics.jsonl"))
        if c.resume and self.load():
            self.log(f"resumed from {self.checkpoint_path} after update {self.update}")
            metrics.truncate(self.update)
        else:
            metrics.truncate(-1)
        if self.update == 0 and c.eval_every:
            rec = {"update": 0, "mode": c.mode, **self.evaluate()}
            metrics.write(rec)
        bar = None
        if c.progress:
            from tqdm import tqdm
            bar = tqdm(total=c.num_updates, initial=self.update, desc=f"grpo[{c.mode}]", dynamic_ncols=True)
        last_eval = None
        while self.update < c.num_updates:
            rec = self.step()
            if c.eval_every and (self.update % c.eval_every == 0 or self.update == c.num_updates):
                rec.update(self.evaluate())
                last_eval = rec.get("eval_accuracy")
            metrics.write(rec)
            self.history.append(rec)
            if c.save_every and (self.update % c.save_every == 0 or self.update == c.num_updates):
                self.save()
            if bar is not None:
                post = {"reward": f"{rec['reward']:.3f}", "acc": f"{rec['accuracy']:.3f}"}
                if last_eval is not None:
                    post["eval_acc"] = f"{last_eval:.3f}"
                bar.set_postfix(post)
                bar.update(1)
        if bar is not None:
            bar.close()
        records = metrics.read()
        try:
            plot_curves({c.mode: [records]}, os.path.join(c.output_dir, "curves.png"))
        except ImportError as e:  # matplotlib is optional
            self.log(f"no plot: {e}")
        return records

    def save_pretrained(self, path: str):
        self.policy.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
