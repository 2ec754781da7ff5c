"""The scorer's output contract: score(length=, device=) and score_ids (policy ids in, rows without a
step), token_rewards for every mode, lazy PRM views; the vectorised host helpers against their plain
Python definitions; the trainer set-up (a saved lab policy continues training)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import p2t
from p2t.attribution import MODES, NORMALIZE, SCALES, P2TScorer, ScoredBatch, token_rewards
from p2t.attribution.align import assign_steps_array, encode_with_offsets, offsets_from_ids
from p2t.attribution.batch import PRMViews

from reference_layout import assign_steps, reference_row

from _attribution_models import char_tokenizer, gpt2_tokenizer, save_model

PROMPTS = ["17+25+33=", "What is 6*7?"]
RESPONSES = ["17+25=42\n42+33=75\n#75", "6*7=42\nso 42"]
TOY = dict(template="{prompt}{response}", step_separator="\n", step_split="\n")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d, t = save_model("step_classifier", str(tmp_path_factory.mktemp("prm")))
    return P2TScorer.from_pretrained(d, kind="step_classifier", tokenizer=t, **TOY)


def test_one_source_of_the_option_values():
    from p2t import options, rewards
    from p2t.attribution import METHODS, NULLS, batch, methods
    from p2t.attribution import options as scorer_options
    from p2t.ops import _checks
    assert tuple(MODES) == ("outcome", "process", "p2t") and MODES is options.MODES is rewards.MODES
    assert NORMALIZE is options.NORMALIZE is _checks.NORMALIZE and SCALES is options.SCALES is _checks.SCALES
    assert NULLS is options.NULLS is scorer_options.NULLS and METHODS is options.METHODS is methods.METHODS
    assert token_rewards is rewards.token_rewards and batch.MODES is MODES
    assert ScoredBatch.ids_checked is True


def test_score_length_and_device(toy):
    b = toy.score(PROMPTS, RESPONSES)
    c = toy.score(PROMPTS, RESPONSES, length=30, device="cpu")
    n = b.scores.shape[1]
    assert c.scores.shape == c.segment_ids.shape == c.response_mask.shape == (2, 30)
    assert torch.equal(c.scores[:, :n], b.scores) and (c.scores[:, n:] == 0).all()
    assert torch.equal(c.segment_ids[:, :n], b.segment_ids) and (c.segment_ids[:, n:] == -1).all()
    assert torch.equal(c.response_mask[:, :n], b.response_mask) and not c.response_mask[:, n:].any()
    assert c.scores.device.type == "cpu"
    with pytest.raises(ValueError, match="a response has 21 tokens but length=20"):
        toy.score(PROMPTS, RESPONSES, length=20)


def test_score_ids_rows_without_a_step_and_no_retokenizing(toy, monkeypatch):
    tok = toy.tokenizer
    ids = [tok.encode(r, add_special_tokens=False) for r in RESPONSES]
    rows = [ids[0], [], tok.encode(" \n \n", add_special_tokens=False), [tok.eos_token_id, tok.pad_token_id],
            ids[1] + [tok.eos_token_id]]
    prompts = [PROMPTS[0], "q", "q", "q", PROMPTS[1]]
    seen = []
    real_call, real_encode = type(tok).__call__, type(tok).encode

    def call(self, text, *a, **k):
        seen.append(text)
        return real_call(self, text, *a, **k)

    def encode(self, text, *a, **k):
        seen.append(text)
        return real_encode(self, text, *a, **k)
    monkeypatch.setattr(type(tok), "__call__", call)
    monkeypatch.setattr(type(tok), "encode", encode)
    b = toy.score_ids(prompts, rows, length=24)
    monkeypatch.undo()
    assert not any(r in str(t) for t in seen for r in RESPONSES), "a response was re-tokenized"
    assert b.steps_per_response == [3, 0, 0, 0, 2] and b.segment_rewards.shape == (5,)
    assert [v is None for v in b.prm] == [False, True, True, True, False]
    for i in (1, 2, 3):
        assert (b.segment_ids[i] == -1).all() and (b.scores[i] == 0).all()
        assert b.response_mask[i].sum() == len(rows[i])
    ref = toy.score(PROMPTS, RESPONSES, response_token_ids=[rows[0], rows[4]], length=24)
    for i, j in ((0, 0), (4, 1)):
        assert torch.equal(b.scores[i], ref.scores[j]) and torch.equal(b.response_mask[i], ref.response_mask[j])
    assert torch.equal(b.segment_ids[4], torch.where(ref.segment_ids[1] >= 0, ref.segment_ids[1], -1))
    torch.testing.assert_close(b.segment_rewards, ref.segment_rewards, rtol=0, atol=0)
    # nothing to score at all: no PRM call, no step
    e = toy.score_ids(["q", "q"], [[], [tok.eos_token_id]], length=3)
    assert e.steps_per_response == [0, 0] and e.segment_rewards.shape == (0,)
    for mode in MODES:
        assert (e.token_rewards(mode=mode) == 0).all()
    with pytest.raises(ValueError, match=r"response_token_ids\[0\] holds the id -3"):
        toy.score_ids(["q"], [[-3]])
    with pytest.raises(ValueError, match="response_token_ids has 1 rows but there are 2 prompts"):
        toy.score_ids(["q", "r"], [[5]])


def test_token_rewards_every_mode(toy):
    b = toy.score(PROMPTS, RESPONSES, length=25)
    for mode in MODES:
        opts = p2t.P2TOptions(mode=mode, omega=0.5, temperature=0.7, standardize=True, normalize="sum")
        r = b.token_rewards(opts)
        assert r.shape == (2, 25) and r.dtype == torch.float32
        assert torch.equal(r, token_rewards(b, opts))
        assert torch.equal(r, b.token_rewards(mode=mode, omega=0.5, temperature=0.7, standardize=True,
                                              normalize="sum"))
        if mode == "outcome":
            assert (r == 0).all()
        elif mode == "process":
            want = torch.where(b.segment_ids >= 0, b.segment_rewards[b.segment_ids.clamp(min=0)], torch.zeros(()))
            assert torch.equal(r, want)
        else:
            want = p2t.segment_redistribute(b.scores, b.segment_ids, b.segment_rewards, omega=0.5, temperature=0.7,
                                            standardize=True, normalize="sum")
            torch.testing.assert_close(r, want, rtol=0, atol=0)
            assert (r[b.segment_ids < 0] == 0).all() and (r[b.segment_ids >= 0] != 0).all()
    with pytest.raises(ValueError, match="mode must be one of"):
        b.token_rewards(mode="dense")
    with pytest.raises(ValueError, match="normalize must be one of"):
        b.token_rewards(mode="p2t", normalize="l1")


def test_prm_views_are_built_on_access(toy):
    b = toy.score(PROMPTS, RESPONSES)
    assert isinstance(b.prm, PRMViews) and len(b.prm) == 2 and not b.prm._cache
    v = b.prm[1]
    assert b.prm._cache.keys() == {1} and b.prm[1] is v and b.prm[-1] is v
    assert "".join(v.tokens).endswith("6*7=42\nso 42\n")
    with pytest.raises(IndexError):
        b.prm[2]
    assert isinstance(b, ScoredBatch)


def test_embeddings_are_not_left_requiring_grad(toy):
    seen = []
    emb = toy.model.get_input_embeddings()
    h = emb.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        toy.score(PROMPTS, RESPONSES)
    finally:
        h.remove()
    assert seen and all(not x.requires_grad for x in seen)


def test_assign_steps_array_equals_the_loop():
    rng = random.Random(0)
    for _ in range(300):
        n_chars = rng.randint(1, 40)
        cuts = sorted(rng.sample(range(n_chars + 1), min(n_chars + 1, rng.randint(0, 8))))
        steps = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
        spans, pos = [], 0
        while pos < n_chars:
            if rng.random() < 0.2:
                spans.append((pos, pos))  # an empty span: a special token or the rest of a character
            step = rng.randint(1, 4)
            spans.append((pos, min(pos + step, n_chars)))
            pos += step
        has_text = [rng.random() < 0.5 for _ in spans]
        for ht in (None, has_text):
            want = assign_steps(spans, steps, ht)
            got = assign_steps_array(np.asarray(spans).reshape(-1, 2), np.asarray(steps).reshape(-1, 2),
                                     None if ht is None else np.asarray(ht))
            assert got.tolist() == want, (spans, steps, ht)


def test_assign_steps_array_of_many_rows_equals_the_loop_per_row():
    """Rows laid end to end (``row_offsets``; spans and steps shifted into disjoint character ranges) are
    assigned as each row alone: tokens with text but no characters leading a row take the first token
    after them in that row, never the last token of the row before."""
    rng = random.Random(2)
    for _ in range(200):
        spans_all, steps_all, ht_all, want, off, base = [], [], [], [], [0], 0
        for _ in range(rng.randint(1, 5)):
            n_chars = rng.randint(0, 20)
            cuts = sorted(rng.sample(range(n_chars + 1), min(n_chars + 1, rng.randint(0, 6))))
            steps = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
            spans, pos = [(0, 0)] * rng.randint(0, 2), 0  # empty spans leading the row
            while pos < n_chars:
                if rng.random() < 0.2:
                    spans.append((pos, pos))
                step = rng.randint(1, 4)
                spans.append((pos, min(pos + step, n_chars)))
                pos += step
            ht = [rng.random() < 0.6 for _ in spans]
            k0 = len(steps_all)
            want += [k + k0 if k >= 0 else -1 for k in assign_steps(spans, steps, ht)]
            spans_all += [(a + base, b + base) for a, b in spans]
            steps_all += [(a + base, b + base) for a, b in steps]
            ht_all += ht
            off.append(off[-1] + len(spans))
            base += n_chars
        got = assign_steps_array(np.asarray(spans_all).reshape(-1, 2), np.asarray(steps_all).reshape(-1, 2),
                                 np.asarray(ht_all, dtype=bool), row_offsets=np.asarray(off))
        assert got.tolist() == want, (spans_all, steps_all, ht_all, off)


def test_byte_level_offsets_from_token_bytes(tmp_path):
    """GPT-2's ids -> offsets from the token bytes (no re-encoding) equal the offsets of encoding the text."""
    gpt2 = gpt2_tokenizer(str(tmp_path / "g"))
    rng = random.Random(1)
    alphabet = list("abc xyz 012+=.\n") + list("éк×÷√π≤日本🙂")
    for _ in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids, spans = encode_with_offsets(gpt2, text)
        decoded, sp = offsets_from_ids(gpt2, ids)
        assert decoded == text and sp == spans, text
    # ids that are not valid UTF-8 on their own fall back to the general path
    decoded, sp = offsets_from_ids(gpt2, gpt2.encode("日")[:1])
    assert len(sp) == 1


