"""The trainer's settings: one dataclass, loadable from YAML/JSON, overridable from the command line.

Precedence: dataclass defaults < config file < command-line flags. Every field is a flag named after
it (``--num-updates 50``, ``--lab.sft-steps 400`` for the lab's nested settings); booleans take
``--standardize`` / ``--no-standardize``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Union, get_args, get_origin, get_type_hints

from .lab.models import LabConfig

from ..attribution.batch import MODES, NORMALIZE, SCALES  # noqa: F401  (defined once)
from ..attribution.options import NULLS
from .sampling import SAMPLERS

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
PRM_KINDS = ("step_classifier", "value_head", "lm_judge")


@dataclass
class GRPOConfig:
    """GRPO with outcome, process or P2T token advantages. Options follow TRL's meanings."""
    # what is trained and rewarded
    mode: str = "p2t"                    # outcome (A^ only) | process (A^ + alpha*R_s) | p2t (A^ + alpha*r_i)
    policy: Optional[str] = None         # HF id or local path; None = the lab's SFT policy
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
    reward: Optional[str] = None         # outcome reward "module:function", fn(prompts, responses, **columns); None = the lab's
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
    scale_rewards: str = "group"         # group | batch | none
    num_iterations: int = 1              # optimisation passes per batch (mu); >1 stores old log-probs
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mask_truncated_completions: bool = True  # completions cut at max_new_tokens (no EOS) are left out of the loss
    # process / P2T advantages
    alpha: float = 1.0                   # weight of the token (or step) rewards
    omega: float = 0.6                   # redistribution strength
    attr_temperature: float = 1.0        # softmax temperature over a step's attributions
    standardize: bool = False            # standardize attributions within each step before the softmax
    normalize: str = "paper"             # paper | sum
    attribution_method: str = "taylor"   # P2TScorer method
    fused_advantages: bool = True        # p2t mode ends in the fused p2t_advantages where the scorer can fuse
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
        def choice(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"unknown {name} {v!r}: choose one of {', '.join(allowed)}")
        choice("mode", MODES)
        choice("loss_type", LOSS_TYPES)
        choice("scale_rewards", SCALES)
        choice("normalize", NORMALIZE)
        choice("prm_kind", PRM_KINDS)
        choice("prm_judge_logits", ("all", "readout"))
        choice("sampler", SAMPLERS)
        if self.prm_null is not None:
            choice("prm_null", NULLS)
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
        if self.attr_temperature <= 0:
            raise ValueError(f"attr_temperature must be > 0, got {self.attr_temperature}")
        if self.mode != "outcome" and self.prm is None and not self.uses_lab:
            raise ValueError(f"mode={self.mode!r} needs a process reward model: set prm (an HF id or a local path) "
                             "or use mode='outcome'")
        if self.train_data is None and not self.uses_lab:
            raise ValueError("a policy of your own needs train_data (a JSONL of prompts) and a reward")
        if self.train_data is not None and self.reward is None:
            raise ValueError("train_data needs reward='module:function' (the outcome reward)")
        return self

    @property
    def uses_lab(self) -> bool:
        from .setup import uses_lab  # no policy, or a lab policy saved by an earlier run
        return uses_lab(self)

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


def add_arguments(parser: argparse.ArgumentParser):
    """One flag per config field (defaults suppressed, so only given flags override the file)."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON config file (flags override it)")
    groups = [(GRPOConfig, "", parser.add_argument_group("trainer options")),
              (LabConfig, "lab.", parser.add_argument_group("toy lab warm-up options"))]
    for cls, prefix, group in groups:
        hints = get_type_hints(cls)
        for f in fields(cls):
            if f.name == "lab":
                continue
            flag = "--" + prefix + f.name.replace("_", "-")
            dest = prefix + f.name
            tp = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else None
            if _base_type(tp) is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=f"(default {default})")
            else:
                group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=_base_type(tp).__name__.upper(),
                                   type=lambda s, tp=tp: _parse_value(tp, s), help=f"(default {default!r})")


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
