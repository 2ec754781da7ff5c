"""GRPO trainer and toy lab: one step per mode, loss normalisations, advantages reaching the loss,
checkpoint/resume, config checks, CLI. Everything runs on a tiny lab built once in a temporary cache."""
from __future__ import annotations

import json
import os

import pytest
import torch

import p2t
from p2t.grpo import GRPOConfig, GRPOTrainer, aggregate, ensure_lab, per_token_loss
from p2t.grpo import loss as loss_mod
from p2t.grpo.checkpoint import load_checkpoint, save_checkpoint
from p2t.grpo.lab import task
from p2t.grpo.lab.tokenizer import CharTokenizer

from _grpo_helpers import TINY_LAB, digit_reward, tiny_config


def fill_step_holes(segment_ids: torch.Tensor) -> torch.Tensor:
    """Tokens with id -1 lying between two tokens of the same step join that step (tokens with no text of
    their own, e.g. a special token sampled mid-line): the independent recomputation below needs them."""
    B, N = segment_ids.shape
    pos = torch.arange(N).expand(B, N)
    valid = segment_ids >= 0
    last = torch.where(valid, pos, torch.full_like(pos, -1)).cummax(-1).values
    nxt = torch.where(valid, pos, torch.full_like(pos, N)).flip(-1).cummin(-1).values.flip(-1)
    prev_id = torch.where(last >= 0, segment_ids.gather(1, last.clamp(min=0)), torch.full_like(pos, -1))
    next_id = torch.where(nxt < N, segment_ids.gather(1, nxt.clamp(max=N - 1)), torch.full_like(pos, -2))
    hole = ~valid & (prev_id == next_id)
    return torch.where(hole, prev_id, segment_ids)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("labcache")
    ensure_lab(TINY_LAB, str(root))
    return root


def make(tmp_path, cache, **changes):
    return GRPOTrainer(tiny_config(tmp_path, cache, **changes), reward_fn=digit_reward)


# ---------------------------------------------------------------- lab pieces
def test_char_tokenizer_round_trip(tmp_path):
    tok = CharTokenizer()
    text = "17+25+33=\n17+25=42\n#75"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    tok.save_pretrained(tmp_path)
    tok2 = CharTokenizer.from_pretrained(tmp_path)
    assert tok2.get_vocab() == tok.get_vocab()
    assert tok2(text)["input_ids"] == ids
    assert tok2.decode(ids, skip_special_tokens=True) == text
    batch = tok2(["1+2=", "10+20+30="], padding=True)
    assert batch["input_ids"][0][0] == tok2.pad_token_id  # left padding for generation


def test_task_labels_and_reward():
    p = task.Problem([17, 25, 33, 48])
    good = task.solution(p)
    assert good == "17+25=42\n42+33=75\n75+48=123\n#123"
    assert task.step_labels(p, good) == [True] * 4
    assert task.outcome_reward([p.prompt], [good]) == [1.0]
    bad = "17+25=43\n43+33=76\n76+48=124\n#124"  # first step wrong, later steps right given it
    assert task.step_labels(p, bad) == [False, True, True, True]
    assert task.outcome_reward([p.prompt], [bad]) == [0.0]
    labels = task.char_labels(p, "17+25=4\n#4")
    assert labels == [1] * 7 + [0] + [0, 0, 0]  # "17+25=4" is a prefix of the right line, but the line is wrong
    assert len(task.char_labels(p, good)) == len(good) + 1


