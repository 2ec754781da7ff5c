"""Static resource report of every GPU kernel of p2t for sm_90 (H100/H200), without a GPU.

* CUDA: ``csrc/cuda/*.cu`` compiled by nvcc to a cubin for sm_90 with ``-Xptxas -v`` (the flags of the
  extension build), every template instance; the block size from the PTX's ``.maxntid``
  (``__launch_bounds__``) or, failing that, from the launch in the source.
* Triton: every kernel variant of ``p2t_kernels.aot_check.variants()`` compiled ahead of time for sm_90
  (``triton.compile`` with a ``GPUTarget``), its PTX run through Triton's own ptxas with ``-v`` and the
  flags Triton uses; block size from ``num_warps``, shared memory from the compiled metadata.

Per kernel: registers per thread, spill stores/loads and stack (bytes), shared memory per block,
theoretical occupancy on sm_90 (resident warps / 64, limited by registers, shared memory, threads and
blocks per SM), bytes moved per element, and the time those bytes take at the copy bandwidth
(``--bandwidth``, default 4300 GB/s: an H200) at the headline shapes: attribution 64x2048x1536, the other
kernels 64x2048 tokens. The predicted time is a floor; the small kernels are bound by launch latency
(a few microseconds each), not by bytes.

    python benchmarks/static_resources.py [--out benchmarks/results] [--force] [--bandwidth 4300]

Writes ``static_resources_sm90.json`` (everything, with the hash of the inputs of each part: an
unchanged part is not recompiled) and ``static_resources_sm90.md`` (the tables) under ``--out``. Without
nvcc the CUDA part is skipped (or kept from the cache); without triton, the Triton part.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = {"root": ROOT, "rev": "working tree"}  # where csrc/ and p2t_kernels/ are read from (--rev: a commit)
NAME = "static_resources_sm90"

# sm_90 (H100/H200) limits, from the CUDA occupancy calculator
SM90 = dict(regs_per_sm=65536, reg_unit=256, max_warps=64, max_blocks=32, max_threads=2048,
            smem_per_sm=233472, smem_unit=128, smem_reserved_per_block=1024, max_regs_per_thread=255)

# headline shapes: the attribution reads [B, N, D]; the other kernels go over B*N tokens
SHAPE = dict(B=64, N=2048, D=1536)
SIZES = {"fp64": 8, "fp32": 4, "fp16": 2, "bf16": 2, "i64": 8, "i32": 4, "u8": 1, "i1": 1,
         "double": 8, "float": 4, "Half": 2, "BFloat16": 2, "c10::Half": 2, "c10::BFloat16": 2}


# ---------------------------------------------------------------------------------------------
# Occupancy and bytes
# ---------------------------------------------------------------------------------------------
def occupancy(regs: int, threads: int, smem: int, arch: dict = SM90) -> dict:
    """Theoretical occupancy of a kernel with ``regs`` registers per thread, ``threads`` per block and
    ``smem`` bytes of shared memory per block: blocks per SM, resident warps / max warps, and the limiter."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / arch["reg_unit"]) * arch["reg_unit"]
    limits = {
        "registers": (arch["regs_per_sm"] // regs_per_warp) // warps,
        "threads": arch["max_threads"] // (warps * 32),
        "blocks": arch["max_blocks"],
        "shared": arch["smem_per_sm"] // (math.ceil(smem / arch["smem_unit"]) * arch["smem_unit"]
                                          + arch["smem_reserved_per_block"]),
    }
    blocks = min(limits.values())
    full = blocks * warps >= arch["max_warps"]
    limiter = "none" if full else min(limits, key=lambda k: (limits[k], k != "registers"))
    return dict(blocks_per_sm=blocks, occupancy=blocks * warps / arch["max_warps"], limiter=limiter)


