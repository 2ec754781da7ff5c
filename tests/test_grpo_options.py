"""GRPO trainer options: the P2T options (one P2TOptions, alpha's default, omega_neg), the reward's
accuracy contract, the scorer's null embedding (prm_null), the sampler, the thread default, and the
package's import graph."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from p2t.attribution.options import NULLS
from p2t.grpo import GRPOConfig, GRPOTrainer, ensure_lab

from _grpo_helpers import TINY_LAB, digit_reward, tiny_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("labcache")
    ensure_lab(TINY_LAB, str(root))
    return root


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make(tmp_path, cache, **changes):
    return GRPOTrainer(tiny_config(tmp_path, cache, **changes), reward_fn=digit_reward)


# ---------------------------------------------------------------- prm_null
def test_prm_null_is_checked(capsys):
    with pytest.raises(ValueError, match="prm_null must be one of 'pad', 'eos', 'vocab_mean', 'zero'.*'mean'"):
        GRPOConfig(prm_null="mean")
    from p2t.cli import main
    assert main(["train", "--prm-null", "mean", "--print-config"]) == 2
    assert "prm_null" in capsys.readouterr().err
    assert main(["train", "--prm-null", "zero", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["prm_null"] == "zero"


def test_prm_null_reaches_the_lab_scorer(tmp_path, cache, keep_threads):
    for null in (None,) + NULLS:
        tr = make(tmp_path, cache, mode="p2t", prm_null=null)
        assert tr.scorer.null == (null or "pad")
        emb = tr.scorer.model.get_input_embeddings().weight
        want = {"zero": torch.zeros(emb.shape[1]), "vocab_mean": emb.detach().mean(0),
                "pad": emb[tr.scorer.tokenizer.pad_token_id], "eos": emb[tr.scorer.tokenizer.eos_token_id],
                None: emb[tr.scorer.tokenizer.pad_token_id]}[null]
        torch.testing.assert_close(tr.scorer._null_embed, want.detach())


def test_prm_null_reaches_a_users_scorer(tmp_path, cache, keep_threads):
    from p2t.grpo.lab.tokenizer import CharTokenizer
    from p2t.grpo.setup import scorer_options
    paths = ensure_lab(TINY_LAB, str(cache))
    cfg = GRPOConfig(mode="p2t", policy=paths["policy"], prm=paths["prm"], train_data="x.jsonl", reward="m:f",
                     prm_null="eos")
    assert scorer_options(cfg, CharTokenizer(), lab=False)["null"] == "eos"
    assert "null" not in scorer_options(cfg.replace(prm_null=None), CharTokenizer(), lab=False)
    # a scorer passed in must have been built with the null the config asks for
    scorer = make(tmp_path, cache, mode="p2t").scorer  # null pad
    with pytest.raises(ValueError, match="prm_null='zero'.*null='pad'"):
        GRPOTrainer(tiny_config(tmp_path, cache, mode="p2t", prm_null="zero"), scorer=scorer, reward_fn=digit_reward)
    GRPOTrainer(tiny_config(tmp_path, cache, mode="p2t", prm_null="pad"), scorer=scorer, reward_fn=digit_reward)


def test_two_updates_with_the_zero_null_standardized(tmp_path, cache, keep_threads):
    tr = make(tmp_path, cache, mode="p2t", prm_null="zero", standardize=True, num_updates=2)
    records = tr.train()
    assert [r["update"] for r in records] == [1, 2]
    r = tr.last_rollout
    assert torch.isfinite(r.advantages).all() and torch.isfinite(r.token_scores).all()
    assert (r.advantages[~r.completion_mask] == 0).all()
    # standardized attributions of the zero null still tell the tokens of a step apart
    spread = [float(r.advantages[b][(r.segment_ids[b] == s) & r.completion_mask[b]].std())
              for b in range(r.advantages.shape[0]) for s in r.segment_ids[b].unique().tolist() if s >= 0
              and int(((r.segment_ids[b] == s) & r.completion_mask[b]).sum()) > 1]
    assert spread and max(spread) > 0


def test_compare_passes_the_null_to_every_run():
    from p2t.cli.compare import _train_flags, configure
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--prm-null", "vocab_mean"])
    for variant in ("outcome", "p2t", "p2t-ps"):
        flags = _train_flags(args, variant, 3, "out")
        assert flags[flags.index("--prm-null") + 1] == "vocab_mean"
    assert "--prm-null" not in _train_flags(parser.parse_args([]), "p2t", 3, "out")
    # the p2t-zero variant's own null wins over the shared one: what `p2t train` resolves from its flags
    from p2t.cli.train import configure as train_configure
    from p2t.grpo.config import from_args
    train_parser = argparse.ArgumentParser()
    train_configure(train_parser)
    cfg = from_args(train_parser.parse_args(_train_flags(args, "p2t-zero", 3, "out")))
    assert (cfg.mode, cfg.prm_null, cfg.attribution_method) == ("p2t", "zero", "taylor")
    cfg = from_args(train_parser.parse_args(_train_flags(args, "p2t", 3, "out")))
    assert (cfg.mode, cfg.prm_null) == ("p2t", "vocab_mean")
    with pytest.raises(SystemExit):
        parser.parse_args(["--prm-null", "mean"])


# ---------------------------------------------------------------- sampler, threads
def test_trainer_samples_the_same_with_either_sampler(tmp_path, cache, keep_threads):
    """The lab policy goes through the decode loop; for a seed it draws what HF generate draws."""
    from p2t.grpo import sampling
    got = {}
    for sampler in ("fast", "hf"):
        tr = make(tmp_path, cache, mode="outcome", sampler=sampler)
        assert sampling.supports(tr.policy)
        got[sampler] = (tr.rollout(0).input_ids, tr.evaluate())
    assert torch.equal(got["fast"][0], got["hf"][0]) and got["fast"][1] == got["hf"][1]
    with pytest.raises(ValueError, match="sampler"):
        GRPOConfig(sampler="beam")


def test_the_lab_runs_on_one_thread_unless_told(tmp_path, cache, keep_threads):
    torch.set_num_threads(2)
    make(tmp_path, cache, mode="outcome")
    assert torch.get_num_threads() == 1
    torch.set_num_threads(1)
    make(tmp_path, cache, mode="outcome", threads=2)
    assert torch.get_num_threads() == 2


# ---------------------------------------------------------------- the P2T options: one P2TOptions
def test_the_config_builds_one_p2t_options():
    from p2t import P2TOptions
    from p2t.grpo.config import LAB_ALPHA
    c = GRPOConfig(mode="process", omega=0.5, omega_neg=0.25, attr_temperature=0.3, standardize=True,
                   normalize="sum", scale_rewards="batch", attribution_method="taylor_per_step", prm_null="eos")
    assert c.p2t_options() == P2TOptions(mode="process", alpha=LAB_ALPHA, omega=0.5, omega_neg=0.25, temperature=0.3,
                                         standardize=True, normalize="sum", scale="batch", method="taylor_per_step",
                                         null="eos")
    # alpha: the lab's 1.0 when training the lab, the options' default for a policy of one's own, else as set
    assert LAB_ALPHA == 1.0 and GRPOConfig().p2t_options().alpha == 1.0
    own = GRPOConfig(policy="some/policy", prm="some/prm", train_data="x.jsonl", reward="m:f")
    assert own.p2t_options().alpha == P2TOptions().alpha == 0.1
    assert own.p2t_options(lab=True).alpha == 1.0  # a lab policy saved by an earlier run (the set-up knows)
    assert GRPOConfig(alpha=0.3).p2t_options().alpha == own.replace(alpha=0.3).p2t_options().alpha == 0.3
    assert GRPOConfig().p2t_options().null == "pad"  # prm_null unset: the options' (and the scorer's) default


@pytest.mark.parametrize("field,value,message", [
    ("mode", "signed", "mode must be one of 'outcome', 'process', 'p2t'"),
    ("attr_temperature", 0.0, "attr_temperature must be > 0"),
    ("omega_neg", -0.5, "omega_neg must be >= 0"),
    ("omega", float("nan"), "omega must be finite"),
    ("alpha", "big", "alpha must be a float"),
    ("normalize", "l1", "normalize must be one of 'paper', 'sum'"),
    ("scale_rewards", "std", "scale_rewards must be one of 'group', 'batch', 'none'"),
    ("attribution_method", "lrp", "attribution_method must be one of 'taylor'"),
    ("standardize", "yes", "standardize must be a bool"),
])
def test_option_errors_name_the_config_field(field, value, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(")):
        GRPOConfig(**{field: value})


def test_omega_neg_flag_and_file(tmp_path):
    from p2t.cli.train import configure
    from p2t.grpo.config import from_args
    parser = argparse.ArgumentParser()
    configure(parser)
    assert from_args(parser.parse_args([])).omega_neg == 0.0
    cfg = from_args(parser.parse_args(["--omega-neg", "0.4", "--alpha", "0.2"]))
    assert (cfg.p2t_options().omega_neg, cfg.p2t_options().alpha) == (0.4, 0.2)
    path = tmp_path / "c.yaml"
    path.write_text("omega_neg: 0.3\nattr_temperature: 0.5\nscale_rewards: none\n")
    opts = GRPOConfig.from_file(str(path)).p2t_options()
    assert (opts.omega_neg, opts.temperature, opts.scale) == (0.3, 0.5, "none")
    help_text = parser.format_help()
    assert "--omega-neg" in help_text and "--correct-threshold" in help_text and "reward >= this" in help_text


def test_the_config_reads_nothing_from_disk(monkeypatch):
    """Validation is pure: whether a policy directory is a saved lab policy is the set-up's question."""
    import builtins
    import os.path

    def no_disk(*a, **k):
        raise AssertionError("the config read the disk")

    monkeypatch.setattr(builtins, "open", no_disk)
    monkeypatch.setattr(os.path, "isdir", no_disk)
    monkeypatch.setattr(os.path, "exists", no_disk)
    cfg = GRPOConfig(mode="p2t", policy="/some/dir", lab=TINY_LAB)
    assert not cfg.uses_lab and cfg.p2t_options(lab=False).alpha == 0.1