# ---------------------------------------------------------------- the trainer set-up
def test_setup_resolves_and_a_saved_lab_policy_continues(tmp_path):
    from p2t.grpo import GRPOConfig, GRPOTrainer
    from p2t.grpo.setup import is_lab_policy, resolve, uses_lab

    from _grpo_helpers import TINY_LAB, digit_reward, tiny_config
    cache = tmp_path / "cache"
    tr = GRPOTrainer(tiny_config(tmp_path, cache, mode="p2t"), reward_fn=digit_reward)
    assert tr.lab and tr.scorer is not None and tr.scorer.same_tokenizer
    tr.step()
    saved = str(tmp_path / "saved")
    tr.save_pretrained(saved)
    assert is_lab_policy(saved) and not is_lab_policy(str(tmp_path)) and not is_lab_policy(None)
    cfg = tiny_config(tmp_path, cache, mode="p2t", policy=saved)
    # the config names a policy (its checks read no disk); the set-up reads that it is a lab policy, so no
    # prm, train_data or reward is needed
    assert uses_lab(cfg) and not cfg.uses_lab
    setup = resolve(cfg, reward_fn=digit_reward)
    assert setup.lab and setup.scorer is not None and len(setup.eval_rows) == cfg.eval_prompts
    sd = setup.policy.state_dict()
    for k, v in tr.policy.state_dict().items():
        assert torch.equal(sd[k].cpu(), v.cpu()), k
    again = GRPOTrainer(cfg, reward_fn=digit_reward)
    assert again.step()["update"] == 1
    from p2t.grpo.setup import check
    with pytest.raises(ValueError, match="train_data"):
        check(GRPOConfig(policy=str(tmp_path), mode="outcome", lab=TINY_LAB))