def _bytes_cuda(name: str) -> tuple:
    """(bytes per element, element, elements at the headline shape) of a CUDA kernel from its demangled
    name; (None, "", 0) for a kernel this model does not know."""
    m = re.match(r"(?:void )?(\w+)<([^>]*(?:<[^>]*>[^>]*)*)>", name)
    base = m.group(1) if m else name.split("(")[0].replace("void ", "")
    targs = [t.strip() for t in m.group(2).split(",")] if m else []
    tokens = SHAPE["B"] * SHAPE["N"]
    sz = [SIZES.get(t, 0) for t in targs]
    if base == "attribution_kernel" and len(sz) >= 3:
        return sz[0] + sz[1] + sz[2] / SHAPE["D"], "(token, d)", tokens * SHAPE["D"]
    if base == "segment_kernel" and len(sz) >= 2:
        return sz[0] + 8 + sz[1], "token", tokens  # scores, int64 id, out
    if base == "row_stage_kernel" and len(sz) >= 2:
        return sz[0] + 8 + 1 + sz[1], "token", tokens  # the whole stage: scores, int64 id, mask, out
    if base == "token_advantages_kernel" and len(sz) >= 2:
        return sz[0] + 1 + sz[1], "token", tokens  # token rewards, mask, out
    if base == "run_bounds_kernel":
        return 8.0, "token", tokens  # int64 ids (bounds: 2 x 4 bytes per segment)
    return None, "", 0


# per-token pointer arguments of the Triton kernels (the rest are per segment or per row)
_TRITON_TOKEN_PTRS = ("x_ptr", "ids_ptr", "mask_ptr", "tr_ptr", "out_ptr")


def _bytes_triton(kernel: str, args: dict, cx: dict) -> tuple:
    tokens = SHAPE["B"] * SHAPE["N"]

    def size(ptr):
        t = args.get(ptr, "")
        return SIZES.get(t.lstrip("*"), 0) if isinstance(t, str) and t.startswith("*") else 0

    if kernel == "_attribution_kernel":
        per_row = size("out_ptr") + (size("mask_ptr") if cx.get("HAS_MASK") else 0)
        if cx.get("FUSED"):
            per_row += size("ids_ptr")
        return size("g_ptr") + size("e_ptr") + per_row / SHAPE["D"], "(token, d)", tokens * SHAPE["D"]
    ptrs = [p for p in _TRITON_TOKEN_PTRS if p in args and (p != "mask_ptr" or cx.get("HAS_MASK"))]
    if kernel == "_run_bounds_kernel":
        ptrs = [p for p in ("ids_ptr",) + (("mask_ptr",) if cx.get("HAS_MASK") else ())]
    if not ptrs:
        return None, "", 0
    return float(sum(size(p) for p in ptrs)), "token", tokens


# ---------------------------------------------------------------------------------------------
# ptxas -v
# ---------------------------------------------------------------------------------------------
def parse_ptxas(log: str) -> dict:
    """{mangled name: {registers, spill_stores, spill_loads, stack, smem, barriers}} from ``ptxas -v``."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = out.setdefault(m.group(1), dict(registers=0, spill_stores=0, spill_loads=0, stack=0, smem=0,
                                                  barriers=0))
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            s = re.search(r"(\d+) bytes smem", line)
            cur["barriers"] = int(b.group(1)) if b else 0
            cur["smem"] = int(s.group(1)) if s else 0
    return out


def demangle(names: list) -> dict:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    p = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60)
    dem = p.stdout.splitlines()
    if len(dem) != len(names):
        return {n: n for n in names}
    clean = [re.sub(r"p2t::\(anonymous namespace\)::|c10::(?=Half|BFloat16)", "", d) for d in dem]
    clean = [re.sub(r"\(.*\)$", "", c).replace("void ", "") for c in clean]
    return dict(zip(names, clean))


def _hash(paths: list, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(os.path.relpath(p, SRC["root"]).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME", "")
    for cand in ([os.path.join(home, "bin", "nvcc")] if home else []) + ["/usr/local/cuda/bin/nvcc",
                                                                           shutil.which("nvcc") or ""]:
        if cand and os.access(cand, os.X_OK):
            return cand
    return ""


def _launch_threads(src: str, kernel: str) -> int:
    """Threads per block of ``kernel`` from its launch in the source: the block argument of the
    P2T_LAUNCH after the last assignment naming the kernel, evaluated with the file's constexpr ints."""
    consts = {k: int(v) for k, v in re.findall(r"constexpr int (\w+) = (\d+);", src)}
    for m in re.finditer(r"P2T_LAUNCH\(", src):
        before = src[max(0, m.start() - 600):m.start()]
        depth, args, cur = 1, [], ""
        for ch in src[m.end():m.end() + 400]:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    break
            if ch == "," and depth == 1:
                args.append(cur.strip())
                cur = ""
            else:
                cur += ch
        if len(args) >= 3 and (args[0] == kernel or re.search(rf"\b{kernel}\b", before.split(";")[-2]
                                                                if ";" in before else before)):
            expr = args[2]
            try:
                return int(eval(expr, {"__builtins__": {}}, consts))  # noqa: S307 - constants of our own file
            except Exception:  # noqa: BLE001
                return 0
    return 0


