"""P2TScorer on tiny random PRMs of every kind, saved with save_pretrained and loaded back: every
method against a manual autograd / brute-force computation, the PRM input layout, the policy-token
output, frozen parameters, options and bad inputs."""
from __future__ import annotations

import warnings

import pytest
import torch

import p2t
from p2t.attribution import AttributionWarning, P2TScorer, ScoredBatch

from _attribution_models import char_tokenizer, save_model

PROMPTS = ["17+25+33=", "What is 6*7?"]
RESPONSES = ["17+25=42\n42+33=75\n#75", "6*7=42\nso 42"]
TOY = dict(template="{prompt}{response}", step_separator="\n", step_split="\n")  # the toy lab's layout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("prms")
    kinds = ("step_classifier", "value_head", "lm_judge")
    return {k: save_model(k, str(root / k), seed=i) for i, k in enumerate(kinds)}


def load(saved, kind, **options):
    d, tok = saved[kind]
    return P2TScorer.from_pretrained(d, kind=kind, tokenizer=tok, **options)


@pytest.fixture(scope="module")
def toy(saved):
    return load(saved, "step_classifier", **TOY)


# ---------------------------------------------------------------- manual references
def _margins(scorer, logits):
    if scorer.kind == "step_classifier":
        return logits[:, 1] - logits[:, 0]
    if scorer.kind == "value_head":
        return logits[:, 0]
    tok = scorer.tokenizer
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    return logits[:, plus] - logits[:, minus]


def _objective_fn(scorer, view):
    """F_s(x) for one unpadded PRM input, computed directly with the model."""
    model = scorer.model

    def f(x):
        logits = model(inputs_embeds=x[None]).logits[0].float()[view.readout_positions]
        m = _margins(scorer, logits)
        return m if scorer.objective == "logit" else torch.sigmoid(m)
    return f


def _setup(scorer, view, null=None):
    emb = scorer.model.get_input_embeddings()
    x = emb.weight.detach()[torch.tensor(view.input_ids)].clone()
    null = emb.weight.detach()[scorer.tokenizer.pad_token_id] if null is None else null
    steps = view.step_index >= 0
    return x, null, steps


def manual_taylor(scorer, view, null=None):
    x, null, steps = _setup(scorer, view, null)
    xg = x.clone().requires_grad_(True)
    f = _objective_fn(scorer, view)(xg)
    g, = torch.autograd.grad(f.sum(), xg)
    return ((x - null) * g).sum(-1) * steps


def manual_exact(scorer, view):
    x, null, steps = _setup(scorer, view)
    f = _objective_fn(scorer, view)
    out = torch.zeros(x.shape[0])
    with torch.no_grad():
        f0 = f(x).sum()
        for p in steps.nonzero().flatten().tolist():
            xx = x.clone()
            xx[p] = null
            out[p] = f0 - f(xx).sum()
    return out


def manual_per_step(scorer, view):
    x, null, steps = _setup(scorer, view)
    out = torch.zeros(x.shape[0])
    for s in range(len(view.readout_positions)):
        xg = x.clone().requires_grad_(True)
        g, = torch.autograd.grad(_objective_fn(scorer, view)(xg)[s], xg)
        tok = view.step_index == s
        out[tok] = ((x - null) * g).sum(-1)[tok]
    return out


def manual_ig(scorer, view, k):
    x, null, steps = _setup(scorer, view)
    g = torch.zeros_like(x)
    for j in range(1, k + 1):
        xa = torch.where(steps[:, None], null + (j / k) * (x - null), x).clone().requires_grad_(True)
        gj, = torch.autograd.grad(_objective_fn(scorer, view)(xa).sum(), xa)
        g += gj
    return ((x - null) * g / k).sum(-1) * steps


def manual_rewards(scorer, view):
    x, _, _ = _setup(scorer, view)
    with torch.no_grad():
        logits = scorer.model(inputs_embeds=x[None]).logits[0].float()[view.readout_positions]
        return torch.sigmoid(_margins(scorer, logits))