def test_token_rewards_is_public():
    assert p2t.token_rewards is token_rewards and "token_rewards" in p2t.__all__


# ---------------------------------------------------------------- one host copy per training step
_HOST_READS = ("cpu", "tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")


class _Tracked(torch.Tensor):
    """A tensor that counts reads onto the host (``.cpu()``, ``.to("cpu")``, ``.tolist()``, ``.item()``,
    ``.numpy()``, ``bool``/``int``/``float``) of itself and of everything computed from it."""
    reads: list = []
    counting = True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # .to("cpu") (a .to(device) of the tensor's own device object is no copy, and is not counted)
        to_cpu = name == "to" and any(a == "cpu" for a in list(args[1:]) + list(kwargs.values())
                                      if isinstance(a, str))
        if cls.counting and (name in _HOST_READS or to_cpu):
            cls.reads.append(name)
        return super().__torch_function__(func, types, args, kwargs)


def _tracked_step(tmp_path, mode):
    """One GRPO update of the tiny lab with the scorer's outputs tracked; reads inside the policy update
    (the loss mixes the advantages with the policy's log-probs) are the policy's, not counted."""
    import dataclasses

    from p2t.grpo import GRPOTrainer

    from _grpo_helpers import digit_reward, tiny_config
    tr = GRPOTrainer(tiny_config(tmp_path, tmp_path / "cache", mode=mode), reward_fn=digit_reward)
    optimize = tr.optimize

    def tracked(call):  # every scorer entry point the trainer may use (p2t: the fused advantages_ids)
        def run(*a, **kw):
            sb = call(*a, **kw)
            wrap = {f: getattr(sb, f).as_subclass(_Tracked) for f in ("scores", "segment_ids", "segment_rewards",
                                                                     "segment_logits", "response_mask", "advantages")
                    if getattr(sb, f) is not None}
            return dataclasses.replace(sb, **wrap)
        return run

    def untracked_optimize(r):
        _Tracked.counting = False
        try:
            return optimize(r)
        finally:
            _Tracked.counting = True

    for name in ("score_ids", "rewards_ids", "advantages_ids"):
        setattr(tr.scorer, name, tracked(getattr(tr.scorer, name)))
    tr.optimize = untracked_optimize
    _Tracked.reads = []
    rec = tr.step()
    return tr, rec, list(_Tracked.reads)


