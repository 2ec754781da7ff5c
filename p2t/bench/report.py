"""Results: one row type (:class:`BenchmarkRow`), one CSV schema (:data:`COLUMNS`), and the text and
markdown tables made from rows."""
from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Iterable, Mapping, Optional, Sequence, Union

from .cases import COMPILE_PROVIDERS

NAN = float("nan")


@dataclasses.dataclass
class BenchmarkRow:
    """One measurement: ``provider`` running ``kernel`` in ``mode`` on one case, ``metric`` in ``unit`` at
    ``x``, as median (``y50``) and p20/p80 -- the eleven columns of Liger-Kernel's benchmark CSVs (``gpu``
    is the device's name, CPU included; ``version`` is p2t's) -- then the context a row needs to stand
    alone: the case (``x_name``, ``layout``, ``dtype``, ``shape``), bytes moved (``mbytes``) and the
    bandwidth they give (``gbps``, ``pct_copy_bw`` of the copy bandwidth measured in the same run), peak
    memory, versions, commit and date; ``host_ms``: host (CPU) time per call, beside the device time
    (``y50``) on a GPU."""
    kernel: str
    provider: str
    mode: str
    metric: str
    unit: str
    x: float
    y50: float
    y20: float
    y80: float
    gpu: str
    version: str
    x_name: str = ""
    layout: str = ""
    dtype: str = ""
    shape: str = ""
    mbytes: float = NAN
    gbps: float = NAN
    pct_copy_bw: float = NAN
    peak_mem_mb: float = NAN
    torch: str = ""
    triton: str = ""
    commit: str = ""
    date: str = ""
    host_ms: float = NAN

    @classmethod
    def measured(cls, env: Mapping, **fields) -> "BenchmarkRow":
        """A row with the context of ``env`` (:func:`p2t.bench.environment`: gpu, version, torch, triton,
        commit, date) and the given fields."""
        ctx = {k: env[k] for k in ("gpu", "version", "torch", "triton", "commit", "date") if k in env}
        return cls(**{**ctx, **fields})

    @classmethod
    def coerce(cls, row: Union["BenchmarkRow", Mapping]) -> "BenchmarkRow":
        """A row from a row or a mapping with the :data:`COLUMNS` names (strings from a CSV accepted:
        numbers parsed, empty cells become NaN); unknown names raise ``TypeError``."""
        if isinstance(row, cls):
            return row
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise TypeError(f"unknown benchmark row field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: (_float(v) if k in FLOAT_COLUMNS else ("" if v is None else str(v))) for k, v in row.items()})

    def csv_cells(self) -> dict:
        return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def key(self) -> tuple:
        """The case and mode a row belongs to (rows of one key are compared with one another)."""
        return (self.kernel, self.layout, self.dtype, self.shape, self.mode)


COLUMNS = tuple(f.name for f in dataclasses.fields(BenchmarkRow))
FLOAT_COLUMNS = tuple(f.name for f in dataclasses.fields(BenchmarkRow) if f.type in (float, "float"))


def _float(v) -> float:
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return NAN


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------
class CsvWriter:
    """Writes the header when created, then appends rows as they come (an interrupted run keeps what
    it measured)."""

    def __init__(self, path: str):
        self.path = path
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writeheader()

    def write(self, rows: Iterable) -> None:
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            for r in rows:
                w.writerow(BenchmarkRow.coerce(r).csv_cells())


_CsvAppender = CsvWriter  # the name the benchmark scripts used first


def write_csv(rows: Iterable, path: str) -> None:
    """Writes ``rows`` (:class:`BenchmarkRow` or mappings with the :data:`COLUMNS` names) to ``path``."""
    CsvWriter(path).write(rows)


def read_csv(path: str) -> list:
    """The rows of a benchmark CSV as :class:`BenchmarkRow` (columns added later read as empty/NaN)."""
    with open(path, newline="") as f:
        return [BenchmarkRow.coerce({k: v for k, v in r.items() if k in COLUMNS}) for r in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
BASELINES = ("reference",) + COMPILE_PROVIDERS


def _label(baseline: str) -> str:
    return "eager" if baseline == "reference" else baseline.replace("torch_", "")


def _by_case(rows: Sequence[BenchmarkRow], with_copy: bool = True) -> dict:
    groups: dict = {}
    for r in rows:
        if with_copy or r.kernel != "copy":
            groups.setdefault(r.key, {})[r.provider] = r
    return groups


def ratios(rows: Sequence[BenchmarkRow]) -> list:
    """Per case and mode, each fused backend's speed-up (median time ratio) over ``reference`` and the
    compile providers. Returns dicts: kernel, layout, dtype, shape, mode, provider, vs_<baseline>."""
    out = []
    for key, g in _by_case(rows, with_copy=False).items():
        for p, r in g.items():
            if p in BASELINES:
                continue
            d = dict(zip(("kernel", "layout", "dtype", "shape", "mode"), key), provider=p)
            for b in BASELINES:
                if b in g:
                    d[f"vs_{b}"] = g[b].y50 / r.y50
            out.append(d)
    return out


def _us(ms: float) -> str:
    return "" if math.isnan(ms) else f"{ms * 1e3:.1f}"


def format_table(rows: Sequence[BenchmarkRow], header: bool = True) -> list:
    """Text lines: one per row, with the speed-up of fused backends over the baselines of its case; the
    host time per call (µs) where it was measured."""
    groups = _by_case(rows)
    host = any(not math.isnan(r.host_ms) for r in rows)
    lines = []
    if header:
        lines.append(f"{'kernel':<21} {'layout':<6} {'dtype':<5} {'shape':<22} {'mode':<8} {'provider':<21} "
                     f"{'ms p50':>9} {'p20':>9} {'p80':>9} {'GB/s':>7} {'%copy':>6} {'peakMB':>8}"
                     + (f" {'host us':>8}" if host else "") + "  speed-up")
    for r in rows:
        g = groups[r.key]
        sp = ""
        if r.provider not in ("torch",) + BASELINES:
            sp = ", ".join(f"{g[b].y50 / r.y50:.2f}x {_label(b)}" for b in BASELINES if b in g)
        lines.append(f"{r.kernel:<21} {r.layout:<6} {r.dtype:<5} {r.shape:<22} {r.mode:<8} "
                     f"{r.provider:<21} {r.y50:>9.4f} {r.y20:>9.4f} {r.y80:>9.4f} {r.gbps:>7.1f} "
                     f"{r.pct_copy_bw:>6.1f} {r.peak_mem_mb:>8.1f}" + (f" {_us(r.host_ms):>8}" if host else "")
                     + f"  {sp}")
    return lines


def target_lines(rows: Sequence[BenchmarkRow]) -> list:
    """The core-ops speed target: C++ (cpu) attribution >= 10x eager and >= 0.8x torch.compile."""
    lines = []
    for d in ratios(rows):
        if d["kernel"] == "token_attribution" and d["provider"] == "cpu" and d["layout"] == "dense":
            ve, vc = d.get("vs_reference", NAN), d.get("vs_torch_compile", NAN)
            ok = ve >= 10 and vc >= 0.8
            lines.append(f"target cpu attribution {d['shape']} {d['dtype']} {d['mode']}: "
                         f"{ve:.1f}x eager (>=10), {vc:.2f}x torch.compile (>=0.8)"
                         + (f", {d['vs_torch_compile_dynamic']:.2f}x compile dynamic"
                            if "vs_torch_compile_dynamic" in d else "") + (" -> met" if ok else " -> NOT met"))
    return lines


def markdown_summary(rows: Sequence[BenchmarkRow], fused: Optional[Sequence[str]] = None) -> list:
    """Markdown lines: one row per case and mode, the median time of every provider, then each fused
    backend's GB/s, % of copy bandwidth and speed-up over eager and torch.compile (ratios of medians
    measured in the same run)."""
    cases = _by_case(rows, with_copy=False)
    provs = []
    for g in cases.values():
        for p in g:
            if p not in provs:
                provs.append(p)
    base = [p for p in BASELINES if p in provs]
    fused = [p for p in (fused or provs) if p not in base]
    head = ["op", "layout", "dtype", "shape", "mode"] + [f"{p} ms" for p in base + fused]
    for f in fused:
        head += [f"{f} GB/s (% copy)"] + [f"{f} vs {_label(b)}" for b in base]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, g in cases.items():
        cells = list(key)
        cells += [f"{g[p].y50:.3f}" if p in g else "" for p in base + fused]
        for f in fused:
            r = g.get(f)
            cells.append(f"{r.gbps:.1f} ({r.pct_copy_bw:.0f}%)" if r else "")
            cells += [f"{g[b].y50 / r.y50:.2f}x" if r and b in g else "" for b in base]
        lines.append("| " + " | ".join(cells) + " |")
    copy = [r for r in rows if r.kernel == "copy"]
    if copy:
        c = copy[0]
        lines.append("")
        lines.append(f"Device: {c.gpu}; copy bandwidth {c.gbps:.1f} GB/s measured in the same run; "
                     f"torch {c.torch}, triton {c.triton}, commit {c.commit}, {c.date}.")
    return lines
