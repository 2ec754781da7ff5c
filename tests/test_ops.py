"""Every backend of every public op vs the reference vs a float64 oracle; gradients; degenerate cases.

Backends join by registration (conftest.backend_device_params): C++ on CPU, Triton under the
interpreter without a GPU, CUDA and Triton on a GPU.
"""
import math

import pytest
import torch

import p2t
from p2t.ops import reference as ref
from p2t.ops._spec import SPECS
from _op_helpers import assert_close_to_oracle, backend_device_params, check_golden, max_err_report, sample_args

BACKENDS = backend_device_params()
FUSED = backend_device_params(include_reference=False)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_segments(B, N, *, device="cpu", empty_rows=(), gen=None, max_len=9):
    """Random contiguous segments per row: lengths 1..max_len (one-token ones included), -1 gaps,
    rows in ``empty_rows`` without any segment. Returns (ids [B, N] int64, S)."""
    gen = gen or torch.Generator().manual_seed(7)
    ids = torch.full((B, N), -1, dtype=torch.long)
    s = 0
    for b in range(B):
        if b in empty_rows:
            continue
        i = int(torch.randint(0, 3, (1,), generator=gen))
        while i < N:
            n = int(torch.randint(1, max_len + 1, (1,), generator=gen))
            ids[b, i:i + n] = s
            s += 1
            i += n + int(torch.randint(0, 3, (1,), generator=gen))
    return ids.to(device), s


def loop_oracle(scores, ids, rewards, omega, temperature, standardize, normalize_sum, omega_neg=0.0):
    """Independent float64 oracle by explicit loops over segments (checks the reference too)."""
    x = scores.double().reshape(-1).tolist()
    flat = ids.reshape(-1).tolist()
    out = [0.0] * len(x)
    for s in range(rewards.numel()):
        pos = [i for i, v in enumerate(flat) if v == s]
        if not pos:
            continue
        v = [x[i] for i in pos]
        if standardize:
            m = sum(v) / len(v)
            sd = math.sqrt(sum((a - m) ** 2 for a in v) / len(v))
            v = [0.0 if sd <= 1e-6 * abs(m) else (a - m) / sd for a in v]
        v = [a / temperature for a in v]
        mx, mn = max(v), min(v)
        e = [math.exp(a - mx) for a in v]
        en = [math.exp(mn - a) for a in v]  # softmax of -x
        Rs = float(rewards[s])
        c = 1.0 / (len(v) + omega) if normalize_sum else 1.0
        for i, ei, eni in zip(pos, e, en):
            out[i] = c * (Rs + omega * Rs * ei / sum(e) - omega_neg * (1 - Rs) * eni / sum(en))
    return torch.tensor(out, dtype=torch.float64).reshape(scores.shape)


# ------------------------------------------------------------------------------------------------ #
# token_attribution
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("g_dtype,e_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_token_attribution_vs_oracle(backend, device, g_dtype, e_dtype, layout):
    shape = (3, 37, 300) if layout == "padded" else (97, 300)
    g64 = torch.randn(shape, dtype=torch.float64)
    e64 = torch.randn(shape, dtype=torch.float64)
    n64 = torch.randn(shape[-1], dtype=torch.float64)
    mask = torch.rand(shape[:-1]) > 0.25
    g, e, n = g64.to(g_dtype), e64.to(e_dtype), n64.to(e_dtype)
    oracle = ((e64 - n64) * g64).sum(-1) * mask
    dev = lambda t: t.to(device)  # noqa: E731
    out = p2t.token_attribution(dev(g), dev(e), dev(n), mask=dev(mask), backend=backend).cpu()
    ref_out = p2t.token_attribution(g, e, n, mask=mask, backend="reference")
    assert out.dtype == torch.float32
    assert (out[~mask] == 0).all()
    assert_close_to_oracle(out, ref_out, oracle, floor=2e-5 * (1 + oracle.abs().max().item()))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_token_attribution_noncontiguous_and_odd_d(backend, device):
    base_g = torch.randn(5, 2, 13, 2 * 131, device=device)
    base_e = torch.randn(13, 5, 131, device=device)
    g = base_g[:, 1, :, ::2]  # last-dim stride 2
    e = base_e.transpose(0, 1)  # [5, 13, 131], rows not contiguous
    n = torch.randn(131, device=device)
    oracle = ((e.double() - n.double()) * g.double()).sum(-1)
    out = p2t.token_attribution(g, e, n, backend=backend)
    assert out.shape == (5, 13)
    torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=1e-4, msg=lambda m: max_err_report(out, oracle))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_token_attribution_empty(backend, device):
    g = torch.randn(2, 0, 17, device=device)
    assert p2t.token_attribution(g, g, torch.randn(17, device=device), backend=backend).shape == (2, 0)
    g = torch.randn(0, 17, device=device)
    assert p2t.token_attribution(g, g, torch.randn(17, device=device), backend=backend).shape == (0,)


