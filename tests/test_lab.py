"""The toy lab: the task at each step length, its labels and token truth, the settings' cache key, the
shipped checkpoints, the verifier PRM of several-additions lines, the build's thread handling and the
lab's import graph."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import random

import pytest
import torch

from p2t.grpo.lab import LabConfig, checkpoint_settings, ensure_lab, packaged_lab, task
from p2t.grpo.lab.layout import LAYOUT, prm_example
from p2t.grpo.lab.localisation import token_truth
from p2t.grpo.lab.tokenizer import CharTokenizer

LAB_DIR = os.path.join(os.path.dirname(__file__), "..", "p2t", "grpo", "lab")
TINY = LabConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, sft_steps=2, sft_batch_size=16,
                 prm_steps=2, prm_batch_size=16, prm_samples=16, report_samples=8)


# ---------------------------------------------------------------- the task, one and two additions a line
def test_one_addition_a_line_is_unchanged():
    p = task.Problem([17, 25, 33, 48])
    good = task.solution(p)
    assert good == "17+25=42\n42+33=75\n75+48=123\n#123"
    assert task.step_labels(p, good) == [True] * 4
    bad = "17+25=43\n43+33=76\n76+48=124\n#124"
    assert task.step_labels(p, bad) == [False, True, True, True]
    assert task.char_labels(p, "17+25=4\n#4") == [1] * 7 + [0] + [0, 0, 0]
    # a line with two additions is malformed here, and leaves no result to continue from
    assert task.step_labels(p, "17+25=42 42+33=75\n75+48=123\n#123") == [False, False, False]
    rng_a, rng_b = random.Random(3), random.Random(3)
    for q in task.problems(0, 20):  # the same draws at every step length
        one, two = task.solution(q, rng_a, 0.4), task.solution(q, rng_b, 0.4, ops_per_step=2)
        assert one.split("\n")[-1] == two.split("\n")[-1]
        assert one.replace("\n", " ").split(" ")[:-1] == two.replace("\n", " ").split(" ")[:-1]


def test_two_additions_a_line():
    p = task.Problem([17, 25, 33, 48])
    good = task.solution(p, ops_per_step=2)
    assert good == "17+25=42 42+33=75\n75+48=123\n#123"
    assert task.step_labels(p, good, 2) == [True, True, True]
    assert task.outcome_reward([p.prompt], [good]) == [1.0]
    assert task.solution(task.Problem([17, 25, 33]), ops_per_step=2) == "17+25=42 42+33=75\n#75"
    assert task.solution(p, ops_per_step=3) == "17+25=42 42+33=75 75+48=123\n#123"
    # a wrong first result makes the line wrong even when the second addition is right given it;
    # the next line continues from the line's last written result
    resp = "17+25=43 43+33=76\n76+48=124\n#124"
    assert task.step_labels(p, resp, 2) == [False, True, True]
    assert task.expected_lines(p, resp, 2) == ["17+25=42 42+33=75", "76+48=124", "#124"]
    # one addition where two are due, too many lines, a line that does not parse
    assert task.step_labels(p, "17+25=42\n42+33=75\n#75", 2) == [False, False, True]  # the answer repeats the last result
    assert task.step_labels(p, "17+25=42 42+33=75\n75+48=123\n#123\n#1", 2) == [True, True, True, False]
    assert task.step_labels(p, "17+25=42 42+33=75\n75+48=12x\n#123", 2) == [True, False, False]


def test_two_additions_char_labels_and_token_truth():
    p = task.Problem([17, 25, 33])
    resp = "17+25=42 42+33=85\n#85"  # right first result, wrong second one
    labels = task.char_labels(p, resp, 2)
    assert len(labels) == len(resp) + 1
    first_wrong = resp.index("85")
    assert labels[:first_wrong] == [1] * first_wrong and labels[first_wrong:len("17+25=42 42+33=85") + 1] == [0] * 3
    line_of, wrong = token_truth(p, resp, 2)
    assert line_of == [0] * 17 + [0] + [1] * 3
    assert [i for i, w in enumerate(wrong) if w] == [first_wrong, first_wrong + 1]
    # the right, uncertain first result is a right token of the wrong step
    assert not any(wrong[6:8])
    resp = "17+25=43 43+33=76\n#76"  # the first result is where the line leaves the right one
    assert [i for i, w in enumerate(token_truth(p, resp, 2)[1]) if w] == list(range(7, 17))
    assert not any(token_truth(p, "17+25=42 42+33=75\n#75", 2)[1])


def test_wrong_step_kinds_at_each_step_length():
    p = task.Problem([17, 25, 33])
    assert task.wrong_step_kinds(p, "17+25=43\n43+33=76\n#76") == ["+1"]
    assert task.wrong_step_kinds(p, "17+25=42\n42+3=45\n#45\n1") == ["malformed", "extra"]
    assert task.wrong_step_kinds(p, "17+25=42 42+33=65\n#65", 2) == ["-10"]
    assert task.wrong_step_kinds(p, "17+25=44 44+33=77\n#77", 2) == ["+2"]
    assert task.wrong_step_kinds(p, "17+25=42\n42+33=75\n#75", 2) == ["malformed", "answer", "extra"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_ops_per_step_is_checked(bad):
    with pytest.raises(ValueError, match="ops_per_step"):
        task.solution(task.Problem([1, 2]), ops_per_step=bad)
    with pytest.raises(ValueError, match="ops_per_step"):
        LabConfig(ops_per_step=bad)


def test_prm_example_two_additions():
    tok = CharTokenizer()
    sep = tok.convert_tokens_to_ids(task.STEP_SEPARATOR)
    p = task.Problem([17, 25, 33, 48])
    for resp in ["17+25=42 42+33=75\n75+48=123\n#123", "17+25=42 42+33=76\n76+48=124\n#124",
                 "17+25=42\n42+33=75\n#75"]:
        ids, labels = prm_example(tok, p, resp, 2)
        assert ids == [tok.bos_token_id] + tok.convert_tokens_to_ids(list(p.prompt + resp + "\n"))
        assert len(labels) == len(ids)
        at_sep = [lab for i, lab in zip(ids, labels) if i == sep and lab != -100]
        assert at_sep == [int(ok) for ok in task.step_labels(p, resp, 2)], resp


# ---------------------------------------------------------------- settings, cache key, shipped checkpoints
def test_cache_key_of_the_default_lab_is_unchanged():
    """The shipped checkpoints are found by this key: a new setting must leave it alone at its default."""
    assert LabConfig().key("sft") == "9453c21a2731" and LabConfig().key() == "29881e3dfe3b"
    two = LabConfig(ops_per_step=2)
    assert two.key("sft") != LabConfig().key("sft") and two.key() != LabConfig().key()
    assert LabConfig(ops_per_step=2, prm_margin=0.5).key("sft") == two.key("sft")


@pytest.mark.parametrize("ops", [1, 2])
def test_packaged_lab_is_shipped_for_each_step_length(ops):
    lab = LabConfig(ops_per_step=ops)
    paths = packaged_lab(lab)
    assert paths is not None, f"no packaged lab for ops_per_step={ops}"
    root = os.path.join(os.path.dirname(LAB_DIR), "..", "data", "lab", lab.key("sft"))
    assert os.path.samefile(paths["root"], root)
    assert os.path.basename(paths["prm"]) == "prm-" + lab.key()
    for part in ("policy", "prm"):
        assert checkpoint_settings(paths[part]).ops_per_step == ops
        metrics = json.load(open(os.path.join(paths[part], "lab_metrics.json")))
        assert metrics["samples"] == lab.report_samples
    pol = json.load(open(os.path.join(paths["policy"], "lab_metrics.json")))
    prm = json.load(open(os.path.join(paths["prm"], "lab_metrics.json")))
    assert 0.35 <= pol["sampled_accuracy"] <= 0.55 and pol["greedy_accuracy"] >= 0.95
    assert prm["step_accuracy"] >= 0.90 and prm["wrong_step_recall"] >= 0.80


def test_checkpoint_settings(tmp_path):
    assert checkpoint_settings(str(tmp_path)) == LabConfig()  # no lab.json: the settings before it existed
    (tmp_path / "lab.json").write_text(json.dumps({**dataclasses.asdict(LabConfig(ops_per_step=2)), "gone": 1}))
    assert checkpoint_settings(str(tmp_path)).ops_per_step == 2


def test_packaged_lab_is_used_when_settings_match(tmp_path, monkeypatch):
    from p2t.grpo.lab import cache
    monkeypatch.setattr(cache, "build_policy", lambda *a, **k: pytest.fail("built although checkpoints ship"))
    monkeypatch.setattr(cache, "PACKAGED_DIR", str(tmp_path / "pkg"))
    paths = cache.lab_paths(str(tmp_path / "pkg"), TINY)
    for part in ("policy", "prm"):
        os.makedirs(paths[part])
        open(os.path.join(paths[part], "config.json"), "w").write("{}")
    assert ensure_lab(TINY, str(tmp_path / "cache")) == paths
    with pytest.raises(pytest.fail.Exception):
        ensure_lab(TINY, str(tmp_path / "cache"), packaged=False)


def test_ensure_lab_restores_the_thread_count_when_the_build_fails(tmp_path, monkeypatch):
    from p2t.grpo.lab import cache
    seen = []

    def boom(*a, **k):
        seen.append(torch.get_num_threads())
        raise RuntimeError("build failed")

    monkeypatch.setattr(cache, "build_policy", boom)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="build failed"):
            ensure_lab(TINY, str(tmp_path), packaged=False)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("ops", [1, 2])
def test_tiny_lab_builds_and_localises_at_each_step_length(tmp_path, ops):
    """A tiny lab (two SFT steps, the verifier PRM) builds at each step length, writes its settings, and
    ``measure`` judges the truth with the step length the policy was built for."""
    from p2t.grpo.lab.localisation import measure
    lab = dataclasses.replace(TINY, ops_per_step=ops, prm_kind="verifier")
    paths = ensure_lab(lab, str(tmp_path), packaged=False)
    assert checkpoint_settings(paths["prm"]) == lab
    res = measure(paths["policy"], paths["prm"], samples=4, methods=["taylor"], nulls=["pad"])
    assert res["ops_per_step"] == ops and res["rows"][0]["steps"] > 0


def test_layout_is_the_one_the_prm_reads():
    from p2t.grpo.lab.layout import prm_text
    assert LAYOUT == {"template": "{prompt}{response}", "step_separator": "\n", "step_split": "\n"}
    assert prm_text("1+2=", "1+2=3\n#3") == LAYOUT["template"].format(prompt="1+2=", response="1+2=3\n#3") + "\n"


# ---------------------------------------------------------------- the verifier PRM
def test_shipped_one_addition_prm_is_the_verifier_built_on_its_policy():
    from transformers import Qwen2ForCausalLM, Qwen2ForTokenClassification
    from p2t.grpo.lab import lab_tokenizer
    from p2t.grpo.lab.prm import verifier_prm
    paths = packaged_lab(LabConfig())
    policy = Qwen2ForCausalLM.from_pretrained(paths["policy"]).eval()
    built = verifier_prm(policy, lab_tokenizer(), LabConfig()).state_dict()
    shipped = Qwen2ForTokenClassification.from_pretrained(paths["prm"]).state_dict()
    assert shipped.keys() == built.keys()
    assert [k for k in built if k != "score.weight" and not torch.equal(built[k], shipped[k])] == []


def test_two_additions_verifier_sums_the_flags_of_its_own_line():
    """The shipped two-additions PRM is the verifier built on its policy: at every separator its line flag
    is > 0 when some checked token of that line was beaten by a rival by more than 0.5 logits in the
    policy's own prediction, and <= 0 when every checked token of the line beat all rivals by more than
    0.5 (whatever the lines before it hold)."""
    from transformers import Qwen2ForCausalLM, Qwen2ForTokenClassification
    from p2t.grpo.lab import lab_tokenizer
    from p2t.grpo.lab.layout import pad, prm_text, token_ids
    from p2t.grpo.lab.prm import verifier_prm, verifier_tokens
    lab, tok = LabConfig(ops_per_step=2), lab_tokenizer()
    paths = packaged_lab(lab)
    assert paths is not None
    policy = Qwen2ForCausalLM.from_pretrained(paths["policy"]).eval()
    prm = verifier_prm(policy, tok, lab).eval()
    rng = random.Random(0)
    texts = [prm_text(p.prompt, task.solution(p, rng, error_rate=0.4, ops_per_step=2)) for p in task.problems(5, 48)]
    ids = pad([[tok.bos_token_id] + token_ids(tok, t) for t in texts], tok.pad_token_id)
    am = ids != tok.pad_token_id
    seen = {}
    hook = prm.model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("n", o.detach()))
    with torch.no_grad():
        prm(input_ids=ids, attention_mask=am)
        logits = policy(input_ids=ids, attention_mask=am).logits[:, :-1]
    hook.remove()
    V, H = len(tok), lab.hidden_size
    line_flag = seen["n"][..., H + 2 * V + 2] / seen["n"][..., H + 2 * V]
    checked, rivals = (torch.tensor(tok.convert_tokens_to_ids(list(t))) for t in verifier_tokens(lab))
    written = ids[:, 1:]
    own = logits.gather(-1, written[..., None])[..., 0]
    best_rival = logits[..., rivals].masked_fill(rivals == written[..., None], float("-inf")).max(-1).values
    gap = torch.cat([torch.zeros(len(ids), 1), best_rival - own], 1)  # per position of ids
    on = torch.cat([torch.zeros(len(ids), 1, dtype=torch.bool), torch.isin(written, checked)], 1) & am
    sep = tok.convert_tokens_to_ids("\n")
    beaten_lines = clear_lines = 0
    for b in range(len(ids)):
        start = None
        for t in range(ids.shape[1]):
            if ids[b, t] == tok.convert_tokens_to_ids("=") and start is None:
                start = t + 1  # the response starts after the prompt's "="
            if ids[b, t] != sep or not am[b, t]:
                continue
            g = gap[b, start:t][on[b, start:t]]
            if bool((g > 0.5).any()):
                beaten_lines += 1
                assert line_flag[b, t] > 0, (texts[b], t)
            elif bool((g < -0.5).all()):
                clear_lines += 1
                assert line_flag[b, t] <= 1e-6, (texts[b], t, float(line_flag[b, t]))
            start = t + 1
    assert beaten_lines > 20 and clear_lines > 40
    shipped = Qwen2ForTokenClassification.from_pretrained(paths["prm"]).state_dict()
    built = prm.state_dict()
    assert [k for k in built if k != "score.weight" and not torch.equal(built[k], shipped[k])] == []


# ---------------------------------------------------------------- the lab's import graph
def test_lab_modules_import_no_circle():
    """No module of the lab imports (at any level, in a function or not) one that imports it back."""
    graph = {}
    for name in os.listdir(LAB_DIR):
        if not name.endswith(".py"):
            continue
        mod = name[:-3]
        deps = set()
        for node in ast.walk(ast.parse(open(os.path.join(LAB_DIR, name)).read())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("p2t.grpo.lab."):
                deps.add(node.module.rsplit(".", 1)[1])
        graph[mod] = deps - {"__init__"}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    circles = sorted(m for m in graph if m != "models" and m in reach(m))
    assert circles == [], circles
    assert "models" not in set().union(*(graph[m] for m in graph if m != "__init__"))


# ---------------------------------------------------------------- build pieces, localisation statistics
def test_lr_factor_warms_up_then_decays_to_the_floor():
    import math
    from p2t.grpo.lab.sft import lr_factor
    assert lr_factor(0, 100, 10, 1e-3, 1e-5) == pytest.approx(0.1, rel=1e-3)
    assert lr_factor(9, 100, 10, 1e-3, 1e-5) == pytest.approx(0.5 * (1 + math.cos(0.09 * math.pi)) * 0.99 + 0.01)
    assert lr_factor(100, 100, 10, 1e-3, 1e-5) == pytest.approx(0.01)
    assert lr_factor(500, 100, 10, 1e-3, 1e-5) == pytest.approx(0.01)  # stays at the floor
    vals = [lr_factor(s, 100, 10, 1e-3, 1e-5) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_cached_lab_is_reused(tmp_path, monkeypatch):
    from p2t.grpo.lab import cache
    lab = dataclasses.replace(TINY, prm_kind="verifier")
    paths = ensure_lab(lab, str(tmp_path), packaged=False)
    monkeypatch.setattr(cache, "build_policy", lambda *a, **k: pytest.fail("the cached SFT policy was rebuilt"))
    monkeypatch.setattr(cache, "build_lab_prm", lambda *a, **k: pytest.fail("the cached PRM was rebuilt"))
    assert ensure_lab(lab, str(tmp_path), packaged=False) == paths
    pol = json.load(open(os.path.join(paths["policy"], "lab_metrics.json")))
    assert {"sampled_accuracy", "greedy_accuracy", "wrong_step_share", "wrong_step_kinds"} <= set(pol)
    prm = json.load(open(os.path.join(paths["prm"], "lab_metrics.json")))
    assert {"step_accuracy", "wrong_step_recall", "right_step_recall", "step_auroc", "samples"} <= set(prm)


def test_auroc_and_spearman_against_brute_force():
    import numpy as np
    from p2t.grpo.lab.metrics import auroc, spearman
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 13).astype(float), rng.integers(0, 5, 17).astype(float)
    brute = np.mean([[1.0 if a > b else 0.5 if a == b else 0.0 for b in neg] for a in pos])
    assert auroc(pos, neg) == pytest.approx(brute)
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert np.isnan(auroc(np.array([]), np.array([1.0])))
    x = rng.normal(size=20)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert np.isnan(spearman(x, np.zeros(20)))


@pytest.mark.parametrize("ops", [1, 2])
def test_step_records_align_attributions_with_truth(ops):
    from types import SimpleNamespace
    from p2t.grpo.lab.localisation import step_records, summarise
    p = task.Problem([17, 25, 33, 48])
    resp = {1: "17+25=42\n42+33=85\n85+48=133\n#133", 2: "17+25=42 42+33=85\n85+48=133\n#133"}[ops]
    lines = resp.split("\n")
    n = len(resp)
    seg = torch.full((1, n), -1)
    start = 0
    for s, line in enumerate(lines):
        seg[0, start:start + len(line)] = s
        start += len(line) + 1
    wrong_at = resp.index("85")
    bad = resp[:wrong_at].count("\n")  # the wrong line
    col = wrong_at - (resp[:wrong_at].rfind("\n") + 1)
    scores = torch.zeros(1, n)
    scores[0, wrong_at] = -1.0  # the wrong digit has the lowest attribution
    batch = SimpleNamespace(scores=scores, segment_ids=seg,
                            segment_rewards=torch.tensor([0.1 if s == bad else 0.9 for s in range(len(lines))]),
                            steps_per_response=[len(lines)])
    steps = step_records(batch, [p], [resp], ops)
    assert [s["step_ok"] for s in steps] == [s != bad for s in range(len(lines))]
    assert steps[bad]["wrong"].tolist() == [False] * col + [True, True]
    res = summarise(steps)
    assert res["top1"] == 1.0 and res["wrong_steps"] == 1 and res["mixed_steps"] == 1 and res["flagged_steps"] == 1
    # the 8 beats every right token, the 5 ties them
    assert res["auroc_step"] == pytest.approx(0.75) and res["auroc_flagged"] == pytest.approx(0.75)


def test_one_addition_prm_example_and_token_truth():
    tok = CharTokenizer()
    sep = tok.convert_tokens_to_ids(task.STEP_SEPARATOR)
    p = task.Problem([17, 25, 33])
    for resp in ["17+25=42\n42+33=75\n#75", "17+25=43\n43+33=76\n#76", "17+25=42\n42+33=85\n#85",
                 "17+25=42\n42+3=45\n#45\n1", "17+25=42\n#42", "17+25=52\n52+33=85\n#86"]:
        ids, labels = prm_example(tok, p, resp)
        assert ids == [tok.bos_token_id] + tok.convert_tokens_to_ids(list(p.prompt + resp + "\n"))
        assert len(labels) == len(ids) and labels[:1 + len(p.prompt)] == [-100] * (1 + len(p.prompt))
        at_sep = [lab for i, lab in zip(ids, labels) if i == sep and lab != -100]
        assert at_sep == [int(ok) for ok in task.step_labels(p, resp)], resp
    ids, labels = prm_example(tok, p, "17+25=43\n43+33=76\n#76")
    text = p.prompt + "17+25=43\n43+33=76\n#76\n"
    assert [j for j, lab in enumerate(labels[1 + len(p.prompt):]) if lab == 0] == [7, 8]  # the 3 of 43, its separator
    assert text[len(p.prompt) + 7] == "3"
    line_of, wrong = token_truth(p, "17+25=43\n43+33=76\n#76")
    assert line_of == [0] * 9 + [1] * 9 + [2] * 3
    assert [i for i, w in enumerate(wrong) if w] == [7]  # the next lines are right given 43
    assert [i for i, w in enumerate(token_truth(task.Problem([17, 25]), "17+25=52\n#52")[1]) if w] == [6, 7]
    assert not any(token_truth(p, "17+25=42\n42+33=75\n#75")[1])


def test_one_addition_verifier_flags_what_the_policy_ranks_below_a_rival():
    """The flag channel (after the first layer on top) is > 0 on every checked token some rival beat by
    more than 0.5 logits in the policy's own prediction, and <= 0 on every one that beat all rivals by more
    than 0.5."""
    from transformers import Qwen2ForCausalLM
    from p2t.grpo.lab import lab_tokenizer
    from p2t.grpo.lab.layout import pad, prm_text, token_ids
    from p2t.grpo.lab.prm import verifier_prm, verifier_tokens
    lab, tok = LabConfig(), lab_tokenizer()
    policy = Qwen2ForCausalLM.from_pretrained(packaged_lab(lab)["policy"]).eval()
    prm = verifier_prm(policy, tok, lab).eval()
    rng = random.Random(0)
    texts = [prm_text(p.prompt, task.solution(p, rng, error_rate=0.4)) for p in task.problems(5, 48)]
    ids = pad([token_ids(tok, t) for t in texts], tok.pad_token_id)
    am = ids != tok.pad_token_id
    seen = {}
    hook = prm.model.layers[lab.num_layers].register_forward_hook(
        lambda m, i, o: seen.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        prm(input_ids=ids, attention_mask=am)
        logits = policy(input_ids=ids, attention_mask=am).logits[:, :-1]
    hook.remove()
    flag = seen["h"][:, 1:, lab.hidden_size + 2 * len(tok) + 1]
    checked, rivals = (torch.tensor(tok.convert_tokens_to_ids(list(t))) for t in verifier_tokens(lab))
    written = ids[:, 1:]
    own = logits.gather(-1, written[..., None])[..., 0]
    best_rival = logits[..., rivals].masked_fill(rivals == written[..., None], float("-inf")).max(-1).values
    gap = best_rival - own
    on = am[:, 1:] & torch.isin(written, checked)
    beaten, clear = on & (gap > 0.5), on & (gap < -0.5)
    assert beaten.sum() > 50 and clear.sum() > 500
    assert bool((flag[beaten] > 0).all()), flag[beaten].min()
    assert bool((flag[clear] <= 1e-6).all()), flag[clear].max()


def test_measure_checks_its_arguments(tmp_path):
    from p2t.grpo.lab.localisation import measure
    paths = packaged_lab(LabConfig())
    with pytest.raises(ValueError, match="method"):
        measure(paths["policy"], paths["prm"], samples=2, methods=["gradcam"])
    with pytest.raises(ValueError, match="null"):
        measure(paths["policy"], paths["prm"], samples=2, nulls=["unk"])
    with pytest.raises(ValueError, match="samples"):
        measure(paths["policy"], paths["prm"], samples=0)
    with pytest.raises(ValueError, match="ops_per_step"):
        measure(paths["policy"], paths["prm"], samples=2, ops_per_step=0)