@pytest.mark.parametrize("mode", ["p2t", "process"])
def test_a_training_step_moves_scorer_results_to_the_host_once(tmp_path, mode):
    from p2t.grpo import advantages as adv_mod
    tr, rec, reads = _tracked_step(tmp_path, mode)
    r = tr.last_rollout
    # the tracking reached the whole reward path: token rewards and advantages derive from the scores
    assert isinstance(r.token_rewards, _Tracked) and isinstance(r.advantages, _Tracked)
    assert "step_reward" in rec and "attr_entropy" in rec
    assert len(reads) <= 1, f"scorer results reached the host {len(reads)} times in one step: {reads}"
    # and a second copy would be seen: the log's view read once more is a second read
    _Tracked.reads = []
    adv_mod.scored_stats(r.scored)
    r.scored.segment_rewards.to("cpu")
    assert len(_Tracked.reads) == 2


def test_token_rewards_checks_segment_ids_of_other_batches():
    from types import SimpleNamespace
    ids = torch.tensor([[0, 0, 3, -1]])
    other = SimpleNamespace(scores=torch.rand(1, 4), segment_ids=ids, segment_rewards=torch.rand(2))
    for mode in ("process", "p2t"):
        with pytest.raises(ValueError, match="segment_ids"):
            token_rewards(other, mode=mode)


