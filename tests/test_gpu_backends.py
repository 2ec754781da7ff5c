"""Tests specific to the GPU backends ("triton" from p2t_kernels, "cuda" from csrc/cuda): the paths
the generic suite (test_ops.py) does not reach — multi-block segments and rows, stale run bounds,
vector vs scalar loads, mixed dtypes, direct op calls, no recompilation for a new length — and, on a
GPU, the cuda and triton backends against the reference and a float64 oracle at larger shapes.

Without a GPU, the CUDA kernels still run: csrc/cuda/p2t_cuda.cu is compiled for the host against
csrc/cuda/host_emulation.h (a thread per CUDA thread, barriers for __syncthreads and warp shuffles) and
its ops, in the namespace p2t_cuda_emulated, join the tests as the backend "cuda-emulated". That checks
the kernels' indexing, reductions and dtype handling, not CUDA itself (memory model, launch limits), and
every Triton kernel variant is compiled for sm_90 ahead of time (test_triton_kernels_compile_for_sm90).

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET=1 must be set before
triton is first imported. tests/conftest.py sets it; the lines below do the same when this module is
imported on its own.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import p2t  # noqa: E402
from p2t.ops import _backends, reference as ref  # noqa: E402
from p2t.ops._spec import SPECS  # noqa: E402
from _op_helpers import _err, check, check_golden, oracle_p2t, pipeline, segments  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATED = "cuda-emulated"  # csrc/cuda/p2t_cuda.cu compiled for the host (host_emulation.h), on CPU tensors


def _params():
    out = []
    if "triton" in p2t.available_backends("cpu"):
        out.append(pytest.param("triton", "cpu", id="triton-cpu"))
    if not torch.cuda.is_available():
        out.append(pytest.param(EMULATED, "cpu", id="cuda-emulated-cpu"))
    else:
        for name in ("triton", "cuda"):
            if name in p2t.available_backends("cuda"):
                out.append(pytest.param(name, "cuda", id=f"{name}-cuda"))
    return out


GPU_BACKENDS = _params()


_EMULATED_OPS = []


def _emulated_ops():
    """Build (once; cached by torch's extension builder) and load the host emulation of the CUDA kernels:
    the op namespace p2t_cuda_emulated with the schemas of the p2t ops, CPU tensors."""
    if _EMULATED_OPS:
        return _EMULATED_OPS[0]
    import hashlib
    import shutil
    from torch.utils.cpp_extension import is_ninja_available, load_inline
    if (shutil.which("c++") is None and shutil.which("g++") is None) or not is_ninja_available():
        pytest.skip("the host emulation of the CUDA kernels needs a C++ compiler and ninja")
    from p2t.ops._custom import register_meta
    srcs = [os.path.join(ROOT, "csrc", "cuda", f) for f in ("p2t_cuda.cu", "host_emulation.h")]
    srcs += [os.path.join(ROOT, "csrc", f) for f in ("common.h", "schemas.h")]
    digest = hashlib.sha1(b"".join(open(f, "rb").read() for f in srcs)).hexdigest()[:12]
    load_inline(name="p2t_cuda_emulated", is_python_module=False, verbose=False,
                cpp_sources=[f"// sources {digest}\n#define P2T_HOST_EMULATION\n#include \"p2t_cuda.cu\"\n"],
                extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cuda")],
                extra_cflags=["-O1", "-pthread"], extra_ldflags=["-pthread"])
    register_meta("p2t_cuda_emulated")
    _EMULATED_OPS.append(torch.ops.p2t_cuda_emulated)
    return _EMULATED_OPS[0]


class _Emulated:
    """The public API's normalisation (as p2t.ops does) in front of the emulated CUDA ops."""

    def __init__(self):
        self.ops = _emulated_ops()

    def token_attribution(self, g, e, n, *, mask=None):
        D = g.shape[-1]
        out = self.ops.token_attribution(g.reshape(-1, D), e.reshape(-1, D), n,
                                         None if mask is None else mask.reshape(-1))
        return out.reshape(g.shape[:-1])

    def segment_redistribute(self, scores, ids, R, *, omega=0.6, temperature=1.0, standardize=False,
                             normalize="paper", validate=True, omega_neg=0.0):
        return self.ops.segment_redistribute(scores.reshape(-1), ids.reshape(-1), R, omega, temperature, standardize,
                                             normalize == "sum", omega_neg).reshape(scores.shape)

    def token_advantages(self, o, tr, *, group_size, alpha=0.1, mask=None, scale="group", eps=1e-6, out=None):
        s = ("group", "batch", "none").index(scale)
        if out is None:
            return self.ops.token_advantages(o, tr, mask, group_size, alpha, s, eps)
        self.ops.token_advantages_out(o, tr, mask, group_size, alpha, s, eps, out)
        return out

    def p2t_advantages(self, g, e, n, ids, R, o, *, group_size, omega=0.6, alpha=0.1, temperature=1.0,
                       standardize=False, normalize="paper", mask=None, scale="group", eps=1e-6, out=None,
                       validate=True, omega_neg=0.0):
        args = (g, e, n, ids, R, o, mask, group_size, omega, alpha, temperature, standardize, normalize == "sum",
                ("group", "batch", "none").index(scale), eps, omega_neg)
        if out is None:
            return self.ops.p2t_advantages(*args)
        self.ops.p2t_advantages_out(*args, out)
        return out


class _Public:
    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        fn = getattr(p2t, name)
        return lambda *a, **kw: fn(*a, backend=self.backend, **kw)


def api(backend):
    """The public ops for one backend (``backend=...``), or the emulated CUDA kernels behind the same API."""
    return _Emulated() if backend == EMULATED else _Public(backend)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


# ------------------------------------------------------------------------------------------------ #
# attribution: vector and scalar paths, mixed dtypes, offsets
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32, torch.float16),
                                    (torch.float16, torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float16, torch.bfloat16),
                                    (torch.float64, torch.float64, torch.float64),
                                    (torch.float64, torch.float32, torch.float64),
                                    (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # null read as bf16
                                    (torch.float16, torch.float16, torch.float16)])
