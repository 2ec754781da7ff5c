"""Every command: a path argument that does not exist, or a hub id that cannot be loaded offline, is one
line on stderr naming the argument and the value, exit code 2, before any model or run starts."""
from __future__ import annotations

import pytest

from p2t.cli import main
from p2t.cli.checks import ArgumentError, check_model, is_hub_id, is_path_like


def _one_line(capsys, *parts):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for p in parts:
        assert p in err, (p, err)
    return err


def test_path_or_hub_id(tmp_path):
    assert is_path_like("/x") and is_path_like("./x") and is_path_like("../x") and is_path_like("~/x")
    assert not is_path_like("Qwen/Qwen2.5-Math-PRM-7B") and not is_path_like("gpt2")
    assert is_hub_id("Qwen/Qwen2.5-Math-PRM-7B") and not is_hub_id(str(tmp_path)) and not is_hub_id("./missing")
    check_model("--prm", "Qwen/Qwen2.5-Math-PRM-7B")        # a hub id: checked when it is loaded
    check_model("--prm", str(tmp_path))
    with pytest.raises(ArgumentError, match="--prm: no such file or directory: ./missing"):
        check_model("--prm", "./missing")


@pytest.mark.parametrize("argv, flag, value", [
    (["train", "--prm", "{missing}/dir"], "--prm", "{missing}/dir"),
    (["train", "--policy", "{missing}/dir"], "--policy", "{missing}/dir"),
    (["train", "--policy", "~{missing}/policy", "--mode", "outcome"], "--policy", "~{missing}/policy"),
    (["train", "--config", "{missing}/config.yaml"], "--config", "{missing}/config.yaml"),
    (["train", "--policy", "/", "--train-data", "no_such_prompts.jsonl", "--reward", "m:f", "--mode", "outcome"],
     "--train-data", "no_such_prompts.jsonl"),
    (["train", "--eval-data", "./no_such_eval.jsonl"], "--eval-data", "./no_such_eval.jsonl"),
    (["compare", "--config", "{missing}/config.yaml"], "--config", "{missing}/config.yaml"),
    (["compare", "--modes", "p2t", "--", "--prm", "{missing}/dir"], "--prm", "{missing}/dir"),
    (["localise", "--policy", "{missing}/dir"], "--policy", "{missing}/dir"),
    (["localise", "--prm", ".{missing}/prm"], "--prm", ".{missing}/prm"),
    (["attribute", "{missing}/input.jsonl"], "error: input: no such file", "{missing}/input.jsonl"),
    (["attribute", "--prm", "{missing}/dir"], "--prm", "{missing}/dir"),
    (["attribute", "--prm", "minilm", "--tokenizer", ".{missing}/tok"], "--tokenizer", ".{missing}/tok"),
    (["attribute", "--html", "{missing}/dir/out.html"], "--html", "{missing}/dir"),
    (["bench", "--out", "{missing}/dir/rows.csv"], "--out", "{missing}/dir"),
])
def test_a_missing_path_is_one_line_and_exit_2(argv, flag, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no" / "such")                  # "{missing}": an absolute path that does not exist
    argv = [a.replace("{missing}", missing) for a in argv]
    value = value.replace("{missing}", missing)
    assert main(argv) == 2
    err = _one_line(capsys, flag, value, f"p2t {argv[0]}: error:")
    assert "Traceback" not in err and not (tmp_path / "no").exists()


def test_compare_checks_its_variants_before_running(capsys, tmp_path):
    assert main(["compare", "--modes", "p2t-signed", "--omega-neg", "-0.5", "--output-dir", str(tmp_path / "c")]) == 2
    _one_line(capsys, "omega_neg must be >= 0")
    assert not (tmp_path / "c").exists()


def test_a_hub_id_that_cannot_be_loaded_offline(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))          # an empty cache
    assert main(["attribute", "--prm", "Qwen/Qwen2.5-Math-PRM-7B", "--html", str(tmp_path / "a.html")]) == 2
    _one_line(capsys, "--prm", "'Qwen/Qwen2.5-Math-PRM-7B'", "not in the local Hugging Face cache")
    assert main(["train", "--mode", "outcome", "--policy", "someone/no-such-policy", "--train-data", __file__,
                 "--reward", "m:f"]) == 2
    _one_line(capsys, "--policy", "'someone/no-such-policy'", "offline")