def close(a, b, tol=2e-5):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max error {err}:\n{a}\n{b}"


# ---------------------------------------------------------------- layout
def test_toy_layout_separator_is_an_ordinary_token(toy):
    """BOS + prompt + lines, each closed by the newline token; steps read at the newlines."""
    tok = toy.tokenizer
    b = toy.score(PROMPTS, RESPONSES)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        v = b.prm[i]
        assert v.input_ids == tok(p + r + "\n")["input_ids"]
        nl = tok.convert_tokens_to_ids("\n")
        assert v.readout_positions == [j for j, t in enumerate(v.input_ids) if t == nl]
        assert v.prompt_length == 1 + len(p)
    # policy columns are the response's characters; "\n" are in no step, steps numbered across the batch
    want = [[0] * 8 + [-1] + [1] * 8 + [-1] + [2] * 3, [3] * 6 + [-1] + [4] * 5 + [-1] * 9]
    assert b.segment_ids.tolist() == want
    assert b.steps_per_response == [3, 2] and b.segment_rewards.shape == (5,)
    assert b.response_mask.tolist() == [[True] * 21, [True] * 12 + [False] * 9]
    assert b.scores.dtype == torch.float32 and b.segment_ids.dtype == torch.int64


def test_step_classifier_preset_chat_template_and_extra_0(saved):
    s = load(saved, "step_classifier")
    b = s.score(["Q?"], ["a b\n\nc\n\n\n\nd"])
    v = b.prm[0]
    text = "".join(v.tokens)
    assert text == ("<|system|>Please reason step by step, and put your final answer within \\boxed{}.\n"
                    "<|user|>Q?\n<|assistant|>a b<extra_0>c<extra_0>d<extra_0>\n")
    assert [v.tokens[p] for p in v.readout_positions] == ["<extra_0>"] * 3
    assert b.segment_ids[0].tolist() == [0, 0, 0, -1, -1, 1, -1, -1, -1, -1, 2]


def test_lab_tokenizer_layout():
    """The toy lab's own (slow, character-level) tokenizer: no offset mapping, same layout."""
    lab = pytest.importorskip("p2t.grpo.lab.tokenizer")
    from transformers import Qwen2Config, Qwen2ForTokenClassification
    tok = lab.CharTokenizer()
    torch.manual_seed(0)
    model = Qwen2ForTokenClassification(Qwen2Config(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, max_position_embeddings=96, num_labels=2)).eval()
    s = P2TScorer(model, tok, "step_classifier", **TOY)
    r = "17+25=42\n42+33=75\n#75"
    ids = tok.encode(r, add_special_tokens=False)
    ids = ids[:3] + [tok.pad_token_id] + ids[3:] + [tok.eos_token_id]  # a special token mid-line, EOS at the end
    b = s.score(["17+25+33="], [r], response_token_ids=[ids])
    assert b.prm[0].input_ids == [tok.bos_token_id] + tok.encode("17+25+33=" + r + "\n", add_special_tokens=False)
    # the mid-line special token stays in its step (one contiguous run) with score 0; EOS in no step
    assert b.segment_ids[0].tolist() == [0] * 9 + [-1] + [1] * 8 + [-1] + [2] * 3 + [-1]
    assert b.scores[0, 3] == 0 and b.scores[0, -1] == 0
    manual = manual_taylor(s, b.prm[0])
    close(b.scores[0, [0, 1, 2, 4]], manual[[10, 11, 12, 13]])


# ---------------------------------------------------------------- methods vs manual
KIND_CASES = [("step_classifier", "logit"), ("step_classifier", "prob"), ("value_head", "logit"),
              ("lm_judge", "logit")]