@pytest.mark.parametrize("D", [256, 300, 37])
def test_attribution_mixed_dtypes(backend, device, dtypes, D):
    gd, ed, nd = dtypes
    gen = torch.Generator().manual_seed(D)
    g = torch.randn(3, 37, D, generator=gen).to(device, gd)
    e = torch.randn(3, 37, D, generator=gen).to(device, ed)
    n = torch.randn(D, generator=gen).to(device, nd)
    mask = (torch.rand(3, 37, generator=gen) > 0.3).to(device)
    out = api(backend).token_attribution(g, e, n, mask=mask)
    want_dtype = torch.float64 if all(d == torch.float64 for d in dtypes) else torch.float32
    assert out.dtype == want_dtype
    oracle = ref.token_attribution(g.double(), e.double(), n.double(), mask)
    check(out, p2t.token_attribution(g, e, n, mask=mask, backend="reference"), oracle)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_attribution_misaligned_and_strided_rows(backend, device):
    """Views whose base is 1 element off (no 16-byte loads), rows with padding, a transposed copy."""
    D = 64
    base = torch.randn(2 * 29 * D + 1, device=device, dtype=torch.bfloat16)
    g = base[1:].view(2, 29, D)  # misaligned by 2 bytes
    big = torch.randn(2, 29, D + 8, device=device, dtype=torch.bfloat16)
    e = big[..., 3:3 + D]  # row stride D + 8, misaligned start
    n = torch.randn(D + 1, device=device)[1:]
    t = torch.randn(D, 2, 29, device=device).permute(1, 2, 0)  # last dim strided
    oracle = ref.token_attribution(g.double(), e.double(), n.double())
    check(api(backend).token_attribution(g, e, n), p2t.token_attribution(g, e, n, backend="reference"),
          oracle)
    oracle = ref.token_attribution(g.double(), t.double(), n.double())
    check(api(backend).token_attribution(g, t, n), p2t.token_attribution(g, t, n, backend="reference"),
          oracle)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("D,offset", [(131, 0), (131, 1), (33, 3), (64, 1)])
