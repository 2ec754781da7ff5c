"""Public P2T ops: argument checks, then one backend from the dispatch table in ``_backends``.

Shapes: ``[B, N, D]`` padded or ``[T, D]`` packed for grad/embeds; ``[B, N]`` / ``[T]`` for
per-token tensors; ``[S]`` segment rewards; ``[B]`` outcome rewards. Results are float32
(float64 when every input is float64).
"""
from __future__ import annotations

from typing import Optional

import torch

from p2t.options import DEFAULTS

from . import _backends, _checks as chk, reference
from ._backends import available_backends
from .host import cpu_isa, cpu_isas

__all__ = [
    "token_attribution", "segment_redistribute", "process_token_rewards", "group_advantages", "token_advantages",
    "p2t_advantages", "available_backends", "cpu_isa", "cpu_isas",
]

_backends.register(_backends.Backend(
    name="reference", devices=("cpu", "cuda"),
    token_attribution=reference.token_attribution,
    segment_redistribute=reference.segment_redistribute,
    token_advantages=lambda o, tr, mask, G, alpha, scale, eps, out=None: _write(
        out, reference.token_advantages(o, tr, mask, G, alpha, scale, eps)),
    p2t_advantages=lambda *a, out=None: _write(out, reference.p2t_advantages(*a)),
))


def _write(out, value):
    if out is None:
        return value
    out.copy_(value)
    return out


def _load_backends():
    from . import _cpp  # noqa: F401  (registers "cpu" and "cuda" when the extension is built)
    try:
        from . import _triton  # noqa: F401  (registers "triton" when triton can run here)
    except ImportError as e:  # pragma: no cover - the module ships with the package
        _backends.mark_unavailable("triton", str(e))


_load_backends()


def _device_type(t: torch.Tensor) -> str:
    return t.device.type


