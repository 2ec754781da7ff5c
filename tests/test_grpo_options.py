"""GRPO trainer options: the scorer's null embedding (prm_null), the sampler, the thread default."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from p2t.attribution.options import NULLS
from p2t.grpo import GRPOConfig, GRPOTrainer, ensure_lab

from _grpo_helpers import TINY_LAB, digit_reward, tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("labcache")
    ensure_lab(TINY_LAB, str(root))
    return root


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make(tmp_path, cache, **changes):
    return GRPOTrainer(tiny_config(tmp_path, cache, **changes), reward_fn=digit_reward)


# ---------------------------------------------------------------- prm_null
def test_prm_null_is_checked(capsys):
    with pytest.raises(ValueError, match="prm_null 'mean'.*pad, eos, vocab_mean, zero"):
        GRPOConfig(prm_null="mean")
    from p2t.cli import main
    assert main(["train", "--prm-null", "mean", "--print-config"]) == 2
    assert "prm_null" in capsys.readouterr().err
    assert main(["train", "--prm-null", "zero", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["prm_null"] == "zero"


def test_prm_null_reaches_the_lab_scorer(tmp_path, cache, keep_threads):
    for null in (None,) + NULLS:
        tr = make(tmp_path, cache, mode="p2t", prm_null=null)
        assert tr.scorer.null == (null or "pad")
        emb = tr.scorer.model.get_input_embeddings().weight
        want = {"zero": torch.zeros(emb.shape[1]), "vocab_mean": emb.detach().mean(0),
                "pad": emb[tr.scorer.tokenizer.pad_token_id], "eos": emb[tr.scorer.tokenizer.eos_token_id],
                None: emb[tr.scorer.tokenizer.pad_token_id]}[null]
        torch.testing.assert_close(tr.scorer._null_embed, want.detach())


def test_prm_null_reaches_a_users_scorer(tmp_path, cache, keep_threads):
    from p2t.grpo.lab.tokenizer import CharTokenizer
    from p2t.grpo.setup import scorer_options
    paths = ensure_lab(TINY_LAB, str(cache))
    cfg = GRPOConfig(mode="p2t", policy=paths["policy"], prm=paths["prm"], train_data="x.jsonl", reward="m:f",
                     prm_null="eos")
    assert scorer_options(cfg, CharTokenizer(), lab=False)["null"] == "eos"
    assert "null" not in scorer_options(cfg.replace(prm_null=None), CharTokenizer(), lab=False)
    # a scorer passed in must have been built with the null the config asks for
    scorer = make(tmp_path, cache, mode="p2t").scorer  # null pad
    with pytest.raises(ValueError, match="prm_null='zero'.*null='pad'"):
        GRPOTrainer(tiny_config(tmp_path, cache, mode="p2t", prm_null="zero"), scorer=scorer, reward_fn=digit_reward)
    GRPOTrainer(tiny_config(tmp_path, cache, mode="p2t", prm_null="pad"), scorer=scorer, reward_fn=digit_reward)


def test_two_updates_with_the_zero_null_standardized(tmp_path, cache, keep_threads):
    tr = make(tmp_path, cache, mode="p2t", prm_null="zero", standardize=True, num_updates=2)
    records = tr.train()
    assert [r["update"] for r in records] == [1, 2]
    r = tr.last_rollout
    assert torch.isfinite(r.advantages).all() and torch.isfinite(r.token_scores).all()
    assert (r.advantages[~r.completion_mask] == 0).all()
    # standardized attributions of the zero null still tell the tokens of a step apart
    spread = [float(r.advantages[b][(r.segment_ids[b] == s) & r.completion_mask[b]].std())
              for b in range(r.advantages.shape[0]) for s in r.segment_ids[b].unique().tolist() if s >= 0
              and int(((r.segment_ids[b] == s) & r.completion_mask[b]).sum()) > 1]
    assert spread and max(spread) > 0


def test_compare_passes_the_null_to_every_run():
    from p2t.cli.compare import _train_flags, configure
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--prm-null", "vocab_mean"])
    for variant in ("outcome", "p2t", "p2t-ps"):
        flags = _train_flags(args, variant, 3, "out")
        assert flags[flags.index("--prm-null") + 1] == "vocab_mean"
    assert "--prm-null" not in _train_flags(parser.parse_args([]), "p2t", 3, "out")
    # the p2t-zero variant's own null wins over the shared one: what `p2t train` resolves from its flags
    from p2t.cli.train import configure as train_configure
    from p2t.grpo.config import from_args
    train_parser = argparse.ArgumentParser()
    train_configure(train_parser)
    cfg = from_args(train_parser.parse_args(_train_flags(args, "p2t-zero", 3, "out")))
    assert (cfg.mode, cfg.prm_null, cfg.attribution_method) == ("p2t", "zero", "taylor")
    cfg = from_args(train_parser.parse_args(_train_flags(args, "p2t", 3, "out")))
    assert (cfg.mode, cfg.prm_null) == ("p2t", "vocab_mean")
    with pytest.raises(SystemExit):
        parser.parse_args(["--prm-null", "mean"])


# ---------------------------------------------------------------- sampler, threads
def test_trainer_samples_the_same_with_either_sampler(tmp_path, cache, keep_threads):
    """The lab policy goes through the decode loop; for a seed it draws what HF generate draws."""
    from p2t.grpo import sampling
    got = {}
    for sampler in ("fast", "hf"):
        tr = make(tmp_path, cache, mode="outcome", sampler=sampler)
        assert sampling.supports(tr.policy)
        got[sampler] = (tr.rollout(0).input_ids, tr.evaluate())
    assert torch.equal(got["fast"][0], got["hf"][0]) and got["fast"][1] == got["hf"][1]
    with pytest.raises(ValueError, match="sampler"):
        GRPOConfig(sampler="beam")


def test_the_lab_runs_on_one_thread_unless_told(tmp_path, cache, keep_threads):
    torch.set_num_threads(2)
    make(tmp_path, cache, mode="outcome")
    assert torch.get_num_threads() == 1
    torch.set_num_threads(1)
    make(tmp_path, cache, mode="outcome", threads=2)
    assert torch.get_num_threads() == 2
