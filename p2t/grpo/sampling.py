"""Sampling completions: a KV-cached decode loop for Qwen2/Llama-style decoders, or HF ``generate``.

:func:`sample` draws from the same distribution as ``model.generate(do_sample=True, temperature=T,
top_p=p, top_k=0)`` with an explicit ``eos_token_id`` / ``pad_token_id``: the logits of the last
position, divided by T, then HF's top-p filter (tokens whose ascending cumulative probability is
``<= 1 - p`` are removed, the most likely token always kept), a softmax and one ``torch.multinomial``
draw per step from the global generator, so a seed fixes the samples. After a row's EOS it receives
``pad_token_id``; the loop stops when every row has ended or after ``max_new_tokens``. Positions of
left-padded prompts are ``cumsum(mask) - 1``, as in ``generate``.

The decode loop (:func:`supports` says when it applies) runs the model's own modules (embedding,
RMSNorm, rotary table, head) and its weights, with the q/k/v and gate/up projections fused into one
matrix product each and a preallocated key/value cache written in place. On the tiny lab policy, where
``generate`` spends most of each step on per-call overhead, this is several times faster (measurements
in benchmarks/NOTES.md). The samples need not be bit-identical to ``generate``'s (matrix products in
another order), but the per-token probabilities match the model's logits (tests/test_grpo.py).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

__all__ = ["SAMPLERS", "sample", "supports", "top_p_filter"]

SAMPLERS = ("auto", "fast", "hf")

# generation_config fields that would make ``generate`` apply a logits processor of its own; the decode
# loop applies none, so a model that sets any of them keeps ``generate`` under sampler="auto"
_NEUTRAL = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
            "encoder_no_repeat_ngram_size": (None, 0),
            "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
            "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
            "forced_eos_token_id": (None,), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
            "eta_cutoff": (None, 0.0), "min_p": (None,), "top_h": (None,), "sequence_bias": (None,),
            "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False),
            "watermarking_config": (None,), "logits_processor": (None,)}


def _why_not(model) -> Optional[str]:
    """None when the decode loop computes what ``model`` computes, else the reason it does not."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in ("qwen2", "llama"):
        return f"model_type {getattr(cfg, 'model_type', None)!r} (the loop knows qwen2 and llama)"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "not a decoder with embed_tokens, layers, norm and rotary_emb"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())) or \
            getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in ("default", "linear", "llama3"):  # the others depend on the running length
        return f"rope_type {rope!r}"
    for layer in base.layers:
        at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if at is None or mlp is None or not all(hasattr(at, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            return "a layer without q/k/v/o and gate/up/down projections"
        projections = [getattr(at, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
            [getattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")]
        if any(type(m) is not torch.nn.Linear for m in projections):
            return "projections that are not plain nn.Linear (quantised or adapted)"
    gen = getattr(model, "generation_config", None)
    for name, neutral in _NEUTRAL.items():
        v = getattr(gen, name, None)
        if v not in neutral:
            return f"generation_config.{name}={v!r} (a logits processor of generate's own)"
    return None


def supports(model) -> bool:
    """Whether :func:`sample` can run ``model`` through the decode loop (else it calls ``generate``)."""
    return _why_not(model) is None


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF's top-p (nucleus) filter on ``[B, V]`` scores: -inf outside the nucleus, the top token always kept."""
    if top_p >= 1.0:
        return scores
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


@torch.no_grad()
def _decode(model, input_ids, attention_mask, *, max_new_tokens, temperature, top_p, eos_token_id, pad_token_id,
            step_logits: Optional[List[torch.Tensor]] = None):
    cfg, base = model.config, model.model
    B, P = input_ids.shape
    dev = input_ids.device
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    L = P + max_new_tokens
    layers = []
    for layer in base.layers:  # fused weights, read afresh each call (the policy trains between calls)
        at, mlp = layer.self_attn, layer.mlp
        w = torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])
        b = None
        if at.q_proj.bias is not None:
            b = torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias])
        gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        gub = None if mlp.gate_proj.bias is None else torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
        layers.append((layer.input_layernorm, w, b, at.o_proj, layer.post_attention_layernorm, gu, gub, mlp.down_proj,
                       getattr(at, "scaling", hd ** -0.5)))
    head = model.get_output_embeddings()
    x = base.embed_tokens(input_ids)
    dtype = x.dtype
    k_cache = [torch.zeros(B, KV, L, hd, dtype=dtype, device=dev) for _ in layers]
    v_cache = [torch.zeros(B, KV, L, hd, dtype=dtype, device=dev) for _ in layers]
    # additive attention bias over the cache columns: 0 for a real token, -inf for padding (a float mask
    # takes sdpa's faster path on CPU)
    bias = torch.full((B, 1, 1, L), -float("inf"), dtype=dtype, device=dev)
    bias[:, 0, 0, :P].masked_fill_(attention_mask.bool(), 0.0)
    # positions as generate computes them: cumsum(mask) - 1 on the prompt, +1 per generated token
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, max_new_tokens + 1, device=dev)], 1)
    cos, sin = base.rotary_emb(x, pos)  # [B, L, hd]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    # prompt: causal over valid keys; a padding query sees itself only (its output is never read)
    causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
    seen = (causal & attention_mask.bool()[:, None, :]) | torch.eye(P, dtype=torch.bool, device=dev)
    mask = torch.zeros(B, 1, P, P, dtype=dtype, device=dev).masked_fill_(~seen[:, None], -float("inf"))
    rep = H // KV
    out = torch.full((B, L), pad_token_id, dtype=input_ids.dtype, device=dev)
    out[:, :P] = input_ids
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    start, n = 0, P
    for t in range(max_new_tokens):
        end = start + n
        c, s = cos[:, :, start:end], sin[:, :, start:end]
        for i, (ln1, w, b, o_proj, ln2, gu, gub, down, scale) in enumerate(layers):
            qkv = F.linear(ln1(x), w, b).view(B, n, H + 2 * KV, hd).transpose(1, 2)
            q = _rotate(qkv[:, :H], c, s)
            k_cache[i][:, :, start:end] = _rotate(qkv[:, H:H + KV], c, s)
            v_cache[i][:, :, start:end] = qkv[:, H + KV:]
            k, v = k_cache[i][:, :, :end], v_cache[i][:, :, :end]
            if rep > 1:
                k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            # plain matrix products: faster than sdpa's CPU kernels for one query row or a short prompt
            a = torch.matmul(torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(mask).softmax(-1), v)
            x = x + o_proj(a.transpose(1, 2).reshape(B, n, H * hd))
            g, u = F.linear(ln2(x), gu, gub).chunk(2, -1)
            x = x + down(F.silu(g) * u)
        logits = head(base.norm(x[:, -1])).float()
        if step_logits is not None:
            step_logits.append(logits)
        scores = logits / temperature if temperature != 1.0 else logits
        probs = top_p_filter(scores, top_p).softmax(-1)
        nxt = torch.multinomial(probs, 1).squeeze(1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        out[:, end] = nxt
        unfinished &= nxt != eos_token_id
        if t + 1 == max_new_tokens or not bool(unfinished.any()):
            break
        bias[:, :, :, end] = 0.0  # generate's attention mask grows by one column of ones per step
        x = base.embed_tokens(nxt[:, None])
        start, n = end, 1
        mask = bias[..., :end + 1]
    return out[:, :end + 1]


def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int, pad_token_id: int,
           sampler: str = "auto") -> torch.Tensor:
    """Left-padded prompts ``[B, P]`` -> ``[B, P + n]`` ids, ``n <= max_new_tokens`` (see the module doc).

    ``sampler``: ``"fast"`` (the decode loop; a ValueError when the model is not supported), ``"hf"``
    (``model.generate``) or ``"auto"`` (the loop when :func:`supports` the model)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    why = _why_not(model) if sampler != "hf" else "hf"
    if sampler == "fast" and why is not None:
        raise ValueError(f"sampler='fast' cannot run this model: {why}; use sampler='hf'")
    if why is None:
        return _decode(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=temperature,
                          top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                          eos_token_id=eos_token_id)
