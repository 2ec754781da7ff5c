"""Packed sequences in the attribution engine (``P2TScorer(packing=True)``) on tiny random decoder PRMs
saved with save_pretrained and loaded back: packed scores equal the padded path's per response, no
information crosses from one packed input to another, the packing plan, and the PRMs and options that
are refused."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from p2t.attribution import P2TScorer
from p2t.attribution import packing

from _attribution_models import save_model

PROMPTS = ["17+25+33=", "What is 6*7?", "2+2=", "Name a prime.", "1+1="]
RESPONSES = ["17+25=42\n42+33=75\n#75", "6*7=42\nso 42", "4", "7\nit is odd\nand prime\n#7", "2\n#2"]
TOY = dict(template="{prompt}{response}", step_separator="\n", step_split="\n")
KINDS = ("step_classifier", "value_head", "lm_judge")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("prms")
    return {k: save_model(k, str(root / k), seed=i) for i, k in enumerate(KINDS)}


def load(saved, kind, **options):
    d, tok = saved[kind]
    options = {**(TOY if kind != "lm_judge" else {}), **options}
    return P2TScorer.from_pretrained(d, kind=kind, tokenizer=tok, **options)


def close(a, b, tol=1e-5):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max error {err}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["taylor", "taylor_per_step", "integrated_gradients"])
def test_packed_equals_padded(saved, kind, method):
    """Every response's attributions and step rewards agree with the padded path to 1e-5 (fp32), with
    several packed rows per micro-batch and several micro-batches."""
    padded = load(saved, kind)
    want = padded.score(PROMPTS, RESPONSES, method=method, ig_steps=3)
    for budget in (8192, 40):  # one micro-batch of packed rows; one packed row per micro-batch
        got = load(saved, kind, packing=True, micro_batch_tokens=budget).score(PROMPTS, RESPONSES, method=method,
                                                                                ig_steps=3)
        assert got.scores.abs().sum() > 0
        close(got.scores, want.scores)
        close(got.segment_logits, want.segment_logits)
        assert torch.equal(got.segment_ids, want.segment_ids)
        for i in range(len(PROMPTS)):  # the per-response PRM views are those of an unpacked input
            assert got.prm[i].input_ids == want.prm[i].input_ids
            close(got.prm[i].attributions, want.prm[i].attributions)


def test_packing_plan_packs_several_inputs_per_row(saved):
    """The plan really packs: fewer rows than inputs, each row within its length, every input once."""
    s = load(saved, "step_classifier", packing=True)
    rows = s.layout.rows(PROMPTS, RESPONSES, None)
    cap = packing.row_length(s.model, rows, None, s.micro_batch_tokens)
    assert cap == max(r.length for r in rows)
    groups = packing.plan(s.model, rows, None, s.micro_batch_tokens)
    assert sorted(i for g in groups for i in g) == list(range(len(rows)))
    t = packing.tensors([rows[i] for i in groups[0]], cap, 0, "cpu")
    assert t["input_ids"].shape[0] < len(rows) and t["input_ids"].shape[1] == cap
    # positions restart at every input, which transformers reads as the sequence boundaries
    for i, (j, o) in enumerate(t["where"]):
        n = rows[groups[0][i]].length
        assert t["position_ids"][j, o:o + n].tolist() == list(range(n))


def test_split_recovers_first_fit_decreasing_rows():
    """Listing the plan's rows one after the other and splitting them greedily gives the same rows."""
    rng = random.Random(0)
    for _ in range(300):
        n, cap = rng.randint(1, 30), rng.randint(5, 60)
        lengths = [rng.randint(1, cap) for _ in range(n)]
        bins = packing._ffd(lengths, cap)
        flat = [i for b in bins for i in b]
        assert sorted(flat) == list(range(n))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        got = packing.split([lengths[i] for i in flat], cap)
        sizes = [len(b) for b in bins]
        assert [len(b) for b in got] == sizes