# ---------------------------------------------------------------- one training step per mode
@pytest.mark.parametrize("mode", ["outcome", "process", "p2t"])
def test_one_training_step(tmp_path, cache, mode):
    tr = make(tmp_path, cache, mode=mode)
    before = [p.detach().clone() for p in tr.policy.parameters()]
    rec = tr.step()
    r = tr.last_rollout
    B, N = r.completion_mask.shape
    assert B == 8 and r.advantages.shape == (B, N)
    assert torch.isfinite(r.advantages).all()
    assert (r.advantages[~r.completion_mask] == 0).all()
    assert all(torch.isfinite(torch.tensor(v)) for v in rec.values() if isinstance(v, float))
    changed = any(not torch.equal(a, b) for a, b in zip(before, tr.policy.parameters()))
    assert changed, "the optimiser step left the policy unchanged"
    if mode == "outcome":
        assert r.scored is None
        a_hat = p2t.group_advantages(r.outcome_rewards, 4)
        assert torch.allclose(r.advantages, a_hat[:, None].expand(B, N) * r.completion_mask, atol=1e-6)
    else:
        assert r.scored is not None and r.segment_ids is not None
        assert (r.segment_ids >= 0).any()


# ---------------------------------------------------------------- loss normalisations vs hand computation
def _hand_loss(loss, mask, loss_type, L, accum=1, total_tokens=None):
    rows = loss.tolist()
    m = mask.tolist()
    if loss_type == "grpo":
        per_seq = [sum(x for x, k in zip(r, mr) if k) / max(sum(mr), 1) for r, mr in zip(rows, m)]
        return sum(per_seq) / len(per_seq) / accum
    s = sum(x for r, mr in zip(rows, m) for x, k in zip(r, mr) if k)
    n = sum(sum(mr) for mr in m)
    if loss_type == "bnpo":
        return s / n / accum
    if loss_type == "dr_grpo":
        return s / (len(rows) * L) / accum
    return s / (total_tokens if total_tokens is not None else n)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_normalisation(loss_type):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    got = aggregate(loss, mask, loss_type, max_completion_length=7)
    assert got.item() == pytest.approx(_hand_loss(loss, mask, loss_type, 7), rel=1e-12)
    # with gradient accumulation: two micro-batches of a 6-row batch
    got2 = aggregate(loss, mask, loss_type, max_completion_length=7, gradient_accumulation_steps=2,
                     num_items_in_batch=15)
    assert got2.item() == pytest.approx(_hand_loss(loss, mask, loss_type, 7, accum=2, total_tokens=15), rel=1e-12)


def test_loss_types_differ():
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    vals = {t: aggregate(loss, mask, t, max_completion_length=4).item() for t in ("grpo", "bnpo", "dr_grpo")}
    assert vals == pytest.approx({"grpo": 2.0, "bnpo": 7 / 5, "dr_grpo": 7 / 8})
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(loss, mask, "ppo", max_completion_length=4)