@pytest.mark.parametrize("kind,objective", KIND_CASES)
def test_taylor_equals_manual_autograd(saved, kind, objective):
    s = load(saved, kind, objective=objective, micro_batch_tokens=40)  # one response per micro-batch
    b = s.score(PROMPTS, RESPONSES)
    for i, v in enumerate(b.prm):
        want = manual_taylor(s, v)
        close(v.attributions, want)
        close(b.prm[i].step_rewards, manual_rewards(s, v))
        # identity mapping: each policy token gets its PRM token's attribution; separators 0
        pos = v.step_index >= 0
        n = int(b.response_mask[i].sum())
        assert torch.equal(b.scores[i, :n][b.segment_ids[i, :n] >= 0], v.attributions[pos])
        assert (b.scores[i, :n][b.segment_ids[i, :n] < 0] == 0).all()
    close(b.segment_rewards, torch.cat([manual_rewards(s, v) for v in b.prm]))
    assert ((b.segment_rewards >= 0) & (b.segment_rewards <= 1)).all()


def test_presets_read_where_the_conventions_say(saved):
    vh = load(saved, "value_head").score(["Q"], ["a\nb"]).prm[0]
    assert "".join(vh.tokens) == "<bos>Q\na\nb\n" and [vh.tokens[p] for p in vh.readout_positions] == ["\n", "\n"]
    lj = load(saved, "lm_judge").score(["Q"], ["a\nb"]).prm[0]
    assert "".join(lj.tokens) == "<bos>Q a ки\nb ки\n"
    assert [lj.tokens[p] for p in lj.readout_positions] == ["и", "и"]


@pytest.mark.parametrize("kind", ["step_classifier", "lm_judge"])
def test_exact_equals_brute_force_loop(saved, kind):
    s = load(saved, kind, **TOY, micro_batch_tokens=64)  # several chunks of perturbed copies per response
    b = s.score(PROMPTS, RESPONSES, method="exact")
    for v in b.prm:
        close(v.attributions, manual_exact(s, v), tol=5e-5)


def test_taylor_per_step_equals_per_step_loop(toy):
    b = toy.score(PROMPTS, RESPONSES, method="taylor_per_step")
    for v in b.prm:
        close(v.attributions, manual_per_step(toy, v))
    # the loop fallback (no vmap) gives the same
    toy.engine.state.vmap_ok = False
    try:
        b2 = toy.score(PROMPTS, RESPONSES, method="taylor_per_step")
    finally:
        toy.engine.state.vmap_ok = True
    close(b2.scores, b.scores)
    # and it differs from plain taylor (later steps contaminate earlier tokens there)
    assert (toy.score(PROMPTS, RESPONSES).scores - b.scores).abs().max() > 1e-4


def test_integrated_gradients(toy):
    taylor = toy.score(PROMPTS, RESPONSES)
    ig1 = toy.score(PROMPTS, RESPONSES, method="integrated_gradients", ig_steps=1)
    close(ig1.scores, taylor.scores, tol=1e-6)
    ig3 = toy.score(PROMPTS, RESPONSES, method="integrated_gradients", ig_steps=3)
    for v in ig3.prm:
        close(v.attributions, manual_ig(toy, v, 3))
    assert (ig3.scores - taylor.scores).abs().max() > 1e-4


def test_micro_batching_and_sorting_do_not_change_results(saved):
    prompts = PROMPTS + ["1+1=", "99+1+2="]
    responses = RESPONSES + ["1+1=2\n#2", "99+1=100\n100+2=102\n#102\nok"]
    big = load(saved, "step_classifier", **TOY, micro_batch_tokens=100000)
    small = load(saved, "step_classifier", **TOY, micro_batch_tokens=1)
    for method in ("taylor", "exact"):
        a, c = big.score(prompts, responses, method=method), small.score(prompts, responses, method=method)
        close(a.scores, c.scores)
        close(a.segment_rewards, c.segment_rewards)
        assert torch.equal(a.segment_ids, c.segment_ids)


