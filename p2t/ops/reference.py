"""Plain-PyTorch reference for every P2T op: the oracle the fused backends are tested against.

Every function here is written with ordinary differentiable torch ops (autograd works through
them), computes in float32 (float64 when the inputs are float64) and accepts the same
normalised arguments as the fused kernels:

* ``token_attribution(grad [R, D], embeds [R, D], null_embed [D], mask [R] | None) -> [R]``
* ``segment_redistribute(scores [R], segment_ids [R], segment_rewards [S], ...) -> [R]``
* ``group_advantages(outcome_rewards [B], group_size, scale, eps) -> [B]``
* ``token_advantages(outcome_rewards [B], token_rewards [B, N], mask [B, N] | None, ...) -> [B, N]``
* ``p2t_advantages(grad [B, N, D], ...) -> [B, N]``

No argument checks happen here: ``p2t.ops`` checks once, then calls a backend.
"""
from __future__ import annotations

import torch

# A segment whose population std is at most this fraction of |mean| counts as constant: its
# standardised scores are 0 (uniform weights). Catches the fp rounding of mean((c, c, c)) != c.
ZERO_STD_RTOL = 1e-6
# A GRPO group is constant when max - min <= CONST_RTOL * max(1, |mean|) (the tolerance of the compute
# dtype): its advantages are 0 for every scale. max - min of equal values is exactly 0, unlike the
# variance around a rounded mean; the tolerance also absorbs rewards equal up to a few ulps.
CONST_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def constant_groups(og):
    """Bool [n_groups, 1]: which rows of the grouped rewards ``og [n_groups, G]`` are constant."""
    og = og.detach()
    spread = og.amax(1, keepdim=True) - og.amin(1, keepdim=True)
    return spread <= CONST_RTOL[og.dtype] * og.mean(1, keepdim=True).abs().clamp_min(1.0)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when every floating input is float64, else float32."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def token_attribution(grad, embeds, null_embed, mask=None):
    """I_r = sum_d (embeds[r, d] - null_embed[d]) * grad[r, d], accumulated in fp32; 0 where ~mask."""
    dt = compute_dtype(grad, embeds, null_embed)
    out = ((embeds.to(dt) - null_embed.to(dt)) * grad.to(dt)).sum(-1)
    if mask is not None:
        out = torch.where(mask, out, out.new_zeros(()))
    return out


def _segment_sum(values, index, num_buckets):
    return values.new_zeros(num_buckets).index_add(0, index, values)


def _segment_softmax(x, idx, S1):
    """softmax of x within each bucket of ``idx`` (max-subtracted; the max is a constant of autograd)."""
    mx = torch.full((S1,), float("-inf"), dtype=x.dtype, device=x.device)
    mx = mx.scatter_reduce(0, idx, x.detach(), reduce="amax", include_self=True)
    e = torch.exp(x - mx[idx])
    return e / _segment_sum(e, idx, S1)[idx]


def _logits(scores, segment_ids, num_segments, temperature=1.0, standardize=False):
    """The softmax logits x / temperature [R] (x standardised within its segment when asked) and the
    bucket index [R]: segment ``s`` has bucket ``s``; tokens in no segment (ids outside ``[0, S)``) go to the
    dummy bucket ``num_segments``. A segment is the set of its tokens: they need not be contiguous."""
    S1 = num_segments + 1
    valid = (segment_ids >= 0) & (segment_ids < num_segments)
    idx = torch.where(valid, segment_ids.long(), torch.full_like(segment_ids, num_segments, dtype=torch.long))
    x = scores
    if standardize:
        count = _segment_sum(torch.ones_like(x), idx, S1).clamp_min(1)
        mean = _segment_sum(x, idx, S1) / count
        d = x - mean[idx]
        var = _segment_sum(d * d, idx, S1) / count
        const = var <= (ZERO_STD_RTOL * mean.detach().abs()) ** 2
        std = torch.where(const, torch.ones_like(var), var).sqrt()
        x = torch.where(const[idx], torch.zeros_like(x), d / std[idx])
    return x / temperature, idx, valid