def test_vocabulary_gather_equals_joining_the_token_strings(tmp_path):
    """Text and bytes of random ids (multi-character tokens, special tokens, repeats, none) gathered from
    the flat per-tokenizer buffer equal joining the per-token table entries."""
    from p2t.attribution import align
    gpt2, char = gpt2_tokenizer(str(tmp_path / "g")), char_tokenizer()
    rng = np.random.default_rng(3)
    for tok, kind in ((gpt2, "bytes"), (gpt2, "text"), (char, "text")):
        vt = align.vocab_table(tok, kind)
        table = vt.values
        specials = sorted(align.special_ids(tok))
        for n in (0, 1, 2, 37, 500):
            ids = rng.integers(0, len(table), n).tolist()
            ids[:min(n, 2)] = specials[:min(n, 2)]  # entries of length 0
            idx = np.asarray(ids, dtype=np.int64)
            want = (b"" if kind == "bytes" else "").join(table[i] for i in ids)
            if kind == "bytes":
                assert vt.bytes(ids, idx) == want
            else:
                text, got_lens = vt.text(ids, idx)
                assert text == want and got_lens.tolist() == [len(table[i]) for i in ids]


# ---------------------------------------------------------------- the batch layout against the per-row one
def _layout(tok, **kw):
    from p2t.attribution.layout import Layout
    o = dict(template="{prompt}\n{response}", add_special_tokens=True, step_separator="\n", separator_suffix="",
             step_split="\n", read_at="separator", max_length=None, truncation="steps")
    o.update(kw)
    return Layout(tok, tok, True, system_prompt=None, **o)


def _same_row(a, b):
    if a is None or b is None:
        return a is None and b is None
    fields = ("input_ids", "token_step", "readout", "map_prm", "map_policy", "policy_step", "policy_spans")
    weights = ((a.map_weight is None and b.map_weight is None) or
               (a.map_weight is not None and b.map_weight is not None and np.array_equal(a.map_weight, b.map_weight)))
    return ((a.index, a.prompt_length, a.steps, a.text) == (b.index, b.prompt_length, b.steps, b.text) and weights
            and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields))


