"""Argument checks for the public ops: clear ValueError / TypeError naming the argument.

Shape, dtype and device checks are metadata-only and always run (they trace under
torch.compile). Checks that read tensor values (segment ids in range, each segment inside one
sequence) synchronise with the device; they run when ``validate=True`` (the default)
and are skipped inside torch.compile traces and when the caller passes ``validate=False``.
"""
from __future__ import annotations

import torch

# one declaration of each: the option values and their checks live in p2t.options
from p2t.options import NORMALIZE, SCALES, check_float as finite, choice as check_choice  # noqa: F401

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def tensor(name, t, *, dtypes=None, dims=None, kind=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        want = kind or ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {str(t.dtype).replace('torch.', '')}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    return t


def floating(name, t, dims=None):
    return tensor(name, t, dtypes=FLOAT_DTYPES, dims=dims, kind="float32, bfloat16, float16 or float64")


def same_device(**named):
    items = [(k, v) for k, v in named.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: move them to one device")


def same_shape(name, t, ref_name, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (as {ref_name}), got {tuple(t.shape)}")


def mask(name, m, shape):
    if m is None:
        return None
    tensor(name, m, dtypes=(torch.bool,), kind="bool")
    same_shape(name, m, "the token dimensions", shape)
    return m


def positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def choice(name, v, options):
    """The index of ``v`` in ``options`` (the kernels take the index), checked by :func:`p2t.options.choice`."""
    return options.index(check_choice(name, v, options))


def group(outcome_rewards, group_size):
    floating("outcome_rewards", outcome_rewards, dims=(1,))
    positive_int("group_size", group_size)
    B = outcome_rewards.shape[0]
    if B % group_size != 0:
        raise ValueError(f"outcome_rewards has {B} rows, not a multiple of group_size={group_size}")


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def segment_values(segment_ids, num_segments, rows=None):
    """Value checks: ids in [-1, S) and, with ``rows``, every segment inside one row.

    A segment is the set of its tokens: its tokens need not be one contiguous run (a tool call or a
    masked span may sit between them). ``rows`` is the number of sequences when ids are [B, N]
    flattened: a segment may not have tokens in two rows (a step belongs to one response).
    """
    if _tracing() or segment_ids.numel() == 0:
        return
    ids = segment_ids.reshape(-1)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1:
        raise ValueError(f"segment_ids must be >= -1 (-1 marks tokens in no segment), found {lo}")
    if hi >= num_segments:
        raise ValueError(f"segment_ids contains {hi} but segment_rewards has only {num_segments} segments "
                         f"(ids must be < {num_segments})")
    if rows is None or rows <= 1 or hi < 0:
        return
    row = torch.arange(rows, device=ids.device).repeat_interleave(ids.numel() // rows)
    keep = ids >= 0
    s, r = ids[keep].long(), row[keep]
    first = torch.full((num_segments,), rows, device=ids.device, dtype=torch.long).scatter_reduce(
        0, s, r, reduce="amin")
    last = torch.full((num_segments,), -1, device=ids.device, dtype=torch.long).scatter_reduce(
        0, s, r, reduce="amax")
    crossing = (last > first).nonzero()
    if crossing.numel():
        worst = int(crossing[0, 0])
        raise ValueError(f"segment {worst} is split over rows {int(first[worst])} and {int(last[worst])}: the "
                         f"tokens of a segment must lie inside one sequence (after masking)")