def test_the_trainer_takes_the_options_and_writes_what_it_used(tmp_path, cache, keep_threads, monkeypatch):
    from p2t import ops
    seen = []
    real = ops.segment_redistribute
    monkeypatch.setattr(ops, "segment_redistribute", lambda *a, **k: seen.append(k) or real(*a, **k))
    tr = make(tmp_path, cache, mode="p2t", fused_advantages=False, omega_neg=0.2, attr_temperature=0.7,
              num_updates=1, save_every=1)
    assert tr.options == tr.config.p2t_options(lab=True) and tr.options.alpha == 1.0
    tr.train()
    assert seen and all((k["omega_neg"], k["temperature"]) == (0.2, 0.7) for k in seen)
    with open(tmp_path / "run" / "config.json") as f:
        written = json.load(f)
    assert written["alpha"] == 1.0 and written["omega_neg"] == 0.2 and tr.config.alpha is None


# ---------------------------------------------------------------- the reward's accuracy contract
def test_outcomes_contract():
    from p2t.grpo.trainer import outcomes
    assert outcomes([1.0, 0.5, 2.0], 3, 1.0) == ([1.0, 0.5, 2.0], [True, False, True])
    assert outcomes([-1.0, 1.0], 2, 0.0) == ([-1.0, 1.0], [False, True])
    assert outcomes([(-1.0, False), (0.2, True)], 2, 1.0) == ([-1.0, 0.2], [False, True])
    with pytest.raises(ValueError, match="returned 2 values for 3 responses"):
        outcomes([1.0, 0.0], 3, 1.0)
    with pytest.raises(ValueError, match="not a mix"):
        outcomes([(1.0, True), 0.0], 2, 1.0)


