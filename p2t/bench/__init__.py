"""Op benchmarks shared by ``benchmarks/`` and ``p2t bench``: timers, cases, providers, one row type.

Modules: :mod:`~p2t.bench.timing` (device names, versions, quantile timers, host time per call, peak
memory, copy bandwidth), :mod:`~p2t.bench.cases` (what is measured: inputs, public call, plain-PyTorch
twin, bytes moved; the suites), :mod:`~p2t.bench.runner` (providers, one callable per case x provider x
mode, the timing loops) and :mod:`~p2t.bench.report` (:class:`BenchmarkRow`, the CSV schema
:data:`COLUMNS`, text and markdown tables). Everything is importable from ``p2t.bench``.

Every row compares one *provider* on one *case* (op, layout, dtype, shape) in one *mode*:

* providers: each backend usable on the device through the public API (``reference`` is the plain
  PyTorch eager path), plus ``torch_compile`` / ``torch_compile_dynamic``: the same plain-PyTorch
  math (``p2t.ops.reference``) under ``torch.compile(dynamic=False)`` and ``dynamic=True`` -- what a
  user would otherwise write.
* modes: ``forward``, ``backward`` (``y.backward(dy)`` on a recorded graph) and ``full`` (both).

Timing: on CUDA ``triton.testing.do_bench`` quantiles; on CPU :func:`cpu_quantiles`, a robust
wall-clock timer (warm-up, several calls per sample for short ops, providers interleaved sample by
sample so that load from other processes hits them alike). Inputs are random normals (never zeros)
and rotated over several copies when one set would sit in the last-level cache. The device's copy
bandwidth is measured in the same run; GB/s counts each input read once and each output written once.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the running sum of the allocator's
allocations and frees recorded by ``torch.profiler(profile_memory=True)`` over one call.
"""

from .cases import (COMPILE_PROVIDERS, DTYPES, FP32_ONLY, MODES, OPS, Case, advantages_case, attribution_case,
                    lengths, pipeline_case, segment_case, segment_ids, stage_case, suite)
from .report import (BASELINES, COLUMNS, BenchmarkRow, CsvWriter, _CsvAppender, format_table, markdown_summary,
                     ratios, read_csv, target_lines, write_csv)
from .runner import _callable, _rotations, callable_for, copy_row, providers, run_case, run_suite
from .timing import (CLOCKS, _quantiles, copy_bandwidth, cpu_quantiles, cuda_quantiles, device_name, device_tag,
                     environment, git_commit, host_quantiles, llc_bytes, peak_memory_mb, quantiles, time_fns,
                     versions)

__all__ = [
    "BenchmarkRow", "COLUMNS", "BASELINES", "CsvWriter", "write_csv", "read_csv", "format_table", "markdown_summary",
    "ratios", "target_lines",
    "Case", "OPS", "MODES", "DTYPES", "FP32_ONLY", "COMPILE_PROVIDERS", "attribution_case", "segment_case",
    "advantages_case", "stage_case", "pipeline_case", "suite", "lengths", "segment_ids",
    "providers", "callable_for", "run_case", "run_suite", "copy_row",
    "CLOCKS", "quantiles", "cpu_quantiles", "cuda_quantiles", "time_fns", "host_quantiles", "peak_memory_mb",
    "copy_bandwidth", "device_name", "device_tag", "environment", "versions", "git_commit", "llc_bytes",
]