def test_attribution_odd_d_and_shifted_rows(backend, device, dtype, D, offset):
    """Odd D and rows that start inside a 16-byte block (the same offset in grad and embeds): the CUDA
    kernel reads them as aligned vectors with masked head and tail; values as the oracle, masked rows 0,
    and the fused pipeline on the same layout."""
    gen = torch.Generator().manual_seed(D + offset)
    B, N = 3, 7
    base_g = torch.randn(B * N * D + offset, generator=gen).to(device, dtype)
    base_e = torch.randn(B * N * D + offset, generator=gen).to(device, dtype)
    g, e = base_g[offset:].view(B, N, D), base_e[offset:].view(B, N, D)
    n = torch.randn(D, generator=gen).to(device, dtype)
    mask = (torch.rand(B, N, generator=gen) > 0.3).to(device)
    out = api(backend).token_attribution(g, e, n, mask=mask)
    oracle = ref.token_attribution(g.double(), e.double(), n.double(), mask)
    check(out, p2t.token_attribution(g, e, n, mask=mask, backend="reference"), oracle)
    assert (out[~mask] == 0).all()
    ids, S = segments(B, N, [2, 3], device=device)
    R, o = torch.randn(S, generator=gen).to(device), torch.randn(B, generator=gen).to(device)
    got = api(backend).p2t_advantages(g, e, n, ids, R, o, group_size=1, mask=mask)
    check(got, p2t.p2t_advantages(g, e, n, ids, R, o, group_size=1, mask=mask, backend="reference"),
          oracle_p2t(g, e, n, ids, R, o, mask, 1))


# ------------------------------------------------------------------------------------------------ #
# segments: long runs (several blocks), long rows (several fill chunks), stale bounds, ids >= S
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("standardize,normalize,temperature,omega_neg", [(False, "paper", 0.7, 0.0),
                                                                         (True, "sum", 1.3, 0.0),
                                                                         (False, "sum", 0.7, 0.8),
                                                                         (True, "paper", 1.3, 0.5)])
