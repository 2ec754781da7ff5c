"""Compile every Triton kernel of p2t_kernels ahead of time for a GPU target, without a GPU:
``python -m p2t_kernels.aot_check [--arch 90]`` (TRITON_INTERPRET must be unset). It catches what
the interpreter lets through (typing, constexpr and layout errors) on a machine without a GPU; it
does not run anything."""
from __future__ import annotations

import argparse
import itertools
import sys
import time

_TY = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32",
       "uint8": "u8"}


_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def _signature(kernel, args: dict, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            v = args[name]
            sig[name] = v if isinstance(v, str) else ("fp64" if isinstance(v, float) else "i32")
    return sig


def variants():
    """(name, kernel, signature args, constexprs) for the combinations the launchers use."""
    from .advantages import _token_advantages_kernel
    from .attribution import _attribution_kernel
    from .segment import _run_bounds_kernel, _segment_kernel

    out = []
    for (g, e, acc), (mask, fused) in itertools.product(
            [("bf16", "bf16", "fp32"), ("fp16", "fp32", "fp32"), ("fp64", "fp64", "fp64")],
            [(False, False), (True, False), (True, True)]):
        args = dict(g_ptr="*" + g, e_ptr="*" + e, null_ptr="*" + g, mask_ptr="*u8", out_ptr="*" + acc,
                    ids_ptr="*i64", pos_ptr="*i32", R="i32", D="i32", stride_g="i32", stride_e="i32", N="i32",
                    S="i32")
        out.append((f"attribution {g}/{e} mask={mask} fused={fused}", _attribution_kernel, args,
                    dict(HAS_MASK=mask, FUSED=fused, BLOCK_R=8, BLOCK_D=512, HEAD=0)))
        if g == e and not fused:
            out.append((f"attribution {g}/{e} mask={mask} odd D", _attribution_kernel, args,
                        dict(HAS_MASK=mask, FUSED=fused, BLOCK_R=8, BLOCK_D=512, HEAD=16 // _BYTES[g])))
    out.append(("run_bounds", _run_bounds_kernel, dict(ids_ptr="*i32", mask_ptr="*i32", pos_ptr="*i32", R="i32",
                                                       N="i32", S="i32"), dict(HAS_MASK=False, BLOCK=1024)))
    for cd, mask, adv, std, nsum, scale, sgn in [("fp32", False, False, False, False, 2, False),
                                                 ("fp32", True, True, True, True, 0, False),
                                                 ("fp64", True, True, False, True, 1, False),
                                                 ("fp32", False, True, True, False, 1, False),
                                                 ("fp32", True, True, True, True, 0, True),
                                                 ("fp64", False, False, False, True, 2, True)]:
        args = dict(x_ptr="*" + cd, ids_ptr="*i64", mask_ptr="*u8", rewards_ptr="*" + cd, o_ptr="*" + cd,
                    pos_ptr="*i32", out_ptr="*fp32", R="i32", N="i32", S="i32", B="i32", G="i32", n_chunks="i32",
                    omega="fp64", temperature="fp64", alpha="fp64", eps="fp64", omega_neg="fp64")
        out.append((f"segment {cd} mask={mask} adv={adv} std={std} sum={nsum} scale={scale} signed={sgn}",
                    _segment_kernel, args,
                    dict(HAS_MASK=mask, SIGNED=sgn, HAS_ADV=adv, STANDARDIZE=std, NORMALIZE_SUM=nsum, SCALE=scale,
                         BLOCK=128,
                         FILL_BLOCK=1024, BLOCK_G=16, CONST_RTOL=1e-12 if cd == "fp64" else 1e-6)))
    for cd, mask, scale in [("fp32", True, 0), ("fp64", False, 1)]:
        args = dict(o_ptr="*" + cd, tr_ptr="*" + cd, mask_ptr="*u8", out_ptr="*fp32", N="i32", B="i32", G="i32",
                    n_chunks="i32", alpha="fp64", eps="fp64")
        out.append((f"token_advantages {cd} mask={mask} scale={scale}", _token_advantages_kernel, args,
                    dict(HAS_MASK=mask, SCALE=scale, BLOCK=1024, BLOCK_G=64,
                         CONST_RTOL=1e-12 if cd == "fp64" else 1e-6)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    a = ap.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", a.arch, 32)
    failed = 0
    for name, kernel, args, cx in variants():
        if not hasattr(kernel, "arg_names") or type(kernel).__name__ == "InterpretedFunction":
            print("TRITON_INTERPRET=1 is set: nothing to compile", file=sys.stderr)
            return 2
        t0 = time.time()
        try:
            src = ASTSource(fn=kernel, signature=_signature(kernel, args, cx), constexprs=cx)
            ck = triton.compile(src, target=target)
            shared = getattr(ck.metadata, "shared", "?")
            print(f"ok   {name} ({time.time() - t0:.1f} s, cubin {len(ck.asm['cubin'])} bytes, shared {shared})")
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