def segment_weights(scores, segment_ids, num_segments, temperature=1.0, standardize=False, negative=False):
    """Within-segment softmax weights w [R] (0 for tokens with id -1) and the bucket index [R]
    (see :func:`_logits`). ``negative``: the weights of the blame term, softmax of ``-x / temperature``."""
    z, idx, valid = _logits(scores, segment_ids, num_segments, temperature, standardize)
    w = _segment_softmax(-z if negative else z, idx, num_segments + 1)
    return torch.where(valid, w, torch.zeros_like(w)), idx


def segment_redistribute(scores, segment_ids, segment_rewards, omega=0.6, temperature=1.0,
                         standardize=False, normalize_sum=False, omega_neg=0.0):
    """r_i = R_s + omega R_s w_i - omega_neg (1 - R_s) v_i, w = softmax_s(x / T), v = softmax_s(-x / T)
    (all divided by n_s + omega when normalize_sum); 0 for id -1. omega_neg = 0: the term is not computed."""
    dt = compute_dtype(scores, segment_rewards)
    scores = scores.to(dt)
    S = segment_rewards.shape[0]
    z, idx, valid = _logits(scores, segment_ids, S, temperature, standardize)
    w = _segment_softmax(z, idx, S + 1)
    R = torch.cat([segment_rewards.to(dt), scores.new_zeros(1)])[idx]
    r = R + omega * R * w
    if omega_neg != 0.0:
        r = r - omega_neg * (1 - R) * _segment_softmax(-z, idx, S + 1)
    if normalize_sum:
        count = _segment_sum(torch.ones_like(scores), idx, S + 1)
        r = r / (count[idx] + omega)
    return torch.where(valid, r, torch.zeros_like(r))