@pytest.mark.parametrize("kind", ["floats", "pairs"])
def test_accuracy_of_a_reward_in_minus_one_plus_one(tmp_path, cache, keep_threads, kind):
    """A reward of -1 (wrong) / +1 (right): accuracy counts the right responses, whether the reward says
    which are right (pairs) or the threshold does (floats, correct_threshold 0)."""
    seen = []

    def signed(prompts, responses, **columns):
        ok = [len(r) % 2 == 0 for r in responses]
        seen.append(ok)
        return [(1.0 if k else -1.0, k) for k in ok] if kind == "pairs" else [1.0 if k else -1.0 for k in ok]

    tr = GRPOTrainer(tiny_config(tmp_path, cache, mode="outcome", correct_threshold=0.0 if kind == "floats" else 5.0,
                                 eval_every=1), reward_fn=signed)
    rec = tr.step()
    want = sum(seen[0]) / len(seen[0])
    assert 0 < want < 1, "the samples should hold right and wrong responses"
    assert rec["accuracy"] == pytest.approx(want) and rec["reward"] == pytest.approx(2 * want - 1)
    ev = tr.evaluate()
    assert ev["eval_accuracy"] == pytest.approx(sum(seen[-1]) / len(seen[-1]))
    assert ev["eval_reward"] == pytest.approx(2 * ev["eval_accuracy"] - 1)


