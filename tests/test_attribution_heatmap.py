"""The heatmap shows what the trainer uses: the attribution I and the token rewards r_i (with R_s per step),
terminal and HTML, with the formula and the options in the legend; the HTML toggle checked in a headless
browser where one is installed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

import p2t
from p2t.attribution import P2TScorer
from p2t.attribution.render import html_report, legend, terminal_heatmap, token_table
from p2t.cli import main

from _attribution_models import save_model

PROMPTS = ["1+2+3=", "5+5="]
RESPONSES = ["1+2=3\n3+3=6\n#6", "5+5=10\n#<10>"]
TOY = dict(template="{prompt}{response}", step_separator="\n", step_split="\n")


@pytest.fixture(scope="module")
def prm(tmp_path_factory):
    return save_model("step_classifier", str(tmp_path_factory.mktemp("prm")))


@pytest.fixture(scope="module")
def batch(prm):
    d, tok = prm
    return P2TScorer.from_pretrained(d, kind="step_classifier", tokenizer=tok, **TOY).score(PROMPTS, RESPONSES)


def _signed_ops():
    try:
        p2t.segment_redistribute(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long), torch.tensor([0.5]),
                                 omega_neg=0.5)
    except NotImplementedError:
        return False
    return True


def test_token_table_holds_I_and_the_token_rewards_of_the_options(batch):
    opts = p2t.P2TOptions(omega=0.3, temperature=2.0, normalize="sum")
    table = token_table(batch, opts)
    want = p2t.token_rewards(batch, opts)
    for b, toks in enumerate(table):
        assert "".join(t.text for t in toks) == RESPONSES[b]
        n = len(toks)
        torch.testing.assert_close(torch.tensor([t.reward for t in toks]), want[b, :n].float())
        torch.testing.assert_close(torch.tensor([t.attribution for t in toks]), batch.scores[b, :n].float())
    # process mode: r_i = R_s on the step's tokens
    proc = token_table(batch, p2t.P2TOptions(mode="process"))
    R = batch.segment_rewards.tolist()
    first = [0, batch.steps_per_response[0]]
    for b, toks in enumerate(proc):
        for t in toks:
            assert t.reward == (pytest.approx(R[first[b] + t.step]) if t.step >= 0 else 0.0)


def test_legend_states_the_formula_and_the_options():
    line = legend(p2t.P2TOptions(omega=0.3, omega_neg=0.2, temperature=2.0, null="zero", normalize="sum",
                                 standardize=True), show="rewards")
    assert line.startswith("shown: token rewards r_i; ")
    assert "r_i = R_s + ω·R_s·softmax_{j∈s}(I_j/τ)_i − ω⁻·(1 − R_s)·softmax_{j∈s}(−I_j/τ)_i" in line
    for part in ("ω=0.3", "ω⁻=0.2", "τ=2", "null zero", "normalize sum", "divided by n_s + ω",
                 "I standardized within each step"):
        assert part in line, part
    assert "r_i = R_s on every token of step s" in legend(p2t.P2TOptions(mode="process"))


def test_terminal_shows_attributions_or_rewards(batch):
    opts = p2t.P2TOptions(omega=0.6)
    att = terminal_heatmap(batch, PROMPTS, color=False, show="attribution", options=opts)
    rew = terminal_heatmap(batch, PROMPTS, color=False, show="rewards", options=opts)
    assert att.splitlines()[0].startswith("shown: attributions I") and rew.splitlines()[0].startswith(
        "shown: token rewards r_i")
    r = p2t.token_rewards(batch, opts)
    # response 1's first step "5+5=10": its tokens' r_i in brackets, then the step's R
    first = "".join(f"{c}[{float(v):+.2f}]" for c, v in zip("5+5=10", r[1, :6]))
    assert first + f" ⟦step 0 R={batch.segment_rewards[3].item():.2f}⟧" in rew
    assert first not in att and len(re.findall(r"⟦step \d R=\d\.\d\d⟧", rew)) == 5
    with pytest.raises(ValueError, match="show"):
        terminal_heatmap(batch, show="both")


def test_html_carries_both_views_and_a_toggle(batch):
    opts = p2t.P2TOptions(omega=0.6, temperature=0.5)
    page = html_report(batch, PROMPTS, options=opts)
    r = p2t.token_rewards(batch, opts)
    got = [float(x) for x in re.findall(r"data-r='([^']+)'", page)]
    want = [float(v) for b, n in enumerate(map(len, RESPONSES)) for v in r[b, :n]]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert len(re.findall(r"data-i='", page)) == sum(map(len, RESPONSES))
    assert "id='show-attribution'" in page and "id='show-rewards'" in page and "<body class='show-attribution'>" in page
    assert "τ=0.5" in page and page.count("class='reward'") == 5
    # self-contained: inline style and script only
    assert "http" not in page and " src=" not in page and "<link" not in page
    assert "<body class='show-rewards'>" in html_report(batch, PROMPTS, options=opts, show="rewards")


def test_signed_rewards_in_the_heatmap(batch):
    if not _signed_ops():
        pytest.skip("the ops do not implement omega_neg > 0 in this build")
    opts = p2t.P2TOptions(omega=0.6, omega_neg=0.6)
    table = token_table(batch, opts)
    want = p2t.token_rewards(batch, opts)
    for b, toks in enumerate(table):
        torch.testing.assert_close(torch.tensor([t.reward for t in toks]), want[b, :len(toks)].float())
    assert "ω⁻=0.6" in html_report(batch, options=opts)


def test_attribute_show_rewards_with_options(prm, tmp_path, capsys):
    d, tok = prm
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(PROMPTS, RESPONSES)))
    out = tmp_path / "a.html"
    rc = main(["attribute", str(data), "--prm", d, "--tokenizer", tok, "--template", "{prompt}{response}",
               "--separator", r"\n", "--step-split", r"\n", "--html", str(out), "--no-color", "--show", "rewards",
               "--omega", "0.3", "--temperature", "2", "--normalize", "sum", "--null", "zero"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "shown: token rewards r_i" in text and "ω=0.3" in text and "τ=2" in text and "null zero" in text
    assert re.search(r"5\[[+-]\d\.\d\d\]\+\[[+-]\d\.\d\d\]", text)
    page = out.read_text()
    assert "<body class='show-rewards'>" in page and "normalize sum" in page
    assert main(["attribute", str(data), "--prm", d, "--tokenizer", tok, "--html", str(out),
                 "--temperature", "0"]) == 2
    assert "temperature must be > 0" in capsys.readouterr().err


def _browser():
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _dump_dom(browser, url):
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                              "--disable-component-update", "--disable-sync", "--no-first-run",
                              f"--user-data-dir={profile}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.mark.skipif(_browser() is None, reason="no headless browser (chromium) installed")
def test_html_toggle_in_a_headless_browser(batch, tmp_path):
    """The page's script runs in a real browser: the address's ?show=rewards switches the view (the body's
    class, which the stylesheet keys the token colours on), and the page loads nothing from outside."""
    page = tmp_path / "heatmap.html"
    page.write_text(html_report(batch, PROMPTS, options=p2t.P2TOptions()), encoding="utf-8")
    browser = _browser()
    url = "file://" + os.path.abspath(page)
    assert re.search(r'<body class="show-attribution"', _dump_dom(browser, url))
    dom = _dump_dom(browser, url + "?show=rewards")
    assert re.search(r'<body class="show-rewards"', dom)
    assert dom.count('class="tok"') == sum(map(len, RESPONSES))
    assert re.search(r'<body class="show-rewards"', _dump_dom(browser, url + "#rewards"))
