"""Triton kernels of p2t (no import of p2t): attribution, segment redistribution, token advantages
and the fused pipeline. Launchers take the normalised tensors of p2t.ops (see p2t/ops/_custom.py).

Block sizes come from heuristics (no autotuning: the kernels also run under TRITON_INTERPRET=1),
and sequence lengths are not specialised on (``do_not_specialize``): a new length reuses the
compiled kernel."""
from .advantages import token_advantages, token_advantages_into
from .attribution import token_attribution
from .fused import p2t_advantages, p2t_advantages_into
from .segment import segment_redistribute

__all__ = ["token_attribution", "segment_redistribute", "token_advantages", "token_advantages_into",
           "p2t_advantages", "p2t_advantages_into"]
