"""The options of the redistribution and the advantage: one declaration, one set of defaults, one check.

Every entry point that turns step rewards into token rewards or token advantages (the scorer's
``advantages_ids``, :func:`p2t.token_rewards`, the lean GRPO loop's config, TRL's ``P2TGRPOConfig``,
verl's ``algorithm.p2t`` block, ``p2t compare``) takes a :class:`P2TOptions` or builds one from its own
field names. A new option is a field here (plus its kernel argument) and reaches all of them.

The ops (:func:`p2t.segment_redistribute`, :func:`p2t.token_advantages`, :func:`p2t.p2t_advantages`) keep
plain keyword arguments, like torch's functional ops; their defaults are read from :data:`DEFAULTS`.

This module imports nothing from p2t: every layer may import it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Union

__all__ = ["P2TOptions", "DEFAULTS", "NORMALIZE", "SCALES", "NULLS", "METHODS", "MODES", "check_float", "choice"]

NORMALIZE = ("paper", "sum")
SCALES = ("group", "batch", "none")
NULLS = ("pad", "eos", "vocab_mean", "zero")
METHODS = ("taylor", "taylor_per_step", "integrated_gradients", "exact")
# the token-reward modes: filled by :func:`p2t.rewards.register_mode` (outcome, process, p2t, ...)
MODES: Dict[str, Any] = {}


def choice(name: str, value, options):
    """``value`` if it is one of ``options``, else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def check_float(name: str, v, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite float (ints accepted, bools not); ``positive``/``nonnegative`` bound it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if v != v or abs(v) == float("inf"):  # (math.isfinite does not trace under torch.compile)
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonnegative and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


@dataclass(frozen=True)
class P2TOptions:
    """How step rewards become token rewards and token advantages.

    mode: a registered token-reward mode (:data:`MODES`): ``"outcome"`` (no token rewards: the group
        advantage alone), ``"process"`` (R_s on every token of step s), ``"p2t"`` (the redistribution below).
    omega: ω, the credit concentrated on the tokens with the highest attribution:
        ``r_i = R_s + ω·R_s·softmax_{j∈s}(I_j/τ)_i`` (0.6 in the paper).
    omega_neg: ω⁻, the signed blame term ``− ω⁻·(1 − R_s)·softmax_{j∈s}(−I_j/τ)_i`` added to r_i
        (0: the paper's formula).
    temperature: τ of both softmaxes (> 0).
    standardize: attributions standardized within each step before the softmaxes.
    normalize: ``"paper"`` (the formula as written) or ``"sum"`` (divided by ``n_s + ω``: a step's
        token rewards sum to R_s when ω⁻ = 0; the blame term is divided by the same ``n_s + ω``).
    alpha: α, the weight of the token rewards in ``Ã = Â + α·r``. 0.1: the paper's value for short
        chains of thought (it asks for up to 1.0 for long ones); a caller that wants another says so (the
        toy lab's ``p2t train`` uses 1.0 in its own settings).
    scale: how outcome rewards are scaled within a group: ``"group"`` (std, as TRL/verl), ``"batch"``,
        ``"none"`` (Dr. GRPO).
    eps: added to the std.
    method: the attribution method of the scorer (``taylor``, ``taylor_per_step``,
        ``integrated_gradients``, ``exact``).
    null: the null embedding e_∅: ``"pad"`` (the paper's best), ``"eos"``, ``"vocab_mean"``, ``"zero"`` or a
        token id.
    """
    mode: str = "p2t"
    omega: float = 0.6
    omega_neg: float = 0.0
    temperature: float = 1.0
    standardize: bool = False
    normalize: str = "paper"
    alpha: float = 0.1
    scale: str = "group"
    eps: float = 1e-6
    method: str = "taylor"
    null: Union[str, int] = "pad"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: checked values written once)
        if MODES:  # (the registry is filled on `import p2t`; before that, any name passes)
            choice("mode", self.mode, tuple(MODES))
        set_("omega", check_float("omega", self.omega))
        set_("omega_neg", check_float("omega_neg", self.omega_neg, nonnegative=True))
        set_("temperature", check_float("temperature", self.temperature, positive=True))
        if not isinstance(self.standardize, bool):
            raise TypeError(f"standardize must be a bool, got {type(self.standardize).__name__}")
        choice("normalize", self.normalize, NORMALIZE)
        set_("alpha", check_float("alpha", self.alpha))
        choice("scale", self.scale, SCALES)
        set_("eps", check_float("eps", self.eps, nonnegative=True))
        choice("method", self.method, METHODS)
        if isinstance(self.null, bool) or not (isinstance(self.null, int) or self.null in NULLS):
            raise ValueError(f"null must be one of {', '.join(map(repr, NULLS))} or a token id, got {self.null!r}")

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, options: Optional["P2TOptions"] = None, /, **overrides) -> "P2TOptions":
        """``options`` (default: :data:`DEFAULTS`) with ``overrides`` applied; an unknown name is a
        ``TypeError`` naming it. ``None`` overrides are ignored (\"not set\")."""
        base = DEFAULTS if options is None else options
        if not isinstance(base, P2TOptions):
            raise TypeError(f"options must be a p2t.P2TOptions, got {type(base).__name__}")
        names = cls.names()
        unknown = [k for k in overrides if k not in names]
        if unknown:
            raise TypeError(f"unknown P2T option(s) {', '.join(map(repr, unknown))}; the options are "
                            f"{', '.join(names)}")
        kw = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(base, **kw) if kw else base

    @classmethod
    def from_mapping(cls, m: Optional[Mapping[str, Any]], /, *, aliases: Optional[Mapping[str, str]] = None,
                     **overrides) -> "P2TOptions":
        """From a config mapping (YAML, a dataclass's fields): the option names (or ``aliases`` of them, e.g.
        ``{"attr_temperature": "temperature"}``) are taken, other keys ignored."""
        aliases = dict(aliases or {})
        kw = {}
        for k, v in dict(m or {}).items():
            name = aliases.get(k, k)
            if name in cls.names():
                kw[name] = v
        kw.update(overrides)
        return cls.build(**kw)

    @staticmethod
    def names():
        return tuple(f.name for f in dataclasses.fields(P2TOptions))

    def replace(self, **overrides) -> "P2TOptions":
        return P2TOptions.build(self, **overrides)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ what each op takes
    @property
    def redistribution(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`p2t.segment_redistribute`."""
        return dict(omega=self.omega, omega_neg=self.omega_neg, temperature=self.temperature,
                    standardize=self.standardize, normalize=self.normalize)

    @property
    def advantage(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`p2t.token_advantages` (besides ``group_size``)."""
        return dict(alpha=self.alpha, scale=self.scale, eps=self.eps)

    @property
    def fused(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`p2t.p2t_advantages` (besides ``group_size``)."""
        return {**self.redistribution, **self.advantage}


DEFAULTS = P2TOptions()
