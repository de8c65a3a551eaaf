"""How the extension is compiled: shared by setup.py (ahead of time) and crepa_kernels/ops/build.py (JIT).

Plain Python with no torch import, shipped next to the sources so both paths use the same files and flags.
"""
from __future__ import annotations

import os
from pathlib import Path

CSRC = Path(__file__).resolve().parent
CPU_SOURCES = ("crepa_ops.cpp", "crepa_cpu.cpp", "crepa_relation_cpu.cpp")
CUDA_SOURCES = ("crepa_cuda.cpp", "crepa_cuda_kernels.cu")
# TORCH_CUDA_ARCH_LIST entries: SASS for each (a GPU runs SASS of its own major version and an equal or lower minor
# one), and "+PTX" embeds the PTX of that architecture too, which the driver compiles for newer GPUs.
#   8.0 A100 (8.7 Orin runs it)  8.6 RTX 30xx, A10, A40, A6000  8.9 RTX 40xx, L4, L40S  9.0 H100, H200
#   10.0 B200 (10.3 B300 runs it)  11.0 Jetson Thor  12.0 RTX 50xx, RTX PRO 6000 (12.1 DGX Spark runs it)
# Every SASS architecture nvcc 13.0 can build from 8.0 on, minus the minors a lower SASS already covers.
CUDA_ARCHS = "8.0;8.6;8.9;9.0;10.0;11.0;12.0+PTX"
DEFAULT_CUDA_ARCHS = CUDA_ARCHS

# -O3 vectorises the kernels' fixed-lane loops; no -march: the CPU kernels are built for the baseline ISA (SSE2 on
# x86-64, so a built wheel runs anywhere) and again, through a function attribute, for AVX2 + FMA, picked at run
# time. -ffp-contract=fast lets that build fuse a * b + c into one FMA (ISO C++ modes default to no contraction);
# it changes nothing where the ISA has no FMA. -fopenmp makes at::parallel_for parallel (torch's builds use OpenMP).
CXX_FLAGS = ["-O3", "-ffp-contract=fast", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
# No --use_fast_math: the kernels must match the fp32 reference to ~1e-5, with IEEE sqrt and division.
NVCC_FLAGS = ["-O3", "-lineinfo"]
CUDA_DEFINE = "-DCREPA_WITH_CUDA"


# The "cuda_emulated" backend: the CUDA kernels and their ATen glue built by the host compiler against ROCm's HIP CPU
# Runtime (header-only; crepa_cuda_portability.h), as a second extension of its own ops (crepa_kernels_emulated).
# -O2: the kernels run as fibers, where the build's speed matters as much as the code's.
EMULATED_SOURCES = ("crepa_ops.cpp", "crepa_cuda.cpp", "crepa_cuda_kernels_emulated.cpp", "crepa_cuda_emulated.cpp")
EMULATED_DEFINE = "-DCREPA_HIP_CPU"
EMULATED_CXX_FLAGS = ["-O2", EMULATED_DEFINE]
HIP_CPU_ROOT_VARIABLE = "HIP_CPU_ROOT"


def hip_cpu_root(csrc: Path = CSRC) -> Path | None:
    """The HIP CPU Runtime: $HIP_CPU_ROOT, else ../shared/third_party/hip-cpu beside the checkout; None if absent."""
    configured = os.environ.get(HIP_CPU_ROOT_VARIABLE)
    candidates = [Path(configured)] if configured else [csrc.parent.parent / "shared" / "third_party" / "hip-cpu"]
    for candidate in candidates:
        if (candidate / "include" / "hip" / "hip_runtime.h").exists():
            return candidate.resolve()
    return None


def emulated_sources(csrc: Path = CSRC) -> list[str]:
    return [str(csrc / name) for name in EMULATED_SOURCES]


def sources(with_cuda: bool, csrc: Path = CSRC) -> list[str]:
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(csrc / name) for name in names]


def cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME (or $CUDA_PATH), else /usr/local/cuda when it is a complete toolkit, else None.

    torch's own guess derives the toolkit from the nvcc on PATH, which can be a wrapper script outside it
    (then linking fails on -lcudart); callers fall back to that guess only when this returns None.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").exists() and (default / "lib64" / "libcudart.so").exists():
        return str(default)
    return None
