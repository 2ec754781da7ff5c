"""The lean loop's policy log-probs (p2t.grpo.logprobs): TRL's chunked kernel equals the eager log-softmax,
values and gradients w.r.t. every parameter, with left-padded prompts, tokens after EOS and masked
completions; the path is chosen by the vocabulary's size, so the toy lab keeps the eager one."""
from __future__ import annotations

import pytest
import torch

from p2t.grpo import logprobs

pytest.importorskip("trl.kernels", reason="the chunked path needs TRL >= 1.16")

V, H = 613, 48  # an odd vocabulary: the last tile of 128 columns is partial


def tiny_qwen2(seed: int = 0, tie: bool = False, bias: bool = False, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg)
    if bias:  # a head with a bias (Qwen2's has none): the kernel takes it too
        head = torch.nn.Linear(H, V, bias=True)
        torch.nn.init.normal_(head.bias, std=0.5)
        head.weight.data.copy_(model.lm_head.weight.data)
        model.lm_head = head
    return model.to(dtype)


def batch(seed: int = 1):
    """5 rows: left-padded prompts (P = 7), 9 completion tokens; two completions end early (EOS then pad),
    one is masked out entirely (as a truncated completion is)."""
    g = torch.Generator().manual_seed(seed)
    B, P, N = 5, 7, 9
    ids = torch.randint(2, V, (B, P + N), generator=g)
    attn = torch.ones(B, P + N, dtype=torch.long)
    for b, pad in enumerate((0, 3, 1, 5, 0)):
        attn[b, :pad] = 0
        ids[b, :pad] = 0  # the pad id
    mask = torch.ones(B, N, dtype=torch.bool)
    for b, end in ((1, 4), (3, 6)):
        ids[b, P + end] = 1  # EOS
        ids[b, P + end + 1:] = 0
        attn[b, P + end + 1:] = 0
        mask[b, end + 1:] = False
    mask[4] = False
    adv = torch.randn(B, N, generator=g)
    return ids, attn, P, mask, adv


def run(model, path: str, temperature: float = 0.7, tile_columns: int = 128):
    ids, attn, P, mask, adv = batch()
    model.zero_grad(set_to_none=True)
    chunked_vocab = 0 if path == "chunked" else 10 ** 9
    assert logprobs.path(model, chunked_vocab) == path
    logp = logprobs.completion_logprobs(model, ids, attn, P, temperature=temperature, chunked_vocab=chunked_vocab,
                                        tile_columns=tile_columns)
    (-(logp * adv * mask).sum() / mask.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), grads