def test_segment_long_runs_and_rows(backend, device, standardize, normalize, temperature, omega_neg):
    # rows of 4500 tokens (> the fill chunk), runs of 1..700 tokens (> the segment block)
    ids, S = segments(2, 4500, [700, 1, 3, 261, 1, 513], gaps=2, first=1, device=device)
    scores = 3 * torch.randn(2, 4500, device=device)
    scores[0, 705:708] = 0.25  # a constant 3-token segment: zero std
    R = torch.randn(S, device=device)
    kw = dict(omega=0.6, temperature=temperature, standardize=standardize, normalize=normalize, omega_neg=omega_neg)
    out = api(backend).segment_redistribute(scores, ids, R, **kw)
    oracle = ref.segment_redistribute(scores.double().reshape(-1), ids.reshape(-1), R.double(), 0.6, temperature,
                                      standardize, normalize == "sum", omega_neg).reshape(2, 4500)
    check(out, p2t.segment_redistribute(scores, ids, R, backend="reference", **kw), oracle)
    assert (out[ids < 0] == 0).all()


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_segment_stale_bounds_and_out_of_range_ids(backend, device):
    """A second call where most segments have no token (their run bounds are stale memory of the
    first call) and some ids are >= S (treated like -1 when validation is off)."""
    ids, S = segments(3, 57, [4, 1, 7], device=device)
    R = torch.randn(S, device=device)
    x = torch.randn(3, 57, device=device)
    api(backend).segment_redistribute(x, ids, R)
    ids2 = ids.clone()
    ids2[ids2 % 3 != 0] = -1  # two thirds of the segments vanish
    ids2[2, 40:45] = S + 5  # out of range
    out = api(backend).segment_redistribute(x, ids2, R, validate=False)
    ids_ref = torch.where(ids2 >= S, torch.full_like(ids2, -1), ids2)
    oracle = ref.segment_redistribute(x.double().reshape(-1), ids_ref.reshape(-1), R.double()).reshape(3, 57)
    check(out, ref.segment_redistribute(x.reshape(-1), ids_ref.reshape(-1), R).reshape(3, 57), oracle)
    assert (out[2, 40:45] == 0).all()


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_segment_extreme_scores_no_overflow(backend, device):
    """Softmax shift by the segment max: scores of 1e4 in one segment and -1e4 in the next."""
    ids, S = segments(1, 40, [5, 6], device=device)
    x = torch.where(ids % 2 == 0, 1e4, -1e4).float() + torch.randn(1, 40, device=device)
    R = torch.randn(S, device=device)
    out = api(backend).segment_redistribute(x, ids, R, temperature=0.1)
    oracle = ref.segment_redistribute(x.double().reshape(-1), ids.reshape(-1), R.double(), 0.6, 0.1).reshape(1, 40)
    check(out, ref.segment_redistribute(x.reshape(-1), ids.reshape(-1), R, 0.6, 0.1).reshape(1, 40), oracle)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_segments_with_holes_issue_ids(backend, device):
    """ids [0, 0, -1, 0, 0, 1, 1]: step 0 is one set of four tokens (not two runs racing for its bounds);
    every token is written (out poisoned with NaN), validate=False as under torch.compile."""
    ids = torch.tensor([[0, 0, -1, 0, 0, 1, 1]], device=device)
    g, e = torch.randn(1, 7, 5, device=device), torch.randn(1, 7, 5, device=device)
    n, R, o = torch.randn(5, device=device), torch.tensor([0.8, -0.3], device=device), torch.rand(1, device=device)
    out = torch.full((1, 7), float("nan"), device=device)
    api(backend).p2t_advantages(g, e, n, ids, R, o, group_size=1, out=out, validate=False)
    oracle = oracle_p2t(g, e, n, ids, R, o, None, 1)
    check(out, p2t.p2t_advantages(g, e, n, ids, R, o, group_size=1, backend="reference"), oracle)
    x = torch.randn(1, 7, device=device)
    got = api(backend).segment_redistribute(x, ids, R, normalize="sum", validate=False)
    torch.testing.assert_close(got[0, [0, 1, 3, 4]].sum(), R[0])


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("standardize", [False, True])
def test_segments_with_holes_over_several_blocks(backend, device, standardize):
    """Steps whose tokens are spread over hundreds of positions (interleaved with other steps and -1),
    longer than a segment block; rows longer than a fill chunk."""
    B, N = (1, 1100) if backend == EMULATED else (2, 4300)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(-1, 6, (B, N), generator=gen) + 6 * torch.arange(B)[:, None]
    ids = torch.where(ids < 6 * torch.arange(B)[:, None], -1, ids).to(device)
    S = 6 * B
    x = (2 * torch.randn(B, N, generator=gen)).to(device)
    R = torch.randn(S, generator=gen).to(device)
    out = api(backend).segment_redistribute(x, ids, R, standardize=standardize, validate=False)
    oracle = ref.segment_redistribute(x.double().reshape(-1), ids.reshape(-1), R.double(), 0.6, 1.0,
                                      standardize).reshape(B, N)
    check(out, p2t.segment_redistribute(x, ids, R, standardize=standardize, backend="reference"), oracle)
    o = torch.rand(B, generator=gen).to(device)
    mask = (torch.rand(B, N, generator=gen) > 0.2).to(device)
    g, e = torch.randn(B, N, 4, generator=gen).to(device), torch.randn(B, N, 4, generator=gen).to(device)
    n = torch.randn(4, generator=gen).to(device)
    got = api(backend).p2t_advantages(g, e, n, ids, R, o, group_size=1, mask=mask, standardize=standardize,
                                      validate=False)
    check(got, p2t.p2t_advantages(g, e, n, ids, R, o, group_size=1, mask=mask, standardize=standardize,
                                  backend="reference"),
          oracle_p2t(g, e, n, ids, R, o, mask, 1, standardize=standardize))


@pytest.mark.skipif("triton" not in p2t.available_backends(), reason="triton backend not available")
def test_triton_token_limit_and_device_guard():
    from p2t_kernels._common import MAX_TOKENS, check_tokens, device_guard
    check_tokens(MAX_TOKENS)
    with pytest.raises(ValueError, match="too many tokens"):
        check_tokens(MAX_TOKENS + 1)
    with device_guard(torch.zeros(1)):  # CPU tensors: no CUDA device switch
        pass
    if torch.cuda.is_available():
        t = torch.zeros(1, device=f"cuda:{torch.cuda.device_count() - 1}")
        with device_guard(t):
            assert torch.cuda.current_device() == t.device.index


