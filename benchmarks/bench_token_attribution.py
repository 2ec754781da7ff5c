"""Benchmark of `p2t.token_attribution`: every backend vs reference vs torch.compile (see bench_ops.py for options)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(ops=["token_attribution"]))