def test_gradient_checkpointing_same_result_and_restored(saved):
    plain = load(saved, "step_classifier", **TOY)
    ck = load(saved, "step_classifier", **TOY, gradient_checkpointing=True)
    close(ck.score(PROMPTS, RESPONSES).scores, plain.score(PROMPTS, RESPONSES).scores)
    assert not ck.model.is_gradient_checkpointing and not ck.model.training


# ---------------------------------------------------------------- frozen PRM, no_grad callers
@pytest.mark.parametrize("method", ["taylor", "taylor_per_step", "integrated_gradients", "exact"])
def test_no_parameter_grad_and_flags_restored(saved, method):
    s = load(saved, "step_classifier", **TOY)
    params = list(s.model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 0)
    want = manual_taylor(s, s.score(PROMPTS[:1], RESPONSES[:1]).prm[0]) if method == "taylor" else None
    s.model.train()  # the scorer runs the PRM in eval mode (no classifier dropout) and restores this
    with torch.no_grad():
        b = s.score(PROMPTS, RESPONSES, method=method, ig_steps=2)
    with torch.inference_mode():
        b2 = s.score(PROMPTS, RESPONSES, method=method, ig_steps=2)
    close(b2.scores, b.scores)
    assert all(p.grad is None for p in params)
    assert [p.requires_grad for p in params] == [i % 2 == 0 for i in range(len(params))]
    assert s.model.training and all(m.training for m in s.model.modules())
    assert not b.scores.requires_grad and (b.scores != 0).any()
    if want is not None:
        close(b.prm[0].attributions, want)


def test_freeze_restores_mixed_flags_and_modes(saved):
    """Inside a call every parameter is frozen and every module in eval mode; afterwards each flag and
    mode is back as it was, modules in different modes and parameters with different flags included."""
    s = load(saved, "step_classifier", **TOY)
    mods = list(s.model.modules())
    params = list(s.model.parameters())
    s.model.train()
    for i, m in enumerate(mods):
        m.training = i % 3 == 0
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 1)
    modes, flags = [m.training for m in mods], [p.requires_grad for p in params]
    seen = {}
    emb = s.model.get_input_embeddings()

    def look(module, args, out):
        seen["frozen"] = not any(p.requires_grad for p in params)
        seen["eval"] = not any(m.training for m in mods)
    h = emb.register_forward_hook(look)
    try:
        s.score(PROMPTS, RESPONSES)
    finally:
        h.remove()
    assert seen == {"frozen": True, "eval": True}
    assert [m.training for m in mods] == modes and [p.requires_grad for p in params] == flags
    loaded = P2TScorer.from_pretrained(saved["step_classifier"][0], tokenizer=saved["step_classifier"][1], **TOY)
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())


# ---------------------------------------------------------------- callable kind, read_at="last"
def test_callable_reward(saved):
    d, tokdir = saved["step_classifier"]
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    model = AutoModelForTokenClassification.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(tokdir)
    torch.manual_seed(1)
    w = torch.randn(32)
    seen = {}

    def per_step(inputs_embeds, attention_mask, *, step_index, readout_positions, row_index, **_):
        seen["rows"] = row_index.tolist()
        h = model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        return (h[readout_positions[:, 0], readout_positions[:, 1]] * w).sum(-1)  # [K]

    def per_position(inputs_embeds, attention_mask, **_):
        h = model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        return (h * w).sum(-1)  # [B, L]

    a = P2TScorer(model, tok, per_step, **TOY).score(PROMPTS, RESPONSES)
    c = P2TScorer(model, tok, per_position, **TOY).score(PROMPTS, RESPONSES)
    close(a.scores, c.scores)
    assert sorted(seen["rows"]) == [0, 1]
    v = a.prm[0]
    x, null, steps = _setup(P2TScorer(model, tok, per_step, **TOY), v)
    xg = x.clone().requires_grad_(True)
    m = (model.model(inputs_embeds=xg[None]).last_hidden_state[0, v.readout_positions] * w).sum(-1)
    g, = torch.autograd.grad(m.sum(), xg)
    close(v.attributions, ((x - null) * g).sum(-1) * steps)
    close(v.step_rewards, torch.sigmoid(m.detach()))


