"""Long responses within bounded memory: the LM judge read at the readout positions only
(``judge_logits="readout"``: no ``[L, vocab]`` logits) gives the full head's scores, alone, packed and
with checkpointed layers; the options it needs."""
from __future__ import annotations

import pytest
import torch

from p2t.attribution import P2TScorer

from _attribution_models import save_model

PROMPTS = ["17+25+33=", "What is 6*7?", "Name a prime."]
RESPONSES = ["17+25=42\n42+33=75\n#75", "6*7=42\nso 42", "7\nit is odd\nand prime\n#7"]


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return save_model("lm_judge", str(tmp_path_factory.mktemp("prms") / "lm_judge"), seed=3)


def load(judge, **options):
    d, tok = judge
    return P2TScorer.from_pretrained(d, kind="lm_judge", tokenizer=tok, **options)


def close(a, b, tol=1e-5):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max error {err}"


@pytest.mark.parametrize("method", ["taylor", "taylor_per_step", "exact"])
@pytest.mark.parametrize("options", [{}, {"packing": True}, {"gradient_checkpointing": True}])
def test_readout_head_equals_full_head(judge, method, options):
    full = load(judge).score(PROMPTS, RESPONSES, method=method)
    got = load(judge, judge_logits="readout", **options).score(PROMPTS, RESPONSES, method=method)
    assert got.scores.abs().sum() > 0
    close(got.scores, full.scores)
    close(got.segment_logits, full.segment_logits)


def test_readout_head_computes_no_full_vocabulary_logits(judge):
    """The LM head sees the readout positions only: [b, P, V] with P the distinct readout positions."""
    s = load(judge, judge_logits="readout")
    shapes = []
    head = s.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        b = s.score(PROMPTS[:1], RESPONSES[:1])
    finally:
        hook.remove()
    L = len(b.prm[0].input_ids)
    assert shapes and all(sh[1] == len(b.prm[0].readout_positions) < L for sh in shapes), shapes


def test_judge_logits_option(judge):
    with pytest.raises(ValueError, match="judge_logits"):
        load(judge, judge_logits="some")
    s = load(judge)
    assert s.head.judge_logits == "all"

    class NoKeep(torch.nn.Module):  # a causal LM whose forward cannot restrict its logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, inputs_embeds=None, attention_mask=None):
            return self.inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask)

    with pytest.raises(ValueError, match="logits_to_keep"):
        P2TScorer(NoKeep(s.model), s.tokenizer, kind="lm_judge", judge_logits="readout")