def test_per_token_loss_clipping_and_kl():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.1]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 2.0, -3.0]])
    ref = torch.log(torch.tensor([[1.0, 1.0, 2.0, 1.0]]))
    out, parts = per_token_loss(logp, old, adv, epsilon=0.2, epsilon_high=0.28, beta=0.5, ref_logp=ref)
    ratio = [1.5, 0.5, 1.0, 1.1]
    clip = [min(max(r, 0.8), 1.28) for r in ratio]
    want = []
    for r, c, a, rf in zip(ratio, clip, adv[0].tolist(), [1.0, 1.0, 2.0, 1.0]):
        d = torch.log(torch.tensor(rf / r)).item()
        want.append(-min(r * a, c * a) + 0.5 * (rf / r - d - 1))
    assert out[0].tolist() == pytest.approx(want, rel=1e-5)
    assert parts["clipped"][0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_gradient_accumulation_matches_full_batch(tmp_path, cache, loss_type):
    """dapo normalises by the whole batch's tokens, so 2 micro-batches give the full batch's gradient;
    grpo averages per-sequence means, which also splits exactly into equal micro-batches."""
    grads = []
    for accum in (1, 2):
        tr = make(tmp_path / str(accum), cache, mode="outcome", loss_type=loss_type, gradient_accumulation_steps=accum,
                  max_grad_norm=1e9)
        r = tr.rollout(0)
        n_items = int(r.completion_mask.sum())
        tr.optimizer.zero_grad()
        mb = 8 // accum
        for k in range(accum):
            loss, _ = tr.compute_loss(r, slice(k * mb, (k + 1) * mb), n_items)
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in tr.policy.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- the advantages that reach the loss
@pytest.mark.parametrize("mode", ["p2t", "process"])
def test_advantages_reaching_the_loss_are_p2ts(tmp_path, cache, monkeypatch, mode):
    seen = []
    real = loss_mod.per_token_loss

    def spy(logp, old_logp, advantages, **kw):
        seen.append(advantages.detach().clone())
        return real(logp, old_logp, advantages, **kw)

    monkeypatch.setattr(loss_mod, "per_token_loss", spy)
    # the unfused tail, bit for bit (the fused p2t path is held to 1e-6 of it in test_fused_trainer.py)
    tr = make(tmp_path, cache, mode=mode, alpha=0.7, omega=0.6, attr_temperature=0.5, standardize=True,
              normalize="sum", gradient_accumulation_steps=2, fused_advantages=False)
    tr.step()
    r = tr.last_rollout
    got = torch.cat(seen, dim=0)
    # recompute from the scorer's own output, independently of the trainer's alignment code
    b = r.scored
    B, N = r.completion_mask.shape
    # the scored batch covers every row, aligned to the completion (rows without a step have no segment)
    keep = list(range(B)) if b.scores.shape[0] == B else [i for i, s in enumerate(r.responses) if s.strip()]
    scores = torch.zeros(B, N)
    seg = torch.full((B, N), -1, dtype=torch.long)
    n = min(N, b.scores.shape[1])
    scores[keep, :n] = b.scores[:, :n].float()
    seg[keep, :n] = b.segment_ids[:, :n]
    seg = fill_step_holes(seg)
    if mode == "p2t":
        tr_ = p2t.segment_redistribute(scores, seg, b.segment_rewards.float(), omega=0.6, temperature=0.5,
                                       standardize=True, normalize="sum")
    else:
        tr_ = torch.where(seg >= 0, b.segment_rewards.float()[seg.clamp(min=0)], torch.zeros(()))
    want = p2t.token_advantages(r.outcome_rewards, tr_, group_size=4, alpha=0.7, mask=r.completion_mask)
    assert torch.equal(got, want)
    a_hat = p2t.group_advantages(r.outcome_rewards, 4)[:, None] * r.completion_mask
    assert not torch.allclose(got, a_hat), "the token rewards did not reach the loss"


def test_fill_step_holes():
    seg = torch.tensor([[0, -1, 0, -1, 1, 1, -1, -1], [-1, 2, -1, -1, 2, -1, 3, -1]])
    want = torch.tensor([[0, 0, 0, -1, 1, 1, -1, -1], [-1, 2, 2, 2, 2, -1, 3, -1]])
    assert torch.equal(fill_step_holes(seg), want)


# ---------------------------------------------------------------- KL reference, several passes
def test_reference_model_only_with_beta(tmp_path, cache):
    assert make(tmp_path / "a", cache, mode="outcome").ref_model is None
    tr = make(tmp_path / "b", cache, mode="outcome", beta=0.1, num_iterations=2, learning_rate=1e-2)
    assert tr.ref_model is not None
    rec = tr.step()
    r = tr.last_rollout
    assert r.old_logp is not None and r.ref_logp is not None
    assert rec["kl"] > 0  # the second pass runs on updated weights: the policy moved away from the reference


# ---------------------------------------------------------------- checkpoints
def test_resume_gives_the_same_next_step(tmp_path, cache):
    common = dict(mode="p2t", num_updates=2, save_every=1, num_iterations=2, learning_rate=1e-2)
    full = make(tmp_path / "full", cache, **common)
    full.train()
    part = make(tmp_path / "part", cache, **{**common, "num_updates": 1})
    part.train()
    assert load_checkpoint(part.checkpoint_path)["update"] == 1
    resumed = make(tmp_path / "part", cache, **{**common, "resume": True})
    records = resumed.train()
    assert resumed.update == 2
    assert [r["update"] for r in records] == [1, 2]
    assert resumed.history[-1]["loss"] == full.history[-1]["loss"]
    for a, b in zip(full.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"update": 1})

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, {"update": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["update"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


# ---------------------------------------------------------------- bad configs
def test_std_scaling_needs_groups():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1, scale_rewards="group")
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1, scale_rewards="batch")
    GRPOConfig(group_size=1, scale_rewards="none")


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type 'ppo'.*grpo, bnpo, dr_grpo, dapo"):
        GRPOConfig(loss_type="ppo")