def test_value_head_read_at_last(saved):
    s = load(saved, "value_head", read_at="last")
    b = s.score(PROMPTS, RESPONSES)
    assert b.steps_per_response == [1, 1]
    for i, v in enumerate(b.prm):
        assert v.readout_positions == [len(v.input_ids) - 1]
        n = int(b.response_mask[i].sum())
        assert (b.segment_ids[i, :n] == i).all()  # the whole response is one segment
        close(v.attributions, manual_taylor(s, v))


# ---------------------------------------------------------------- null embedding
def test_null_options(saved):
    d, tokdir = saved["step_classifier"]
    W = load(saved, "step_classifier", **TOY).model.get_input_embeddings().weight.detach()
    tok = char_tokenizer()
    cases = {"pad": W[tok.pad_token_id], "eos": W[tok.eos_token_id], "vocab_mean": W.mean(0),
             "zero": torch.zeros(W.shape[1]), 7: W[7]}
    for null, vec in cases.items():
        s = load(saved, "step_classifier", **TOY, null=null)
        close(s._null_embed, vec, tol=1e-6)
        v = s.score(PROMPTS[:1], RESPONSES[:1]).prm[0]
        close(v.attributions, manual_taylor(s, v, null=vec))


def test_no_pad_token_is_an_error_naming_the_options(tmp_path):
    from transformers import AutoModelForTokenClassification
    d, _ = save_model("step_classifier", str(tmp_path / "m"))
    model = AutoModelForTokenClassification.from_pretrained(d)
    tok = char_tokenizer(pad=False)
    with pytest.raises(ValueError, match="no pad token.*'eos', 'vocab_mean', 'zero' or a token id"):
        P2TScorer(model, tok, "step_classifier", **TOY)
    s = P2TScorer(model, tok, "step_classifier", **TOY, null="eos")  # fine with another null
    assert s.score(PROMPTS, RESPONSES).scores.abs().sum() > 0


