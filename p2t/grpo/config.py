"""The trainer's settings: one dataclass, loadable from YAML/JSON, overridable from the command line.

Precedence: dataclass defaults < config file < command-line flags. Every field is a flag named after
it (``--num-updates 50``, ``--lab.sft-steps 400`` for the lab's nested settings); booleans take
``--standardize`` / ``--no-standardize``.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Union, get_args, get_origin, get_type_hints

from ..attribution import KINDS as PRM_KINDS
from ..options import DEFAULTS, MODES, SCALES, P2TOptions, check_float  # noqa: F401  (MODES, SCALES re-exported: defined once)
from .lab import LabConfig
from .logprobs import CHUNKED_VOCAB
from .sampling import SAMPLERS

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
JUDGE_LOGITS = ("all", "readout")
# the toy lab's alpha (see GRPOConfig.alpha): its PRM's step rewards are the lab's own verified signal,
# and at 1.0 they move the tiny policy within the short runs of `p2t train` / `p2t compare`
LAB_ALPHA = 1.0
# GRPOConfig field -> P2TOptions field (the config keeps its YAML's and TRL's names: attr_temperature, ...)
OPTION_FIELDS = {"mode": "mode", "alpha": "alpha", "omega": "omega", "omega_neg": "omega_neg",
                 "attr_temperature": "temperature", "standardize": "standardize", "normalize": "normalize",
                 "scale_rewards": "scale", "attribution_method": "method", "prm_null": "null"}


@dataclass
class GRPOConfig:
    """GRPO with outcome, process or P2T token advantages. Options follow TRL's meanings."""
    # what is trained and rewarded
    mode: str = "p2t"                    # a registered mode (p2t.rewards): outcome (A^ only) | process
                                         # (A^ + alpha*R_s) | p2t (A^ + alpha*r_i)
    policy: Optional[str] = None         # HF id or local path; None = the lab's SFT policy (as is a directory
                                         # saved by a lab run)
    prm: Optional[str] = None            # HF id or local path; None = the lab's PRM when training the lab policy
    prm_kind: str = "step_classifier"    # step_classifier | value_head | lm_judge
    step_separator: Optional[str] = None  # PRM step separator; None = the kind's convention (the lab: newline)
    step_split: Optional[str] = None      # how responses are split into steps; None = the kind's (the lab: newline)
    prm_template: Optional[str] = None    # PRM input template with {prompt} and {response}; None = the kind's
    prm_packing: bool = False             # several responses per PRM row, positions restarting per response
    prm_gradient_checkpointing: bool = False  # recompute the PRM's layer activations in its backward (long responses)
    prm_judge_logits: str = "all"         # lm_judge logits at every position (all) or at the step tags only (readout)
    prm_image_column: Optional[str] = None  # train-data column of each prompt's image file: a vision-language PRM
    prm_null: Optional[str] = None       # null embedding: pad | eos | vocab_mean | zero; None = the scorer's (pad)
    reward: Optional[str] = None         # outcome reward "module:function", fn(prompts, responses, **columns)
                                         # -> a float per response, or a (reward, correct) pair per response;
                                         # None = the lab's
    correct_threshold: float = 1.0       # a response counts as correct (accuracy, eval_accuracy) when its
                                         # reward >= this; a reward function returning (reward, correct)
                                         # pairs decides itself
    train_data: Optional[str] = None     # JSONL of {"prompt": ..., other columns}; None = the lab's generated task
    eval_data: Optional[str] = None      # JSONL for evaluation; None = held-out lab prompts
    trust_remote_code: bool = False
    # sampling
    num_updates: int = 100
    prompts_per_update: int = 16
    group_size: int = 8                  # G samples per prompt
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    sampler: str = "auto"                # auto (the decode loop where the policy allows it) | fast | hf (generate)
    # optimisation
    learning_rate: float = 1e-4
    warmup_updates: int = 10             # linear learning-rate warm-up (Adam's first steps are sign-like)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    weight_decay: float = 0.0
    loss_type: str = "grpo"              # grpo | bnpo | dr_grpo | dapo
    epsilon: float = 0.2                 # lower clip range of the ratio
    epsilon_high: Optional[float] = None  # upper clip range; None = epsilon
    beta: float = 0.0                    # k3 KL to a frozen reference; 0 = no reference model loaded
    scale_rewards: str = DEFAULTS.scale  # group (std, as TRL) | batch | none (Dr. GRPO)
    num_iterations: int = 1              # optimisation passes per batch (mu); >1 stores old log-probs
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mask_truncated_completions: bool = True  # completions cut at max_new_tokens (no EOS) are left out of the loss
    # process / P2T advantages (checked and used as one p2t.P2TOptions: GRPOConfig.p2t_options)
    # alpha: None = the toy lab's 1.0 when the run trains the lab's policy (the figures of `p2t train` and
    # `p2t compare`), else P2TOptions' default (0.1, the paper's value for short chains of thought)
    alpha: Optional[float] = None        # weight of the token (or step) rewards; None = 1.0 for the toy lab, else 0.1
    omega: float = DEFAULTS.omega        # redistribution strength
    omega_neg: float = DEFAULTS.omega_neg  # signed blame on a step's lowest-attribution tokens, weighted by
                                           # (1 - R_s); 0 = the paper's formula
    attr_temperature: float = DEFAULTS.temperature  # softmax temperature over a step's attributions
    standardize: bool = DEFAULTS.standardize  # standardize attributions within each step before the softmax
    normalize: str = DEFAULTS.normalize  # paper | sum
    attribution_method: str = DEFAULTS.method  # P2TScorer method: taylor | taylor_per_step | integrated_gradients | exact
    fused_advantages: bool = True        # p2t mode ends in the fused p2t_advantages where the scorer can fuse
    chunked_logprobs_vocab: int = CHUNKED_VOCAB  # policy log-probs through TRL's chunked kernel (no
                                                 # [B, N, V] logits) for vocabularies at least this large,
                                                 # where TRL >= 1.16 is installed; smaller ones (the toy
                                                 # lab's) take the eager log-softmax
    # evaluation, output
    eval_every: int = 10
    eval_prompts: int = 200
    eval_samples_per_prompt: int = 4
    eval_seed: int = 2024
    eval_temperature: float = 1.0
    seed: int = 0
    output_dir: str = "runs/train"
    save_every: int = 20
    resume: bool = False
    bf16: bool = False                   # bf16 autocast for the policy forward (GPU only)
    device: str = "auto"
    threads: Optional[int] = None        # torch CPU threads; None = 1 for the toy lab, else torch's default
    progress: bool = True
    lab_cache: Optional[str] = None      # where the lab's warm-up checkpoints are cached
    lab_packaged: bool = True            # use the lab checkpoints shipped with p2t when the lab settings match
    lab: LabConfig = field(default_factory=LabConfig)

    def __post_init__(self):
        if isinstance(self.lab, dict):
            self.lab = LabConfig(**self.lab)
        self.validate()

    # ---------------------------------------------------------------- checks
    def validate(self) -> "GRPOConfig":
        """Value checks that need nothing but the config. What depends on the policy being the toy lab's
        (a PRM, train_data and a reward for a policy of one's own) is checked when the run is set up
        (:func:`p2t.grpo.setup.check`), where a policy directory may be read."""
        def choice(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"unknown {name} {v!r}: choose one of {', '.join(allowed)}")
        self.p2t_options()  # mode, alpha, omega, omega_neg, attr_temperature, standardize, normalize, ...
        choice("loss_type", LOSS_TYPES)
        choice("prm_kind", PRM_KINDS)
        choice("prm_judge_logits", JUDGE_LOGITS)
        choice("sampler", SAMPLERS)
        for name in ("num_updates", "prompts_per_update", "group_size", "max_new_tokens", "num_iterations",
                     "gradient_accumulation_steps", "eval_prompts", "eval_samples_per_prompt"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "num_updates" else 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.scale_rewards in ("group", "batch") and self.group_size < 2:
            raise ValueError(f"scale_rewards={self.scale_rewards!r} divides by a standard deviation, which needs "
                             f"group_size >= 2 (got group_size={self.group_size}); use scale_rewards='none' "
                             "or a larger group_size")
        batch = self.prompts_per_update * self.group_size
        if batch % self.gradient_accumulation_steps:
            raise ValueError(f"gradient_accumulation_steps={self.gradient_accumulation_steps} must divide the batch "
                             f"prompts_per_update * group_size = {batch}")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError("epsilon and epsilon_high must be > 0")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.temperature <= 0 or self.eval_temperature <= 0:
            raise ValueError("temperature and eval_temperature must be > 0 (sampling)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        check_float("correct_threshold", self.correct_threshold)
        if isinstance(self.chunked_logprobs_vocab, bool) or not isinstance(self.chunked_logprobs_vocab, int) \
                or self.chunked_logprobs_vocab < 0:
            raise ValueError(f"chunked_logprobs_vocab must be an integer >= 0, got {self.chunked_logprobs_vocab!r}")
        if self.train_data is not None and self.reward is None:
            raise ValueError("train_data needs reward='module:function' (the outcome reward)")
        return self

    def p2t_options(self, lab: Optional[bool] = None) -> P2TOptions:
        """The redistribution and advantage options of this config (the one place they are checked).

        ``lab``: whether the run trains the toy lab's policy, which an unset ``alpha`` resolves by
        (:data:`LAB_ALPHA`); default :attr:`uses_lab`. The set-up knows it for certain
        (:func:`p2t.grpo.setup.uses_lab` also recognises a policy directory saved by a lab run)."""
        lab = self.uses_lab if lab is None else lab
        values = {opt: getattr(self, name) for name, opt in OPTION_FIELDS.items()}
        if values["alpha"] is None and lab:
            values["alpha"] = LAB_ALPHA
        try:
            return P2TOptions.build(**values)  # None: the option's default (alpha, null)
        except (TypeError, ValueError) as e:  # the message names the option: name the config's field
            msg = str(e)
            head = msg.split(" ", 1)[0]
            name = {opt: name for name, opt in OPTION_FIELDS.items()}.get(head, head)
            raise type(e)(name + msg[len(head):]) from None

    @property
    def uses_lab(self) -> bool:
        """The config names no policy: the toy lab's SFT policy, PRM, reward, prompts and evaluation set
        are used. (A policy directory saved by a lab run is the lab's too: :func:`p2t.grpo.setup.uses_lab`,
        which reads it, is what a run goes by.)"""
        return self.policy is None

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    # ---------------------------------------------------------------- files
    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GRPOConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config option(s): {', '.join(unknown)}")
        d = dict(d)
        if isinstance(d.get("lab"), dict):
            lab_known = {f.name for f in fields(LabConfig)}
            bad = sorted(set(d["lab"]) - lab_known)
            if bad:
                raise ValueError(f"unknown config option(s): {', '.join('lab.' + b for b in bad)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str, **overrides) -> "GRPOConfig":
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        data.update(overrides)
        return cls.from_dict(data)

    def save(self, path: str):
        with open(path, "w", encoding="utf-8") as f:
            if path.endswith((".yaml", ".yml")):
                import yaml
                yaml.safe_dump(self.to_dict(), f, sort_keys=False)
            else:
                json.dump(self.to_dict(), f, indent=1)

    def replace(self, **changes) -> "GRPOConfig":
        lab = changes.pop("lab", None)
        new = dataclasses.replace(self, **changes)
        if lab is not None:
            new.lab = dataclasses.replace(self.lab, **lab) if isinstance(lab, dict) else lab
        return new


# -------------------------------------------------------------------- command line
def _base_type(tp):
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _parse_value(tp, text: str):
    if text.lower() in ("none", "null") and get_origin(tp) is Union:
        return None
    base = _base_type(tp)
    if base is str:
        return text.encode().decode("unicode_escape") if "\\" in text else text
    return base(text)


def field_comments(cls) -> Dict[str, str]:
    """The comment after each field of a settings dataclass, with the comment lines aligned under it (its
    ``--help`` text); empty where the source cannot be read."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, name, col = {}, None, -1
    for line in lines:
        m = re.match(r"^    (\w+): [^#]*?(#\s*)(.+)$", line)
        if m:
            name, col = m.group(1), m.start(2)
            out[name] = m.group(3).strip()
        elif name is not None and line.find("#") == col and not line[:col].strip():
            out[name] += " " + line[col + 1:].strip()
        else:
            name = None
    return out


def add_arguments(parser: argparse.ArgumentParser):
    """One flag per config field, its comment as help (defaults suppressed, so only given flags override
    the file)."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON config file (flags override it)")
    groups = [(GRPOConfig, "", parser.add_argument_group("trainer options")),
              (LabConfig, "lab.", parser.add_argument_group("toy lab warm-up options"))]
    for cls, prefix, group in groups:
        hints, comments = get_type_hints(cls), field_comments(cls)
        for f in fields(cls):
            if f.name == "lab":
                continue
            flag = "--" + prefix + f.name.replace("_", "-")
            dest = prefix + f.name
            tp = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else None
            text = comments.get(f.name, "").replace("%", "%%")
            if _base_type(tp) is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=f"{text} (default {default})".lstrip())
            else:
                group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=_base_type(tp).__name__.upper(),
                                   type=lambda s, tp=tp: _parse_value(tp, s),
                                   help=f"{text} (default {default!r})".lstrip())


def from_args(args: argparse.Namespace, **defaults) -> GRPOConfig:
    """Build a config: defaults (keyword arguments) < ``--config`` file < flags."""
    data: Dict[str, Any] = dict(defaults)
    lab = dict(data.pop("lab", {}) or {})
    if getattr(args, "config", None):
        with open(args.config, encoding="utf-8") as f:
            text = f.read()
        if args.config.endswith((".yaml", ".yml")):
            import yaml
            filed = yaml.safe_load(text) or {}
        else:
            filed = json.loads(text)
        lab.update(filed.pop("lab", {}) or {})
        data.update(filed)
    for key, value in vars(args).items():
        if key.startswith("lab."):
            lab[key[4:]] = value
        elif key in {f.name for f in fields(GRPOConfig)}:
            data[key] = value
    data["lab"] = lab
    return GRPOConfig.from_dict(data)