def test_p2t_without_prm(tmp_path, cache):
    from p2t.grpo.setup import check
    cfg = GRPOConfig(mode="p2t", policy="some/policy", train_data="x.jsonl", reward="m:f")  # nothing read yet
    with pytest.raises(ValueError, match="prm"):
        check(cfg)
    with pytest.raises(ValueError, match="prm"):
        GRPOTrainer(cfg)
    assert check(cfg, scorer=object()) is False  # a scorer passed in is the PRM
    check(cfg.replace(mode="outcome"))
    with pytest.raises(ValueError, match="train_data"):
        check(cfg.replace(mode="outcome", train_data=None, reward=None))
    from transformers import AutoModelForCausalLM
    paths = ensure_lab(TINY_LAB, str(cache))
    model = AutoModelForCausalLM.from_pretrained(paths["policy"])
    with pytest.raises(ValueError, match="prm"):
        GRPOTrainer(tiny_config(tmp_path, cache, mode="p2t"), policy=model, tokenizer=CharTokenizer(),
                    reward_fn=digit_reward)


def test_unknown_option_in_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"mode": "process", "lerning_rate": 1.0}))
    with pytest.raises(ValueError, match="lerning_rate"):
        GRPOConfig.from_file(str(path))


# ---------------------------------------------------------------- config file + command line
def test_config_file_then_flags(tmp_path, capsys):
    from p2t.cli import main
    path = tmp_path / "c.yaml"
    path.write_text("mode: process\nalpha: 0.5\nloss_type: dapo\nlab:\n  sft_steps: 7\n")
    assert main(["train", "--config", str(path), "--alpha", "0.25", "--no-progress", "--epsilon-high", "0.28",
                 "--lab.prm-steps", "9", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["mode"], cfg["alpha"], cfg["loss_type"], cfg["progress"], cfg["epsilon_high"]) == \
        ("process", 0.25, "dapo", False, 0.28)
    assert (cfg["lab"]["sft_steps"], cfg["lab"]["prm_steps"]) == (7, 9)
    assert main(["train", "--loss-type", "ppo", "--print-config"]) == 2
    assert "loss_type" in capsys.readouterr().err


def test_cli_train_end_to_end(tmp_path, cache, capsys):
    from p2t.cli import main
    out = tmp_path / "run"
    rc = main(["train", "--mode", "p2t", "--num-updates", "2", "--prompts-per-update", "2", "--group-size", "2",
               "--max-new-tokens", "10", "--eval-every", "2", "--eval-prompts", "3", "--eval-samples-per-prompt", "2",
               "--save-every", "1", "--output-dir", str(out), "--lab-cache", str(cache), "--no-progress",
               "--lab.hidden-size", "32", "--lab.num-layers", "1", "--lab.num-heads", "2",
               "--lab.intermediate-size", "64", "--lab.sft-steps", "2", "--lab.sft-batch-size", "16",
               "--lab.prm-steps", "2", "--lab.prm-batch-size", "16", "--lab.prm-samples", "16"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["updates"] == 2
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [l["update"] for l in lines] == [0, 1, 2]
    assert "eval_accuracy" in lines[0] and "eval_accuracy" in lines[2]
    for name in ("curves.png", "checkpoint.pt", "config.json", "summary.json", "policy/config.json"):
        assert (out / name).exists(), name


# ---------------------------------------------------------------- compare
def test_compare_summary_and_table():
    from p2t.cli.compare import auc, summarise, table
    import numpy as np
    assert auc(np.array([0.0, 10.0, 20.0]), np.array([0.0, 1.0, 1.0])) == pytest.approx(0.75)
    mk = lambda ys: [{"update": 10 * i, "eval_accuracy": y} for i, y in enumerate(ys)]  # noqa: E731
    runs = {"outcome": [mk([0.2, 0.3, 0.4]), mk([0.2, 0.4, 0.6])],
            "p2t": [mk([0.2, 0.5, 0.6]), mk([0.2, 0.5, 0.5])]}
    s = summarise(runs)
    assert s["outcome"]["final"] == [0.4, 0.6] and s["outcome"]["updates_to_outcome_final"] == 20
    assert s["p2t"]["updates_to_outcome_final"] == 10  # outcome ends at 0.5 on average; p2t is there at 10
    assert s["p2t"]["auc"][0] == pytest.approx((0.35 + 0.55) / 2)
    md = table(s, "settings")
    assert "| p2t | 0.200 | 0.550 ± 0.050 |" in md


def test_cli_compare_end_to_end(tmp_path, cache, capsys):
    from p2t.cli import main
    out = tmp_path / "cmp"
    rc = main(["compare", "--modes", "outcome,p2t-std", "--seeds", "1", "--jobs", "2", "--output-dir", str(out), "--",
               "--num-updates", "1", "--prompts-per-update", "2", "--group-size", "2", "--max-new-tokens", "8",
               "--eval-every", "1", "--eval-prompts", "2", "--eval-samples-per-prompt", "2",
               "--lab-cache", str(cache), "--lab.hidden-size", "32", "--lab.num-layers", "1", "--lab.num-heads", "2",
               "--lab.intermediate-size", "64", "--lab.sft-steps", "2", "--lab.sft-batch-size", "16",
               "--lab.prm-steps", "2", "--lab.prm-batch-size", "16", "--lab.prm-samples", "16"])
    assert rc == 0, capsys.readouterr().err
    for name in ("compare.png", "compare.md", "compare.json"):
        assert (out / name).exists(), name
    cfg = json.load(open(out / "p2t-std-seed0" / "config.json"))
    assert cfg["standardize"] is True and cfg["attr_temperature"] == 0.5 and cfg["mode"] == "p2t"
    assert "| outcome |" in (out / "compare.md").read_text()
    # summarise the finished runs only (seeds 0..2 asked for, seed 0 finished), training nothing
    (out / "compare.md").unlink()
    assert main(["compare", "--modes", "outcome,p2t-std", "--seeds", "3", "--report-only", "--output-dir", str(out),
                 "--", "--lab-cache", str(cache), "--lab.hidden-size", "32", "--lab.num-layers", "1",
                 "--lab.num-heads", "2", "--lab.intermediate-size", "64", "--lab.sft-steps", "2",
                 "--lab.sft-batch-size", "16", "--lab.prm-steps", "2", "--lab.prm-batch-size", "16",
                 "--lab.prm-samples", "16"]) == 0
    assert "runs per mode: outcome 1, p2t-std 1" in (out / "compare.md").read_text()
    assert not (out / "outcome-seed1").exists()


@pytest.mark.parametrize("prm_kind", ["trained", "verifier"])
def test_lab_rebuild_is_identical(tmp_path, cache, prm_kind):
    """The lab's warm-up is seeded and single-threaded: a rebuild gives the same weights (what lets p2t
    ship its default lab checkpoints), for the trained PRM and for the verifier built on the policy."""
    import dataclasses
    from safetensors.torch import load_file
    lab = dataclasses.replace(TINY_LAB, prm_kind=prm_kind)
    first = ensure_lab(lab, str(cache))
    second = ensure_lab(lab, str(tmp_path / "again"))
    for part in ("policy", "prm"):
        a = load_file(os.path.join(first[part], "model.safetensors"))
        b = load_file(os.path.join(second[part], "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_truncated_completions_are_masked(tmp_path, cache):
    tr = make(tmp_path, cache, mode="p2t", mask_truncated_completions=True, max_new_tokens=6)
    r = tr.rollout(0)
    comp = r.input_ids[:, r.prompt_len:]
    has_eos = (comp == tr.tokenizer.eos_token_id).any(-1)
    assert not has_eos.all(), "every completion ended: nothing to check"
    assert not r.completion_mask[~has_eos].any()
    assert (r.advantages[~has_eos] == 0).all()


def test_attribution_stats_entropy():
    from p2t.grpo.advantages import attribution_stats

    ids = torch.tensor([[0, 0, 0, -1, 1, 1], [2, 2, -1, -1, -1, -1]])
    flat = torch.full((2, 6), 0.25)
    st = attribution_stats(flat, ids)
    assert abs(st["attr_entropy"] - 1.0) < 1e-9 and abs(st["attr_abs_mean"] - 0.25) < 1e-6
    peaked = torch.tensor([[9.0, -9.0, -9.0, 0.0, 9.0, -9.0], [9.0, -9.0, 0.0, 0.0, 0.0, 0.0]])
    assert attribution_stats(peaked, ids)["attr_entropy"] < 0.01
    # temperature flattens, standardize rescales: a small spread becomes a visible one
    small = torch.tensor([[0.1, 0.12, 0.14, 0.0, 0.1, 0.11], [0.1, 0.13, 0.0, 0.0, 0.0, 0.0]])
    assert attribution_stats(small, ids)["attr_entropy"] > 0.99
    assert attribution_stats(small, ids, standardize=True, temperature=0.5)["attr_entropy"] < 0.9


# ---------------------------------------------------------------- lab warm-up, localisation, compare statistics
def test_wrong_step_kinds():
    from p2t.grpo.lab.models import wrong_step_kinds
    p = task.Problem([17, 25, 33])
    assert wrong_step_kinds(p, "17+25=42\n42+33=75\n#75") == []
    assert wrong_step_kinds(p, "17+25=43\n43+33=76\n#76") == ["+1"]  # later steps are judged on their own
    assert wrong_step_kinds(p, "17+25=32\n32+33=65\n#66") == ["-10", "answer"]
    assert wrong_step_kinds(p, "17+25=42\n42+3=45\n#45\n1") == ["malformed", "extra"]


def test_localisation_on_the_tiny_lab(cache):
    from p2t.grpo.lab.localisation import measure, table
    paths = ensure_lab(TINY_LAB, str(cache))
    res = measure(paths["policy"], paths["prm"], samples=6, methods=["taylor", "exact", "integrated_gradients:2"],
                  nulls=["pad", "zero"])
    assert [(r["method"], r["null"]) for r in res["rows"]] == [
        ("taylor", "pad"), ("taylor", "zero"), ("integrated_gradients:2", "pad"), ("integrated_gradients:2", "zero"),
        ("exact", "pad"), ("exact", "zero")]
    for r in res["rows"]:
        assert 0.0 <= r["entropy"] <= 1.0 + 1e-9 and r["steps"] > 0
        if r["method"] == "exact":
            assert r["spearman_exact"] == pytest.approx(1.0)
    assert "| taylor | pad |" in table(res)
    with pytest.raises(ValueError, match="method"):
        measure(paths["policy"], paths["prm"], samples=2, methods=["gradcam"])
    with pytest.raises(ValueError, match="null"):
        measure(paths["policy"], paths["prm"], samples=2, nulls=["unk"])


def test_step_records_align_attributions_with_truth():
    from types import SimpleNamespace
    from p2t.grpo.lab.localisation import step_records, summarise
    p = task.Problem([17, 25, 33])
    resp = "17+25=43\n43+33=76\n#76"
    n = len(resp)
    seg = torch.full((1, n), -1)
    seg[0, :8], seg[0, 9:17], seg[0, 18:] = 0, 1, 2
    scores = torch.zeros(1, n)
    scores[0, 7] = -1.0  # the wrong digit has the lowest attribution
    batch = SimpleNamespace(scores=scores, segment_ids=seg, segment_rewards=torch.tensor([0.1, 0.9, 0.9]),
                            steps_per_response=[3])
    steps = step_records(batch, [p], [resp])
    assert [s["step_ok"] for s in steps] == [False, True, True]
    assert steps[0]["wrong"].tolist() == [False] * 7 + [True]
    res = summarise(steps)
    assert res["auroc_step"] == 1.0 and res["top1"] == 1.0 and res["auroc_flagged"] == 1.0
    assert res["wrong_steps"] == 1 and res["mixed_steps"] == 1


def test_policy_and_prm_reports_are_saved(cache):
    paths = ensure_lab(TINY_LAB, str(cache))
    pol = json.load(open(os.path.join(paths["policy"], "lab_metrics.json")))
    assert {"sampled_accuracy", "greedy_accuracy", "wrong_step_share", "wrong_step_kinds"} <= set(pol)
    prm = json.load(open(os.path.join(paths["prm"], "lab_metrics.json")))
    assert {"step_accuracy", "wrong_step_recall", "right_step_recall", "samples"} <= set(prm)


def test_compare_statistics():
    import numpy as np
    from p2t.cli.compare import bootstrap_ci, summarise, table, updates_to, welch
    t, p = welch([1.0, 1.1, 0.9, 1.0], [0.0, 0.1, -0.1, 0.0])
    assert t > 10 and p < 1e-3
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [0.3, 0.5, 0.4, 0.45], [0.35, 0.2, 0.3]
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert welch(a, b) == pytest.approx((ref.statistic, ref.pvalue))
    lo, hi = bootstrap_ci([1.0, 1.1, 0.9], [0.0, 0.1, -0.1])
    assert 0.7 < lo < 1.0 < hi < 1.3
    assert all(np.isnan(bootstrap_ci([1.0], [0.0, 0.1])))
    assert updates_to(np.array([0, 10, 20]), np.array([0.1, 0.5, 0.7]), 0.5) == 10
    assert updates_to(np.array([0, 10]), np.array([0.1, 0.2]), 0.5) is None
    mk = lambda ys, sa: [{"update": 0, "eval_accuracy": ys[0]}] + [  # noqa: E731
        {"update": 10 * i, "eval_accuracy": y, "step_accuracy": sa, "step_reward": 0.8} for i, y in enumerate(ys) if i]
    runs = {"outcome": [mk([0.2, 0.3, 0.4], 0.7), mk([0.2, 0.4, 0.6], 0.7)],
            "process": [mk([0.2, 0.5, 0.6], 0.8), mk([0.2, 0.5, 0.5], 0.8)]}
    s = summarise(runs)
    assert s["outcome"]["threshold"] == pytest.approx(0.2 + 0.75 * 0.3)
    assert s["process"]["updates_to_threshold"] == [10.0, 10.0]
    assert s["outcome"]["updates_to_threshold"] == [None, 20.0]  # 0.4 never reaches 0.425
    assert s["process"]["vs"]["outcome"]["final"]["diff"] == pytest.approx(0.05)
    assert s["process"]["track"]["step_accuracy_last"] == [0.8, 0.8]
    md = table(s, "settings")
    assert "| process − outcome |" in md and "0.800 → 0.800" in md
    assert "| outcome | 0.200 | 0.500 ± 0.100 | 0.350 ± 0.050 | 20 | 20 ± 0 (1 not reached, counted as 20) |" in md