# ---------------------------------------------------------------- into the ops
def test_outputs_feed_the_ops(toy):
    b = toy.score(PROMPTS, RESPONSES)
    r = p2t.segment_redistribute(b.scores, b.segment_ids, b.segment_rewards)
    ref = torch.zeros_like(b.scores)
    for s in range(b.segment_rewards.shape[0]):
        m = b.segment_ids == s
        w = torch.softmax(b.scores[m], 0)
        ref[m] = b.segment_rewards[s] * (1 + 0.6 * w)
    close(r, ref, tol=1e-6)
    adv = p2t.token_advantages(torch.tensor([1.0, 0.0]), r, group_size=2, mask=b.response_mask)
    assert adv.shape == b.scores.shape and (adv[~b.response_mask] == 0).all()
    assert isinstance(b, ScoredBatch) and b.to("cpu").scores.data_ptr() == b.scores.data_ptr()


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs(toy, saved):
    cases = [
        (dict(prompts=["a"], responses=["1\n2", "3"]), ValueError, "same length"),
        (dict(prompts=["a"], responses=[""]), ValueError, r"responses\[0\] is empty"),
        (dict(prompts=["a"], responses=["\n \n\n"]), ValueError, r"responses\[0\] has no step"),
        (dict(prompts="a", responses=["x"]), TypeError, "prompts must be a list"),
        (dict(prompts=["a"], responses=[3]), TypeError, r"responses\[0\] must be a string"),
        (dict(prompts=[], responses=[]), ValueError, "responses is empty"),
        (dict(prompts=["a"], responses=["x"], method="gradient"), ValueError, "method must be one of"),
        (dict(prompts=["a"], responses=["x"], response_token_ids=[[1], [2]]), ValueError, "response_token_ids has"),
        (dict(prompts=["a"], responses=["x"], response_token_ids=[[]]), ValueError,
         r"response_token_ids\[0\] is empty"),
        (dict(prompts=["a"], responses=["x"], ig_steps=0), ValueError, "ig_steps"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            toy.score(kw.pop("prompts"), kw.pop("responses"), **kw)
    for opts, exc, msg in [(dict(kind="classifier"), ValueError, "kind must be one of"),
                           (dict(objective="margin"), ValueError, "objective must be one of"),
                           (dict(null="mean"), ValueError, "null must be one of"),
                           (dict(null=10 ** 6), ValueError, "outside the PRM vocabulary"),
                           (dict(step_separator=""), ValueError, "step_separator"),
                           (dict(template="{prompt}"), ValueError, "template must be"),
                           (dict(micro_batch_tokens=0), ValueError, "micro_batch_tokens"),
                           (dict(truncation="cut"), ValueError, "truncation must be one of")]:
        kind = opts.pop("kind", "step_classifier")
        with pytest.raises(exc, match=msg):
            P2TScorer(toy.model, toy.tokenizer, kind, **{**TOY, **opts})
    with pytest.raises(TypeError, match="callable reward has no checkpoint"):
        P2TScorer.from_pretrained(saved["step_classifier"][0], kind=lambda *a, **k: None)
    with pytest.raises(TypeError, match="model must be"):
        P2TScorer(object(), toy.tokenizer)


def test_longer_than_max_length(saved):
    prompt, resp = "1+2+3=", "1+2=3\n3+3=6\n#6"
    n = len(prompt) + len(resp) + 2  # BOS + text + trailing separator
    s = load(saved, "step_classifier", **TOY, max_length=n - 3)  # the last step (#6 + separator) does not fit
    with pytest.warns(AttributionWarning, match="kept the first 2 of 3 steps") as w:
        b = s.score([prompt], [resp])
    assert w[0].filename == __file__  # the warning points at the caller
    assert b.steps_per_response == [2] and b.segment_rewards.shape == (2,)
    ids = s.tokenizer(resp, add_special_tokens=False)["input_ids"]  # the ids-in path truncates alike
    with pytest.warns(AttributionWarning, match="kept the first 2 of 3 steps") as w:
        b_ids = s.score_ids([prompt], [ids])
    assert w[0].filename == __file__
    assert torch.equal(b_ids.segment_ids, b.segment_ids)
    assert b.segment_ids[0].tolist() == [0] * 5 + [-1] + [1] * 5 + [-1] * 3
    assert (b.scores[0, 11:] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(saved, "step_classifier", **TOY, max_length=n).score([prompt], [resp])  # fits exactly
    with pytest.raises(ValueError, match=r"responses\[0\].*more than max_length"):
        load(saved, "step_classifier", **TOY, max_length=n - 3, truncation="error").score([prompt], [resp])
    with pytest.raises(ValueError, match="not even its first step fits"):
        load(saved, "step_classifier", **TOY, max_length=len(prompt) + 2).score([prompt], [resp])
    # the default limit is the model's max_position_embeddings (256 here)
    with pytest.warns(AttributionWarning):
        load(saved, "step_classifier", **TOY).score(["q"], ["\n".join(["1+1=2"] * 60)])


# ---------------------------------------------------------------- reduced precision
def test_bf16_autocast_and_bf16_weights(saved):
    ref = load(saved, "step_classifier", **TOY).score(PROMPTS, RESPONSES)
    for opts in (dict(autocast=True), dict(dtype=torch.bfloat16)):
        s = load(saved, "step_classifier", **TOY, **opts)
        b = s.score(PROMPTS, RESPONSES)
        assert b.scores.dtype == torch.float32 and b.segment_rewards.dtype == torch.float32
        assert torch.equal(b.segment_ids, ref.segment_ids)
        corr = torch.corrcoef(torch.stack([b.scores.flatten(), ref.scores.flatten()]))[0, 1]
        assert corr > 0.98, (opts, corr)
        assert (b.segment_rewards - ref.segment_rewards).abs().max() < 0.05
        assert all(p.grad is None for p in s.model.parameters())


# ---------------------------------------------------------------- construction checks, limits, precision
def _wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "1", "2", "+", "="])}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def test_separator_without_tokens_is_refused(saved):
    """A WordPiece tokenizer drops "\\n" (the value_head preset's separator): the steps would be read
    at their own last tokens."""
    tok = _wordpiece_tokenizer()
    assert tok.encode("\n", add_special_tokens=False) == []
    model = load(saved, "value_head").model
    with pytest.raises(ValueError, match=r"step_separator='\\n' encodes to no token with the PRM tokenizer \("):
        P2TScorer(model, tok, "value_head")
    s = P2TScorer(model, tok, "value_head", step_separator="[SEP]")  # a token it keeps
    assert s.layout.sep_ids == [tok.sep_token_id]