@pytest.mark.parametrize("pair", ["char->gpt2", "gpt2->char", "char->char"])
def test_text_and_cross_tokenizer_layout_equals_the_reference(tmp_path, pair):
    """Layout.rows of response texts (score) and of ids with a hint, with the PRM's tokenizer or another one
    (each step re-encoded by the PRM tokenizer, attributions split by shared characters), builds the rows,
    warnings and errors of the step-by-step reference: truncation, steps split otherwise, read_at="last",
    responses with no step (before, the per-row path was a second copy of the layout)."""
    import warnings

    from p2t.attribution.layout import Layout

    from reference_layout import reference_rows
    gpt2 = gpt2_tokenizer(str(tmp_path / "g"))
    toks = {"char": char_tokenizer(), "gpt2": gpt2}
    prm, policy = (toks[n] for n in pair.split("->"))
    texts = ["17+25=42\n42+33=75\n#75", "a b\n\n c d 12\n\nend", "x", "+1=2\nnext line", "\n\nlead\ntrail\n\n",
             "a×b 日本\n\né", "emoji 🙂 ok\n2", " \n \n"]
    rng = random.Random(4)
    for kw in [dict(), dict(step_split="\n\n"), dict(read_at="last"), dict(max_length=30),
               dict(max_length=30, truncation="error"), dict(step_separator="\n\n", separator_suffix="\n")]:
        o = dict(template="{prompt}\n{response}", add_special_tokens=True, step_separator="\n", separator_suffix="",
                 step_split="\n", read_at="separator", max_length=None, truncation="steps")
        o.update(kw)
        lay = Layout(prm, policy, prm is policy, system_prompt=None, **o)
        for _ in range(6):
            B = rng.randint(1, 5)
            responses = [rng.choice(texts) for _ in range(B)]
            prompts = [rng.choice(["q", "What is 2+2?"]) for _ in range(B)]
            ids = [policy.encode(r, add_special_tokens=False) for r in responses]
            for args in ((responses, None, True, False), (responses, ids, True, False), (None, ids, False, True)):
                seen = []
                for build in (lambda: lay.rows(prompts, args[0], args[1], hint=args[2], skip_empty=args[3]),
                              lambda: reference_rows(lay, prompts, args[0], args[1], hint=args[2],
                                                     skip_empty=args[3])):
                    with warnings.catch_warnings(record=True) as w:
                        warnings.simplefilter("always")
                        try:
                            got = build()
                        except ValueError as e:
                            got = str(e)
                    seen.append((got, [str(x.message) for x in w]))
                (a, wa), (b, wb) = seen
                assert type(a) is type(b), (kw, responses, a, b)
                if isinstance(a, str):  # the first error in row order (the warnings before it may differ)
                    assert a == b
                else:  # the same warnings (the batch gives them phase by phase, the reference row by row)
                    assert sorted(wa) == sorted(wb)
                    assert len(a) == B and all(_same_row(x, y) for x, y in zip(a, b)), (kw, responses)


@pytest.mark.parametrize("path", ["native", "numpy"])
@pytest.mark.parametrize("which", ["char", "gpt2", "lab"])
def test_batch_layout_equals_the_row_by_row_layout(tmp_path, which, path, monkeypatch):
    """Layout.rows of policy ids (the whole batch at once, what score_ids, rewards_ids and advantages_ids
    use) builds exactly the rows, warnings and errors of Layout.row one response at a time: specials
    inside and around steps, empty rows, whitespace rows, random ids, multi-byte characters, truncation,
    other separators and read_at="last". Both batch paths: the native kernel (where the extension holds it)
    and the NumPy one."""
    import warnings

    from p2t.grpo.lab.tokenizer import CharTokenizer
    from p2t.ops import host
    if path == "native" and not host.has_layout():
        pytest.skip("p2t._C is not built with the layout kernel")
    if path == "numpy":
        monkeypatch.setattr(host, "has_layout", lambda: False)
    tok = {"char": char_tokenizer, "gpt2": lambda: gpt2_tokenizer(str(tmp_path / "g")), "lab": CharTokenizer}[which]()
    texts = ["17+25=42\n42+33=75\n#75", "a b\n\n c d 12\n\nend", " \n \n", "", "x", "+1=2\nnext line",
             "\n\nlead\ntrail\n\n"]
    if which != "lab":
        texts += ["a×b 日本\n\né", "emoji 🙂 ok\n2"]
    rng = random.Random(1)
    for kw in [dict(), dict(step_split="\n\n"), dict(read_at="last"), dict(max_length=24),
               dict(max_length=24, truncation="error"), dict(step_separator="\n\n", separator_suffix="\n"),
               dict(add_special_tokens=False, template="{prompt}{response}")]:
        lay = _layout(tok, **kw)
        specials = sorted(lay.policy_special)
        for _ in range(12):
            B = rng.randint(1, 6)
            ids = []
            for _ in range(B):
                row = tok.encode(rng.choice(texts), add_special_tokens=False)
                if row and specials and rng.random() < 0.4:
                    row.insert(rng.randint(0, len(row)), rng.choice(specials))
                if rng.random() < 0.15:
                    row = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 12))]
                ids.append(row)
            prompts = [rng.choice(["q", "What is 2+2?", ""]) for _ in range(B)]
            got, want = [], []
            for build, seen in ((lambda: lay.rows(prompts, None, ids, hint=False, skip_empty=True), got),
                                (lambda: [reference_row(lay, i, lay.template_parts(p), None, ids[i], hint=False,
                                                        skip_empty=True)
                                          for i, p in enumerate(prompts)], want)):
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    try:
                        seen.append(build())
                    except ValueError as e:
                        seen.append(str(e))
                seen.append([str(x.message) for x in w])
            if isinstance(want[0], str):
                assert got[0] == want[0]
                continue
            assert got[1] == want[1]
            assert len(got[0]) == B and all(_same_row(a, b) for a, b in zip(got[0], want[0])), (kw, prompts, ids)


