"""The attribution methods, as functions of a differentiable ``f(inputs_embeds) -> m`` (the step
log-odds ``[K]`` of a micro-batch, in readout order).

Every method returns ``(scores [b, L], m [K])``: the attribution of every PRM input position (0
outside the steps, ``amask``) and the step log-odds at the unperturbed input. ``objective`` maps the
log-odds to what is differentiated: the log-odds themselves (``"logit"``) or ``sigmoid(m)``
(``"prob"``).

* :func:`taylor`: one forward and one backward w.r.t. ``inputs_embeds``, all step objectives summed;
  ``I_i = (x_i - e_null) . dF/dx_i``.
* :func:`taylor_per_step`: the tokens of step s with ``dF_s`` only (K batched gradient outputs).
* :func:`integrated_gradients`: the gradient averaged over ``e_null + (j/k)(x - e_null)``, j = 1..k.
* :func:`exact`: each step token replaced by ``e_null`` and the PRM re-run: the oracle.

The input embeddings are never copied: ``x`` is the embedding output (a leaf) and is flagged as
requiring a gradient for the backward only.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch

from ..options import METHODS, NULLS

__all__ = ["METHODS", "taylor", "taylor_per_step", "integrated_gradients", "exact", "exact_copies", "reduce",
           "gradient", "attribute", "null_embedding", "frozen"]

Margins = Callable[[torch.Tensor], torch.Tensor]


def objective_of(m: torch.Tensor, objective: str) -> torch.Tensor:
    return m if objective == "logit" else torch.sigmoid(m)


def reduce(g: torch.Tensor, x: torch.Tensor, null: torch.Tensor, amask: torch.Tensor) -> torch.Tensor:
    """``(x - e_null) . g`` per position, 0 outside ``amask``: :func:`p2t.token_attribution` (float32),
    or in float64 for a float64 PRM (the ops reduce in float32)."""
    if x.dtype == torch.float64:
        return ((x - null) * g.to(torch.float64)).sum(-1) * amask
    from .. import ops
    return ops.token_attribution(g, x, null, mask=amask)


def _grad_at(f: Margins, x: torch.Tensor, objective: str, grad_outputs=None, batched=False, retain=False):
    """(m, dF/dx) with ``x`` flagged as requiring a gradient for this call only (no copy of ``x``)."""
    x.requires_grad_(True)
    try:
        m = f(x)
        out = objective_of(m, objective)
        if grad_outputs is None:
            g, = torch.autograd.grad(out.sum(), x, retain_graph=retain)
        else:
            g, = torch.autograd.grad(out, x, grad_outputs=grad_outputs, is_grads_batched=batched, retain_graph=retain)
    finally:
        x.requires_grad_(False)
    return m.detach(), g


def gradient(f: Margins, x, objective: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(m, dF/dx) of one forward and one backward, all step objectives summed: what :func:`taylor`
    reduces, and what :func:`p2t.p2t_advantages` takes whole."""
    return _grad_at(f, x, objective)


def taylor(f: Margins, x, null, amask, objective: str) -> Tuple[torch.Tensor, torch.Tensor]:
    m, g = _grad_at(f, x, objective)
    return reduce(g, x, null, amask), m


def taylor_per_step(f: Margins, x, null, amask, objective: str, *, step_index: torch.Tensor, local: torch.Tensor,
                    num_local: int, state) -> Tuple[torch.Tensor, torch.Tensor]:
    """dF_s/dx for the step s of every token, from one forward: K batched gradient outputs (the k-th
    step of every row at once; rows do not interact), one backward each when the model's backward
    cannot be vmapped (``state.vmap_ok``, a :class:`~p2t.attribution.engine.RunState`, remembers it).
    ``local``: ``[K]`` step of each readout within its row; ``num_local``: its maximum + 1 (known on the
    host: no device sync)."""
    K = num_local
    x.requires_grad_(True)
    try:
        m = f(x)
        out = objective_of(m, objective)
        go = torch.zeros((K, out.shape[0]), dtype=out.dtype, device=out.device)
        go[local, torch.arange(out.shape[0], device=out.device)] = 1
        grads = None
        if state.vmap_ok and K > 1:
            try:
                grads, = torch.autograd.grad(out, x, grad_outputs=go, is_grads_batched=True, retain_graph=True)
            except (RuntimeError, NotImplementedError):
                state.vmap_ok = False
        if grads is None:
            grads = torch.stack([torch.autograd.grad(out, x, grad_outputs=go[k], retain_graph=k + 1 < K)[0]
                                 for k in range(K)])
    finally:
        x.requires_grad_(False)
    b, L = step_index.shape
    idx = step_index.clamp(min=0)
    g = grads[idx, torch.arange(b, device=x.device)[:, None], torch.arange(L, device=x.device)[None, :]]
    return reduce(g, x, null, amask), m.detach()