def group_advantages(outcome_rewards, group_size, scale=0, eps=1e-6):
    """(o - mean_g) / (std + eps): std of the group (scale 0, unbiased), of the batch (1), or 1 (2);
    0 for every row of a constant group (``constant_groups``)."""
    dt = compute_dtype(outcome_rewards)
    o = outcome_rewards.to(dt)
    B = o.shape[0]
    og = o.reshape(B // group_size, group_size)
    const = constant_groups(og)
    centered = torch.where(const, torch.zeros_like(og), og - og.mean(1, keepdim=True))
    if scale == 2:
        return centered.reshape(B)
    if scale == 0:
        c = centered
        n = group_size
    else:
        c = (o - o.mean()).reshape(1, B)
        n = B
    var = (c * c).sum(1, keepdim=True) / max(n - 1, 1)
    zero = var == 0
    std = torch.where(zero, torch.zeros_like(var), torch.where(zero, torch.ones_like(var), var).sqrt())
    den = std + eps
    # a zero std means every centred value is 0: the advantage is 0 (also with eps = 0, never 0/0)
    return (centered / torch.where(den == 0, torch.ones_like(den), den)).reshape(B)


def token_advantages(outcome_rewards, token_rewards, mask=None, group_size=1, alpha=0.1, scale=0, eps=1e-6):
    """A~[b, i] = A^_b + alpha * token_rewards[b, i]; 0 where ~mask."""
    dt = compute_dtype(outcome_rewards, token_rewards)
    adv = group_advantages(outcome_rewards, group_size, scale, eps).to(dt)
    out = adv[:, None] + alpha * token_rewards.to(dt)
    if mask is not None:
        out = torch.where(mask, out, torch.zeros_like(out))
    return out


def p2t_advantages(grad, embeds, null_embed, segment_ids, segment_rewards, outcome_rewards, mask=None,
                   group_size=1, omega=0.6, alpha=0.1, temperature=1.0, standardize=False,
                   normalize_sum=False, scale=0, eps=1e-6, omega_neg=0.0):
    """attribution -> redistribution -> token advantages; tokens with ~mask are in no segment."""
    B, N, D = grad.shape
    scores = token_attribution(grad.reshape(B * N, D), embeds.reshape(B * N, D), null_embed)
    ids = segment_ids.reshape(B * N)
    if mask is not None:
        ids = torch.where(mask.reshape(B * N), ids, torch.full_like(ids, -1))
    r = segment_redistribute(scores, ids, segment_rewards, omega, temperature, standardize, normalize_sum, omega_neg)
    return token_advantages(outcome_rewards, r.reshape(B, N), mask, group_size, alpha, scale, eps)


# ---------------------------------------------------------------------------------------------
# Closed-form backwards, in plain torch ops: every backend registers these as its autograd
# formula (they trace under torch.compile), and tests check them against autograd of the
# forwards above.
# ---------------------------------------------------------------------------------------------
def token_attribution_backward(grad_out, grad, embeds, null_embed, mask=None):
    """Returns (d_grad, d_embeds, d_null_embed) for I = sum_d (embeds - null) * grad."""
    dt = compute_dtype(grad, embeds, null_embed)
    g = grad_out.to(dt)
    if mask is not None:
        g = torch.where(mask, g, torch.zeros_like(g))
    g = g.unsqueeze(-1)
    gg = g * grad.to(dt)
    d_grad = (g * (embeds.to(dt) - null_embed.to(dt))).to(grad.dtype)
    d_null = (-gg.reshape(-1, gg.shape[-1]).sum(0)).to(null_embed.dtype)
    return d_grad, gg.to(embeds.dtype), d_null


def segment_redistribute_backward(grad_out, scores, segment_ids, segment_rewards, omega=0.6, temperature=1.0,
                                  standardize=False, normalize_sum=False, omega_neg=0.0):
    """Returns (d_scores, d_segment_rewards) of segment_redistribute.

    With c = 1 (or 1 / (n_s + omega)), w = softmax_s(z), v = softmax_s(-z), z = x / T:
    dR_s = sum_s g c (1 + omega w + omega_neg v);
    dz = w (a - sum_s w a) + v (b - sum_s v b), a = g c omega R_s, b = g c omega_neg (1 - R_s)."""
    dt = compute_dtype(scores, segment_rewards)
    x = scores.detach().to(dt)
    S = segment_rewards.shape[0]
    S1 = S + 1
    valid = (segment_ids >= 0) & (segment_ids < S)
    g = torch.where(valid, grad_out.to(dt), torch.zeros((), dtype=dt, device=x.device))
    w, idx = segment_weights(x, segment_ids, S, temperature, standardize)
    count = _segment_sum(torch.ones_like(x), idx, S1)
    c = 1.0 / (count[idx] + omega) if normalize_sum else torch.ones_like(x)
    R = torch.cat([segment_rewards.detach().to(dt), x.new_zeros(1)])[idx]
    gw = g * c * omega * R
    dx = w * (gw - _segment_sum(w * gw, idx, S1)[idx])
    if omega_neg != 0.0:
        v, _ = segment_weights(x, segment_ids, S, temperature, standardize, negative=True)
        d_rewards = _segment_sum(g * c * (1 + omega * w + omega_neg * v), idx, S1)[:S].to(segment_rewards.dtype)
        gv = g * c * omega_neg * (1 - R)
        dx = dx + v * (gv - _segment_sum(v * gv, idx, S1)[idx])
    else:
        d_rewards = _segment_sum(g * c * (1 + omega * w), idx, S1)[:S].to(segment_rewards.dtype)
    dx = dx / temperature
    if standardize:
        n = count.clamp_min(1)
        mean = _segment_sum(x, idx, S1) / n
        d = x - mean[idx]
        var = _segment_sum(d * d, idx, S1) / n
        const = var <= (ZERO_STD_RTOL * mean.abs()) ** 2
        std = torch.where(const, torch.ones_like(var), var).sqrt()
        xs = d / std[idx]
        m1 = _segment_sum(dx, idx, S1) / n
        m2 = _segment_sum(dx * xs, idx, S1) / n
        dx = torch.where(const[idx], torch.zeros_like(dx), (dx - m1[idx] - xs * m2[idx]) / std[idx])
    d_scores = torch.where(valid, dx, torch.zeros_like(dx)).to(scores.dtype)
    return d_scores, d_rewards


def group_advantages_backward(grad_out, outcome_rewards, group_size, scale=0, eps=1e-6):
    """d outcome_rewards of group_advantages, given d advantages [B]."""
    dt = compute_dtype(outcome_rewards)
    o = outcome_rewards.detach().to(dt)
    B = o.shape[0]
    G = group_size
    og = o.reshape(B // G, G)
    const = constant_groups(og)
    ga = torch.where(const, torch.zeros((), dtype=dt, device=o.device), grad_out.to(dt).reshape(B // G, G))
    centered = torch.where(const, torch.zeros_like(og), og - og.mean(1, keepdim=True))
    if scale == 2:
        return (ga - ga.mean(1, keepdim=True)).reshape(B).to(outcome_rewards.dtype)
    if scale == 0:
        c, n = centered, G
        d_sigma_sum = lambda t: t.sum(1, keepdim=True)  # noqa: E731
    else:
        c, n = (o - o.mean()).reshape(B // G, G), B
        d_sigma_sum = lambda t: t.sum().reshape(1, 1)  # noqa: E731
    var = d_sigma_sum(c * c) / max(n - 1, 1)
    zero = var == 0
    std = torch.where(zero, torch.zeros_like(var), torch.where(zero, torch.ones_like(var), var).sqrt())
    den = std + eps
    den = torch.where(den == 0, torch.ones_like(den), den)
    d_o = (ga - ga.mean(1, keepdim=True)) / den
    d_sigma = -d_sigma_sum(ga * centered) / (den * den)
    safe = torch.where(zero, torch.ones_like(std), std)
    d_o = d_o + torch.where(zero, torch.zeros_like(c), d_sigma * c / ((max(n - 1, 1)) * safe))
    return d_o.reshape(B).to(outcome_rewards.dtype)


def token_advantages_backward(grad_out, outcome_rewards, token_rewards, mask=None, group_size=1, alpha=0.1,
                              scale=0, eps=1e-6):
    """Returns (d_outcome_rewards, d_token_rewards)."""
    dt = compute_dtype(outcome_rewards, token_rewards)
    g = grad_out.to(dt)
    if mask is not None:
        g = torch.where(mask, g, torch.zeros_like(g))
    d_o = group_advantages_backward(g.sum(1), outcome_rewards, group_size, scale, eps)
    return d_o, (alpha * g).to(token_rewards.dtype)


def p2t_advantages_backward(grad_out, grad, embeds, null_embed, segment_ids, segment_rewards, outcome_rewards,
                            mask=None, group_size=1, omega=0.6, alpha=0.1, temperature=1.0, standardize=False,
                            normalize_sum=False, scale=0, eps=1e-6, omega_neg=0.0):
    """Returns (d_grad, d_embeds, d_null_embed, d_segment_rewards, d_outcome_rewards)."""
    B, N, D = grad.shape
    flat = lambda t: t.reshape(B * N, D)  # noqa: E731
    with torch.no_grad():
        scores = token_attribution(flat(grad), flat(embeds), null_embed)
    ids = segment_ids.reshape(B * N)
    if mask is not None:
        ids = torch.where(mask.reshape(B * N), ids, torch.full_like(ids, -1))
    # the token rewards' values do not enter the token-advantage backward: only their dtype
    d_o, d_r = token_advantages_backward(grad_out, outcome_rewards, scores.reshape(B, N), mask, group_size,
                                         alpha, scale, eps)
    d_scores, d_rewards = segment_redistribute_backward(d_r.reshape(B * N), scores, ids, segment_rewards, omega,
                                                        temperature, standardize, normalize_sum, omega_neg)
    d_grad, d_embeds, d_null = token_attribution_backward(d_scores, flat(grad), flat(embeds), null_embed)
    return d_grad.reshape(B, N, D), d_embeds.reshape(B, N, D), d_null, d_rewards, d_o
