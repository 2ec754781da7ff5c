"""The trainer's sampler (p2t.grpo.sampling): the decode loop draws from the model's own distribution.

Checked on tiny random Qwen2 and Llama decoders with left-padded prompts of different lengths: each
step's logits equal the model's full forward at that position; the samples equal HF ``generate``'s
for the same seed (temperature, top-p, EOS then padding, early stop); the top-p filter is HF's; models
the loop does not cover fall back to ``generate``."""
from __future__ import annotations

import pytest
import torch

from p2t.grpo import sampling

EOS, PAD, V = 2, 0, 9


def tiny(kind: str, seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, **extra)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=4, tie_word_embeddings=True, **common))
    else:  # grouped-query attention, untied head
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common))
    with torch.no_grad():  # larger weights than the init's, so that distributions are far from uniform
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    return model.eval()


def prompts(batch: int = 6, seed: int = 1):
    """Left-padded prompts of lengths 1..5 (no EOS or PAD inside)."""
    g = torch.Generator().manual_seed(seed)
    lens = [1 + i % 5 for i in range(batch)]
    P = max(lens)
    ids = torch.full((batch, P), PAD, dtype=torch.long)
    mask = torch.zeros(batch, P, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, P - n:] = torch.randint(3, V, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


def draw(model, ids, mask, sampler, seed=0, **kw):
    kw = dict(dict(max_new_tokens=12, temperature=1.0, top_p=1.0, eos_token_id=EOS, pad_token_id=PAD), **kw)
    torch.manual_seed(seed)
    return sampling.sample(model, ids, mask, sampler=sampler, **kw)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_step_logits_are_the_models_logits(kind):
    """Step t's logits = the model's forward over the prompt and the first t sampled tokens, read at the
    last position (positions cumsum(mask) - 1, padding masked). A cache or position off by one fails."""
    model = tiny(kind)
    ids, mask = prompts()
    P = ids.shape[1]
    steps = []
    torch.manual_seed(0)
    out = sampling._decode(model, ids, mask, max_new_tokens=10, temperature=0.8, top_p=1.0, eos_token_id=EOS,
                           pad_token_id=PAD, step_logits=steps)
    assert len(steps) == out.shape[1] - P >= 2
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], out.shape[1] - P, dtype=torch.long)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=out, attention_mask=full_mask, position_ids=pos).logits
    for t, got in enumerate(steps):
        torch.testing.assert_close(got, ref[:, P - 1 + t].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_samples_equal_generate(kind, temperature, top_p):
    """Same seed, same tokens as ``generate``: temperature then top-p, one multinomial draw per step,
    PAD after a row's EOS, and the output ends when every row has ended (or at max_new_tokens)."""
    model = tiny(kind)
    ids, mask = prompts(8)
    for seed in range(3):
        fast = draw(model, ids, mask, "fast", seed, temperature=temperature, top_p=top_p)
        ref = draw(model, ids, mask, "hf", seed, temperature=temperature, top_p=top_p)
        assert torch.equal(fast, ref), (seed, fast, ref)


def test_eos_then_padding_and_early_stop():
    model = tiny("qwen2", seed=3)
    ids, mask = prompts(8)
    P, n = ids.shape[1], 30
    out = draw(model, ids, mask, "fast", 5, max_new_tokens=n)
    comp = out[:, P:]
    is_eos = comp == EOS
    assert is_eos.any(-1).all(), "every row should end within 30 tokens on this model"
    assert comp.shape[1] < n  # stopped early, at the step where the last row ended
    first = is_eos.float().argmax(-1)
    assert first.max() == comp.shape[1] - 1
    after = torch.arange(comp.shape[1]) > first[:, None]
    assert (comp[after] == PAD).all()
    assert torch.equal(out[:, :P], ids)


def test_same_seed_same_samples_and_max_new_tokens():
    model = tiny("llama")
    ids, mask = prompts()
    a, b = draw(model, ids, mask, "fast", 7), draw(model, ids, mask, "fast", 7)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw(model, ids, mask, "fast", 8))
    one = draw(model, ids, mask, "fast", 7, max_new_tokens=1)
    assert one.shape == (ids.shape[0], ids.shape[1] + 1) and torch.equal(one, a[:, :ids.shape[1] + 1])


def test_top_p_filter_is_hfs():
    from transformers.generation.logits_process import TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 11, generator=g) * 3
    scores[0] = 0.0  # ties
    for p in (0.05, 0.3, 0.9, 0.999):
        torch.testing.assert_close(sampling.top_p_filter(scores, p), TopPLogitsWarper(p)(None, scores),
                                   rtol=0, atol=0)
    assert sampling.top_p_filter(scores, 1.0) is scores


def test_models_the_loop_does_not_cover_use_generate(monkeypatch):
    model = tiny("qwen2")
    assert sampling.supports(model)
    model.generation_config.repetition_penalty = 1.2  # generate would apply it: the loop must not run
    assert not sampling.supports(model)
    ids, mask = prompts()
    called = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: called.append(1) or real(**kw))
    draw(model, ids, mask, "auto")
    assert called
    with pytest.raises(ValueError, match="repetition_penalty"):
        draw(model, ids, mask, "fast")
    with pytest.raises(ValueError, match="sampler"):
        draw(model, ids, mask, "beam")
    class Adapted(torch.nn.Linear):  # e.g. a LoRA or quantised layer: its weight is not the whole story
        pass
    other = tiny("llama")
    v = other.model.layers[1].self_attn.v_proj
    other.model.layers[1].self_attn.v_proj = Adapted(v.in_features, v.out_features, bias=False)
    assert not sampling.supports(other)
    assert not sampling.supports(tiny("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    from transformers import GPT2Config, GPT2LMHeadModel
    assert not sampling.supports(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V)))
