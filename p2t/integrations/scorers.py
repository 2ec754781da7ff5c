"""Scorers behind a function call, for a PRM that does not run in the trainer's process.

:class:`CallableScorer` turns any function that returns per-token attributions, step ids and step rewards
(for instance a client of a PRM service on other GPUs) into an object with ``P2TScorer.score``'s
signature, so the TRL trainer and the verl reward manager take it in place of a :class:`p2t.P2TScorer`.
:func:`http_scorer` is such a client for a service answering JSON over HTTP.

Plain torch and the standard library only; no trainer framework is imported here.
"""
from __future__ import annotations

import json
import math
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

__all__ = ["CallableScorer", "CallableScoredBatch", "http_scorer"]


@dataclass
class CallableScoredBatch:
    """What the integrations read from a scored batch (the fields of :class:`p2t.ScoredBatch` they use).

    scores: float32 ``[B, N]`` attribution per policy response token, 0 on padding.
    segment_ids: int64 ``[B, N]`` global step ids (``[0, S)``), -1 for tokens in no step and padding.
    segment_rewards: float32 ``[S]`` step rewards R_s.
    response_mask: bool ``[B, N]``.
    steps_per_response: number of steps of each response.
    """
    scores: torch.Tensor
    segment_ids: torch.Tensor
    segment_rewards: torch.Tensor
    response_mask: torch.Tensor
    steps_per_response: List[int]


def _result_field(res, b: int, name: str):
    if not isinstance(res, Mapping) or name not in res:
        raise ValueError(f"scorer result {b} must be a mapping with 'scores', 'step_ids' and 'step_rewards', "
                         f"got {type(res).__name__}" + (f" without {name!r}" if isinstance(res, Mapping) else ""))
    return res[name]


class CallableScorer:
    """``P2TScorer.score`` around a function.

    ``fn(prompts, responses, response_token_ids, method=...)`` gets B prompt texts, B response texts and
    the policy token ids of each response, and returns B results (mappings), one per response:

    - ``"scores"``: one attribution per policy token of that response (``len(response_token_ids[b])``
      floats, finite);
    - ``"step_ids"``: the step of each policy token, ``0 .. k-1`` in order of the response, ``-1`` for a
      token in no step;
    - ``"step_rewards"``: the k step rewards R_s.

    Args:
        fn: the function (e.g. a client of a remote PRM service; see :func:`http_scorer`).
        output_device: device of the returned tensors (default CPU); the integrations move them once,
            onto the policy's device.
    """

    def __init__(self, fn: Callable[..., Sequence[Mapping[str, Any]]], output_device=None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.output_device = torch.device("cpu") if output_device is None else torch.device(output_device)

    def score(self, prompts: Sequence[str], responses: Sequence[str], *, method: str = "taylor",
              response_token_ids: Optional[Sequence[Sequence[int]]] = None, **kwargs) -> CallableScoredBatch:
        if response_token_ids is None:
            raise ValueError("response_token_ids is required: the results are per policy token")
        B = len(response_token_ids)
        if not (len(prompts) == len(responses) == B):
            raise ValueError(f"prompts, responses and response_token_ids must have the same length, got "
                             f"{len(prompts)}, {len(responses)} and {B}")
        ids = [[int(t) for t in x] for x in response_token_ids]
        results = list(self.fn(list(prompts), list(responses), ids, method=method, **kwargs))
        if len(results) != B:
            raise ValueError(f"the scorer function returned {len(results)} results for {B} responses")
        N = max((len(x) for x in ids), default=0)
        scores = torch.zeros(B, N, dtype=torch.float32)
        seg = torch.full((B, N), -1, dtype=torch.int64)
        mask = torch.zeros(B, N, dtype=torch.bool)
        rewards: List[float] = []
        steps: List[int] = []
        for b, res in enumerate(results):
            n = len(ids[b])
            sc = [float(v) for v in _result_field(res, b, "scores")]
            st = [int(v) for v in _result_field(res, b, "step_ids")]
            R = [float(v) for v in _result_field(res, b, "step_rewards")]
            if len(sc) != n or len(st) != n:
                raise ValueError(f"scorer result {b}: 'scores' and 'step_ids' need one value per policy token "
                                 f"({n}), got {len(sc)} and {len(st)}")
            if not all(math.isfinite(v) for v in sc + R):
                raise ValueError(f"scorer result {b}: 'scores' and 'step_rewards' must be finite")
            k = len(R)
            if any(s < -1 or s >= k for s in st):
                raise ValueError(f"scorer result {b}: 'step_ids' must be -1 or in [0, {k}) ({k} step rewards)")
            scores[b, :n] = torch.tensor(sc, dtype=torch.float32)
            seg[b, :n] = torch.tensor([s + len(rewards) if s >= 0 else -1 for s in st], dtype=torch.int64)
            mask[b, :n] = True
            rewards += R
            steps.append(k)
        dev = self.output_device
        return CallableScoredBatch(scores.to(dev), seg.to(dev), torch.tensor(rewards, dtype=torch.float32,
                                                                                     device=dev),
                                   mask.to(dev), steps)


def http_scorer(url: str, *, timeout: float = 120.0, headers: Optional[Dict[str, str]] = None,
                output_device=None) -> CallableScorer:
    """A :class:`CallableScorer` that POSTs ``{"prompts", "responses", "response_token_ids", "method"}`` as
    JSON to ``url`` and reads back ``{"results": [...]}`` (or a bare list), one result per response as
    :class:`CallableScorer` describes. A failed request raises (the training step does not go on without
    its token rewards)."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"url must be an http:// or https:// address, got {url!r}")
    hdrs = {"Content-Type": "application/json", **(headers or {})}

    def call(prompts, responses, response_token_ids, method="taylor"):
        body = json.dumps({"prompts": prompts, "responses": responses, "response_token_ids": response_token_ids,
                           "method": method}).encode("utf-8")
        req = urllib.request.Request(url, data=body, headers=hdrs, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out = json.loads(resp.read().decode("utf-8"))
        return out["results"] if isinstance(out, dict) else out

    return CallableScorer(call, output_device=output_device)