def integrated_gradients(f: Margins, x, null, amask, objective: str, *, steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = torch.zeros(x.shape, dtype=acc, device=x.device)
    m = None
    for j in range(1, steps + 1):
        a = j / steps
        xa = x if j == steps else torch.where(amask[..., None], null + a * (x - null), x).detach()
        m, gj = _grad_at(f, xa, objective)
        g += gj.to(acc)
    g /= steps
    return reduce(g, x, null, amask), m


def exact(f: Margins, f_copies: Callable[[int, torch.Tensor], torch.Tensor], x, null, amask, objective: str, *,
          rows_of_readouts: torch.Tensor, budget: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """I_i = F(x) - F(x with token i replaced by e_null), F = sum of the row's step objectives;
    perturbed copies of one row batched under the token budget (``f_copies(r, xs)``: the row's
    objectives summed per copy, ``[c]``). Nothing requires a gradient here, so no graph is recorded."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        m0 = f(x)
        b, L, D = x.shape
        f0 = torch.zeros(b, dtype=acc, device=x.device).index_add(0, rows_of_readouts,
                                                                  objective_of(m0, objective).to(acc))
        scores = torch.zeros((b, L), dtype=acc, device=x.device)
        chunk = max(1, budget // L)
        for r in range(b):
            P = amask[r].nonzero().flatten()
            for c0 in range(0, P.numel(), chunk):
                pc = P[c0:c0 + chunk]
                c = pc.numel()
                xs = x[r:r + 1].expand(c, L, D).clone()
                xs[torch.arange(c, device=x.device), pc] = null
                scores[r, pc] = f0[r] - f_copies(r, xs).to(acc)
    return scores, m0


def exact_copies(margins: Callable, x, attn, inputs: dict,
                 objective: str) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """``f_copies(r, xs)`` of :func:`exact` for a padded micro-batch: row ``r``'s inputs repeated for each
    perturbed copy in ``xs`` ``[c, L, D]``, the row's step objectives summed per copy (``margins(xs,
    attention_mask, inputs)`` is the head's log-odds)."""
    ro = inputs["readout_positions"]
    L = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32

    def copies(r, xs):
        c = xs.shape[0]
        ro_r = ro[ro[:, 0] == r]
        ro_c = torch.stack([torch.arange(c, device=x.device).repeat_interleave(ro_r.shape[0]),
                            ro_r[:, 1].repeat(c)], dim=1)
        sub = {k: inputs[k][r:r + 1].expand(c, L) for k in ("input_ids", "step_index", "prompt_mask")}
        sub.update(readout_positions=ro_c, row_index=inputs["row_index"][r:r + 1].expand(c))
        if "position_ids" in inputs:  # e.g. a vision-language PRM's 3-D positions [3, b, L]
            p = inputs["position_ids"]
            sub["position_ids"] = p[..., r:r + 1, :].expand(*p.shape[:-2], c, L)
        m = margins(xs, attn[r:r + 1].expand(c, L), sub)
        return torch.zeros(c, dtype=acc, device=x.device).index_add(0, ro_c[:, 0], objective_of(m, objective).to(acc))
    return copies


def attribute(engine, t: dict, inputs: dict, x: torch.Tensor, method: Optional[str], ig_steps: int):
    """Attributions ``[b, L]`` and margins ``[K]`` of one padded micro-batch (its tensors ``t``, model
    ``inputs`` and ``inputs_embeds`` ``x``) by ``method`` (``None``: no attributions); ``engine``: the
    scorer's :class:`~p2t.attribution.engine.Engine`."""
    attn, tstep, ro = t["attention_mask"], t["step_index"], t["readout_positions"]
    f = lambda xx: engine.margins(xx, attn, inputs)  # noqa: E731
    with engine.autocast_context():
        if method is None:  # the step rewards alone: one forward (the caller turned autograd off)
            return None, f(x).detach()
        if method == "exact":
            copies = exact_copies(engine.margins, x, attn, inputs, engine.objective)
            return exact(f, copies, x, engine.null(x), tstep >= 0, engine.objective, rows_of_readouts=ro[:, 0],
                         budget=engine.micro_batch_tokens)
        return gradient_method(engine, f, x, tstep, t, method, ig_steps)


def gradient_method(engine, f: Margins, x: torch.Tensor, tstep: torch.Tensor, t: dict, method: str, ig_steps: int):
    """``taylor``, ``taylor_per_step`` or ``integrated_gradients`` of ``f`` at ``x`` (padded or packed
    rows: ``tstep`` the local step of each position, ``t`` holds ``local`` / ``num_local``), under the
    caller's autocast; the engine's run state remembers whether the backward could be vmapped."""
    null, amask = engine.null(x), tstep >= 0
    if method == "taylor":
        return taylor(f, x, null, amask, engine.objective)
    if method == "taylor_per_step":
        return taylor_per_step(f, x, null, amask, engine.objective, step_index=tstep, local=t["local"],
                               num_local=t["num_local"], state=engine.state)
    if method == "integrated_gradients":
        return integrated_gradients(f, x, null, amask, engine.objective, steps=ig_steps)
    raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")


def null_embedding(emb, tokenizer, null, nulls=NULLS) -> torch.Tensor:
    """e_null in the space of ``get_input_embeddings()`` outputs (what ``inputs_embeds`` holds): token
    ids go through the embedding module, so embeddings that scale their output (Gemma) agree."""
    weight = emb.weight
    if isinstance(null, bool) or not isinstance(null, (str, int)):
        raise TypeError(f"null must be one of {', '.join(map(repr, nulls))} or a token id, got {null!r}")
    if isinstance(null, int):
        tid = null
    elif null == "zero":
        return torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
    elif null == "vocab_mean":
        scale = getattr(emb, "embed_scale", None)
        mean = weight.detach().float().mean(0)
        return (mean * (float(scale) if scale is not None else 1.0)).to(weight.dtype)
    elif null in ("pad", "eos"):
        tid = getattr(tokenizer, f"{null}_token_id", None)
        if tid is None:
            raise ValueError(f"null={null!r} but the PRM tokenizer has no {null} token; pass null='eos', "
                             "'vocab_mean', 'zero' or a token id (e.g. null=tokenizer.unk_token_id)")
    else:
        raise ValueError(f"null must be one of {', '.join(map(repr, nulls))} or a token id, got {null!r}")
    if not 0 <= tid < weight.shape[0]:
        raise ValueError(f"null token id {tid} is outside the PRM vocabulary [0, {weight.shape[0]})")
    with torch.no_grad():
        return emb(torch.tensor([tid], device=weight.device))[0].detach().clone()


def autocast(device: torch.device, setting):
    """bf16 autocast on a GPU (``setting="auto"``) or wherever asked (``True``); none otherwise."""
    on = setting is True or (setting == "auto" and device.type == "cuda")
    if on and (device.type == "cuda" or setting is True):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def call_context(frozen_ctx, grad: bool) -> contextlib.ExitStack:
    """One scoring call: out of inference mode, autograd on (off for step rewards alone), the PRM frozen."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
    stack.enter_context(frozen_ctx)
    return stack


def _walk(roots):
    """Every module under ``roots``, each once (what ``Module.modules()`` yields, without building the
    names ``named_modules`` makes for every module: a third of the time on a 372-module PRM)."""
    out, seen = [], set()
    for root in roots:
        if id(root) in seen:
            continue
        seen.add(id(root))
        out.append(root)
        i = len(out) - 1
        while i < len(out):
            for c in out[i]._modules.values():
                if c is not None and id(c) not in seen:
                    seen.add(id(c))
                    out.append(c)
            i += 1
    return out


@contextlib.contextmanager
def frozen(model, reward_fn=None, gradient_checkpointing: bool = False):
    """The PRM (and a reward module) with every parameter's ``requires_grad`` off and in eval mode for
    the call, flags and modes restored afterwards; with ``gradient_checkpointing`` the decoder layers
    alone are flagged as training so transformers recomputes them in the backward.

    One walk over the modules, and only what is on is switched off (and back on afterwards): a PRM
    that is already frozen and in eval mode costs the walk alone (benchmarks/NOTES.md)."""
    modules = [model] + ([reward_fn] if isinstance(reward_fn, torch.nn.Module) else [])
    thawed, training, flagged = [], [], []
    ckpt_on = False
    try:
        for m in _walk(modules):
            if m.training:
                training.append(m)
            for p in m._parameters.values():
                if p is not None and p.requires_grad:
                    p.requires_grad_(False)
                    thawed.append(p)
        if training:  # through Module.eval, so that a module's own train() override still runs
            for mod in modules:
                mod.eval()
        if gradient_checkpointing and not getattr(model, "is_gradient_checkpointing", False):
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError("gradient_checkpointing=True but the PRM does not support it")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            ckpt_on = True
        if gradient_checkpointing:
            # transformers checkpoints a layer only in training mode: flag the layers alone, so
            # dropout and every other submodule stay in eval mode
            for m in model.modules():
                if hasattr(m, "gradient_checkpointing") and type(m).__name__.endswith("Layer"):
                    m.training = True
                    flagged.append(m)
        yield
    finally:
        if ckpt_on:
            model.gradient_checkpointing_disable()
        for m in flagged:
            m.training = False
        for m in training:
            m.training = True
        for p in thawed:
            p.requires_grad_(True)
