"""Helpers of the op tests: backends x devices parametrisation and the numerics rules."""
import pytest
import torch

import p2t

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