def _first_mismatches(got, want, atol):
    bad = ((got - want).abs() > atol).nonzero()[:5].tolist()
    return [(i, float(got[tuple(i)]), float(want[tuple(i)])) for i in bad]


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True)])
def test_chunked_equals_eager_values_and_gradients(tie, bias):
    model = tiny_qwen2(tie=tie, bias=bias)
    eager, g_eager = run(model, "eager")
    chunked, g_chunked = run(model, "chunked")
    # a float64 reference: the fp32 chunked error is at most twice the fp32 eager one (+ a rounding floor)
    ref, g_ref = run(tiny_qwen2(tie=tie, bias=bias, dtype=torch.float64), "eager")
    err_e, err_c = (eager.double() - ref).abs().max(), (chunked.double() - ref).abs().max()
    assert err_c <= 2 * err_e + 1e-6, (float(err_c), float(err_e), _first_mismatches(chunked, eager, 1e-5))
    torch.testing.assert_close(chunked, eager, rtol=0, atol=2e-5)  # every column, padding included
    assert set(g_chunked) == set(g_eager) == set(g_ref)
    for name in g_eager:
        scale = g_ref[name].abs().max().item() + 1e-12
        e = (g_eager[name].double() - g_ref[name]).abs().max().item() / scale
        c = (g_chunked[name].double() - g_ref[name]).abs().max().item() / scale
        assert c <= 2 * e + 1e-5, (name, c, e)
        torch.testing.assert_close(g_chunked[name], g_eager[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    head = "model.embed_tokens.weight" if tie else "lm_head.weight"
    assert g_chunked[head].abs().sum() > 0, "no gradient reached the head"
    if bias:
        assert g_chunked["lm_head.bias"].abs().sum() > 0


def test_chunked_path_never_builds_the_logits():
    model = tiny_qwen2()
    model.lm_head.register_forward_hook(lambda *a: pytest.fail("the chunked path ran the head over every position"))
    logp, _ = run(model, "chunked")
    assert logp.shape == (5, 9) and torch.isfinite(logp).all() and (logp <= 0).all()


def test_masked_tokens_get_no_gradient():
    """What the loss masks out moves nothing: the same update with those tokens' advantages changed."""
    model = tiny_qwen2()
    ids, attn, P, mask, adv = batch()
    grads = []
    for a in (adv, torch.where(mask, adv, torch.full_like(adv, 1e3))):
        model.zero_grad(set_to_none=True)
        logp = logprobs.completion_logprobs(model, ids, attn, P, chunked_vocab=0, tile_columns=128)
        (-(logp * a * mask).sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_the_path_is_chosen_by_the_vocabulary(monkeypatch):
    model = tiny_qwen2()
    assert logprobs.path(model) == "eager"  # 613 < the default threshold
    assert logprobs.path(model, chunked_vocab=V) == "chunked" and logprobs.path(model, chunked_vocab=V + 1) == "eager"
    model.config.final_logit_softcapping = 30.0  # logits changed after the head: the kernel would not see it
    assert logprobs.path(model, chunked_vocab=0) == "eager"
    model.config.final_logit_softcapping = None
    monkeypatch.setattr(logprobs, "_chunked_fn", lambda: None)  # TRL missing
    assert logprobs.path(model, chunked_vocab=0) == "eager"


def test_the_lab_policy_keeps_the_eager_path():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from p2t.grpo import GRPOConfig
    from p2t.grpo.lab import CharTokenizer
    tok = CharTokenizer()
    lab_like = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    assert logprobs.path(lab_like, GRPOConfig().chunked_logprobs_vocab) == "eager"
    assert GRPOConfig().chunked_logprobs_vocab == logprobs.CHUNKED_VOCAB
    with pytest.raises(ValueError, match="chunked_logprobs_vocab"):
        GRPOConfig(chunked_logprobs_vocab=-1)


def test_chunked_equals_eager_through_a_lora_wrapper():
    """A PEFT-wrapped policy: the backbone and head are found through the wrapper; the LoRA weights get
    the eager path's gradients."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_qwen2(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    eager, g_eager = run(model, "eager")
    chunked, g_chunked = run(model, "chunked")
    torch.testing.assert_close(chunked, eager, rtol=0, atol=2e-5)
    assert g_eager and set(g_chunked) == set(g_eager) and all("lora" in n for n in g_eager)
    for name in g_eager:
        scale = g_eager[name].abs().max().item() + 1e-12
        torch.testing.assert_close(g_chunked[name], g_eager[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_the_trainer_takes_the_chunked_path_where_told(tmp_path):
    from p2t.grpo import GRPOTrainer

    from _grpo_helpers import digit_reward, tiny_config
    tr = GRPOTrainer(tiny_config(tmp_path, tmp_path / "cache", mode="outcome", chunked_logprobs_vocab=0,
                                 num_iterations=2), reward_fn=digit_reward)
    assert logprobs.path(tr.policy, tr.config.chunked_logprobs_vocab) == "chunked"
    rec = tr.step()  # old log-probs (no grad) and the loss's (with grad) both chunked: ratio 1 on the first pass
    assert abs(rec["clip_ratio"]) == 0.0 and torch.isfinite(torch.tensor(rec["loss"]))
    r = tr.last_rollout
    with torch.no_grad():
        chunked = tr._logps(tr.policy, r.input_ids, r.attention_mask, r.prompt_len)
        tr.config.chunked_logprobs_vocab = logprobs.CHUNKED_VOCAB
        assert logprobs.path(tr.policy, tr.config.chunked_logprobs_vocab) == "eager"
        eager = tr._logps(tr.policy, r.input_ids, r.attention_mask, r.prompt_len)
    torch.testing.assert_close(chunked, eager, rtol=0, atol=2e-5)