# ------------------------------------------------------------------------------------------------ #
# the fused pipeline
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
@pytest.mark.parametrize("scale", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_p2t_masks_and_scales(backend, device, scale, dtype):
    B, N, D = 6, 45, 40
    g, e, n, ids, R, o = pipeline(B, N, D, [1, 5, 9, 2], device, dtype, skip_rows=(4,))
    o[2:4] = 0.5  # a constant group: zero std
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    mask[1, 30:] = False  # padding that cuts a segment short
    mask[3] = False  # all masked
    kw = dict(group_size=2, omega=0.6, alpha=0.3, temperature=0.8, standardize=scale == 1,
              normalize="sum" if scale == 2 else "paper", scale=("group", "batch", "none")[scale], mask=mask)
    out = torch.full((B, N), float("nan"), device=device)
    got = api(backend).p2t_advantages(g, e, n, ids, R, o, out=out, **kw)
    assert got is out
    oracle = oracle_p2t(g, e, n, ids, R, o, mask, 2, alpha=0.3, temperature=0.8, standardize=scale == 1,
                        normalize_sum=scale == 2, scale=scale)
    check(out, p2t.p2t_advantages(g, e, n, ids, R, o, backend="reference", **kw), oracle)
    assert (out[~mask] == 0).all()
    adv = ref.group_advantages(o.double(), 2, scale)
    free = (ids < 0) & mask
    torch.testing.assert_close(out[free].double(), adv[:, None].expand(B, N)[free], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_p2t_float64_and_float32_out(backend, device):
    g, e, n, ids, R, o = pipeline(4, 33, 17, [3, 8], device, torch.float64)
    R, o = R.double(), o.double()
    full = api(backend).p2t_advantages(g, e, n, ids, R, o, group_size=4)
    assert full.dtype == torch.float64
    oracle = oracle_p2t(g, e, n, ids, R, o, None, 4)
    assert _err(full, oracle) < 1e-12
    out32 = torch.full((4, 33), float("nan"), device=device)
    api(backend).p2t_advantages(g, e, n, ids, R, o, group_size=4, out=out32)
    assert _err(out32, oracle) < 1e-6


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_p2t_long_rows(backend, device):
    """Rows longer than a fill chunk (1024 tokens on CUDA, 4096 interpreted) and a segment longer than a
    block (128 / 256 tokens), group size 1."""
    B, N = (1, 1100) if backend == EMULATED else (2, 4200)  # the emulation runs a thread per CUDA thread
    g, e, n, ids, R, o = pipeline(B, N, 8, [600, 1, 17], device, first=2)
    out = api(backend).p2t_advantages(g, e, n, ids, R, o, group_size=1, standardize=True)
    oracle = oracle_p2t(g, e, n, ids, R, o, None, 1, standardize=True)
    check(out, p2t.p2t_advantages(g, e, n, ids, R, o, group_size=1, backend="reference", standardize=True), oracle)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_token_advantages_alias_and_batch_scale(backend, device):
    B, N = 8, 29
    o = torch.randn(B, device=device)
    tr = torch.randn(B, N, device=device)
    mask = torch.rand(B, N, device=device) > 0.25
    want = ref.token_advantages(o.double(), tr.double(), mask, 4, 0.2, 1, 1e-6)
    out = api(backend).token_advantages(o, tr, group_size=4, alpha=0.2, mask=mask, scale="batch", out=tr)
    assert out is tr
    assert _err(out, want) < 1e-5


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_gradients_through_backend(backend, device):
    g, e, n, ids, R, o = pipeline(4, 19, 11, [2, 6, 1], device)
    mask = torch.ones(4, 19, dtype=torch.bool, device=device)
    mask[2, 10:] = False
    grads = []
    for bk in (backend, "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (g, e, n, R, o)]
        out = api(bk).p2t_advantages(leaves[0], leaves[1], leaves[2], ids, leaves[3], leaves[4], group_size=2,
                                     mask=mask, standardize=True)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)
        grads.append(torch.autograd.grad((out * w).sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ #
# registration and compilation
# ------------------------------------------------------------------------------------------------ #
def test_op_schemas_match_the_spec_table():
    """Triton ops are registered from the spec table; the C++ ops (csrc/schemas.h) and the emulated CUDA
    ops must declare the same schemas."""
    namespaces = [ns for ns, ok in (("p2t", "cpu" in p2t.available_backends()),
                                    ("p2t_triton", "triton" in p2t.available_backends())) if ok]
    if not torch.cuda.is_available():
        _emulated_ops()
        namespaces.append("p2t_cuda_emulated")
    assert namespaces
    for ns in namespaces:
        for name, spec in SPECS.items():
            got = str(getattr(getattr(torch.ops, ns), name).default._schema).split("::", 1)[1]
            assert got == name + spec.schema, (ns, got, spec.schema)


def _kernels():
    from p2t_kernels.advantages import _token_advantages_kernel
    from p2t_kernels.attribution import _attribution_kernel
    from p2t_kernels.segment import _run_bounds_kernel, _segment_kernel
    return {"attribution": (_attribution_kernel, {"R", "N", "S"}), "segment": (_segment_kernel, {"R", "N", "S", "B"}),
            "bounds": (_run_bounds_kernel, {"R", "N", "S"}), "advantages": (_token_advantages_kernel, {"N", "B"})}


@pytest.mark.skipif("triton" not in p2t.available_backends(), reason="triton backend not available")
def test_lengths_not_specialised():
    for name, (k, lengths) in _kernels().items():
        dns = k.kwargs.get("do_not_specialize") if INTERPRET else k.do_not_specialize
        names = {k.arg_names[i] if isinstance(i, int) else i for i in dns}
        assert lengths <= names, (name, lengths - names)


def _cache_size(kernel, device):
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(v[0]) for v in caches.values())
    return sum(len(v) for v in kernel.cache.values())  # older triton


@needs_cuda
@pytest.mark.skipif("triton" not in p2t.available_backends("cuda"), reason="triton backend not available")
def test_new_length_does_not_recompile():
    ks = _kernels()
    def run(N):
        g, e, n, ids, R, o = pipeline(4, N, 64, [3, 11], "cuda", torch.bfloat16)
        p2t.p2t_advantages(g, e, n, ids, R, o, group_size=2, backend="triton")
        p2t.segment_redistribute(g[..., 0].float(), ids, R, backend="triton")
        p2t.token_advantages(o, g[..., 0].float(), group_size=2, backend="triton")
    run(100)
    before = {k: _cache_size(v[0], "cuda") for k, v in ks.items()}
    run(137)
    run(1031)
    after = {k: _cache_size(v[0], "cuda") for k, v in ks.items()}
    assert before == after, (before, after)


# ------------------------------------------------------------------------------------------------ #
# on a GPU: cuda and triton vs the reference at larger shapes, direct-call checks
# ------------------------------------------------------------------------------------------------ #
@needs_cuda
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in p2t.available_backends("cuda")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_large_vs_reference(backend, dtype):
    B, N, D = 8, 1000, 1536
    g, e, n, ids, R, o = pipeline(B, N, D, [7, 31, 1, 120, 64], "cuda", dtype, first=5)
    mask = torch.ones(B, N, dtype=torch.bool, device="cuda")
    mask[:, 900:] = False
    attr = api(backend).token_attribution(g, e, n, mask=mask)
    check(attr, p2t.token_attribution(g, e, n, mask=mask, backend="reference"),
          ref.token_attribution(g.double(), e.double(), n.double(), mask))
    out = torch.full((B, N), float("nan"), device="cuda")
    api(backend).p2t_advantages(g, e, n, ids, R, o, group_size=4, mask=mask, out=out)
    check(out, p2t.p2t_advantages(g, e, n, ids, R, o, group_size=4, mask=mask, backend="reference"),
          oracle_p2t(g, e, n, ids, R, o, mask, 4))
    # packed layout, odd D
    gp, ep = g[:, :, :1531].reshape(-1, 1531), e[:, :, :1531].reshape(-1, 1531)
    check(api(backend).token_attribution(gp, ep, n[:1531]),
          p2t.token_attribution(gp, ep, n[:1531], backend="reference"),
          ref.token_attribution(gp.double(), ep.double(), n[:1531].double()))


@needs_cuda
@pytest.mark.skipif("cuda" not in p2t.available_backends("cuda"), reason="CUDA kernels not built")
def test_cuda_ops_direct_checks():
    g = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="null_embed"):
        torch.ops.p2t.token_attribution(g, g, torch.zeros(9, device="cuda"), None)
    with pytest.raises(RuntimeError, match="embeds"):
        torch.ops.p2t.token_attribution(g, g.cpu(), torch.zeros(8, device="cuda"), None)
    with pytest.raises(RuntimeError, match="group_size"):
        torch.ops.p2t.token_advantages(torch.randn(3, device="cuda"), g[:3], None, 2, 0.1, 0, 1e-6)


def test_triton_kernels_compile_for_sm90():
    """Compiled (not interpreted) Triton: every kernel variant the launchers use compiles to a cubin for
    sm_90, ahead of time, without a GPU (p2t_kernels/aot_check.py, in a subprocess without
    TRITON_INTERPRET). Catches what the interpreter accepts but the compiler rejects."""
    import subprocess
    import sys
    if torch.cuda.is_available():
        pytest.skip("with a GPU the other tests compile and run every kernel")
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "p2t_kernels.aot_check", "--arch", "90"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "FAIL" not in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("ok ") >= 10, r.stdout


@pytest.mark.skipif("triton" not in p2t.available_backends(), reason="triton backend not available")
def test_triton_under_torch_compile_dynamic():
    """p2t_advantages with backend="triton" inside torch.compile(fullgraph=True, dynamic=True): one graph
    for two sequence lengths, values and gradients as the reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _backends._RESOLVED.clear()  # a cold dispatch cache, whatever ran before: it must not cost a recompile

    def f(g, e, n, ids, R, o, mask):
        return p2t.p2t_advantages(g, e, n, ids, R, o, group_size=2, mask=mask, backend="triton", validate=False)

    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for N in (13, 17):
        g, e, n, ids, R, o = pipeline(4, N, 9, [3, 1, 4], device)
        mask = torch.ones(4, N, dtype=torch.bool, device=device)
        mask[1, N - 3:] = False
        g.requires_grad_(True)
        out = cf(g, e, n, ids, R, o, mask)
        check(out, ref.p2t_advantages(g.detach(), e, n, ids, R, o, mask, 2), oracle_p2t(g.detach(), e, n, ids, R, o,
                                                                                       mask, 2))
        (d,) = torch.autograd.grad((out * out).sum(), g)
        g2 = g.detach().clone().requires_grad_(True)
        want = ref.p2t_advantages(g2, e, n, ids, R, o, mask, 2)
        (d_ref,) = torch.autograd.grad((want * want).sum(), g2)
        torch.testing.assert_close(d, d_ref, atol=1e-5, rtol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ------------------------------------------------------------------------------------------------ #
# the one-launch row stage of the CUDA kernels (segments + advantages, one block per row): steps as
# sets, ids far apart (several windows of step slots), more steps in a row than slots
# ------------------------------------------------------------------------------------------------ #
# Triton under the interpreter is too slow for these shapes on CPU: there, the emulated CUDA kernels only.
ROW_BACKENDS = [p for p in GPU_BACKENDS if p.id != "triton-cpu"]


def _row_stage_ids(B, N, gen):
    """ids [B, N], S: per row a mix of holes, -1, one-token steps, interleaved steps and ids far apart.
    Row 0: steps 0, 300 and 700 interleaved with holes (three windows of 256 ids); row 1: one-token steps
    and -1; row 2: 40 one-token steps 1000.. then a 5-token constant step split by a hole; row 3: no step."""
    ids = torch.full((B, N), -1, dtype=torch.long)
    pattern = torch.tensor([0, 300, -1, 700, 0, 0, 300, -1])
    ids[0] = pattern.repeat(N // len(pattern) + 1)[:N]
    ids[1, ::3] = torch.arange(800, 800 + len(range(0, N, 3)))
    ids[2, :40] = torch.arange(1000, 1040)
    ids[2, 41:44] = 1040
    ids[2, 45:47] = 1040
    ids[2] = torch.where(torch.rand(N, generator=gen) < 0.1, torch.full((N,), -1, dtype=torch.long), ids[2])
    return ids, 1041


@pytest.mark.parametrize("backend,device", ROW_BACKENDS)
@pytest.mark.parametrize("standardize,normalize,scale,omega_neg", [(False, "paper", "group", 0.0),
                                                                   (True, "sum", "batch", 0.0),
                                                                   (True, "paper", "none", 0.0),
                                                                   (True, "sum", "group", 0.7),
                                                                   (False, "paper", "batch", 0.4)])
def test_row_stage_sets_windows_and_edges(backend, device, standardize, normalize, scale, omega_neg):
    """p2t_advantages (validate=False, out poisoned) on rows of odd length with holes, -1 ids, one-token
    steps, step ids 300 and more apart in one row, a constant step, masked tokens cutting steps, an all-masked
    row, a constant group, against the float64 oracle."""
    B, N, D = 6, 53, 7
    gen = torch.Generator().manual_seed(11)
    ids, S = _row_stage_ids(B, N, gen)
    g, e = torch.randn(B, N, D, generator=gen), torch.randn(B, N, D, generator=gen)
    e[2, 41:47] = 0.0  # step 1040: constant scores (zero std when standardized)
    g[2, 41:47] = 0.0
    n = 0.1 * torch.randn(D, generator=gen)
    R = torch.randn(S, generator=gen)
    o = torch.randn(B, generator=gen)
    o[2:4] = 0.25  # a constant group
    mask = torch.rand(B, N, generator=gen) > 0.15
    mask[4] = False  # all masked
    mask[5, 20:] = False
    ids[5, 10:30] = torch.arange(40, 50).repeat_interleave(2)  # two-token steps, some cut by the mask
    g, e, n, ids, R, o, mask = (t.to(device) for t in (g, e, n, ids, R, o, mask))
    kw = dict(group_size=2, omega=0.6, alpha=0.3, temperature=0.7, standardize=standardize, normalize=normalize,
              scale=scale, mask=mask, omega_neg=omega_neg)
    out = torch.full((B, N), float("nan"), device=device)
    api(backend).p2t_advantages(g, e, n, ids, R, o, out=out, validate=False, **kw)
    s = ("group", "batch", "none").index(scale)
    oracle = oracle_p2t(g, e, n, ids, R, o, mask, 2, alpha=0.3, temperature=0.7, standardize=standardize,
                        normalize_sum=normalize == "sum", scale=s, omega_neg=omega_neg)
    check(out, p2t.p2t_advantages(g, e, n, ids, R, o, backend="reference", **kw), oracle)
    assert (out[~mask] == 0).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the recorded outputs are the host emulation's")
def test_emulated_omega_neg_zero_is_bitwise_unchanged():
    """omega_neg=0 through the CUDA kernels (host emulation) gives the outputs recorded before the signed term
    existed, bit for bit (test_ops checks the other backends)."""
    emu = _Emulated()
    check_golden("emu", emu.segment_redistribute, emu.p2t_advantages)


@pytest.mark.parametrize("backend,device", ROW_BACKENDS)
def test_row_stage_more_steps_than_slots(backend, device):
    """A row with 300 one-token and two-token steps (more than the 256 step slots of a window) and a row
    whose ids run backwards; segment_redistribute on the same ids flattened (one row of the row stage)."""
    B, N = 2, 611
    gen = torch.Generator().manual_seed(3)
    ids = torch.full((B, N), -1, dtype=torch.long)
    ids[0, :300] = torch.arange(300)
    ids[0, 300:600] = torch.arange(300)  # each step: two tokens 300 apart
    ids[1, 1:601:2] = torch.arange(599, 299, -1)
    S = 600
    x = (3 * torch.randn(B, N, generator=gen)).to(device)
    R = torch.randn(S, generator=gen).to(device)
    ids = ids.to(device)
    for standardize, omega_neg in ((False, 0.0), (True, 0.0), (True, 0.6)):
        got = api(backend).segment_redistribute(x, ids, R, standardize=standardize, normalize="sum", validate=False,
                                                omega_neg=omega_neg)
        oracle = ref.segment_redistribute(x.double().reshape(-1), ids.reshape(-1), R.double(), 0.6, 1.0,
                                          standardize, True, omega_neg).reshape(B, N)
        want = p2t.segment_redistribute(x, ids, R, standardize=standardize, normalize="sum", omega_neg=omega_neg,
                                        backend="reference")
        check(got, want, oracle)
    g, e = torch.randn(B, N, 3, generator=gen).to(device), torch.randn(B, N, 3, generator=gen).to(device)
    n, o = torch.randn(3, generator=gen).to(device), torch.randn(B, generator=gen).to(device)
    out = torch.full((B, N), float("nan"), device=device)
    api(backend).p2t_advantages(g, e, n, ids, R, o, group_size=2, out=out, validate=False)
    check(out, p2t.p2t_advantages(g, e, n, ids, R, o, group_size=2, backend="reference"),
          oracle_p2t(g, e, n, ids, R, o, None, 2))


@pytest.mark.parametrize("backend,device", ROW_BACKENDS)
def test_step_crossing_rows_unvalidated_is_finite(backend, device):
    """validate=False and a step with tokens in two rows: unspecified values, but finite, and the tokens in
    no step still get A^_b."""
    ids = torch.tensor([[0, 0, -1, 1], [1, 1, -1, 2]], device=device)
    g, e = torch.randn(2, 4, 5, device=device), torch.randn(2, 4, 5, device=device)
    n, R, o = torch.randn(5, device=device), torch.randn(3, device=device), torch.randn(2, device=device)
    out = api(backend).p2t_advantages(g, e, n, ids, R, o, group_size=1, validate=False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 2], ref.group_advantages(o, 1).to(out.dtype))