def cuda_part(cache: dict, force: bool) -> dict:
    nvcc = _nvcc()
    root = SRC["root"]
    sources = sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))
    headers = sorted(glob.glob(os.path.join(root, "csrc", "*.h")) + glob.glob(os.path.join(root, "csrc", "cuda", "*.h")))
    if not nvcc:
        part = dict(cache.get("cuda") or {})
        part["note"] = "nvcc not found: CUDA part " + ("kept from the cache" if part.get("kernels") else "skipped")
        return part
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout.strip().splitlines()
    version = version[-1] if version else "?"
    os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    import torch
    from torch.utils import cpp_extension as ce

    flags = ["-O3", "-std=c++20", "-lineinfo", "-arch=sm_90"] + list(ce.COMMON_NVCC_FLAGS)
    key = _hash(sources + headers, json.dumps([version, torch.__version__, flags]))
    if not force and (cache.get("cuda") or {}).get("key") == key:
        return dict(cache["cuda"], note="unchanged sources: kept from the cache")
    incs = [os.path.join(root, "csrc")] + ce.include_paths("cuda") + [sysconfig.get_paths()["include"]]
    for p in sys.path:
        d = os.path.join(p, "nvidia", "cu13", "include")
        if os.path.isdir(d):
            incs.append(d)
    kernels, t0 = [], time.time()
    for src_path in sources:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [nvcc, "-cubin", *flags, "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
                   *[f"-I{i}" for i in incs], "-Xptxas", "-v", "--keep", "--keep-dir", tmp,
                   "-o", os.path.join(tmp, "k.cubin"), src_path]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if p.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src_path}:\n{p.stderr[-3000:]}")
            ptx = "".join(open(f).read() for f in glob.glob(os.path.join(tmp, "*.ptx")))
        with open(src_path) as f:
            source = f.read()
        res = parse_ptxas(p.stdout + p.stderr)
        names = demangle(list(res))
        for mangled, r in res.items():
            m = re.search(rf"\.entry {re.escape(mangled)}\((?:.|\n)*?\)\s*((?:\.\w+[^\n]*\n\s*)*)\{{", ptx)
            ntid = re.search(r"\.maxntid (\d+)", m.group(1)) if m else None
            name = names[mangled]
            base = re.sub(r"<.*", "", name)
            threads = int(ntid.group(1)) if ntid else _launch_threads(source, base)
            kernels.append(dict(name=name, source=os.path.relpath(src_path, root), threads=threads,
                                threads_from="__launch_bounds__" if ntid else ("launch" if threads else "unknown"),
                                **r))
    for k in kernels:
        bpe, elem, n = _bytes_cuda(k["name"])
        k.update(bytes_per_elem=bpe, element=elem, elements=n)
    return dict(key=key, nvcc=version, torch=torch.__version__, flags=" ".join(flags), kernels=kernels,
                seconds=round(time.time() - t0, 1), note="compiled")


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
def triton_part(cache: dict, force: bool) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        part = dict(cache.get("triton") or {})
        part["note"] = f"triton unavailable ({e}): Triton part " + ("kept from the cache" if part.get("kernels")
                                                                     else "skipped")
        return part
    sys.path.insert(0, SRC["root"])
    from p2t_kernels import aot_check

    sources = sorted(glob.glob(os.path.join(SRC["root"], "p2t_kernels", "*.py")))
    key = _hash(sources, triton.__version__)
    if not force and (cache.get("triton") or {}).get("key") == key:
        return dict(cache["triton"], note="unchanged sources: kept from the cache")
    try:
        from triton import knobs
        ptxas = knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - older triton
        ptxas = shutil.which("ptxas") or ""
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability
        gpu_name = sm_arch_from_capability(90)
    except Exception:  # noqa: BLE001
        gpu_name = "sm_90a"
    target = GPUTarget("cuda", 90, 32)
    kernels, t0 = [], time.time()
    for name, kernel, args, cx in aot_check.variants():
        cx = dict(cx)
        warps = cx.pop("num_warps", 4)
        row = dict(name=f"{kernel.fn.__name__ if hasattr(kernel, 'fn') else kernel.__name__} [{name}]",
                   source="p2t_kernels", threads=32 * warps, threads_from="num_warps")
        try:
            src = ASTSource(fn=kernel, signature=aot_check._signature(kernel, args, cx), constexprs=cx)
            ck = triton.compile(src, target=target, options={"num_warps": warps})
            with tempfile.TemporaryDirectory() as tmp:
                ptx_path = os.path.join(tmp, "k.ptx")
                with open(ptx_path, "w") as f:
                    f.write(ck.asm["ptx"])
                p = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}",
                                    ptx_path, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True,
                                   timeout=300)
            (r,) = parse_ptxas(p.stdout + p.stderr).values()
            r["smem"] = max(r["smem"], int(getattr(ck.metadata, "shared", 0) or 0))
            row.update(r)
        except Exception as e:  # noqa: BLE001 - report the variant that does not compile
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        bpe, elem, n = _bytes_triton(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, args, cx)
        row.update(bytes_per_elem=bpe, element=elem, elements=n)
        kernels.append(row)
    return dict(key=key, triton=triton.__version__, ptxas=ptxas and os.path.basename(ptxas), gpu_name=gpu_name,
                kernels=kernels, seconds=round(time.time() - t0, 1), note="compiled")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def finish(kernels: list, gbps: float) -> None:
    for k in kernels:
        if "registers" in k and k.get("threads"):
            k.update(occupancy(k["registers"], k["threads"], k.get("smem", 0)))
        if k.get("bytes_per_elem"):
            k["mbytes"] = k["bytes_per_elem"] * k["elements"] / 1e6
            k["predicted_us"] = k["bytes_per_elem"] * k["elements"] / (gbps * 1e9) * 1e6


