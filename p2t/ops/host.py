"""Host kernels of the attribution engine (CPU, from the compiled extension ``p2t._C``), and which
instruction-set clone the C++ CPU kernels run (:func:`cpu_isa`).

:func:`layout_ids` lays out the PRM inputs of rows of policy token ids in one native pass
(``csrc/layout_cpu.cpp``): the token pieces gathered into text, character spans, steps split and
trimmed, each token's step, truncation to ``max_length``, the PRM input ids with separators and readouts,
and the map from PRM positions onto the policy's tokens. It returns ``None`` where the extension does not
hold the kernel (not built, or built before it existed); the caller then takes its NumPy path, which
computes the same arrays.
"""
from __future__ import annotations

from typing import List, Optional

import torch

__all__ = ["has_layout", "layout_ids", "piece_table_entries", "cpu_isa", "cpu_isas"]

_HAS: Optional[bool] = None


def has_layout() -> bool:
    """Whether the compiled layout kernel is loaded."""
    global _HAS
    if _HAS is None:
        from . import _cpp  # noqa: F401  (imports p2t._C when it is built)
        try:
            _HAS = bool(torch._C._dispatch_has_kernel_for_dispatch_key("p2t_host::layout_ids", "CPU"))
        except RuntimeError:  # the op does not exist: no extension, or one built before the kernel
            _HAS = False
    return _HAS


def _has_op(name: str) -> bool:
    from . import _cpp  # noqa: F401  (imports p2t._C when it is built)
    try:
        return bool(torch._C._dispatch_has_kernel(f"p2t_host::{name}"))
    except RuntimeError:
        return False


def cpu_isa() -> str:
    """The instruction-set clone the C++ CPU kernels run now: ``"avx512"``, ``"avx2"`` or ``"default"`` (the
    portable build); ``"none"`` without the compiled extension. The best one the CPU has unless the environment
    variable ``P2T_CPU_ISA`` (read at every call: ``auto``, ``default``, ``avx2``, ``avx512``) names another; a
    name the CPU lacks raises a RuntimeError."""
    if not _has_op("cpu_isa"):
        return "none"
    return torch.ops.p2t_host.cpu_isa()


def cpu_isas() -> List[str]:
    """The clones this CPU can run (``"default"`` first); empty without the compiled extension."""
    if not _has_op("cpu_isas"):
        return []
    return torch.ops.p2t_host.cpu_isas().split(",")


def piece_table_entries(starts, lengths, special) -> Optional[torch.Tensor]:
    """The ``table`` argument of :func:`layout_ids` from per-id piece starts, lengths and special flags
    (array-likes of one length); ``None`` when a piece is 2^16 units or longer."""
    starts = torch.as_tensor(starts, dtype=torch.int64)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if lengths.numel() and int(lengths.max()) >= 1 << 16:
        return None
    return (starts << 17) | (lengths << 1) | torch.as_tensor(special, dtype=torch.bool).to(torch.int64)


def layout_ids(ids: torch.Tensor, offsets: torch.Tensor, pieces: torch.Tensor, table: torch.Tensor,
               split: torch.Tensor, frame: torch.Tensor, frame_offsets: torch.Tensor, row_frame: torch.Tensor,
               separator: torch.Tensor, separator_readout: int, max_length: Optional[int],
               read_last: bool) -> Optional[List[torch.Tensor]]:
    """The layout of ``B`` rows of token ids (``ids`` int64 ``[n]``, row ``r`` at ``offsets[r]:offsets[r + 1]``).

    Args (CPU tensors, contiguous, int64 unless said):
        pieces: each id's text laid end to end, uint8 (UTF-8 bytes) or int32 (code points).
        table: ``[V]``, per id ``start << 17 | length << 1 | special``: where its piece lies in ``pieces``
            (length < 2^16) and whether it is a special token (no text of its own);
            :func:`piece_table_entries` builds it.
        split: int32 code points of the text between steps (empty: the whole text is one step).
        frame: the PRM ids around a response, per frame ``q`` its head at
            ``frame[frame_offsets[2q]:frame_offsets[2q + 1]]`` and its tail after it; ``row_frame`` ``[B]``:
            each row's frame.
        separator: the ids after every step; ``separator_readout``: how many of them lead up to the readout
            (the step is read at ``separator[separator_readout - 1]``).
        max_length: the PRM's maximum input length (``None``: none): trailing steps that do not fit are dropped.
        read_last: every kept step is read at the row's last position (a value head over the whole response).
    Returns ``None`` without the kernel, else 17 CPU tensors: ``buf`` (the rows' pieces, as ``pieces``),
    ``unit_offsets`` ``[B + 1]`` (each row's part of ``buf``), ``spans`` ``[n, 2]`` (row-local character
    spans, contiguous), ``steps`` ``[S, 2]`` and ``step_offsets`` ``[B + 1]`` (row-local character spans of every
    step before truncation), ``policy_step`` ``[n]`` (row-local step of each token, -1 in none or in a
    dropped step), ``keep``, ``total``, ``first`` ``[B]`` (steps kept, PRM input length with every step, with
    the first step only), ``input_ids`` and ``token_step`` ``[T]`` with ``prm_offsets`` ``[B + 1]`` (rows
    without a kept step are empty), ``readout`` with ``readout_offsets`` ``[B + 1]`` (row-local positions),
    ``map_prm``, ``map_policy`` with ``map_offsets`` ``[B + 1]`` (row-local PRM position -> row-local token).
    """
    if not has_layout():
        return None
    return torch.ops.p2t_host.layout_ids(ids, offsets, pieces, table, split, frame, frame_offsets, row_frame,
                                         separator, int(separator_readout),
                                         -1 if max_length is None else int(max_length), bool(read_last))
