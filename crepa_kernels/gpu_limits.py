"""Hardware limits of the NVIDIA architectures the kernels are built and checked for, usable without a GPU.

From the CUDA C++ Programming Guide, "Technical Specifications per Compute Capability", and the same figures in
CCCL's cuda::arch_traits (shared memory per SM minus the 1 KB the driver reserves per block). The per-block shared
memory figure is the opt-in maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin), static plus dynamic; without the
opt-in a kernel gets 48 KB of dynamic shared memory.
"""
from __future__ import annotations

MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65_535
MAX_THREADS_PER_BLOCK = 1024

KB = 1024
# arch -> shared memory one block may use after opting in; examples of each in the comments
SHARED_BYTES_PER_BLOCK_OPTIN = {
    "sm_80": 163 * KB,  # A100, A30
    "sm_86": 99 * KB,  # RTX 3090, A6000, A10, A40
    "sm_87": 163 * KB,  # Jetson AGX Orin
    "sm_89": 99 * KB,  # RTX 4090, L40S, L4
    "sm_90": 227 * KB,  # H100, H200, GH200
    "sm_100": 227 * KB,  # B200, GB200
    "sm_103": 227 * KB,  # B300, GB300
    "sm_110": 227 * KB,  # Jetson Thor
    "sm_120": 99 * KB,  # RTX 5090, RTX PRO 6000 Blackwell
    "sm_121": 99 * KB,  # DGX Spark (GB10)
}
# the architectures the CUDA and Triton builds are checked against
CHECKED_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_103", "sm_110", "sm_120", "sm_121")
# From sm_90 on, a cubin's shared size (cuobjdump -res-usage SHARED) includes the 1 KB per block the driver reserves
# (compiled here with nvcc 13.0: a kernel with no __shared__ variable shows SHARED:1024 for sm_90 to sm_120, 0 for
# sm_8x). That reservation lies outside the opt-in figure above, so it is subtracted before comparing with it.
def reserved_shared_bytes(capability: tuple[int, int]) -> int:
    """The driver's reservation a kernel of this compute capability reports as static shared memory."""
    return 1024 if capability >= (9, 0) else 0


RESERVED_SHARED_BYTES_IN_CUBIN = {arch: reserved_shared_bytes(divmod(int(arch[3:]), 10))
                                  for arch in SHARED_BYTES_PER_BLOCK_OPTIN}