# ------------------------------------------------------------------------------------------------ #
# segment_redistribute
# ------------------------------------------------------------------------------------------------ #
def test_reference_matches_loop_oracle():
    ids, S = make_segments(4, 29, empty_rows=(2,))
    scores = torch.randn(4, 29, dtype=torch.float64)
    scores[0, ids[0] == 0] = 0.37  # a constant segment
    R = torch.rand(S, dtype=torch.float64)
    for st in (False, True):
        for ns in (False, True):
            for on in (0.0, 0.8):
                got = ref.segment_redistribute(scores.reshape(-1), ids.reshape(-1), R, 0.6, 0.7, st, ns, on)
                want = loop_oracle(scores, ids, R, 0.6, 0.7, st, ns, on)
                torch.testing.assert_close(got.reshape(4, 29), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("normalize", ["paper", "sum"])
def test_segment_redistribute_vs_oracle(backend, device, dtype, standardize, normalize):
    B, N = 5, 41
    ids, S = make_segments(B, N, empty_rows=(3,))
    s64 = torch.randn(B, N, dtype=torch.float64) * 2
    s64[0, ids[0] == ids[0][ids[0] >= 0][0]] = 1.5  # one constant segment (zero std)
    R64 = torch.rand(S, dtype=torch.float64) * 2 - 0.5
    T = 0.7
    scores, R = s64.to(dtype), R64.float()
    oracle = loop_oracle(s64, ids, R64, 0.6, T, standardize, normalize == "sum")
    out = p2t.segment_redistribute(scores.to(device), ids.to(device), R.to(device), omega=0.6, temperature=T,
                                   standardize=standardize, normalize=normalize, backend=backend).cpu()
    ref_out = p2t.segment_redistribute(scores, ids, R, omega=0.6, temperature=T, standardize=standardize,
                                       normalize=normalize, backend="reference")
    assert out.dtype == torch.float32 and out.shape == (B, N)
    assert (out[ids < 0] == 0).all()
    assert_close_to_oracle(out, ref_out, oracle, floor=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_segment_redistribute_packed_int32(backend, device, id_dtype):
    ids, S = make_segments(1, 203)
    ids = ids.reshape(-1).to(id_dtype)
    scores = torch.randn(203)
    R = torch.rand(S)
    oracle = loop_oracle(scores, ids.long(), R.double(), 0.6, 1.0, False, False)
    out = p2t.segment_redistribute(scores.to(device), ids.to(device), R.to(device), backend=backend).cpu()
    torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_segment_sum_normalisation_and_one_token_segments(backend, device):
    # token rewards of a segment sum to R_s with normalize="sum"; a one-token segment gets R_s(1+w)/(1+w)=R_s
    ids = torch.tensor([[0, 0, 0, -1, 1, -1, 2, 2], [3, -1, -1, -1, -1, -1, -1, -1]], device=device)
    R = torch.tensor([0.9, 0.3, -0.4, 0.25], device=device)
    scores = torch.randn(2, 8, device=device)
    out = p2t.segment_redistribute(scores, ids, R, normalize="sum", backend=backend).cpu()
    sums = torch.zeros(4).index_add_(0, ids.cpu()[ids.cpu() >= 0], out[ids.cpu() >= 0])
    torch.testing.assert_close(sums, R.cpu(), rtol=1e-6, atol=1e-6)
    paper = p2t.segment_redistribute(scores, ids, R, omega=0.6, backend=backend).cpu()
    torch.testing.assert_close(paper[0, 4], torch.tensor(0.3 * 1.6))  # one token: w = 1
    torch.testing.assert_close(paper[1, 0], torch.tensor(0.25 * 1.6))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_segment_empty(backend, device):
    out = p2t.segment_redistribute(torch.randn(0, device=device), torch.zeros(0, dtype=torch.long, device=device),
                                   torch.rand(0, device=device), backend=backend)
    assert out.shape == (0,)
    ids = torch.full((3, 5), -1, device=device)
    out = p2t.segment_redistribute(torch.randn(3, 5, device=device), ids, torch.rand(0, device=device), backend=backend)
    assert (out == 0).all()


# ------------------------------------------------------------------------------------------------ #
# group / token advantages
# ------------------------------------------------------------------------------------------------ #
def test_group_advantages_values():
    o = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    a = p2t.group_advantages(o, 4, eps=0.0)
    g = o[:4]
    torch.testing.assert_close(a[:4], (g - g.mean()) / g.std())
    assert (a[4:] == 0).all()  # zero std -> 0
    torch.testing.assert_close(p2t.group_advantages(o, 4, scale="none")[:4], g - g.mean())
    b = p2t.group_advantages(o, 4, scale="batch", eps=0.0)
    torch.testing.assert_close(b[:4], (g - g.mean()) / o.std())
    assert (p2t.group_advantages(o, 1) == 0).all() and (p2t.group_advantages(o, 1, eps=0.0) == 0).all()
    assert (p2t.group_advantages(o[:1], 1, scale="batch", eps=0.0) == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("tr_dtype", [torch.float32, torch.bfloat16])
def test_token_advantages_vs_oracle(backend, device, scale, group_size, tr_dtype):
    B, N = 6, 23
    o = torch.rand(B)
    o[3:6] = 0.4  # a constant group (zero std) when group_size = 3
    tr = torch.randn(B, N).to(tr_dtype)
    mask = torch.rand(B, N) > 0.3
    mask[1] = False  # an all-masked row
    a_hat = ref.group_advantages(o.double(), group_size, ["group", "batch", "none"].index(scale), 1e-6)
    oracle = (a_hat[:, None] + 0.3 * tr.double()) * mask
    out = p2t.token_advantages(o.to(device), tr.to(device), group_size=group_size, alpha=0.3, mask=mask.to(device),
                               scale=scale, backend=backend).cpu()
    ref_out = p2t.token_advantages(o, tr, group_size=group_size, alpha=0.3, mask=mask, scale=scale,
                                   backend="reference")
    assert (out[1] == 0).all()
    assert_close_to_oracle(out, ref_out, oracle, floor=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_token_advantages_zero_std_with_eps_zero(backend, device, scale):
    o = torch.full((6,), 0.7, device=device)  # constant rewards: zero std in every group and in the batch
    tr = torch.randn(6, 5, device=device)
    out = p2t.token_advantages(o, tr, group_size=3, alpha=0.5, eps=0.0, scale=scale, backend=backend)
    torch.testing.assert_close(out, 0.5 * tr)  # A^ = 0, never NaN
    out1 = p2t.token_advantages(torch.rand(6, device=device), tr, group_size=1, alpha=0.5, eps=0.0, backend=backend)
    torch.testing.assert_close(out1, 0.5 * tr)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("alias", [False, True])
def test_token_advantages_out(backend, device, alias):
    o = torch.rand(4, device=device)
    tr = torch.randn(4, 9, device=device)
    want = p2t.token_advantages(o, tr, group_size=2, alpha=0.5, backend="reference")
    out = tr if alias else torch.full((4, 9), float("nan"), device=device)
    got = p2t.token_advantages(o, tr, group_size=2, alpha=0.5, out=out, backend=backend)
    assert got is out
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ #
# p2t_advantages (fused)
# ------------------------------------------------------------------------------------------------ #
def _pipeline_inputs(B=6, N=33, D=70, dtype=torch.float32, device="cpu"):
    ids, S = make_segments(B, N, empty_rows=(4,))
    g64, e64 = torch.randn(B, N, D, dtype=torch.float64) * 0.1, torch.randn(B, N, D, dtype=torch.float64)
    n64 = torch.randn(D, dtype=torch.float64) * 0.1
    R = torch.rand(S, dtype=torch.float64)
    o = torch.randint(0, 2, (B,)).double()
    lengths = torch.randint(N // 2, N + 1, (B,))
    lengths[B - 1] = 0  # an empty response (all masked)
    mask = torch.arange(N)[None, :] < lengths[:, None]
    ids = torch.where(mask, ids, -1)
    return dict(g64=g64, e64=e64, n64=n64, ids=ids, R=R, o=o, mask=mask, dtype=dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("standardize,normalize,temperature", [(False, "paper", 1.0), (True, "sum", 0.5)])
def test_p2t_advantages_vs_oracle(backend, device, dtype, standardize, normalize, temperature):
    x = _pipeline_inputs(dtype=dtype)
    kw = dict(group_size=3, omega=0.6, alpha=0.7, temperature=temperature, standardize=standardize,
              normalize=normalize, scale="group")
    oracle = ref.p2t_advantages(x["g64"], x["e64"], x["n64"], x["ids"], x["R"], x["o"], x["mask"], 3, 0.6, 0.7,
                                temperature, standardize, normalize == "sum", 0, 1e-6)
    args = [t.to(dtype) for t in (x["g64"], x["e64"], x["n64"])] + [x["ids"], x["R"].float(), x["o"].float()]
    out = p2t.p2t_advantages(*[a.to(device) for a in args], mask=x["mask"].to(device), backend=backend, **kw).cpu()
    ref_out = p2t.p2t_advantages(*args, mask=x["mask"], backend="reference", **kw)
    assert out.dtype == torch.float32
    assert (out[~x["mask"]] == 0).all()
    assert_close_to_oracle(out, ref_out, oracle, floor=2e-5)
    # tokens in no segment but unmasked get exactly A^_b
    a_hat = ref.group_advantages(x["o"].float(), 3, 0, 1e-6)
    free = x["mask"] & (x["ids"] < 0)
    torch.testing.assert_close(out[free], a_hat[:, None].expand_as(out)[free])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_p2t_advantages_out_poisoned(backend, device):
    x = _pipeline_inputs()
    args = [t.float().to(device) for t in (x["g64"], x["e64"], x["n64"])] + [
        x["ids"].to(device), x["R"].float().to(device), x["o"].float().to(device)]
    out = torch.full(x["ids"].shape, float("nan"), device=device)
    got = p2t.p2t_advantages(*args, group_size=2, mask=x["mask"].to(device), out=out, backend=backend)
    want = p2t.p2t_advantages(*args, group_size=2, mask=x["mask"].to(device), backend="reference")
    assert got is out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_p2t_advantages_group_size_one_and_constant_rewards(backend, device):
    x = _pipeline_inputs()
    args = [t.float().to(device) for t in (x["g64"], x["e64"], x["n64"])] + [x["ids"].to(device),
                                                                              x["R"].float().to(device)]
    const = torch.full((6,), 0.5, device=device)
    out = p2t.p2t_advantages(*args, const, group_size=3, alpha=0.0, backend=backend)
    assert (out == 0).all()  # zero std in every group, no token term
    out1 = p2t.p2t_advantages(*args, torch.rand(6, device=device), group_size=1, alpha=1.0, backend=backend)
    tr = p2t.segment_redistribute(p2t.token_attribution(*args[:3]), args[3], args[4], backend="reference")
    torch.testing.assert_close(out1, tr, rtol=1e-5, atol=1e-5)  # group size 1: A^ = 0


# ------------------------------------------------------------------------------------------------ #
# signed redistribution: omega_neg (the blame term)
# ------------------------------------------------------------------------------------------------ #
SIGNED_OPTIONS = [(False, "paper", 1.0), (True, "sum", 0.7), (False, "sum", 1.3)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("standardize,normalize,temperature", SIGNED_OPTIONS)
def test_signed_segment_redistribute_vs_oracle(backend, device, dtype, standardize, normalize, temperature):
    """r = R_s + omega R_s softmax(x/T) - omega_neg (1 - R_s) softmax(-x/T) [/ (n_s + omega)], x standardised
    when asked, on odd shapes with one-token steps, a constant step and a row without steps."""
    B, N = 5, 41
    ids, S = make_segments(B, N, empty_rows=(3,))
    s64 = torch.randn(B, N, dtype=torch.float64) * 2
    s64[0, ids[0] == ids[0][ids[0] >= 0][0]] = 1.5  # one constant segment (zero std)
    R64 = torch.rand(S, dtype=torch.float64)  # step rewards are probabilities
    scores, R = s64.to(dtype), R64.float()
    kw = dict(omega=0.6, omega_neg=0.8, temperature=temperature, standardize=standardize, normalize=normalize)
    oracle = loop_oracle(s64.to(dtype).double(), ids, R64.float().double(), 0.6, temperature, standardize,
                         normalize == "sum", 0.8)
    out = p2t.segment_redistribute(scores.to(device), ids.to(device), R.to(device), backend=backend, **kw).cpu()
    ref_out = p2t.segment_redistribute(scores, ids, R, backend="reference", **kw)
    assert out.dtype == torch.float32 and out.shape == (B, N)
    assert (out[ids < 0] == 0).all()
    assert_close_to_oracle(out, ref_out, oracle, floor=1e-5)
    unsigned = p2t.segment_redistribute(scores, ids, R, backend="reference", **dict(kw, omega_neg=0.0))
    assert (ref_out[ids >= 0] < unsigned[ids >= 0]).any()  # the term takes something away


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_signed_sums_and_one_token_steps(backend, device):
    """normalize="sum": a step's rewards sum to R_s - omega_neg (1 - R_s) / (n_s + omega); a one-token step
    gets (R_s (1 + omega) - omega_neg (1 - R_s)) / (1 + omega); R_s = 1 leaves nothing to blame."""
    ids = torch.tensor([[0, 0, 0, -1, 1, -1, 2, 2], [3, -1, 4, 4, 4, 4, -1, -1]], device=device)
    R = torch.tensor([0.9, 0.3, 0.05, 0.25, 1.0], device=device)
    scores = torch.randn(2, 8, device=device)
    out = p2t.segment_redistribute(scores, ids, R, omega=0.6, omega_neg=0.7, normalize="sum", backend=backend).cpu()
    idc, Rc = ids.cpu(), R.cpu().double()
    n = torch.bincount(idc[idc >= 0], minlength=5).double()
    sums = torch.zeros(5, dtype=torch.float64).index_add_(0, idc[idc >= 0], out[idc >= 0].double())
    torch.testing.assert_close(sums, Rc - 0.7 * (1 - Rc) / (n + 0.6), rtol=1e-6, atol=1e-6)
    one = (0.3 * 1.6 - 0.7 * 0.7) / 1.6
    torch.testing.assert_close(out[0, 4].double(), torch.tensor(one, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    plain = p2t.segment_redistribute(scores, ids, R, omega=0.6, normalize="sum", backend=backend).cpu()
    torch.testing.assert_close(out[1, 2:6], plain[1, 2:6])  # R_s = 1


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("standardize,normalize", [(False, "paper"), (True, "sum")])
def test_signed_packed_steps_with_holes(backend, device, standardize, normalize):
    """Packed [T] int32 ids, steps with holes (the blame softmax runs over the step's set of tokens)."""
    ids, S = _holes()
    ids = ids.reshape(-1).to(torch.int32)
    scores = torch.randn(18, dtype=torch.float64)
    R = torch.rand(S, dtype=torch.float64)
    oracle = loop_oracle(scores.float().double(), ids.long(), R.float().double(), 0.6, 0.9, standardize,
                         normalize == "sum", 0.5)
    out = p2t.segment_redistribute(scores.float().to(device), ids.to(device), R.float().to(device), temperature=0.9,
                                   omega_neg=0.5, standardize=standardize, normalize=normalize, backend=backend).cpu()
    torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("standardize,normalize,temperature", SIGNED_OPTIONS[:2])
def test_signed_p2t_advantages_vs_oracle(backend, device, dtype, standardize, normalize, temperature):
    x = _pipeline_inputs(dtype=dtype)
    kw = dict(group_size=3, omega=0.6, omega_neg=0.9, alpha=0.7, temperature=temperature, standardize=standardize,
              normalize=normalize, scale="group")
    args = [t.to(dtype) for t in (x["g64"], x["e64"], x["n64"])] + [x["ids"], x["R"].float(), x["o"].float()]
    oracle = ref.p2t_advantages(*[a.double() if a.is_floating_point() else a for a in args], x["mask"], 3, 0.6, 0.7,
                                temperature, standardize, normalize == "sum", 0, 1e-6, 0.9)
    out = p2t.p2t_advantages(*[a.to(device) for a in args], mask=x["mask"].to(device), backend=backend, **kw).cpu()
    ref_out = p2t.p2t_advantages(*args, mask=x["mask"], backend="reference", **kw)
    assert (out[~x["mask"]] == 0).all()
    assert_close_to_oracle(out, ref_out, oracle, floor=2e-5)
    free = x["mask"] & (x["ids"] < 0)  # tokens in no step: A^_b, the blame term does not reach them
    a_hat = ref.group_advantages(x["o"].float(), 3, 0, 1e-6)
    torch.testing.assert_close(out[free], a_hat[:, None].expand_as(out)[free])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_omega_neg_zero_is_bitwise_unchanged(backend, device, monkeypatch):
    """omega_neg=0 gives the recorded outputs of the kernels before the signed term existed, bit for bit (the
    C++ backend with its AVX2 clone, the one that recorded them)."""
    if device != "cpu":
        pytest.skip("recorded on CPU")
    if backend == "cpu":
        if "avx2" not in p2t.ops.cpu_isas():
            pytest.skip("the outputs were recorded with the AVX2 clone, which this CPU lacks")
        monkeypatch.setenv("P2T_CPU_ISA", "avx2")
    check_golden(backend, lambda *a, **kw: p2t.segment_redistribute(*a, backend=backend, **kw),
                 lambda *a, **kw: p2t.p2t_advantages(*a, backend=backend, **kw))


# ------------------------------------------------------------------------------------------------ #
# gradients
# ------------------------------------------------------------------------------------------------ #
def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    w = torch.randn_like(out)
    return torch.autograd.grad((out * w).sum(), inputs, allow_unused=True), w


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradients_match_reference_autograd(backend, device):
    """Every backend's registered backward vs autograd through the reference's plain torch ops."""
    x = _pipeline_inputs(B=4, N=19, D=23)
    g, e, n = (x[k].float().to(device) for k in ("g64", "e64", "n64"))
    ids, mask = x["ids"][:4].to(device), x["mask"][:4].to(device)
    S = x["R"].numel()
    R, o = x["R"].float().to(device), x["o"][:4].float().to(device)
    cases = {
        "token_attribution": (lambda g_, e_, n_: p2t.token_attribution(g_, e_, n_, mask=mask, backend=backend),
                              lambda g_, e_, n_: ref.token_attribution(g_, e_, n_, mask), [g, e, n]),
        "segment_redistribute": (
            lambda s_, r_: p2t.segment_redistribute(s_, ids, r_, standardize=True, normalize="sum", temperature=0.8,
                                                    backend=backend),
            lambda s_, r_: ref.segment_redistribute(s_.reshape(-1), ids.reshape(-1), r_, 0.6, 0.8, True,
                                                    True).reshape(s_.shape),
            [torch.randn(4, 19, device=device), R]),
        "token_advantages": (
            lambda o_, t_: p2t.token_advantages(o_, t_, group_size=2, alpha=0.4, mask=mask, backend=backend),
            lambda o_, t_: ref.token_advantages(o_, t_, mask, 2, 0.4, 0, 1e-6),
            [o, torch.randn(4, 19, device=device)]),
        "p2t_advantages": (
            lambda g_, e_, n_, r_, o_: p2t.p2t_advantages(g_, e_, n_, ids, r_, o_, group_size=2, mask=mask,
                                                          standardize=True, backend=backend),
            lambda g_, e_, n_, r_, o_: ref.p2t_advantages(g_, e_, n_, ids, r_, o_, mask, 2, 0.6, 0.1, 1.0, True,
                                                          False, 0, 1e-6),
            [g, e, n, R, o]),
        "segment_redistribute signed": (
            lambda s_, r_: p2t.segment_redistribute(s_, ids, r_, omega_neg=0.7, standardize=True, normalize="sum",
                                                    temperature=0.8, backend=backend),
            lambda s_, r_: ref.segment_redistribute(s_.reshape(-1), ids.reshape(-1), r_, 0.6, 0.8, True,
                                                    True, 0.7).reshape(s_.shape),
            [torch.randn(4, 19, device=device), R]),
        "p2t_advantages signed": (
            lambda g_, e_, n_, r_, o_: p2t.p2t_advantages(g_, e_, n_, ids, r_, o_, group_size=2, mask=mask,
                                                          omega_neg=0.5, temperature=0.7, backend=backend),
            lambda g_, e_, n_, r_, o_: ref.p2t_advantages(g_, e_, n_, ids, r_, o_, mask, 2, 0.6, 0.1, 0.7, False,
                                                          False, 0, 1e-6, 0.5),
            [g, e, n, R, o]),
    }
    assert S > 0
    for name, (fused, plain, inputs) in cases.items():
        torch.manual_seed(0)
        got, _ = _grads(fused, inputs)
        torch.manual_seed(0)
        want, _ = _grads(plain, inputs)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a is not None, f"{name}: no gradient for input {i}"
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} input {i}: {m}")


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in p2t.available_backends("cpu")])
def test_gradcheck_float64(backend):
    x = _pipeline_inputs(B=2, N=7, D=5)
    ids, mask = x["ids"][:2], x["mask"][:2]
    ids[0, :3], ids[0, 3:] = 0, -1
    ids[1, :2], ids[1, 2:5], ids[1, 5:] = 1, 2, -1
    mask = torch.ones_like(mask)
    d = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    g, e, n, R, o = d(2, 7, 5), d(2, 7, 5), d(5), d(3), d(2)
    sc = d(2, 7)
    f = dict(backend=backend)
    assert torch.autograd.gradcheck(lambda a, b, c: p2t.token_attribution(a, b, c, **f), (g, e, n))
    for st in (False, True):
        assert torch.autograd.gradcheck(
            lambda s_, r_: p2t.segment_redistribute(s_, ids, r_, standardize=st, normalize="sum", **f), (sc, R))
    for st, ns in ((False, "paper"), (True, "sum")):  # the blame term
        assert torch.autograd.gradcheck(
            lambda s_, r_: p2t.segment_redistribute(s_, ids, r_, omega_neg=0.8, temperature=0.7, standardize=st,
                                                    normalize=ns, **f), (sc, R))
    for scale in ("group", "batch", "none"):
        assert torch.autograd.gradcheck(
            lambda o_, t_: p2t.token_advantages(o_, t_, group_size=2, alpha=0.3, scale=scale, **f), (o, sc))
    for on in (0.0, 0.6):
        assert torch.autograd.gradcheck(
            lambda a, b, c, r_, o_: p2t.p2t_advantages(a, b, c, ids, r_, o_, group_size=2, mask=mask,
                                                       standardize=True, omega_neg=on, **f), (g, e, n, R, o))


# ------------------------------------------------------------------------------------------------ #
# registration: opcheck, torch.compile
# ------------------------------------------------------------------------------------------------ #
def _namespaces():
    out = []
    if "cpu" in p2t.available_backends():
        out.append(("p2t", "cpu"))
    if "triton" in p2t.available_backends():
        out.append(("p2t_triton", "cuda" if torch.cuda.is_available() else "cpu"))
    if "cuda" in p2t.available_backends():
        out.append(("p2t", "cuda"))
    return out


@pytest.mark.parametrize("op", list(SPECS))
@pytest.mark.parametrize("ns,device", _namespaces())
def test_opcheck(ns, device, op):
    """Every op of the spec table in every namespace: torch.library.opcheck (schema, fake, autograd
    registration) and the value against the spec's reference forward."""
    spec = SPECS[op]
    args = sample_args(op, device, requires_grad=spec.backward is not None)
    torch.library.opcheck(getattr(getattr(torch.ops, ns), op), args)
    want = spec.reference(*args)
    if spec.mutates:
        getattr(getattr(torch.ops, ns), op)(*args)
        got = args[spec.arg_names.index(spec.mutates[0])]
    else:
        got = getattr(getattr(torch.ops, ns), op)(*args)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)


def test_spec_table_is_complete():
    for name, spec in SPECS.items():
        assert len(sample_args(name, "cpu")) == len(spec.arg_names), name
        assert set(spec.differentiable) <= set(spec.arg_names) and set(spec.mutates) <= set(spec.arg_names)
        assert (spec.backward is None) == (not spec.differentiable), name
    assert tuple(n for n, s in SPECS.items() if s.public) == p2t.ops._backends.OPS


@pytest.mark.skipif("cpu" not in p2t.available_backends(), reason="C++ extension not built")
@pytest.mark.parametrize("omega_neg", [0.0, 0.6])
def test_torch_compile_fullgraph_dynamic(omega_neg):
    torch._dynamo.reset()

    def step(g, e, n, ids, R, o, mask):
        return p2t.p2t_advantages(g, e, n, ids, R, o, group_size=2, mask=mask, validate=False, omega_neg=omega_neg,
                                  backend="cpu")

    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")  # fake-tensor tracing of fwd and bwd graphs
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for N in (13, 17, 29):  # new lengths (and segment counts) must not recompile
        x = _pipeline_inputs(B=4, N=N, D=8)
        args = [x["g64"][:4].float(), x["e64"][:4].float(), x["n64"].float(), x["ids"][:4], x["R"].float(),
                x["o"][:4].float(), x["mask"][:4]]
        torch.testing.assert_close(compiled(*args), step(*args), rtol=1e-5, atol=1e-6)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[-1] == frames[0], f"graphs compiled after each call: {frames}"


# ------------------------------------------------------------------------------------------------ #
# bad input
# ------------------------------------------------------------------------------------------------ #
def _bad_cases():
    g = torch.randn(2, 5, 4)
    ids = torch.tensor([[0, 0, 1, -1, -1], [2, 2, 2, -1, -1]])
    R, o = torch.rand(3), torch.rand(2)
    n = torch.randn(4)
    ok = dict(group_size=2)
    return [
        ("embeds", ValueError, lambda: p2t.token_attribution(g, torch.randn(2, 5, 3), n)),
        ("null_embed", ValueError, lambda: p2t.token_attribution(g, g, torch.randn(5))),
        ("grad", TypeError, lambda: p2t.token_attribution(g.long(), g, n)),
        ("grad", TypeError, lambda: p2t.token_attribution(g.numpy(), g, n)),
        ("mask", TypeError, lambda: p2t.token_attribution(g, g, n, mask=torch.ones(2, 5))),
        ("mask", ValueError, lambda: p2t.token_attribution(g, g, n, mask=torch.ones(2, 4, dtype=torch.bool))),
        ("scores", TypeError, lambda: p2t.segment_redistribute(ids, ids, R)),
        ("segment_ids", TypeError, lambda: p2t.segment_redistribute(g[..., 0], ids.float(), R)),
        ("segment_ids", ValueError, lambda: p2t.segment_redistribute(g[..., 0], ids[:, :4], R)),
        ("segment_rewards", ValueError, lambda: p2t.segment_redistribute(g[..., 0], ids, R[:2])),
        ("segment_ids", ValueError, lambda: p2t.segment_redistribute(g[..., 0], ids - 2, R)),
        ("split", ValueError, lambda: p2t.segment_redistribute(g[..., 0], torch.tensor([[0, 0, 1, 1, 2],
                                                                                        [2, -1, -1, -1, -1]]), R)),
        ("temperature", ValueError, lambda: p2t.segment_redistribute(g[..., 0], ids, R, temperature=0.0)),
        ("normalize", ValueError, lambda: p2t.segment_redistribute(g[..., 0], ids, R, normalize="mean")),
        ("omega", ValueError, lambda: p2t.segment_redistribute(g[..., 0], ids, R, omega=float("nan"))),
        ("omega_neg", ValueError, lambda: p2t.segment_redistribute(g[..., 0], ids, R, omega_neg=float("nan"))),
        ("omega_neg", ValueError, lambda: p2t.segment_redistribute(g[..., 0], ids, R, omega_neg=float("inf"))),
        ("omega_neg", ValueError, lambda: p2t.segment_redistribute(g[..., 0], ids, R, omega_neg=-0.1)),
        ("omega_neg", TypeError, lambda: p2t.segment_redistribute(g[..., 0], ids, R, omega_neg="0.5")),
        ("omega_neg", ValueError, lambda: p2t.p2t_advantages(g, g, n, ids, R, o, omega_neg=float("nan"), **ok)),
        ("omega_neg", ValueError, lambda: p2t.p2t_advantages(g, g, n, ids, R, o, omega_neg=-float("inf"), **ok)),
        ("omega_neg", ValueError, lambda: p2t.p2t_advantages(g, g, n, ids, R, o, omega_neg=-1.0, **ok)),
        ("group_size", ValueError, lambda: p2t.group_advantages(torch.rand(5), 2)),
        ("group_size", ValueError, lambda: p2t.group_advantages(torch.rand(4), 0)),
        ("scale", ValueError, lambda: p2t.group_advantages(torch.rand(4), 2, scale="std")),
        ("token_rewards", ValueError, lambda: p2t.token_advantages(o, torch.randn(3, 5), **ok)),
        ("out", ValueError, lambda: p2t.token_advantages(o, torch.randn(2, 5), out=torch.empty(2, 4), **ok)),
        ("outcome_rewards", ValueError, lambda: p2t.p2t_advantages(g, g, n, ids, R, torch.rand(4), **ok)),
        ("backend", ValueError, lambda: p2t.token_attribution(g, g, n, backend="fast")),
        ("group_size", ValueError, lambda: p2t.p2t_advantages(g, g, n, ids, R, o, group_size=3)),
        ("scale", ValueError, lambda: p2t.p2t_advantages(g, g, n, ids, R, o, scale="seq", **ok)),
        ("split", ValueError, lambda: p2t.p2t_advantages(
            g, g, n, torch.tensor([[0, 0, 1, -1, 2], [2, 2, 2, -1, -1]]), R, o,
            mask=torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool), **ok)),
        ("segment_ids", ValueError, lambda: p2t.process_token_rewards(ids + 1, R)),
        ("segment_ids", ValueError, lambda: p2t.process_token_rewards(ids - 2, R)),
        ("segment_ids", ValueError, lambda: p2t.process_token_rewards(ids, R[:0])),
        ("split", ValueError, lambda: p2t.process_token_rewards(torch.tensor([[0, 0, 1, 1, 2], [2, -1, -1, -1, -1]]),
                                                                R)),
        ("validate", TypeError, lambda: p2t.process_token_rewards(ids, R, validate=1)),
    ]


@pytest.mark.parametrize("arg,exc,call", _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_names_argument(arg, exc, call):
    with pytest.raises(exc, match=arg):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_devices_rejected():
    g = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="embeds"):
        p2t.token_attribution(g, g.cuda(), torch.randn(4))


def test_mixed_devices_rejected_meta():
    g = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="embeds"):
        p2t.token_attribution(g, g.to("meta"), torch.randn(4))


def test_unavailable_backend_says_how_to_get_it():
    missing = [b for b in ("cuda", "triton", "cpu") if b not in p2t.available_backends()]
    g = torch.randn(2, 3, 4)
    for b in missing:
        with pytest.raises(RuntimeError, match="To get it"):
            p2t.token_attribution(g, g, torch.randn(4), backend=b)
    if "cuda" in p2t.available_backends() or "cpu" in p2t.available_backends():
        wrong = "cuda" if "cpu" in p2t.available_backends("cpu") and "cuda" in p2t.available_backends() else None
        if wrong:
            with pytest.raises(ValueError, match="runs on"):
                p2t.token_attribution(g, g, torch.randn(4), backend=wrong)


@pytest.mark.parametrize("backend,device", [p for p in FUSED if p.values[0] in ("cpu", "cuda")])
def test_large_inputs_split_over_threads(backend, device):
    """Sizes above the kernels' per-thread chunks: runs that cross chunk boundaries, many rows."""
    torch.set_num_threads(2)
    ids, S = make_segments(3, 5003, max_len=700, gen=torch.Generator().manual_seed(3))
    scores = torch.randn(3, 5003)
    R = torch.rand(S)
    for standardize in (False, True):
        got = p2t.segment_redistribute(scores.to(device), ids.to(device), R.to(device), standardize=standardize,
                                       backend=backend).cpu()
        want = ref.segment_redistribute(scores.reshape(-1), ids.reshape(-1), R, 0.6, 1.0, standardize,
                                        False).reshape(3, 5003)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g, e = torch.randn(3, 5003, 9, device=device), torch.randn(3, 5003, 9, device=device)
    n = torch.randn(9, device=device)
    o = torch.rand(3, device=device)
    got = p2t.p2t_advantages(g, e, n, ids.to(device), R.to(device), o, group_size=3, backend=backend)
    want = p2t.p2t_advantages(g, e, n, ids.to(device), R.to(device), o, group_size=3, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_process_token_rewards():
    ids = torch.tensor([[0, 0, -1, 1], [2, -1, -1, -1]])
    R = torch.tensor([0.2, 0.7, 0.9], requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = p2t.process_token_rewards(ids, R, mask=mask)
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.2, 0.0, 0.0], [0.9, 0.0, 0.0, 0.0]]))
    out.sum().backward()
    torch.testing.assert_close(R.grad, torch.tensor([2.0, 0.0, 1.0]))
    assert (p2t.process_token_rewards(torch.full((2, 3), -1), torch.zeros(0)) == 0).all()
    with pytest.raises(TypeError, match="segment_ids"):
        p2t.process_token_rewards(ids.float(), R)


# ------------------------------------------------------------------------------------------------ #
# defined semantics of the corner cases (constant groups, steps with holes, out= and autograd, D = 0)
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_group_gets_zero_advantage(backend, device, scale, eps, dtype):
    """A group of equal rewards (0.9: its rounded mean is not 0.9) gets A^ = 0 exactly, for every scale;
    so does a group equal up to an ulp. The other group keeps its usual advantage."""
    o = torch.tensor([0.9, 0.9, 0.9, 0.1, 0.7, 0.3], dtype=dtype)
    if dtype == torch.float32:
        o[1] = torch.nextafter(o[1], torch.tensor(1.0))  # one ulp off: still constant
    want = ref.group_advantages(o, 3, ["group", "batch", "none"].index(scale), eps).double()
    assert (want[:3] == 0).all()
    assert (p2t.group_advantages(o, 3, scale=scale, eps=eps)[:3] == 0).all()
    tr = torch.randn(6, 5, dtype=dtype)
    out = p2t.token_advantages(o.to(device), tr.to(device), group_size=3, alpha=0.0, scale=scale, eps=eps,
                               backend=backend).cpu()
    assert (out[:3] == 0).all(), out[:3]
    torch.testing.assert_close(out[3:, 0].double(), want[3:], rtol=1e-5, atol=1e-6)
    g = torch.randn(6, 4, 3, dtype=dtype)
    ids = torch.full((6, 4), -1)
    adv = p2t.p2t_advantages(g.to(device), g.to(device), torch.zeros(3, dtype=dtype, device=device), ids.to(device),
                             torch.zeros(0, dtype=dtype, device=device), o.to(device), group_size=3, scale=scale,
                             eps=eps, backend=backend).cpu()
    assert (adv[:3] == 0).all(), adv[:3]
    torch.testing.assert_close(adv[3:, 0].double(), want[3:], rtol=1e-5, atol=1e-6)


def test_constant_batch_gets_zero_advantage():
    o = torch.full((6,), 0.3)
    for scale in ("group", "batch", "none"):
        assert (p2t.group_advantages(o, 2, scale=scale, eps=0.0) == 0).all()
        assert (p2t.group_advantages(o, 6, scale=scale) == 0).all()


def test_constant_group_gradient_is_zero():
    o = torch.tensor([0.9, 0.9, 0.9, 0.1, 0.7, 0.3], requires_grad=True)
    for scale in (0, 1, 2):
        w = torch.randn(6)
        (d,) = torch.autograd.grad((ref.group_advantages(o, 3, scale) * w).sum(), o)
        d2 = ref.group_advantages_backward(w, o, 3, scale)
        torch.testing.assert_close(d2, d)
        if scale != 1:
            assert (d[:3] == 0).all()


def _holes():
    """Two rows with steps split by holes (a tool call, a masked span) and one contiguous step."""
    ids = torch.tensor([[0, 0, -1, 0, 0, 1, 1, -1, 0],
                        [2, -1, 3, 3, 2, 2, -1, 3, -1]])
    return ids, 4


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("standardize,normalize", [(False, "paper"), (True, "sum")])
@pytest.mark.parametrize("validate", [True, False])
def test_segment_with_holes_is_one_set(backend, device, standardize, normalize, validate):
    """A step is the set of its tokens: [0, 0, -1, 0, 0] is one segment of four tokens (softmax over all
    four, sum-normalised over four), on every backend, with or without validation."""
    ids, S = _holes()
    scores = torch.randn(2, 9, dtype=torch.float64)
    R = torch.rand(S, dtype=torch.float64) + 0.5
    oracle = loop_oracle(scores, ids, R, 0.6, 0.9, standardize, normalize == "sum")
    out = p2t.segment_redistribute(scores.float().to(device), ids.to(device), R.float().to(device),
                                   temperature=0.9, standardize=standardize, normalize=normalize,
                                   validate=validate, backend=backend).cpu()
    torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=1e-6)
    if normalize == "sum":
        sums = torch.zeros(S, dtype=torch.float64).index_add_(0, ids[ids >= 0], out.double()[ids >= 0])
        torch.testing.assert_close(sums, R, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_p2t_advantages_with_holes_poisoned_out(backend, device):
    """Masked tokens inside a step (and ids with holes) leave no token unwritten: out is poisoned with NaN."""
    ids, S = _holes()
    gen = torch.Generator().manual_seed(11)
    g, e = torch.randn(2, 9, 6, generator=gen), torch.randn(2, 9, 6, generator=gen)
    n, R, o = torch.randn(6, generator=gen), torch.rand(S, generator=gen), torch.rand(2, generator=gen)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 3] = False  # a hole inside step 3
    dev = [t.to(device) for t in (g, e, n, ids, R, o)]
    out = torch.full((2, 9), float("nan"), device=device)
    p2t.p2t_advantages(*dev, group_size=1, mask=mask.to(device), out=out, validate=False, backend=backend)
    oracle = ref.p2t_advantages(g.double(), e.double(), n.double(), ids, R.double(), o.double(), mask, 1)
    torch.testing.assert_close(out.cpu().double(), oracle, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_of_range_int64_ids_do_not_alias(backend, device):
    """With validate=False an id outside [0, S) is in no segment; 2**32 must not wrap to segment 0."""
    ids = torch.tensor([0, 2**32, 1, 2**31 + 1, 0, -(2**32)])
    scores, R = torch.randn(6), torch.tensor([1.0, 2.0])
    out = p2t.segment_redistribute(scores.to(device), ids.to(device), R.to(device), validate=False,
                                   backend=backend).cpu()
    want = loop_oracle(scores, torch.tensor([0, -1, 1, -1, 0, -1]), R.double(), 0.6, 1.0, False, False)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_refuses_autograd(backend, device):
    """out= is not differentiable on any backend (as torch's own out= ops): a clear error naming out
    when an input requires grad under grad mode; fine under no_grad or without grad."""
    o = torch.rand(4, device=device, requires_grad=True)
    tr = torch.randn(4, 3, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="out="):
        p2t.token_advantages(o, tr, group_size=2, out=torch.empty(4, 3, device=device), backend=backend)
    g = torch.randn(4, 3, 5, device=device, requires_grad=True)
    ids = torch.tensor([[0, 0, -1]] * 4, device=device) + torch.arange(4, device=device)[:, None]
    ids = torch.where(ids < torch.arange(4, device=device)[:, None], -1, ids)
    args = (g, g.detach(), torch.zeros(5, device=device), ids, torch.rand(4, device=device), o.detach())
    with pytest.raises(ValueError, match="out=.*grad"):
        p2t.p2t_advantages(*args, group_size=2, out=torch.empty(4, 3, device=device), backend=backend)
    with torch.no_grad():
        out = p2t.token_advantages(o, tr, group_size=2, out=torch.empty(4, 3, device=device), backend=backend)
        p2t.p2t_advantages(*args, group_size=2, out=torch.empty(4, 3, device=device), backend=backend)
    torch.testing.assert_close(out, p2t.token_advantages(o, tr, group_size=2, backend="reference").detach())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_token_attribution_zero_hidden_size(backend, device):
    g = torch.randn(3, 4, 0, device=device, requires_grad=True)
    out = p2t.token_attribution(g, g.detach(), torch.randn(0, device=device), backend=backend)
    assert out.shape == (3, 4) and out.dtype == torch.float32 and (out == 0).all()
    out.sum().backward()
    assert g.grad.shape == g.shape
    assert p2t.token_attribution(torch.randn(5, 0, device=device), torch.randn(5, 0, device=device),
                                 torch.randn(0, device=device), mask=torch.ones(5, dtype=torch.bool, device=device),
                                 backend=backend).shape == (5,)


def test_process_token_rewards_shares_segment_checks():
    ids = torch.tensor([[0, 0, -1, 1], [2, -1, 2, -1]])  # step 2 has a hole: fine
    R = torch.tensor([0.2, 0.7, 0.9])
    torch.testing.assert_close(p2t.process_token_rewards(ids, R),
                               torch.tensor([[0.2, 0.2, 0.0, 0.7], [0.9, 0.0, 0.9, 0.0]]))
    # masked tokens are in no step (a step crossing rows only through masked tokens is fine)
    crossing = torch.tensor([[0, 0, 1, 2], [2, -1, -1, -1]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    torch.testing.assert_close(p2t.process_token_rewards(crossing, R, mask=mask),
                               torch.tensor([[0.2, 0.2, 0.7, 0.0], [0.9, 0.0, 0.0, 0.0]]))
    # validate=False: ids outside [0, S) are in no step, never an IndexError
    torch.testing.assert_close(p2t.process_token_rewards(torch.tensor([0, 3, -2, 2]), R, validate=False),
                               torch.tensor([0.2, 0.0, 0.0, 0.9]))


# ------------------------------------------------------------------------------------------------ #
# the ISA clones of the C++ CPU kernels (csrc/cpu_isa.h): each one against the reference, on this CPU
# ------------------------------------------------------------------------------------------------ #
CPU_ISAS = ["default", "avx2", "avx512"]


def _use_isa(monkeypatch, isa):
    if "cpu" not in p2t.available_backends():
        pytest.skip("C++ extension not built")
    if isa not in p2t.ops.cpu_isas():
        pytest.skip(f"this CPU (or build) has no {isa} clone: it has {p2t.ops.cpu_isas()}")
    monkeypatch.setenv("P2T_CPU_ISA", isa)
    assert p2t.ops.cpu_isa() == isa


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_isa_clone_attribution(isa, monkeypatch):
    """Every dtype path of the attribution (fp32, bf16 and fp16 with null in their dtype, fp64, mixed), D below,
    at and above the vector widths, odd D, strided rows, masks: the clone vs the float64 oracle, within 2x the
    reference's own error."""
    _use_isa(monkeypatch, isa)
    gen = torch.Generator().manual_seed(5)
    for D in (1, 7, 16, 33, 1000, 1531):
        for gd, ed in [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.float64,) * 2,
                       (torch.bfloat16, torch.float32)]:
            g64, e64 = torch.randn(37, D, generator=gen, dtype=torch.float64), torch.randn(37, D, generator=gen,
                                                                                          dtype=torch.float64)
            n64 = torch.randn(D, generator=gen, dtype=torch.float64)
            g, e, n = g64.to(gd), e64.to(ed), n64.to(ed)
            mask = torch.rand(37, generator=gen) > 0.2
            oracle = ((e.double() - n.double()) * g.double()).sum(-1) * mask
            out = p2t.token_attribution(g, e, n, mask=mask, backend="cpu")
            ref_out = p2t.token_attribution(g, e, n, mask=mask, backend="reference")
            assert (out[~mask] == 0).all()
            assert_close_to_oracle(out, ref_out, oracle, floor=2e-6 * (1 + oracle.abs().max().item()))
    base = torch.randn(9, 2, 301, generator=gen)
    g, e = base[:, 0], base[:, 1] * 0.5  # rows 602 floats apart
    n = torch.randn(301, generator=gen)
    torch.testing.assert_close(p2t.token_attribution(g, e, n, backend="cpu").double(),
                               ((e.double() - n.double()) * g.double()).sum(-1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_isa_clone_segments_and_fused(isa, monkeypatch):
    """The segment passes, the advantage loop and the fused op through the clone: against the oracle, and the
    segment / advantage results bit for bit those of the portable clone (the same scalar arithmetic)."""
    _use_isa(monkeypatch, isa)
    x = _pipeline_inputs(B=6, N=33, D=70)
    ids, S = make_segments(3, 5003, max_len=700, gen=torch.Generator().manual_seed(3))  # runs over chunks
    scores, R = torch.randn(3, 5003), torch.rand(S)
    o, tr = torch.rand(6), torch.randn(6, 33).to(torch.bfloat16)
    for on in (0.0, 0.7):
        for st, ns in ((False, "paper"), (True, "sum")):
            kw = dict(omega_neg=on, standardize=st, normalize=ns, temperature=0.8)
            seg = p2t.segment_redistribute(scores, ids, R, backend="cpu", **kw)
            torch.testing.assert_close(seg.double(), loop_oracle(scores, ids, R.double(), 0.6, 0.8, st, ns == "sum",
                                                                 on), rtol=1e-5, atol=1e-6)
            args = [x[k].float() for k in ("g64", "e64", "n64")] + [x["ids"], x["R"].float(), x["o"].float()]
            pk = dict(kw, group_size=3, alpha=0.4, mask=x["mask"])
            fused = p2t.p2t_advantages(*args, backend="cpu", **pk)
            torch.testing.assert_close(fused, p2t.p2t_advantages(*args, backend="reference", **pk), rtol=1e-5,
                                       atol=1e-5)
            adv = p2t.token_advantages(o, tr, group_size=3, alpha=0.3, mask=x["mask"], backend="cpu")
            monkeypatch.setenv("P2T_CPU_ISA", "default")
            assert torch.equal(seg, p2t.segment_redistribute(scores, ids, R, backend="cpu", **kw))
            assert torch.equal(adv, p2t.token_advantages(o, tr, group_size=3, alpha=0.3, mask=x["mask"],
                                                         backend="cpu"))
            monkeypatch.setenv("P2T_CPU_ISA", isa)


def test_cpu_isa_choice_and_errors(monkeypatch):
    if "cpu" not in p2t.available_backends():
        pytest.skip("C++ extension not built")
    have = p2t.ops.cpu_isas()
    assert have[0] == "default" and set(have) <= set(CPU_ISAS)
    for unset in ("", "auto"):
        monkeypatch.setenv("P2T_CPU_ISA", unset)
        assert p2t.ops.cpu_isa() == have[-1]  # the best one
    g = torch.randn(3, 8)
    monkeypatch.setenv("P2T_CPU_ISA", "sse2")
    with pytest.raises(RuntimeError, match="P2T_CPU_ISA must be auto, default, avx2 or avx512"):
        p2t.token_attribution(g, g, torch.zeros(8), backend="cpu")
    missing = [i for i in CPU_ISAS if i not in have]
    if missing:
        monkeypatch.setenv("P2T_CPU_ISA", missing[0])
        with pytest.raises(RuntimeError, match="no .* clone"):
            p2t.token_attribution(g, g, torch.zeros(8), backend="cpu")


@pytest.mark.skipif("cpu" not in p2t.available_backends() or not hasattr(__import__("os"), "fork"),
                    reason="C++ extension not built, or no fork")
def test_cpu_kernels_in_a_forked_child():
    """The C++ kernels' thread pool (csrc/parallel.h) started in the parent; a forked child (a data-loader
    worker) gets its own pool instead of waiting for threads that do not exist there."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import os, torch, p2t
        torch.set_num_threads(2)
        g = torch.randn(64, 4096)
        want = p2t.token_attribution(g, g, torch.zeros(4096), backend="cpu")
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(2)
            got = p2t.token_attribution(g, g, torch.zeros(4096), backend="cpu")
            os._exit(0 if torch.equal(got, want) else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "child 0" in r.stdout, r.stdout + r.stderr[-2000:]


def _run_cpu_script(code, env_extra=None, timeout=300):
    import subprocess
    import sys
    import textwrap
    env = dict(__import__("os").environ, **(env_extra or {}))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    return r.stdout


@pytest.mark.skipif("cpu" not in p2t.available_backends(), reason="C++ extension not built")
@pytest.mark.parametrize("adaptive", ["0", "1"])
def test_cpu_pool_scheduling_paths(adaptive):
    """The C++ kernels' pool (csrc/parallel.h) gives results bitwise equal to one thread on every path:
    jobs just below / at / above the smallest pooled job (8 tasks), many tasks, several Python threads calling
    at once (the pool is held by one, the others run inline), fp32 / bf16 / fp64, masks; with the
    busy-core check off (the pool always runs) and on."""
    out = _run_cpu_script("""
        import threading, torch, p2t
        g = torch.Generator().manual_seed(0)
        cases = []
        # fp32 D=1024: 8 KB per row, 16 rows per task -> 112 rows = 7 tasks (inline), 113 = 8 tasks, 128 = 8
        for R, D, dt in [(112, 1024, torch.float32), (113, 1024, torch.float32), (128, 1024, torch.float32),
                         (20011, 3, torch.float32), (3001, 129, torch.bfloat16), (777, 517, torch.float64),
                         (5, 100000, torch.float32)]:
            x = [torch.randn(R, D, generator=g).to(dt) for _ in range(2)] + [torch.randn(D, generator=g).to(dt)]
            m = torch.rand(R, generator=g) > 0.3
            cases.append((x, m))
        torch.set_num_threads(1)
        want = [(p2t.token_attribution(*x, backend="cpu"), p2t.token_attribution(*x, mask=m, backend="cpu"))
                for x, m in cases]
        ref = [p2t.token_attribution(*[t.double() for t in x], backend="reference") for x, _ in cases]
        for (w, _), r, (x, _) in zip(want, ref, cases):
            assert torch.allclose(w.double(), r, rtol=1e-4, atol=1e-3 * x[0].shape[1] ** 0.5), (w - r).abs().max()
        torch.set_num_threads(2)
        bad = []
        def check(rep):
            for _ in range(rep):
                for (x, m), (w, wm) in zip(cases, want):
                    if not torch.equal(p2t.token_attribution(*x, backend="cpu"), w):
                        bad.append(x[0].shape)
                    if not torch.equal(p2t.token_attribution(*x, mask=m, backend="cpu"), wm):
                        bad.append(("mask", x[0].shape))
        check(3)
        ts = [threading.Thread(target=check, args=(5,)) for _ in range(4)]
        for t in ts: t.start()
        for t in ts: t.join()
        assert not bad, bad
        print("ok")
    """, {"P2T_CPU_ADAPTIVE_THREADS": adaptive})
    assert "ok" in out


@pytest.mark.skipif("cpu" not in p2t.available_backends() or not __import__("sys").platform.startswith("linux")
                    or len(__import__("os").sched_getaffinity(0)) < 2,
                    reason="C++ extension not built, not Linux (/proc), or a single CPU")
@pytest.mark.parametrize("runnable,adaptive,worker", [
    ("one", "1", True),     # only the caller runs: 2 threads
    ("cores", "1", False),  # cores - 1 other threads run: one core is free, the caller's; no worker
    ("over", "1", True),    # every core is shared already: the threads asked for
    ("cores", "0", True),   # the check off
])
def test_cpu_pool_threads_follow_the_runnable_count(tmp_path, runnable, adaptive, worker):
    """The pool's thread count from the machine's runnable threads (a file in /proc/loadavg's format stands
    in for it): a pool worker is started, or not, and the result is the same."""
    import os
    cpus = os.cpu_count()
    r = {"one": 1, "cores": cpus, "over": 2 * cpus + 1}[runnable]
    fake = tmp_path / "loadavg"
    fake.write_text(f"0.00 0.00 0.00 {r}/100 12345\n")
    out = _run_cpu_script("""
        import os, torch, p2t
        g, e, n = torch.randn(4096, 1000), torch.randn(4096, 1000), torch.randn(1000)
        torch.set_num_threads(1)
        want = p2t.token_attribution(g, e, n, backend="cpu")
        torch.set_num_threads(2)
        before = len(os.listdir("/proc/self/task"))
        for _ in range(5):
            assert torch.equal(p2t.token_attribution(g, e, n, backend="cpu"), want)
        print("new threads", len(os.listdir("/proc/self/task")) - before)
    """, {"P2T_CPU_ADAPTIVE_THREADS": adaptive, "P2T_CPU_LOADAVG": str(fake)})
    assert f"new threads {int(worker)}" in out, out