def token_attribution(grad: torch.Tensor, embeds: torch.Tensor, null_embed: torch.Tensor, *,
                      mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Taylor attribution ``I = sum_d (embeds - null_embed) * grad`` per token, in fp32.

    Args:
        grad: ``[B, N, D]`` or ``[T, D]``, dR/d(inputs_embeds).
        embeds: same shape as ``grad`` (dtype may differ), the PRM input embeddings.
        null_embed: ``[D]``, the null (PAD) token embedding e_0.
        mask: optional bool ``[B, N]`` / ``[T]``; masked-out tokens get 0 (the kernels do not read their rows).
    Returns:
        float32 ``[B, N]`` / ``[T]`` (zeros when D = 0). Differentiable w.r.t. grad, embeds and null_embed.

    Example:
        >>> g, e = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
        >>> token_attribution(g, e, torch.zeros(7)).shape
        torch.Size([2, 5])
    """
    chk.floating("grad", grad, dims=(2, 3))
    chk.floating("embeds", embeds)
    chk.floating("null_embed", null_embed, dims=(1,))
    chk.same_shape("embeds", embeds, "grad", grad.shape)
    D = grad.shape[-1]
    if null_embed.shape[0] != D:
        raise ValueError(f"null_embed must have shape ({D},) (the hidden size of grad), got {tuple(null_embed.shape)}")
    chk.mask("mask", mask, grad.shape[:-1])
    chk.same_device(grad=grad, embeds=embeds, null_embed=null_embed, mask=mask)
    fn = _backends.get(backend, "token_attribution", _device_type(grad))
    lead = grad.shape[:-1]
    if D == 0:  # an empty sum: zeros (through the reference, so the result keeps its autograd graph)
        return reference.token_attribution(grad, embeds, null_embed, mask)
    out = fn(grad.reshape(-1, D), embeds.reshape(-1, D), null_embed,
             None if mask is None else mask.reshape(-1))
    return out.reshape(lead)


def _segment_args(scores, segment_ids, segment_rewards, omega, omega_neg, temperature, standardize, normalize):
    chk.tensor("scores", scores, dims=(1, 2))
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating tensor (float32, bfloat16, float16 or float64), got {scores.dtype}")
    chk.floating("scores", scores)
    chk.tensor("segment_ids", segment_ids, dtypes=chk.INDEX_DTYPES, kind="int64 or int32")
    chk.same_shape("segment_ids", segment_ids, "scores", scores.shape)
    chk.floating("segment_rewards", segment_rewards, dims=(1,))
    chk.same_device(scores=scores, segment_ids=segment_ids, segment_rewards=segment_rewards)
    omega, omega_neg, temperature, normalize_sum = _redistribution_args(omega, omega_neg, temperature, standardize,
                                                                         normalize)
    return omega, omega_neg, temperature, normalize_sum


def _redistribution_args(omega, omega_neg, temperature, standardize, normalize):
    omega = chk.finite("omega", omega)
    omega_neg = chk.finite("omega_neg", omega_neg, nonnegative=True)
    temperature = chk.finite("temperature", temperature, positive=True)
    if not isinstance(standardize, bool):
        raise TypeError(f"standardize must be a bool, got {type(standardize).__name__}")
    normalize_sum = chk.choice("normalize", normalize, chk.NORMALIZE) == 1
    return omega, omega_neg, temperature, normalize_sum


def segment_redistribute(scores: torch.Tensor, segment_ids: torch.Tensor, segment_rewards: torch.Tensor, *,
                         omega: float = DEFAULTS.omega, omega_neg: float = DEFAULTS.omega_neg,
                         temperature: float = DEFAULTS.temperature, standardize: bool = DEFAULTS.standardize,
                         normalize: str = DEFAULTS.normalize, validate: bool = True,
                         backend: str = "auto") -> torch.Tensor:
    """Token rewards ``r_i = R_s + omega * R_s * softmax_{j in s}(x_j / temperature)_i
    - omega_neg * (1 - R_s) * softmax_{j in s}(-x_j / temperature)_i``.

    Args:
        scores: float ``[B, N]`` or ``[T]`` attributions I.
        segment_ids: int64/int32, same shape; ids in ``[0, S)`` are global across the batch, -1 marks
            tokens in no segment (prompt, separators, padding). A segment is the set of its tokens:
            they need not be contiguous (``[0, 0, -1, 0, 1]`` gives segment 0 three tokens, e.g. around
            a tool call), but with ``[B, N]`` ids they lie inside one row.
        segment_rewards: float ``[S]``, the step rewards R_s.
        omega: redistribution strength (0.6 in the paper).
        omega_neg: weight of the signed blame term (>= 0; 0, the default, is the paper's formula and skips
            the term). ``1 - R_s`` (a step reward in [0, 1] read as a probability) is taken from the tokens with
            the lowest x, through the same x and temperature as the credit term.
        temperature: temperature of both softmaxes (> 0).
        standardize: use ``x = (scores - mean_s) / std_s`` (population std; x = 0 for constant or
            one-token segments) instead of the raw scores, in both softmaxes.
        normalize: ``"paper"`` (Eq. 3 as written) or ``"sum"``: the whole r_i (blame term included) divided
            by ``n_s + omega``, so a segment's token rewards sum to R_s when omega_neg = 0 and to
            ``R_s - omega_neg (1 - R_s) / (n_s + omega)`` otherwise.
        validate: check that ids are in ``[-1, S)`` and no segment crosses rows (one device sync;
            skipped under torch.compile). With ``validate=False`` ids outside ``[0, S)`` count as -1
            and a segment crossing rows gets unspecified (finite) values.
    Returns:
        float32 tensor shaped like scores, 0 for tokens with id -1. Differentiable w.r.t. scores and
        segment_rewards.
    """
    omega, omega_neg, temperature, normalize_sum = _segment_args(scores, segment_ids, segment_rewards, omega,
                                                                 omega_neg, temperature, standardize, normalize)
    if validate:
        chk.segment_values(segment_ids, segment_rewards.shape[0], rows=scores.shape[0] if scores.dim() == 2 else None)
    fn = _backends.get(backend, "segment_redistribute", _device_type(scores))
    out = fn(scores.reshape(-1), segment_ids.reshape(-1), segment_rewards, omega, temperature, standardize,
             normalize_sum, omega_neg)
    return out.reshape(scores.shape)


def process_token_rewards(segment_ids: torch.Tensor, segment_rewards: torch.Tensor, *,
                          mask: Optional[torch.Tensor] = None, validate: bool = True) -> torch.Tensor:
    """Process-reward baseline without redistribution: ``R_s`` on every token of step s, 0 on tokens in no
    step (id -1) and where ``mask`` is False. float32 (float64 for float64 rewards), shaped like
    segment_ids. Differentiable w.r.t. segment_rewards. Plain torch ops (one gather).

    ``segment_ids`` follow :func:`segment_redistribute` (and its ``validate``: ids in ``[-1, S)``, a
    segment inside one row; with ``validate=False`` ids outside ``[0, S)`` count as -1)."""
    chk.tensor("segment_ids", segment_ids, dtypes=chk.INDEX_DTYPES, kind="int64 or int32")
    chk.floating("segment_rewards", segment_rewards, dims=(1,))
    chk.mask("mask", mask, segment_ids.shape)
    chk.same_device(segment_ids=segment_ids, segment_rewards=segment_rewards, mask=mask)
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    S = segment_rewards.shape[0]
    if validate:
        ids = segment_ids if mask is None else torch.where(mask, segment_ids, torch.full_like(segment_ids, -1))
        chk.segment_values(ids, S, rows=segment_ids.shape[0] if segment_ids.dim() == 2 else None)
    keep = (segment_ids >= 0) & (segment_ids < S)
    if mask is not None:
        keep = keep & mask
    R = segment_rewards.to(reference.compute_dtype(segment_rewards))
    if R.numel() == 0:
        return R.new_zeros(segment_ids.shape)
    gathered = R[torch.where(keep, segment_ids, torch.zeros_like(segment_ids)).long()]
    return torch.where(keep, gathered, torch.zeros_like(gathered))


def group_advantages(outcome_rewards: torch.Tensor, group_size: int, *, scale: str = DEFAULTS.scale,
                     eps: float = DEFAULTS.eps) -> torch.Tensor:
    """GRPO advantages per sequence: ``(o - mean_g) / (std + eps)``.

    Groups are contiguous blocks of ``group_size`` rows. ``scale="group"``: unbiased std of the group
    (as TRL and verl); ``"batch"``: std of the whole batch; ``"none"``: no scaling (Dr. GRPO). Group
    size 1 and constant groups give 0 for every scale, never NaN: a group is constant when
    ``max - min <= rtol * max(1, |mean|)``, rtol 1e-6 in float32 and 1e-12 in float64
    (``reference.CONST_RTOL``). Plain torch ops (B values): the fused ops compute the same inside
    their kernels.
    """
    chk.group(outcome_rewards, group_size)
    s = chk.choice("scale", scale, chk.SCALES)
    eps = chk.finite("eps", eps, nonnegative=True)
    return reference.group_advantages(outcome_rewards, group_size, s, eps)


def _out(out, shape, device, op, **inputs):
    if out is None:
        return None
    chk.tensor("out", out, dtypes=(torch.float32, torch.float64), kind="float32 or float64")
    chk.same_shape("out", out, "token_rewards", shape)
    if out.device != device:
        raise ValueError(f"out is on {out.device} but the inputs are on {device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if torch.is_grad_enabled():
        needs = [k for k, v in inputs.items() if v is not None and v.requires_grad]
        if needs or out.requires_grad:
            what = ", ".join(needs) if needs else "out"
            raise ValueError(f"{op}(): out= does not support automatic differentiation, but {what} requires grad "
                             f"(as torch's own out= ops): call {op} without out=, or under torch.no_grad()")
    return out


def token_advantages(outcome_rewards: torch.Tensor, token_rewards: torch.Tensor, *, group_size: int,
                     alpha: float = DEFAULTS.alpha, mask: Optional[torch.Tensor] = None,
                     scale: str = DEFAULTS.scale, eps: float = DEFAULTS.eps, out: Optional[torch.Tensor] = None,
                     backend: str = "auto") -> torch.Tensor:
    """Token advantages ``A~[b, i] = A^_b + alpha * token_rewards[b, i]`` (0 where mask is False).

    Args:
        outcome_rewards: float ``[B]``; groups are contiguous blocks of ``group_size`` rows.
        token_rewards: float ``[B, N]`` (e.g. from :func:`segment_redistribute`).
        out: optional float32 ``[B, N]`` written in place and returned (may alias token_rewards). Like
            torch's own ``out=`` ops it is not differentiable: a ValueError when an input requires
            grad under grad mode.
    """
    chk.group(outcome_rewards, group_size)
    chk.floating("token_rewards", token_rewards, dims=(2,))
    B = outcome_rewards.shape[0]
    if token_rewards.shape[0] != B:
        raise ValueError(f"token_rewards has {token_rewards.shape[0]} rows but outcome_rewards has {B}")
    chk.mask("mask", mask, token_rewards.shape)
    chk.same_device(outcome_rewards=outcome_rewards, token_rewards=token_rewards, mask=mask)
    alpha = chk.finite("alpha", alpha)
    s = chk.choice("scale", scale, chk.SCALES)
    eps = chk.finite("eps", eps, nonnegative=True)
    out = _out(out, token_rewards.shape, token_rewards.device, "token_advantages",
               outcome_rewards=outcome_rewards, token_rewards=token_rewards)
    fn = _backends.get(backend, "token_advantages", _device_type(token_rewards))
    return fn(outcome_rewards, token_rewards, mask, group_size, alpha, s, eps, out=out)


def p2t_advantages(grad: torch.Tensor, embeds: torch.Tensor, null_embed: torch.Tensor, segment_ids: torch.Tensor,
                   segment_rewards: torch.Tensor, outcome_rewards: torch.Tensor, *, group_size: int,
                   omega: float = DEFAULTS.omega, omega_neg: float = DEFAULTS.omega_neg,
                   alpha: float = DEFAULTS.alpha, temperature: float = DEFAULTS.temperature,
                   standardize: bool = DEFAULTS.standardize, normalize: str = DEFAULTS.normalize,
                   mask: Optional[torch.Tensor] = None, scale: str = DEFAULTS.scale, eps: float = DEFAULTS.eps,
                   out: Optional[torch.Tensor] = None, validate: bool = True, backend: str = "auto") -> torch.Tensor:
    """The whole P2T pipeline: attribution -> redistribution -> token advantages, fused.

    Args:
        grad, embeds: ``[B, N, D]``; null_embed ``[D]``; segment_ids ``[B, N]``; segment_rewards ``[S]``;
        outcome_rewards ``[B]``. Tokens where ``mask`` is False are treated as in no segment and get
        advantage 0; tokens with id -1 and mask True get ``A^_b``.
        Segments follow :func:`segment_redistribute`: a segment is the set of its tokens inside one
        row (need not be contiguous; masked tokens leave holes); omega, omega_neg, temperature,
        standardize and normalize are its redistribution options.
        out: optional float32/float64 ``[B, N]`` written in place; not differentiable (a ValueError
        when an input requires grad under grad mode, as torch's own ``out=`` ops).
    Returns:
        float32 ``[B, N]`` (``out`` when given). Differentiable w.r.t. grad, embeds, null_embed,
        segment_rewards and outcome_rewards (without ``out``).
    """
    chk.floating("grad", grad, dims=(3,))
    chk.floating("embeds", embeds)
    chk.floating("null_embed", null_embed, dims=(1,))
    chk.same_shape("embeds", embeds, "grad", grad.shape)
    B, N, D = grad.shape
    if null_embed.shape[0] != D:
        raise ValueError(f"null_embed must have shape ({D},) (the hidden size of grad), got {tuple(null_embed.shape)}")
    chk.tensor("segment_ids", segment_ids, dtypes=chk.INDEX_DTYPES, kind="int64 or int32")
    chk.same_shape("segment_ids", segment_ids, "grad[..., 0]", (B, N))
    chk.floating("segment_rewards", segment_rewards, dims=(1,))
    chk.group(outcome_rewards, group_size)
    if outcome_rewards.shape[0] != B:
        raise ValueError(f"outcome_rewards has {outcome_rewards.shape[0]} rows but grad has {B}")
    chk.mask("mask", mask, (B, N))
    chk.same_device(grad=grad, embeds=embeds, null_embed=null_embed, segment_ids=segment_ids,
                    segment_rewards=segment_rewards, outcome_rewards=outcome_rewards, mask=mask)
    omega, omega_neg, temperature, normalize_sum = _redistribution_args(omega, omega_neg, temperature, standardize,
                                                                         normalize)
    alpha = chk.finite("alpha", alpha)
    s = chk.choice("scale", scale, chk.SCALES)
    eps = chk.finite("eps", eps, nonnegative=True)
    out = _out(out, (B, N), grad.device, "p2t_advantages", grad=grad, embeds=embeds, null_embed=null_embed,
               segment_rewards=segment_rewards, outcome_rewards=outcome_rewards)
    if validate:
        ids = segment_ids if mask is None else torch.where(mask, segment_ids, torch.full_like(segment_ids, -1))
        chk.segment_values(ids, segment_rewards.shape[0], rows=B)
    fn = _backends.get(backend, "p2t_advantages", _device_type(grad))
    return fn(grad, embeds, null_embed, segment_ids, segment_rewards, outcome_rewards, mask, group_size, omega,
              alpha, temperature, standardize, normalize_sum, s, eps, omega_neg, out=out)
