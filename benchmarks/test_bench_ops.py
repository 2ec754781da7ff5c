"""pytest-benchmark suite: every public op x every backend usable here (+ torch.compile with
``P2T_BENCH_COMPILE=1``), forward and forward+backward, on short shapes (CPU) or the PERF.md shapes (GPU).

    pytest benchmarks/ --benchmark-disable          # smoke test: each case once, checked against the reference
    pytest benchmarks/test_bench_ops.py --benchmark-columns=median,iqr,ops --benchmark-sort=name

Inputs come from ``p2t.bench`` (the same cases as ``p2t bench`` and ``bench_ops.py``), rotated over
several copies on CPU. On CUDA each measured call synchronises the device. pytest-benchmark times wall
clock: on a shared CPU set ``P2T_BENCH_THREADS=1`` (with two OpenMP threads on an oversubscribed machine,
every parallel region waits for both threads to be scheduled, which swamps small ops).
"""
from __future__ import annotations

import os

import pytest
import torch

import p2t
from p2t import bench

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
COMPILE = os.environ.get("P2T_BENCH_COMPILE") == "1"
if os.environ.get("P2T_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["P2T_BENCH_THREADS"]))


def _cases(device):
    if device == "cuda":
        return [bench.attribution_case(64, 2048, 1536, dt, "dense", device=device) for dt in ("fp32", "bf16")] + [
            bench.attribution_case(64, 2048, 1536, "bf16", "packed", device=device),
            bench.segment_case(64, 2048, 16, "fp32", "padded", device=device),
            bench.advantages_case(64, 2048, device=device),
            bench.stage_case(64, 2048, 16, device=device),
            bench.pipeline_case(64, 2048, 1536, 16, "bf16", device=device)]
    return [bench.attribution_case(4, 256, 512, dt, "padded", device=device) for dt in ("fp32", "bf16")] + [
        bench.attribution_case(4, 256, 512, "fp32", "packed", device=device),
        bench.segment_case(16, 512, 8, "fp32", "padded", device=device),
        bench.segment_case(16, 512, 8, "fp32", "packed", device=device),
        bench.advantages_case(16, 512, device=device),
        bench.stage_case(16, 512, 8, group_size=4, device=device),
        bench.pipeline_case(8, 256, 512, 8, "fp32", device=device)]


def _providers(device):
    provs = bench.providers(device, bench.COMPILE_PROVIDERS if COMPILE else ())
    if device == "cpu" and "triton" in provs:
        provs.remove("triton")  # the interpreter is a correctness path, not a speed one
    return provs


PARAMS = [pytest.param(device, case, prov, mode, id=f"{device}-{case.kernel}-{case.layout}-{case.dtype}-{mode}-{prov}")
          for device in DEVICES for case in _cases(device) for prov in _providers(device)
          for mode in ("forward", "full")]


@pytest.mark.parametrize("device,case,provider,mode", PARAMS)
def test_op(benchmark, device, case, provider, mode):
    gen = torch.Generator().manual_seed(0)
    inputs = [case.make(gen) for _ in range(1 if device == "cuda" else 4)]
    fn = bench._callable(case, provider, inputs, mode)
    expect = case.plain(*inputs[0]).detach()
    got = fn(0).detach()
    # bf16 inputs: both sides accumulate in fp32, the order of the sums differs
    tol = dict(rtol=1e-4, atol=1e-5) if case.dtype == "fp32" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got.float(), expect.float(), **tol)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    counter = iter(range(1, 1 << 30))

    def call():
        fn(next(counter))
        sync()

    benchmark.extra_info.update(kernel=case.kernel, layout=case.layout, dtype=case.dtype, shape=case.shape,
                                mbytes=case.nbytes(inputs[0], mode) / 2**20, device=bench.device_name(device),
                                torch=torch.__version__, p2t=p2t.__version__)
    benchmark(call)


def test_rows_round_trip_through_csv(tmp_path):
    """Rows written and read back keep every column; mappings with the column names (empty cells
    included) are accepted, unknown names are not; files without the newer columns still read."""
    env = bench.environment("cpu")
    row = bench.BenchmarkRow.measured(env, kernel="k", provider="cpu", mode="forward", metric="time", unit="ms",
                                      x=3, y50=1.5, y20=1.25, y80=2.0, shape="2x3", host_ms=0.125)
    as_dict = dict(kernel="k", provider="reference", mode="forward", metric="time", unit="ms", x=3, y50=2.0,
                   y20=1.0, y80=3.0, gpu="g", version="v", shape="2x3", mbytes="", gbps="")
    path = str(tmp_path / "rows.csv")
    bench.write_csv([row, as_dict], path)
    back = bench.read_csv(path)
    assert [r.provider for r in back] == ["cpu", "reference"]
    assert back[0].y50 == 1.5 and back[0].host_ms == 0.125 and back[0].gpu == env["gpu"] and back[0].x == 3.0
    assert back[1].mbytes != back[1].mbytes  # empty cell -> NaN
    with open(path) as f:
        assert f.readline().strip().split(",") == list(bench.COLUMNS)
    with pytest.raises(TypeError, match="nope"):
        bench.write_csv([dict(as_dict, nope=1)], path)
    old = tmp_path / "old.csv"
    old.write_text(",".join(bench.COLUMNS[:-1]) + "\n" + ",".join(["copy", "torch"] + ["1"] * (len(bench.COLUMNS) - 3)))
    (r,) = bench.read_csv(str(old))
    assert r.kernel == "copy" and r.y50 == 1.0 and r.host_ms != r.host_ms
    lines = bench.format_table(back)
    assert "host us" in lines[0] and lines[1].endswith("1.33x eager")  # 2.0 ms / 1.5 ms, same case