@pytest.mark.parametrize("kind", ["step_classifier", "lm_judge"])
def test_no_leakage_between_packed_inputs(saved, kind):
    """Changing the first input of a packed row (one character: same length, so the same plan) leaves
    every other response's attributions and step rewards bitwise unchanged, its own changed."""
    s = load(saved, kind, packing=True)
    base = s.score(PROMPTS, RESPONSES)
    t = s.layout.rows(PROMPTS, RESPONSES, None)
    group = packing.plan(s.model, t, None, s.micro_batch_tokens)[0]
    bins = packing.split([t[i].length for i in group], packing.row_length(s.model, t, None, 8192))
    shared = next(b for b in bins if len(b) > 1)  # a row holding several inputs
    first = group[shared[0]]
    changed = list(RESPONSES)
    changed[first] = "9" + changed[first][1:] if changed[first][0] != "9" else "8" + changed[first][1:]
    other = s.score(PROMPTS, changed)
    assert not torch.equal(other.scores[first], base.scores[first])
    rest = [i for i in range(len(PROMPTS)) if i != first]
    assert torch.equal(other.scores[rest], base.scores[rest])
    spr = base.steps_per_response
    keep = [k for i in rest for k in range(sum(spr[:i]), sum(spr[:i + 1]))]
    assert torch.equal(other.segment_logits[keep], base.segment_logits[keep])


def test_packed_with_gradient_checkpointing_and_exact(saved):
    """Checkpointed layers give the same packed result; ``exact`` runs unpacked and agrees with the
    padded path's."""
    want = load(saved, "value_head").score(PROMPTS, RESPONSES)
    got = load(saved, "value_head", packing=True, gradient_checkpointing=True).score(PROMPTS, RESPONSES)
    close(got.scores, want.scores)
    s = load(saved, "value_head", packing=True)
    ex = s.score(PROMPTS[:2], RESPONSES[:2], method="exact")
    close(ex.scores, load(saved, "value_head").score(PROMPTS[:2], RESPONSES[:2], method="exact").scores)


def test_packed_score_ids_skips_empty_rows(saved):
    """The ids-in entry point packs too; a response without a step is not sent."""
    s = load(saved, "step_classifier", packing=True)
    tok = s.tokenizer
    ids = [tok.encode(r, add_special_tokens=False) for r in RESPONSES] + [tok.encode(" ", add_special_tokens=False)]
    prompts = PROMPTS + ["x"]
    got = s.score_ids(prompts, ids)
    want = load(saved, "step_classifier").score_ids(prompts, ids)
    close(got.scores, want.scores)
    assert got.prm[len(PROMPTS)] is None and (got.segment_ids[-1] == -1).all()


def test_packing_refused_where_it_cannot_work(saved, tmp_path):
    d, tok = saved["step_classifier"]
    model = P2TScorer.from_pretrained(d, tokenizer=tok, **TOY).model
    tk = P2TScorer.from_pretrained(d, tokenizer=tok, **TOY).tokenizer
    with pytest.raises(ValueError, match="pack_length"):
        P2TScorer(model, tk, packing=True, pack_length=0, **TOY)
    with pytest.raises(ValueError, match="callable"):
        P2TScorer(model, tk, kind=lambda x, a, **b: x.sum(-1), packing=True, **TOY)
    # a model whose positions mix the whole row (as an encoder's bidirectional mask would, where the
    # installed transformers does not split packed rows by their restarting position_ids): refused
    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.head = torch.nn.Embedding(len(tk), 8), torch.nn.Linear(8, 2)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, inputs_embeds=None, attention_mask=None, position_ids=None, use_cache=False):
            return self.head(inputs_embeds + inputs_embeds.mean(1, keepdim=True))

    with pytest.raises(ValueError, match="see each other"):
        P2TScorer(Mixer(), tk, "value_head", packing=True, **TOY)
    P2TScorer(Mixer(), tk, "value_head", packing=False, **TOY)  # unpacked: fine
    class Plain(torch.nn.Module):  # a module of the user's own: no position_ids, or no use_cache
        def __init__(self, positions):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(len(tk), 8), torch.nn.Linear(8, 2)
            if positions:
                self.forward = self.forward_positions

        def get_input_embeddings(self):
            return self.emb

        def forward(self, inputs_embeds=None, attention_mask=None):
            return self.head(inputs_embeds)

        def forward_positions(self, inputs_embeds=None, attention_mask=None, position_ids=None):
            return self.head(inputs_embeds)

    with pytest.raises(ValueError, match="takes no position_ids"):
        P2TScorer(Plain(False), tk, packing=True, **TOY)
    with pytest.raises(ValueError, match="cannot be called"):
        P2TScorer(Plain(True), tk, packing=True, **TOY)


ENCODERS = ("bert", "electra", "roberta", "xlm-roberta", "camembert", "distilbert", "deberta-v2")
PACKED_ENCODERS = ENCODERS[:5]


