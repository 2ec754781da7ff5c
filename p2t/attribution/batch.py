"""The scorer's output contract: :class:`ScoredBatch` (tensors aligned to the policy's tokens, padded,
on one device), its per-response :class:`PRMView` s (built on first access), and :class:`Assembly`, which
fills a batch micro-batch by micro-batch. Token rewards of each mode come from :func:`p2t.token_rewards`
(:mod:`p2t.rewards`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch

from ..options import MODES, NORMALIZE, SCALES, P2TOptions  # noqa: F401  (MODES, NORMALIZE, SCALES re-exported)
from ..rewards import token_rewards

__all__ = ["ScoredBatch", "PRMView", "PRMViews", "Assembly"]


@dataclass
class PRMView:
    """The PRM-level view of one response, for inspection.

    ``input_ids``/``tokens``: the PRM input (prompt template, steps, separators); ``attributions``:
    ``[L]`` per PRM token (0 outside steps); ``step_index``: ``[L]`` local step of each PRM token, -1 for
    prompt, separators and template; ``readout_positions``: where each step is read;
    ``step_rewards``/``step_logits``: R_s and its log-odds per step; ``step_spans``: character spans of
    the steps in ``response_text``; ``policy_spans``: character spans of the policy tokens.
    """
    input_ids: List[int]
    tokens: List[str]
    attributions: torch.Tensor
    step_index: torch.Tensor
    readout_positions: List[int]
    step_rewards: torch.Tensor
    step_logits: torch.Tensor
    step_spans: List[tuple]
    response_text: str
    policy_spans: List[tuple]
    prompt_length: int


class PRMViews(Sequence):
    """One :class:`PRMView` per response, built on first access (token strings, CPU copies), so a
    training step that never looks at them pays nothing for them."""

    def __init__(self, n: int, build: Callable[[int], Optional[PRMView]]):
        self._n, self._build, self._cache = n, build, {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(f"response {i} out of range for {self._n} responses")
        i %= self._n
        if i not in self._cache:
            self._cache[i] = self._build(i)
        return self._cache[i]

    def __repr__(self) -> str:
        return f"PRMViews({self._n} responses)"


@dataclass
class ScoredBatch:
    """Attributions on the policy's tokens, ready for :func:`p2t.segment_redistribute` /
    :func:`p2t.p2t_advantages` or :meth:`token_rewards`.

    scores: ``[B, N]`` attribution per policy response token (N = ``length`` when given, else the
        longest response; left aligned: column 0 is the first response token), 0 on padding. float32
        (float64 for a float64 PRM).
    segment_ids: int64 ``[B, N]`` global step ids in ``[0, S)`` (a step is the set of its tokens), -1 for
        tokens in no step (separators, whitespace between steps, special tokens, truncated steps,
        responses without a step, padding).
    segment_rewards: ``[S]`` step rewards R_s as probabilities in [0, 1].
    segment_logits: ``[S]`` their log-odds (what ``objective="logit"`` differentiates).
    response_mask: bool ``[B, N]``, True on the response's tokens.
    steps_per_response: number of steps of each response (ids of response b follow those of b-1).
    prm: one :class:`PRMView` per response (``None`` for a response that was not scored).
    advantages: ``[B, N]`` token advantages when the batch comes from
        :meth:`~p2t.attribution.P2TScorer.advantages_ids` (``None`` otherwise).
    """
    scores: torch.Tensor
    segment_ids: torch.Tensor
    segment_rewards: torch.Tensor
    segment_logits: torch.Tensor
    response_mask: torch.Tensor
    steps_per_response: List[int]
    prm: Any = field(repr=False)
    method: str = "taylor"
    objective: str = "logit"
    advantages: Optional[torch.Tensor] = None
    # the segment ids are the scorer's own (in [-1, S), each step inside its response): the token-reward
    # modes do not check them again (a check reads them back to the host, a device sync per call)
    ids_checked = True

    def to(self, device) -> "ScoredBatch":
        """The same batch with its tensors (not the PRM views) on ``device``."""
        return ScoredBatch(self.scores.to(device), self.segment_ids.to(device), self.segment_rewards.to(device),
                           self.segment_logits.to(device), self.response_mask.to(device),
                           list(self.steps_per_response), self.prm, self.method, self.objective,
                           None if self.advantages is None else self.advantages.to(device))

    def token_rewards(self, options: Optional[P2TOptions] = None, /, **overrides) -> torch.Tensor:
        """:func:`p2t.token_rewards` of this batch (``overrides``: option fields, e.g. ``mode="process"``)."""
        return token_rewards(self, options, **overrides)


class Assembly:
    """Collects the micro-batches of one scoring call into a :class:`ScoredBatch` on ``device``: the
    segment ids and mask are known on the host before any PRM call (one copy each); attributions are
    scattered from PRM positions onto policy tokens where they were computed (no host round trip).
    Create it where autograd is on (the output tensors must not be inference tensors)."""

    def __init__(self, rows: Sequence, lens: Sequence[int], length: int, device, dtype, tokenizer):
        import numpy as np
        self.rows, self.dev, self.dtype, self.tokenizer = rows, torch.device(device), dtype, tokenizer
        live = [r for r in rows if r is not None]
        self.steps = [r.num_steps if r is not None else 0 for r in rows]
        self.base = np.concatenate([[0], np.cumsum(self.steps)]).astype(np.int64)
        B, N = len(rows), int(length)
        seg = np.full((B, N), -1, dtype=np.int64)
        for r in live:  # a response's policy tokens: its local step + its first step id (a row slice each)
            ps = r.policy_step
            seg[r.index, :ps.shape[0]] = np.where(ps >= 0, ps + self.base[r.index], -1)
        self.segment_ids = torch.from_numpy(seg).to(self.dev)
        self.mask = torch.from_numpy(np.arange(N)[None, :] < np.asarray(lens)[:, None]).to(self.dev)
        self.scores = torch.zeros((B, N), dtype=dtype, device=self.dev)
        self.logits = torch.zeros(int(self.base[-1]), dtype=dtype, device=self.dev)
        self.per_row = {}

    def add(self, mb, attr: Optional[torch.Tensor], m: torch.Tensor) -> None:
        """One micro-batch (a :class:`~p2t.attribution.plan.MicroBatch`): ``attr`` ``[b, L]`` per PRM
        position (``None``: step rewards only, the scores stay 0), ``m`` ``[K]`` log-odds in readout order;
        both scattered by the micro-batch's planned index tensors (no host work here)."""
        dev, dtype = self.dev, self.dtype
        m = m.to(dev, dtype)
        attr = None if attr is None else attr.to(dev, dtype)
        self.logits[mb.logits_at] = m
        for j, (r, k0) in enumerate(zip(mb.rows, mb.first.tolist())):
            self.per_row[r.index] = (attr, j, m, k0)
        if attr is None:
            return
        flat = mb.flat
        if flat is not None and attr.shape == mb.tensors["input_ids"].shape:
            vals = attr.reshape(-1).index_select(0, flat[0])
        else:
            vals = attr[mb.scatter[0], mb.scatter[1]]
        if mb.weight is not None:  # PRM tokens split over policy tokens: shares, summed
            vals = vals * mb.weight.to(dtype)
        if flat is not None:
            # each policy token has at most one PRM position under the identity map; shares are summed
            (self.scores.view(-1).index_add_ if mb.weight is not None else self.scores.view(-1).index_copy_)(
                0, flat[1], vals)
        else:
            idx = mb.scatter
            self.scores.index_put_((idx[2], idx[3]), vals, accumulate=mb.weight is not None)

    def _view(self, b: int) -> Optional[PRMView]:
        r = self.rows[b]
        if r is None:
            return None
        attr, j, m, k0 = self.per_row[r.index]
        mb = m[k0:k0 + r.num_steps]
        conv = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        ids = r.input_ids.tolist()
        tokens = list(conv(ids)) if conv else [self.tokenizer.decode([t]) for t in ids]
        a = attr[j, :r.length].clone() if attr is not None else torch.zeros(r.length, dtype=self.dtype)
        return PRMView(ids, tokens, a, torch.from_numpy(r.token_step.copy()),
                       r.readout.tolist(), torch.sigmoid(mb), mb, list(r.steps), r.text,
                       [tuple(s) for s in r.policy_spans.tolist()], r.prompt_length)

    def finish(self, method: str, objective: str) -> ScoredBatch:
        return ScoredBatch(self.scores, self.segment_ids, torch.sigmoid(self.logits), self.logits, self.mask,
                           self.steps, PRMViews(len(self.rows), self._view), method, objective)
