"""`p2t env`: versions, devices and which backends are usable here (and why not the others)."""
from __future__ import annotations

import platform


def configure(parser):
    pass


def run(args) -> int:
    import torch

    import p2t
    from p2t.ops import _backends

    print(f"p2t          {p2t.__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__} (cuda {torch.version.cuda})")
    try:
        import triton
        print(f"triton       {triton.__version__}")
    except ImportError:
        print("triton       not installed")
    try:
        import transformers
        print(f"transformers {transformers.__version__}")
    except ImportError:
        print("transformers not installed")
    print(f"cpu threads  {torch.get_num_threads()}")
    print(f"cpu kernels  {p2t.ops.cpu_isa()} clone (here: {', '.join(p2t.ops.cpu_isas()) or 'none'}; "
          f"P2T_CPU_ISA forces one)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}       {torch.cuda.get_device_name(i)}")
    else:
        print("cuda         no GPU visible")
    print("backends:")
    for name in _backends.BACKEND_NAMES:
        if name in _backends.available_backends():
            devs = ", ".join(_backends._REGISTRY[name].devices)
            print(f"  {name:<10} available ({devs})")
        else:
            print(f"  {name:<10} unavailable: {_backends.unavailable_backends().get(name, 'not registered')}")
    for dev in ("cpu", "cuda"):
        picks = {op: next((b for b in _backends.AUTO[dev][op] if b in _backends.available_backends(dev)), "reference")
                 for op in _backends.OPS}
        print(f"auto on {dev}: " + ", ".join(f"{op}->{b}" for op, b in picks.items()))
    return 0