def table(kernels: list) -> list:
    head = ("kernel", "threads", "regs", "spill st/ld (B)", "stack (B)", "smem (B)", "occupancy (limit)",
            "bytes/elem", "MB at headline shape", "µs at copy bw")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in kernels:
        if "error" in k:
            lines.append(f"| {k['name']} | compile error: {k['error'][:120]} |" + " |" * (len(head) - 2))
            continue
        occ = f"{100 * k['occupancy']:.0f}% ({k['limiter']})" if "occupancy" in k else "?"
        bpe = f"{k['bytes_per_elem']:.3g} per {k['element']}" if k.get("bytes_per_elem") else "—"
        lines.append(f"| `{k['name']}` | {k.get('threads') or '?'} | {k['registers']} | {k['spill_stores']}/"
                     f"{k['spill_loads']} | {k['stack']} | {k['smem']} | {occ} | {bpe} | "
                     f"{k.get('mbytes', float('nan')):.3g} | {k.get('predicted_us', float('nan')):.3g} |")
    return lines


def headline(doc: dict) -> list:
    """The README's table: the fp32/bf16 kernels the headline cases run (no fp64/fp16 instances; the
    attribution with equal input dtypes and the null in that dtype), CUDA then Triton."""
    lines = ["| backend | kernel | threads | regs | spills (B) | smem (B) | occupancy | bytes/elem | floor at "
             f"{doc['bandwidth_gbps'] / 1000:.1f} TB/s |", "|---|---|---|---|---|---|---|---|---|"]
    for part in ("cuda", "triton"):
        for k in (doc.get(part) or {}).get("kernels", []):
            n = k["name"]
            if re.search(r"double|Half|fp64|fp16", n) or "error" in k:
                continue
            if n.startswith("attribution_kernel"):
                targs = [t.strip() for t in n[n.index("<") + 1:n.rindex(">")].split(",")]
                # equal input dtypes (bf16 or fp32) and the null read in that dtype (the instance p2t uses)
                if targs[0] != targs[1] or targs[0] not in ("BFloat16", "float") or (len(targs) >= 6
                                                                                      and targs[5] != targs[0]):
                    continue
            occ = f"{100 * k['occupancy']:.0f}%" + (f" ({k['limiter']})" if k.get("limiter") not in (None, "none") else "")
            bpe = f"{k['bytes_per_elem']:.3g}/{'(tok,d)' if k['element'] == '(token, d)' else 'tok'}" \
                if k.get("bytes_per_elem") else "—"
            us = f"{k['predicted_us']:.3g} µs" if k.get("predicted_us") else "—"
            lines.append(f"| {part} | `{n}` | {k.get('threads', '?')} | {k['registers']} | "
                         f"{k['spill_stores'] + k['spill_loads']} | {k['smem']} | {occ} | {bpe} | {us} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--cache", default=None, help=f"a previous {NAME}.json (default: the one in --out)")
    ap.add_argument("--force", action="store_true", help="recompile even when the sources are unchanged")
    ap.add_argument("--bandwidth", type=float, default=4300.0, help="copy bandwidth in GB/s (H200 ~4300)")
    ap.add_argument("--only", choices=("cuda", "triton"), default=None)
    ap.add_argument("--headline", action="store_true", help="print the README's table from the JSON in --out")
    ap.add_argument("--rev", default=None, help="read csrc/ and p2t_kernels/ of this git commit (default: the files)")
    a = ap.parse_args(argv)
    if a.rev:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=10", a.rev], capture_output=True, text=True,
                             check=True).stdout.strip()
        tmp = tempfile.mkdtemp(prefix="p2t-static-")
        archive = subprocess.run(["git", "-C", ROOT, "archive", sha, "csrc", "p2t_kernels"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        SRC.update(root=tmp, rev=sha)
    if a.headline:
        with open(os.path.join(a.out, NAME + ".json")) as f:
            print("\n".join(headline(json.load(f))))
        return 0
    os.makedirs(a.out, exist_ok=True)
    json_path = os.path.join(a.out, NAME + ".json")
    cache = {}
    for path in (a.cache, json_path):
        if path and os.path.exists(path):
            with open(path) as f:
                cache = json.load(f)
            break
    t0 = time.time()
    parts = {}
    if a.only in (None, "cuda"):
        parts["cuda"] = cuda_part(cache, a.force)
        print(f"cuda: {parts['cuda'].get('note')} ({len(parts['cuda'].get('kernels', []))} kernels)", flush=True)
    if a.only in (None, "triton"):
        parts["triton"] = triton_part(cache, a.force)
        print(f"triton: {parts['triton'].get('note')} ({len(parts['triton'].get('kernels', []))} variants)", flush=True)
    for p in parts.values():
        finish(p.get("kernels", []), a.bandwidth)
    for p in parts.values():
        if p.get("note") == "compiled":
            p["sources"] = SRC["rev"]
    doc = dict(arch="sm_90", bandwidth_gbps=a.bandwidth, shape=SHAPE, limits=SM90,
               date=time.strftime("%Y-%m-%d", time.gmtime()), **{k: v for k, v in cache.items()
                                                                  if k in ("cuda", "triton") and k not in parts},
               **parts)
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    md = [f"# Static resources of the GPU kernels for sm_90 (no GPU involved; {doc['date']})", "",
          f"Registers/spills/stack/shared memory from `ptxas -v`; occupancy = resident warps / 64 on sm_90; "
          f"µs = bytes at the headline shape (attribution {SHAPE['B']}x{SHAPE['N']}x{SHAPE['D']}, other kernels "
          f"{SHAPE['B']}x{SHAPE['N']} tokens) / {a.bandwidth:.0f} GB/s: a floor (the small kernels are "
          f"launch-bound). Made by `python benchmarks/static_resources.py`.", ""]
    for part in ("cuda", "triton"):
        p = doc.get(part)
        if not p:
            continue
        who = (f"nvcc {p.get('nvcc', '?')}, `{p.get('flags', '')}`" if part == "cuda"
               else f"triton {p.get('triton', '?')}, its ptxas, `--gpu-name={p.get('gpu_name', '?')}`")
        who += f"; sources: {p.get('sources', '?')}"
        md += [f"## {'CUDA (csrc/cuda)' if part == 'cuda' else 'Triton (p2t_kernels)'}: {who}", ""]
        md += table(p.get("kernels", [])) + [""]
    with open(os.path.join(a.out, NAME + ".md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print(f"wrote {json_path} and {NAME}.md ({time.time() - t0:.0f} s)")
    errors = [k["name"] for p in parts.values() for k in p.get("kernels", []) if "error" in k]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