# ---------------------------------------------------------------- the package's import graph
def _grpo_imports():
    """{module: set of p2t modules it imports anywhere in its source (module level or inside functions)}
    for the modules of p2t/grpo (not the lab)."""
    import ast
    import os

    import p2t.grpo as pkg
    root = os.path.dirname(pkg.__file__)
    graph = {}
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        mod = "p2t.grpo" if name == "__init__.py" else f"p2t.grpo.{name[:-3]}"
        package = "p2t.grpo"
        with open(os.path.join(root, name)) as f:
            tree = ast.parse(f.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[mod] = {d for d in deps if d.startswith("p2t")} - {mod}
    return graph


def test_no_import_circle_in_the_loop():
    graph = _grpo_imports()
    assert {"p2t.grpo.trainer", "p2t.grpo.setup", "p2t.grpo.config", "p2t.grpo.logprobs"} <= set(graph)
    # the loop knows neither the set-up nor the lab; the config reads neither
    lab = lambda d: d == "p2t.grpo.lab" or d.startswith("p2t.grpo.lab.")  # noqa: E731
    for mod in ("p2t.grpo.trainer", "p2t.grpo.advantages", "p2t.grpo.logprobs", "p2t.grpo.config"):
        bad = {d for d in graph[mod] if d.startswith("p2t.grpo.setup") or lab(d)}
        if mod == "p2t.grpo.config":
            bad -= {"p2t.grpo.lab", "p2t.grpo.lab.LabConfig"}  # the lab's settings are a config field
        assert not bad, f"{mod} imports {sorted(bad)}"
    # no circle among the package's modules
    edges = {m: {d for d in deps if d in graph} for m, deps in graph.items() if m != "p2t.grpo"}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in edges.get(m, ()):
            assert state.get(d) != "open", f"import circle: {' -> '.join(stack + [m, d])}"
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"
    for m in sorted(edges):
        if m not in state:
            visit(m, [])


def test_every_module_imports_in_a_fresh_interpreter():
    import subprocess
    import sys
    mods = sorted(_grpo_imports())
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    p = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]


# ---------------------------------------------------------------- the set-up hands the loop its pieces
def test_setup_metrics_reach_the_record(tmp_path, cache, keep_threads):
    from p2t.grpo import GRPOLoop, resolve
    from p2t.grpo.lab import task
    tr = make(tmp_path, cache, mode="outcome")
    rec = tr.step()
    r = tr.last_rollout
    labels = [ok for p, s in zip(r.prompts, r.responses) for ok in task.step_labels(task.parse_prompt(p), s)]
    assert labels and rec["step_accuracy"] == sum(labels) / len(labels)  # the lab's metric, from the set-up
    cfg = tiny_config(tmp_path, cache, mode="outcome")
    mine = GRPOTrainer(cfg, reward_fn=digit_reward, metrics=[lambda ro: {"rows": len(ro.responses)}]).step()
    assert mine["rows"] == 8 and "step_accuracy" not in mine
    setup = resolve(cfg, reward_fn=digit_reward)
    assert isinstance(GRPOTrainer(cfg, setup), GRPOLoop) and GRPOLoop(cfg, setup).step()["update"] == 1
    with pytest.raises(TypeError, match="not both"):
        GRPOTrainer(cfg, setup, reward_fn=digit_reward)