def test_default_max_length_is_the_smaller_of_tokenizer_and_positions(tmp_path):
    """A GPT-2 style PRM with 64 positions and a tokenizer that allows 1024: inputs are cut at 64."""
    from transformers import GPT2Config, GPT2ForTokenClassification
    tok = char_tokenizer()
    tok.model_max_length = 1024
    torch.manual_seed(0)
    model = GPT2ForTokenClassification(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2,
                                                  n_positions=64, num_labels=2)).eval()
    s = P2TScorer(model, tok, "step_classifier", **TOY)
    assert s.max_length == 64
    with pytest.warns(AttributionWarning, match="max_length=64"):
        b = s.score(["q"], ["\n".join(["1+1=2"] * 40)])
    assert len(b.prm[0].input_ids) <= 64 and b.steps_per_response[0] < 40
    tok.model_max_length = 32
    assert P2TScorer(model, tok, "step_classifier", **TOY).max_length == 32


def test_out_of_range_indices_are_named_at_construction(saved, toy):
    with pytest.raises(ValueError, match=r"value_index=3 but the PRM's head has 1 output"):
        load(saved, "value_head", value_index=3)
    with pytest.raises(ValueError, match=r"positive_label=2 but the PRM's head has 2 output"):
        load(saved, "step_classifier", **TOY, positive_label=2)
    with pytest.raises(ValueError, match=r"judge_tokens: token id 1000000 is outside"):
        load(saved, "lm_judge", judge_tokens=(10 ** 6, 5))
    with pytest.raises(ValueError, match=r"step_split returned the span"):
        P2TScorer(toy.model, toy.tokenizer, **{**TOY, "step_split": lambda t: [(0, len(t) + 5)]}).score(["q"], ["1+1"])
    n = len(toy.tokenizer)
    for bad in (n, -1, 10 ** 6):
        with pytest.raises(ValueError, match=rf"response_token_ids\[1\] holds the id {bad}, outside"):
            toy.score(["q", "q"], ["1", "2"], response_token_ids=[[10], [11, bad]])


def test_float64_prm_keeps_float64(saved):
    s = load(saved, "step_classifier", **TOY, dtype=torch.float64)
    for method in ("taylor", "exact", "integrated_gradients"):
        b = s.score(PROMPTS, RESPONSES, method=method, ig_steps=2)
        assert b.scores.dtype == b.segment_rewards.dtype == b.segment_logits.dtype == torch.float64
        assert b.prm[0].attributions.dtype == torch.float64
    b = s.score(PROMPTS, RESPONSES)
    for v in b.prm:
        want = manual_taylor(s, v)
        assert want.dtype == torch.float64
        assert (v.attributions - want).abs().max() <= 1e-12 * want.abs().max()
        with torch.no_grad():
            x = s.model.get_input_embeddings().weight[torch.tensor(v.input_ids)]
            logits = s.model(inputs_embeds=x[None]).logits[0][v.readout_positions]
        assert (v.step_rewards - torch.sigmoid(_margins(s, logits))).abs().max() <= 1e-12
