"""Helpers of the op tests: backends x devices parametrisation, the numerics rules, segment layouts and
pipeline inputs, and sample arguments of every op of the spec table (p2t/ops/_spec.py)."""
import pytest
import torch

import p2t
from p2t.ops import reference as ref
from p2t.ops._spec import SPECS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device_params(include_reference=True):
    params = []
    for dev in DEVICES:
        for name in p2t.available_backends(dev):
            if name == "reference" and not include_reference:
                continue
            params.append(pytest.param(name, dev, id=f"{name}-{dev}"))
    return params


def max_err_report(out, expected, k=5):
    diff = (out.double() - expected.double()).abs()
    flat = diff.reshape(-1)
    if flat.numel() == 0:
        return "empty"
    idx = torch.topk(flat, min(k, flat.numel())).indices
    rows = [f"  at {tuple(torch.unravel_index(i, diff.shape)) if diff.dim() else ()}: got {out.reshape(-1)[i].item():.6g}"
            f" want {expected.reshape(-1)[i].item():.6g}" for i in idx]
    return f"max abs err {flat.max().item():.3g}; first mismatches:\n" + "\n".join(rows)


def assert_close_to_oracle(out, ref_out, oracle, floor):
    """flash-attn's rule: error vs the float64 oracle at most 2x the reference backend's own error
    (same inputs, same dtype), plus a floor for fp32 accumulation-order noise."""
    assert out.shape == oracle.shape, (out.shape, oracle.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    err = (out.double() - oracle).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_out.double() - oracle).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * ref_err + floor, f"err {err:.3g} > 2 x ref err {ref_err:.3g} + {floor:.3g}\n" + \
        max_err_report(out, oracle)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(out, ref_out, oracle, floor=1e-5):
    """out vs the float64 oracle: at most 2x the reference backend's own error + a small floor (relative to
    the oracle's magnitude when it exceeds 1)."""
    assert out.shape == oracle.shape, (out.shape, oracle.shape)
    assert torch.isfinite(out).all(), "non-finite output"
    err, ref_err = _err(out, oracle), _err(ref_out, oracle)
    scale = max(1.0, oracle.abs().max().item()) if oracle.numel() else 1.0
    assert err <= 2 * ref_err + floor * scale, f"err {err:.3g} vs reference err {ref_err:.3g} (floor {floor:.1g})"


def segments(B, N, lengths, gaps=1, first=0, device="cpu", skip_rows=()):
    """ids [B, N]: per row, runs of the given lengths (cycled) separated by ``gaps`` tokens with -1."""
    ids = torch.full((B, N), -1, dtype=torch.long)
    s, k = 0, 0
    for b in range(B):
        if b in skip_rows:
            continue
        i = first
        while i < N:
            n = lengths[k % len(lengths)]
            k += 1
            ids[b, i:i + n] = s
            s += 1
            i += n + gaps
    return ids.to(device), s


def pipeline(B, N, D, lengths, device, dtype=torch.float32, seed=0, **kw):
    """(grad, embeds, null, ids, segment rewards, outcome rewards) of p2t_advantages, segments as ``segments``."""
    gen = torch.Generator().manual_seed(seed)
    ids, S = segments(B, N, lengths, **kw)
    g = torch.randn(B, N, D, generator=gen).to(device, dtype)
    e = torch.randn(B, N, D, generator=gen).to(device, dtype)
    n = (0.1 * torch.randn(D, generator=gen)).to(device, dtype)
    R = torch.randn(S, generator=gen).to(device)
    o = torch.randn(B, generator=gen).to(device)
    return g, e, n, ids.to(device), R, o


def oracle_p2t(g, e, n, ids, R, o, mask, G, **kw):
    """p2t_advantages in float64 through the reference."""
    args = dict(omega=0.6, alpha=0.1, temperature=1.0, standardize=False, normalize_sum=False, scale=0, eps=1e-6,
                omega_neg=0.0)
    args.update(kw)
    return ref.p2t_advantages(g.double(), e.double(), n.double(), ids, R.double(), o.double(), mask, G,
                              args["omega"], args["alpha"], args["temperature"], args["standardize"],
                              args["normalize_sum"], args["scale"], args["eps"], args["omega_neg"])