def test_advantages_options_reach_the_fused_op(toy, monkeypatch):
    """advantages_ids takes a P2TOptions (its field names as overrides): the fused op receives every
    redistribution and advantage option (omega_neg included) and equals the unfused path, the mode registry
    decides what fuses, and the default alpha is P2TOptions'."""
    tok = toy.tokenizer
    ids = [tok.encode(r, add_special_tokens=False) for r in RESPONSES]
    o = torch.tensor([1.0, 0.0])
    seen = []
    real = p2t.ops.p2t_advantages
    monkeypatch.setattr(p2t.ops, "p2t_advantages", lambda *a, **k: seen.append(k) or real(*a, **k))
    opts = p2t.P2TOptions(omega=0.8, omega_neg=0.3, temperature=0.7, standardize=True, normalize="sum", alpha=0.4)
    f = toy.advantages_ids(PROMPTS, ids, o, group_size=2, options=opts)
    assert seen and all(k["omega_neg"] == 0.3 and k["omega"] == 0.8 and k["alpha"] == 0.4 for k in seen)
    sb = toy.score_ids(PROMPTS, ids)
    want = p2t.rewards.token_advantages_of(sb, o, opts, group_size=2)
    torch.testing.assert_close(f.advantages, want.float(), rtol=0, atol=1e-5)
    assert torch.equal(toy.advantages_ids(PROMPTS, ids, o, group_size=2, **opts.as_dict()).advantages, f.advantages)
    seen.clear()
    default = toy.advantages_ids(PROMPTS, ids, o, group_size=2)
    assert seen[0]["alpha"] == p2t.P2TOptions().alpha == 0.1
    torch.testing.assert_close(default.advantages, p2t.rewards.token_advantages_of(sb, o, group_size=2).float(),
                               rtol=0, atol=1e-5)
    seen.clear()
    for mode in ("process", "outcome"):  # not fusable: the registry's token rewards, no fused op
        assert toy.unfused_reason(mode=mode) is not None
        got = toy.advantages_ids(PROMPTS, ids, o, group_size=2, options=opts, mode=mode)
        torch.testing.assert_close(got.advantages, p2t.rewards.token_advantages_of(sb, o, opts, group_size=2,
                                                                                     mode=mode).float(),
                                   rtol=0, atol=1e-6)
    assert not seen
    with pytest.raises(TypeError, match="unknown P2T option"):
        toy.advantages_ids(PROMPTS, ids, o, group_size=2, omgea=1.0)


def test_scorer_state_is_declared_and_read_only(toy):
    """The scorer's resolved state is one frozen engine (plus its run state) and one frozen set of options,
    read through read-only attributes; an unknown option is refused by name."""
    import dataclasses

    from p2t.attribution.engine import Engine, RunState
    e = toy.engine
    assert isinstance(e, Engine) and isinstance(e.state, RunState) and e.state.vmap_ok in (True, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.micro_batch_tokens = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        toy.settings.null = "zero"
    with pytest.raises(AttributeError):
        toy.packing = True
    assert toy.model is e.model and toy.layout is e.layout and toy.micro_batch_tokens == e.micro_batch_tokens
    assert torch.equal(toy.null_embedding, e.null_embed) and toy.null == toy.settings.null
    with pytest.raises(TypeError, match="unknown option.*'micro_batch'"):
        P2TScorer(toy.model, toy.tokenizer, micro_batch=4)
