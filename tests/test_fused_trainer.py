"""The fused end of a P2T step: ``P2TScorer.advantages_ids`` (every micro-batch ending in
``p2t.p2t_advantages``, A^ of the whole batch) against the unfused path and a float64 reference; the
rewards-only path of process mode; the trainer's p2t step going through the fused op."""
from __future__ import annotations

import random

import pytest
import torch

import p2t
from p2t.attribution import P2TScorer
from p2t.attribution import fused as fused_mod
from p2t.ops import reference as ref_ops

from _attribution_models import save_model

TOY = dict(template="{prompt}{response}", step_separator="\n", step_split="\n")
OPTIONS = [dict(), dict(omega=0.3, temperature=0.5, standardize=True, normalize="sum"),
           dict(scale="batch", alpha=0.7), dict(scale="none", normalize="sum", omega=1.1)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d, t = save_model("step_classifier", str(tmp_path_factory.mktemp("prm")))
    return P2TScorer.from_pretrained(d, kind="step_classifier", tokenizer=t, micro_batch_tokens=96, **TOY)


def _batch(tok, seed: int, groups: int, group_size: int):
    """Lab-like completions as policy ids: odd lengths, lines of digits and signs, empty lines, rows with
    no step (empty, whitespace only, specials only), special tokens inside a step (a hole in the PRM
    input), EOS at the end of some rows; outcome rewards with a constant group."""
    rng = random.Random(seed)
    ids, prompts = [], []
    for g in range(groups):
        prompt = f"{rng.randint(1, 99)}+{rng.randint(1, 99)}="
        for _ in range(group_size):
            kind = rng.random()
            if kind < 0.1:
                row = [] if rng.random() < 0.5 else tok.encode(" \n \n", add_special_tokens=False)
            else:
                lines = ["".join(rng.choice("0123456789+=#") for _ in range(rng.randint(1, 9)))
                         for _ in range(rng.randint(1, 4))]
                if rng.random() < 0.3:
                    lines.insert(1, "")  # an empty line between two steps
                row = tok.encode("\n".join(lines), add_special_tokens=False)
                if rng.random() < 0.25 and len(row) > 2:  # a special token sampled inside a step
                    row.insert(rng.randint(1, len(row) - 1), tok.pad_token_id)
                if rng.random() < 0.3:
                    row.append(tok.eos_token_id)
            ids.append(row)
            prompts.append(prompt)
    o = torch.tensor([rng.choice([0.0, 0.25, 1.0]) for _ in ids])
    o[:group_size] = 0.5  # a constant group
    return prompts, ids, o


def _unfused64(sb, o, group_size, alpha=0.1, scale="group", mask=None, **kw):
    """The unfused path in float64 on the scored batch: the reference ops."""
    B, N = sb.scores.shape
    ids = torch.where(sb.response_mask, sb.segment_ids, -1).reshape(-1)
    r = ref_ops.segment_redistribute(sb.scores.double().reshape(-1), ids, sb.segment_rewards.double(),
                                     kw.get("omega", 0.6), kw.get("temperature", 1.0), kw.get("standardize", False),
                                     kw.get("normalize", "paper") == "sum").reshape(B, N)
    keep = sb.response_mask if mask is None else mask
    return ref_ops.token_advantages(o.double(), r, keep, group_size, alpha, {"group": 0, "batch": 1, "none": 2}[scale])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("group_size", [1, 3, 4])
def test_fused_equals_unfused_and_float64(toy, seed, group_size, monkeypatch):
    tok = toy.tokenizer
    prompts, ids, o = _batch(tok, seed, groups=5 if group_size < 4 else 4, group_size=group_size)
    N = max(map(len, ids)) + 3
    calls = []
    real = p2t.ops.p2t_advantages
    monkeypatch.setattr(p2t.ops, "p2t_advantages", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    assert toy.fuses("taylor")
    for opts in OPTIONS:
        calls.clear()
        f = toy.advantages_ids(prompts, ids, o, group_size=group_size, length=N, **opts)
        assert calls, "the fused op was not called"
        assert f.advantages.shape == (len(ids), N) and f.advantages.dtype == torch.float32
        u = fused_mod.unfused(toy.score_ids(prompts, ids, length=N), o, None, group_size=group_size,
                              **{"alpha": 0.1, "scale": "group", "eps": 1e-6, **opts})
        torch.testing.assert_close(f.advantages, u.advantages, rtol=0, atol=1e-6)
        want = _unfused64(f, o, group_size, **opts)
        torch.testing.assert_close(f.advantages.double(), want, rtol=0, atol=1e-6)
        # the batch the fused call returns is score_ids' batch (micro-batched otherwise: other padding, so
        # the PRM's float32 rounding differs)
        torch.testing.assert_close(f.scores, u.scores, rtol=1e-4, atol=1e-6)
        assert torch.equal(f.segment_ids, u.segment_ids) and torch.equal(f.response_mask, u.response_mask)
        torch.testing.assert_close(f.segment_rewards, u.segment_rewards, rtol=0, atol=1e-6)
        # padding and tokens past each response get 0; tokens in no step get A^_b
        assert (f.advantages[~f.response_mask] == 0).all()
        a_hat = p2t.group_advantages(o, group_size, scale=opts.get("scale", "group"))
        none = f.response_mask & (f.segment_ids < 0)
        torch.testing.assert_close(f.advantages[none], a_hat[:, None].expand_as(none)[none], rtol=0, atol=1e-6)
        if group_size > 1:  # the constant group: A^ = 0
            assert (f.advantages[:group_size][f.segment_ids[:group_size] < 0] == 0).all()


def test_fused_float64_prm(tmp_path):
    d, t = save_model("step_classifier", str(tmp_path / "prm64"))
    s = P2TScorer.from_pretrained(d, kind="step_classifier", tokenizer=t, dtype=torch.float64, micro_batch_tokens=96,
                                  **TOY)
    prompts, ids, o = _batch(s.tokenizer, 4, groups=3, group_size=4)
    f = s.advantages_ids(prompts, ids, o, group_size=4, standardize=True, temperature=0.5)
    assert f.scores.dtype == torch.float64 and f.advantages.dtype == torch.float32
    torch.testing.assert_close(f.advantages.double(), _unfused64(f, o, 4, standardize=True, temperature=0.5), rtol=0,
                               atol=1e-6)


def test_fused_mask_zeroes_without_changing_steps(toy):
    prompts, ids, o = _batch(toy.tokenizer, 5, groups=3, group_size=2)
    N = max(map(len, ids))
    mask = torch.ones(len(ids), N, dtype=torch.bool)
    mask[1] = False  # a row left out of the loss
    mask[2, :2] = False
    f = toy.advantages_ids(prompts, ids, o, group_size=2, mask=mask, alpha=0.5)
    full = toy.advantages_ids(prompts, ids, o, group_size=2, alpha=0.5)
    assert (f.advantages[~mask] == 0).all()
    both = mask & full.response_mask
    assert torch.equal(f.advantages[both], full.advantages[both])
    torch.testing.assert_close(f.advantages.double(), _unfused64(f, o, 2, alpha=0.5, mask=mask), rtol=0, atol=1e-6)


def test_fused_micro_batches_are_the_scorers(toy, monkeypatch):
    """The fused path forwards the PRM on score_ids' micro-batches (sorted by length under the token
    budget: no extra padding, a group larger than the budget is split), one fused op per micro-batch."""
    prompts, ids, o = _batch(toy.tokenizer, 7, groups=3, group_size=6)
    shapes = {"fwd": [], "op": []}
    real_fwd, real_op = type(toy.model).forward, p2t.ops.p2t_advantages

    def fwd(self, *a, **k):
        shapes["fwd"].append(tuple(k["inputs_embeds"].shape[:2]))
        return real_fwd(self, *a, **k)
    monkeypatch.setattr(type(toy.model), "forward", fwd)
    monkeypatch.setattr(p2t.ops, "p2t_advantages",
                        lambda *a, **k: shapes["op"].append(k["group_size"]) or real_op(*a, **k))
    toy.score_ids(prompts, ids)
    want = list(shapes["fwd"])
    shapes["fwd"].clear()
    toy.advantages_ids(prompts, ids, o, group_size=6)
    assert shapes["fwd"] == want and len(want) > 1 and all(b * L <= 96 or b == 1 for b, L in want)
    assert shapes["op"] == [1] * len(want)


def test_unfused_fallbacks_and_bad_arguments(toy, monkeypatch):
    prompts, ids, o = _batch(toy.tokenizer, 3, groups=2, group_size=2)
    monkeypatch.setattr(p2t.ops, "p2t_advantages", lambda *a, **k: pytest.fail("fused op on a method it cannot fuse"))
    assert not toy.fuses("exact") and "taylor" in toy.unfused_reason(method="integrated_gradients")
    a = toy.advantages_ids(prompts, ids, o, group_size=2, method="integrated_gradients")
    b = toy.score_ids(prompts, ids, method="integrated_gradients")
    want = p2t.token_advantages(o, b.token_rewards(mode="p2t"), group_size=2, alpha=0.1, mask=b.response_mask)
    torch.testing.assert_close(a.advantages, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="group_size must be a positive int dividing"):
        toy.advantages_ids(prompts, ids, o, group_size=3)
    with pytest.raises(ValueError, match=r"outcome_rewards must be a float tensor of shape \(4,\)"):
        toy.advantages_ids(prompts, ids, o[:3], group_size=2)
    with pytest.raises(ValueError, match="scale must be one of"):
        toy.advantages_ids(prompts, ids, o, group_size=2, scale="rows")
    with pytest.raises(ValueError, match="length=5 but mask has"):
        toy.advantages_ids(prompts, ids, o, group_size=2, length=5, mask=torch.ones(4, 30, dtype=torch.bool))


def test_rewards_only_path_gives_the_same_step_rewards(toy, monkeypatch):
    prompts, ids, o = _batch(toy.tokenizer, 11, groups=4, group_size=3)
    full = toy.score_ids(prompts, ids, length=40)
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: pytest.fail("a gradient on the rewards-only path"))
    r = toy.rewards_ids(prompts, ids, length=40)
    torch.testing.assert_close(r.segment_rewards, full.segment_rewards, rtol=0, atol=1e-6)
    assert torch.equal(r.segment_ids, full.segment_ids) and torch.equal(r.response_mask, full.response_mask)
    assert (r.scores == 0).all() and r.steps_per_response == full.steps_per_response
    torch.testing.assert_close(r.token_rewards(mode="process"), full.token_rewards(mode="process"), rtol=0, atol=1e-6)
    v = next(v for v in r.prm if v is not None)
    assert (v.attributions == 0).all() and v.step_rewards.numel() > 0


def test_fused_op_is_exact_when_a_group_spans_micro_batches(toy):
    """One group of 12 responses over several micro-batches: A^ comes from the whole group."""
    prompts, ids, o = _batch(toy.tokenizer, 9, groups=1, group_size=12)
    o = torch.linspace(0, 1, 12)
    for scale in ("group", "batch", "none"):
        f = toy.advantages_ids(prompts, ids, o, group_size=12, scale=scale, alpha=0.3)
        torch.testing.assert_close(f.advantages.double(), _unfused64(f, o, 12, alpha=0.3, scale=scale), rtol=0,
                                   atol=1e-6)


# ---------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from p2t.grpo import ensure_lab

    from _grpo_helpers import TINY_LAB
    c = tmp_path_factory.mktemp("lab")
    ensure_lab(TINY_LAB, str(c))
    return c


@pytest.mark.parametrize("opts", [dict(), dict(attr_temperature=0.5, standardize=True, normalize="sum",
                                                scale_rewards="batch", alpha=0.7)])
def test_trainer_p2t_step_goes_through_the_fused_op(tmp_path, cache, monkeypatch, opts):
    from p2t.grpo import GRPOTrainer

    from _grpo_helpers import digit_reward, tiny_config
    calls = []
    real = p2t.ops.p2t_advantages
    monkeypatch.setattr(p2t.ops, "p2t_advantages", lambda *a, **k: calls.append(1) or real(*a, **k))
    tr = GRPOTrainer(tiny_config(tmp_path, cache, mode="p2t", **opts), reward_fn=digit_reward)
    rec = tr.step()
    r = tr.last_rollout
    assert calls, "the trainer's p2t step did not reach p2t.p2t_advantages"
    from p2t.grpo.advantages import advantages_from_scored
    assert tr.options == tr.config.p2t_options(lab=True)  # the config's options reach the scorer
    want, _ = advantages_from_scored(r.scored, r.outcome_rewards, r.completion_mask, tr.options,
                                     group_size=tr.config.group_size)
    torch.testing.assert_close(r.advantages, want, rtol=0, atol=1e-6)
    assert (r.advantages[~r.completion_mask] == 0).all() and "attr_entropy" in rec and "step_reward" in rec


def test_trainer_process_step_takes_no_gradient(tmp_path, cache, monkeypatch):
    from p2t.grpo import GRPOTrainer

    from _grpo_helpers import digit_reward, tiny_config
    tr = GRPOTrainer(tiny_config(tmp_path, cache, mode="process"), reward_fn=digit_reward)
    used = []
    real = tr.scorer.rewards_ids
    monkeypatch.setattr(tr.scorer, "score_ids", lambda *a, **k: pytest.fail("process mode computed attributions"))
    monkeypatch.setattr(tr.scorer, "rewards_ids", lambda *a, **k: used.append(1) or real(*a, **k))
    tr.step()
    assert used == [1]