def sample_args(op, device, requires_grad=False):
    """Arguments of op ``op`` of the spec table (normalised shapes, as p2t.ops passes them); the
    differentiable inputs require grad when asked. Every op of SPECS has samples (a test checks it)."""
    g, e, n, ids, R, o = pipeline(4, 11, 9, [3, 1, 4], device)
    mask = torch.ones(4, 11, dtype=torch.bool, device=device)
    mask[1, 8:] = False
    tr = torch.randn(4, 11, device=device)
    samples = {
        "token_attribution": (g.reshape(44, 9), e.reshape(44, 9), n, mask.reshape(44)),
        "segment_redistribute": (tr.reshape(44), ids.reshape(44), R, 0.6, 0.9, True, False, 0.4),
        "token_advantages": (o, tr, mask, 2, 0.3, 0, 1e-6),
        "token_advantages_out": (o, tr, mask, 2, 0.3, 1, 1e-6, torch.empty(4, 11, device=device)),
        "p2t_advantages": (g, e, n, ids, R, o, mask, 2, 0.6, 0.1, 1.0, False, True, 0, 1e-6, 0.3),
        "p2t_advantages_out": (g, e, n, ids, R, o, mask, 2, 0.6, 0.1, 1.0, False, True, 2, 1e-6, 0.0,
                               torch.empty(4, 11, device=device)),
    }
    args = list(samples[op])
    if requires_grad:
        names = SPECS[op].arg_names
        for k in SPECS[op].differentiable:
            i = names.index(k)
            args[i] = args[i].clone().requires_grad_(True)
    return tuple(args)


# ------------------------------------------------------------------------------------------------ #
# omega_neg = 0: the outputs of the kernels before the signed term existed (tests/data), bit for bit
# ------------------------------------------------------------------------------------------------ #
GOLDEN = __import__("os").path.join(__import__("os").path.dirname(__file__), "data", "omega_neg_zero_golden.pt")
GOLDEN_OPTIONS = [(False, "paper", 1.0), (True, "sum", 0.7), (False, "sum", 1.3)]


def golden_cases():
    """(key, segment_redistribute args, p2t_advantages args, kwargs) of the recorded omega_neg = 0 outputs:
    float32 and bfloat16, three option sets, 5x37 tokens, steps of 3, 1, 7 and 12 tokens, masked tokens. The
    outputs were recorded by every backend (the C++ one with its AVX2 clone) before omega_neg was added."""
    for dt in (torch.float32, torch.bfloat16):
        for st, ns, T in GOLDEN_OPTIONS:
            g, e, n, ids, R, o = pipeline(5, 37, 33, [3, 1, 7, 12], "cpu", dtype=dt, seed=3)
            mask = torch.rand(5, 37, generator=torch.Generator().manual_seed(1)) > 0.2
            s = torch.randn(5, 37, generator=torch.Generator().manual_seed(2)).to(dt)
            R = torch.rand(R.shape, generator=torch.Generator().manual_seed(4))
            kw = dict(omega=0.6, temperature=T, standardize=st, normalize=ns)
            yield (f"{dt}|{st}|{ns}|{T}", (s, ids, R), (g, e, n, ids, R, o),
                   dict(kw, group_size=5, alpha=0.3, mask=mask, validate=False), kw)


def check_golden(name, seg_fn, p2t_fn):
    """seg_fn(*args, **kw) / p2t_fn(*args, **kw) with omega_neg=0.0 equal the recorded outputs of ``name``."""
    want = torch.load(GOLDEN)
    bad = []
    for key, seg_args, p2t_args, p2t_kw, seg_kw in golden_cases():
        got_s = seg_fn(*seg_args, omega_neg=0.0, **seg_kw)
        got_p = p2t_fn(*p2t_args, omega_neg=0.0, **p2t_kw)
        for op, got in (("seg", got_s), ("p2t", got_p)):
            w = want[f"{op}|{name}|{key}"]
            if not torch.equal(got, w):
                bad.append(f"{op} {key}: max diff {(got.double() - w.double()).abs().max().item():.3g}")
    assert not bad, "omega_neg=0 differs from the recorded outputs:\n" + "\n".join(bad)
