"""The policy's per-token log-probabilities of its completions, with or without the ``[B, N, V]`` logits.

Two paths, the same numbers within fp32 rounding (tests/test_grpo_logprobs.py):

* ``eager``: the model's forward, then ``log_softmax(logits.float() / T)`` gathered at the completion
  tokens. It holds the logits of every position, an fp32 copy and the log-softmax output, then their
  gradients: with a real vocabulary (Qwen2.5's 151,936 entries) that is tens of GB for a GRPO batch.
* ``chunked``: the model's backbone, then TRL's :class:`trl.kernels.ChunkedLogProbFunction` on the
  completion positions only: the head's matrix product one vocabulary tile at a time, folded into an
  online log-sum-exp, recomputed tile by tile in the backward (Triton on a GPU, torch on a CPU). No
  ``[B, N, V]`` tensor exists; it costs one more head product per tile (the backward's recompute).

:func:`path` chooses by the vocabulary's size: at least ``chunked_vocab`` entries, TRL >= 1.16 installed
and a model made of a backbone and a plain linear head (no logit soft-capping or scaling) take the
chunked path; the others, the toy lab's ~20-character policy among them, keep the eager one, which is
faster where the logits are small. Measurements: ``benchmarks/policy_logprobs.py`` and benchmarks/NOTES.md.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from typing import Optional

import torch

__all__ = ["completion_logprobs", "path", "CHUNKED_VOCAB"]

# vocabularies of real language models (32k-256k entries) take the chunked path; tiny ones stay eager
CHUNKED_VOCAB = 16384
# vocabulary columns per tile of the chunked path: TRL's own choice on GPUs; on a CPU smaller tiles stay in
# cache and bound the tile buffer (4096 tokens x 4096 columns x 4 bytes = 64 MiB)
_TILE_COLUMNS = {"cuda": 32768}
_CPU_TILE_COLUMNS = 4096
# config attributes that change the logits after the head (TRL reads them too): such models stay eager
_SCALED_HEAD = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


@lru_cache(maxsize=None)
def _chunked_fn():
    """TRL's chunked log-prob function, or None where TRL (>= 1.16) is not installed."""
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError:
        return None
    return ChunkedLogProbFunction


def _parts(model):
    """(backbone, head) of a causal LM whose logits are ``head(backbone(...).last_hidden_state)``, else None."""
    get_decoder = getattr(model, "get_decoder", None)  # the backbone (also through a PEFT wrapper)
    backbone = get_decoder() if callable(get_decoder) else None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if backbone is None or backbone is model or not isinstance(head, torch.nn.Linear):
        return None
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if any(getattr(text, name, None) is not None for name in _SCALED_HEAD):
        return None
    return backbone, head


def path(model, chunked_vocab: int = CHUNKED_VOCAB) -> str:
    """``"chunked"`` or ``"eager"``: the path :func:`completion_logprobs` takes for ``model``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = head.weight.shape[0] if isinstance(head, torch.nn.Linear) else 0
    if vocab < chunked_vocab or _parts(model) is None or _chunked_fn() is None:
        return "eager"
    return "chunked"


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, *,
                        temperature: float = 1.0, chunked_vocab: int = CHUNKED_VOCAB,
                        autocast=None, tile_columns: Optional[int] = None) -> torch.Tensor:
    """Log-probabilities ``[B, N]`` float32 of the completion tokens ``input_ids[:, prompt_len:]`` under
    ``model``, its logits divided by the sampling ``temperature``.

    ``input_ids`` / ``attention_mask`` ``[B, P + N]``: left-padded prompts then completions (positions are
    ``cumsum(mask) - 1``, as in sampling). Every completion column gets its log-prob, padding included
    (the loss masks it). ``chunked_vocab``: the vocabulary size from which the chunked path is taken
    (:func:`path`; 0: wherever it applies). ``autocast``: a context manager for the forward (e.g. bf16).
    ``tile_columns``: vocabulary columns per tile of the chunked path (default: 32768 on a GPU, 4096
    elsewhere)."""
    ctx = autocast if autocast is not None else nullcontext()
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    target = input_ids[:, prompt_len:]
    if path(model, chunked_vocab) == "eager":
        with ctx:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).logits
        logits = logits[:, prompt_len - 1:-1].float() / temperature
        return torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    backbone, head = _parts(model)
    B, N = target.shape
    with ctx:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                          use_cache=False).last_hidden_state
        hidden = hidden[:, prompt_len - 1:-1].reshape(B * N, -1)
        cols = tile_columns or _TILE_COLUMNS.get(hidden.device.type, _CPU_TILE_COLUMNS)
        logp = _chunked_fn().apply(hidden, head.weight, head.bias, target.reshape(-1), float(temperature), cols,
                                   None, 1.0, ())[0]
    return logp.view(B, N)
