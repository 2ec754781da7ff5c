"""The CLI builds its token-reward options through p2t.P2TOptions: `p2t train --omega-neg`, the variants of
`p2t compare` (a table of P2TOptions fields, the signed ones included) and `p2t attribute`'s flags."""
from __future__ import annotations

import argparse
import json

import pytest

import p2t
from p2t.cli import main


def _compare_args(*argv):
    from p2t.cli.compare import configure
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(list(argv))


def _train_config(flags):
    from p2t.cli.train import configure
    from p2t.grpo.config import from_args
    parser = argparse.ArgumentParser()
    configure(parser)
    return from_args(parser.parse_args(flags))


def test_train_takes_omega_neg(capsys):
    assert main(["train", "--omega-neg", "0.6", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["omega_neg"] == 0.6
    assert main(["train", "--omega-neg", "-1", "--print-config"]) == 2
    assert "omega_neg" in capsys.readouterr().err


def test_compare_variants_are_p2t_options():
    from p2t.cli.compare import VARIANTS, _train_flags, variant_options
    args = _compare_args("--omega-neg", "0.4", "--std-temperature", "0.25")
    assert {"p2t-signed", "p2t-signed-zero"} <= set(VARIANTS)
    for name in VARIANTS:           # every row is a set of P2TOptions fields that P2TOptions accepts
        opts = variant_options(args, name)
        assert set(opts) <= set(p2t.P2TOptions.names())
        p2t.P2TOptions.build(**opts)
    assert variant_options(args, "p2t-signed") == {"mode": "p2t", "omega_neg": 0.4}
    assert variant_options(args, "p2t-signed-zero") == {"mode": "p2t", "omega_neg": 0.4, "null": "zero"}
    assert variant_options(_compare_args(), "p2t-signed")["omega_neg"] == 0.6        # the flag's default
    # what each run resolves from its flags: the variant's options on top of the shared ones
    shared = _compare_args("--prm-null", "vocab_mean", "--omega-neg", "0.4", "--std-temperature", "0.25")
    cfg = _train_config(_train_flags(shared, "p2t-signed-zero", 3, "out"))
    assert (cfg.mode, cfg.omega_neg, cfg.prm_null, cfg.seed) == ("p2t", 0.4, "zero", 3)
    cfg = _train_config(_train_flags(shared, "p2t-signed", 3, "out"))
    assert (cfg.omega_neg, cfg.prm_null) == (0.4, "vocab_mean")
    cfg = _train_config(_train_flags(shared, "p2t-exact", 3, "out"))
    assert (cfg.attribution_method, cfg.standardize, cfg.attr_temperature, cfg.omega_neg) == ("exact", True, 0.25,
                                                                                               0.0)
    cfg = _train_config(_train_flags(shared, "outcome", 3, "out"))
    assert cfg.mode == "outcome" and "--omega-neg" not in _train_flags(shared, "outcome", 3, "out")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        variant_options(_compare_args("--std-temperature", "0"), "p2t-std")


def test_compare_reports_the_signed_settings():
    from p2t.cli.compare import _variant_settings
    text = _variant_settings(_compare_args("--omega-neg", "0.4"), ["outcome", "p2t-signed", "p2t-signed-zero"])
    assert text == "; p2t-signed: omega_neg 0.4; p2t-signed-zero: omega_neg 0.4, null zero"


def test_attribute_builds_its_options_through_p2t_options():
    from p2t.cli.attribute import configure, options_of
    parser = argparse.ArgumentParser()
    configure(parser)
    o = options_of(parser.parse_args(["--omega", "0.3", "--omega-neg", "0.2", "--temperature", "2",
                                      "--standardize", "--normalize", "sum", "--null", "7", "--mode", "process"]))
    assert o == p2t.P2TOptions(mode="process", omega=0.3, omega_neg=0.2, temperature=2.0, standardize=True,
                               normalize="sum", null=7)
    assert options_of(parser.parse_args([])) == p2t.P2TOptions()
    with pytest.raises(ValueError, match="omega_neg"):
        options_of(parser.parse_args(["--omega-neg", "-0.1"]))