def _encoder(family: str, vocab_size: int):
    """A tiny random token classifier (2 labels) of an encoder family, built from its config."""
    import transformers as T
    names = {"bert": "Bert", "electra": "Electra", "roberta": "Roberta", "xlm-roberta": "XLMRoberta",
             "camembert": "Camembert", "distilbert": "DistilBert", "deberta-v2": "DebertaV2"}[family]
    size = (dict(dim=32, n_layers=2, n_heads=2, hidden_dim=48) if family == "distilbert" else
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48))
    cfg = getattr(T, names + "Config")(vocab_size=vocab_size, max_position_embeddings=256, num_labels=2, **size)
    torch.manual_seed(0)
    model = getattr(T, names + "ForTokenClassification")(cfg).eval()
    with torch.no_grad():  # a larger init so that the outputs vary with the input
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("family", ENCODERS)
def test_packed_encoders_equal_padded(saved, family):
    """Every encoder family the packing probe accepts scores packed inputs as the padded path does (the others,
    DistilBERT and DeBERTa-v2 here, are refused with a ValueError): RoBERTa,
    XLM-RoBERTa and CamemBERT count positions from padding_idx + 1, and a packed input gets those positions
    too (before, packed inputs started at 0 and their step logits differed by ~0.1)."""
    tk = saved["step_classifier"][1]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tk)
    model = _encoder(family, len(tok))
    want = P2TScorer(model, tok, **TOY).score(PROMPTS, RESPONSES, method="taylor")
    try:
        s = P2TScorer(model, tok, packing=True, micro_batch_tokens=40, **TOY)
    except ValueError as e:  # a refusal names the reason; the BERT and RoBERTa families are packed since
        # transformers 5.25 splits packed rows by their restarting position_ids for encoders too
        assert "packing=True" in str(e) and family not in PACKED_ENCODERS, str(e)
        return
    if family in ("roberta", "xlm-roberta", "camembert"):
        assert s.engine.position_offset == model.config.pad_token_id + 1
    got = s.score(PROMPTS, RESPONSES, method="taylor")
    close(got.segment_logits, want.segment_logits)
    close(got.scores, want.scores)


def test_packing_off_by_default(saved):
    s = load(saved, "step_classifier")
    assert s.packing is False and s.pack_length is None


def test_pack_length_rows(saved):
    """A given ``pack_length`` sets the packed row length (never below the longest input)."""
    s = load(saved, "step_classifier", packing=True, pack_length=64)
    rows = s.layout.rows(PROMPTS, RESPONSES, None)
    assert packing.row_length(s.model, rows, 64, 8192) == 64
    assert packing.row_length(s.model, rows, 3, 8192) == max(r.length for r in rows)
    close(s.score(PROMPTS, RESPONSES).scores, load(saved, "step_classifier").score(PROMPTS, RESPONSES).scores)
    lengths = np.asarray([r.length for r in rows])
    assert lengths.sum() > 64  # at least two packed rows


def test_grpo_step_with_packing(tmp_path_factory):
    """The GRPO loop's scorer packs when the config asks (``prm_packing``), with the same token
    advantages as the padded scorer on the same rollout."""
    from p2t.grpo import GRPOTrainer
    from p2t.grpo.lab.models import ensure_lab

    from _grpo_helpers import TINY_LAB, digit_reward, tiny_config
    cache = tmp_path_factory.mktemp("labcache")
    ensure_lab(TINY_LAB, str(cache))
    runs = {}
    for packed in (False, True):
        tr = GRPOTrainer(tiny_config(tmp_path_factory.mktemp("run"), cache, mode="p2t", prm_packing=packed),
                         reward_fn=digit_reward)
        assert tr.scorer.packing is packed
        tr.step()
        runs[packed] = tr.last_rollout
    a, b = runs[False], runs[True]
    assert a.responses == b.responses
    close(b.scored.scores, a.scored.scores)
    close(b.advantages, a.advantages)
    assert (b.scored.segment_ids >= 0).any()


def test_per_step_plan_counts_the_gradient_outputs(saved):
    """taylor_per_step keeps K gradients per position: fewer packed rows per micro-batch."""
    s = load(saved, "step_classifier", packing=True, micro_batch_tokens=200)
    rows = s.layout.rows(PROMPTS, RESPONSES, None)
    cap = packing.row_length(s.model, rows, None, 200)
    k = max(r.num_steps for r in rows)
    assert k > 1 and 200 // cap > 1
    rows_per = lambda groups: max(len(packing.split([rows[i].length for i in g], cap)) for g in groups)  # noqa: E731
    assert rows_per(packing.plan(s.model, rows, None, 200)) == min(200 // cap, len(packing._ffd(
        [r.length for r in rows], cap)))
    assert rows_per(packing.plan(s.model, rows, None, 200, per_step=True)) == max(1, 200 // (cap * k))
