"""The constants only the build tools read, tested without the tools (no nvcc, no cuobjdump here):

* crepa_kernels.gpu_limits against NVIDIA's documented per-architecture figures, restated here from the CUDA C++
  Programming Guide's "Technical Specifications per Compute Capability" (shared memory per SM, the 1 KB per block
  reserved by the driver, the opt-in per-block maximum; the grid and block limits), so a typo in one of them fails
  here instead of in a build check that skips without a toolkit;
* tools/check_cuda_build.py's per-kernel check on synthetic cuobjdump rows, at, below and above each limit.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from crepa_kernels import gpu_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import check_cuda_build  # noqa: E402

KB = 1024
# "Maximum amount of shared memory per SM" per compute capability, in KB (the Programming Guide's table)
SHARED_PER_SM_KB = {"sm_80": 164, "sm_86": 100, "sm_87": 164, "sm_89": 100, "sm_90": 228, "sm_100": 228,
                    "sm_103": 228, "sm_110": 228, "sm_120": 100, "sm_121": 100}
RESERVED_PER_BLOCK = 1 * KB  # "shared memory reserved by the CUDA driver per thread block" from 8.0 on


def test_per_block_opt_in_is_the_documented_per_sm_figure_less_the_reservation():
    assert set(gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN) == set(SHARED_PER_SM_KB)
    for arch, per_sm in SHARED_PER_SM_KB.items():
        assert gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[arch] == per_sm * KB - RESERVED_PER_BLOCK, arch


def test_grid_block_and_default_limits_are_the_documented_ones():
    assert gpu_limits.MAX_GRID_X == 2**31 - 1
    assert gpu_limits.MAX_GRID_YZ == 65535
    assert gpu_limits.MAX_THREADS_PER_BLOCK == 1024


def test_every_checked_arch_has_its_limits():
    for arch in gpu_limits.CHECKED_ARCHS:
        assert arch in gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN and arch in gpu_limits.RESERVED_SHARED_BYTES_IN_CUBIN


def test_cubin_reservation_is_the_drivers_block_reservation_from_sm_90_on():
    """nvcc 13.0 counts the driver's 1 KB in a cubin's SHARED from sm_90 on (0 for sm_8x): gpu_limits' note."""
    for arch in gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN:
        expected = RESERVED_PER_BLOCK if int(arch[3:]) >= 90 else 0
        assert gpu_limits.RESERVED_SHARED_BYTES_IN_CUBIN[arch] == expected, arch


FORWARD = "_Z14forward_kernelIfLb1EEvPKfS1_"  # a band kernel: dynamic shared memory up to the limit
REDUCE = "_Z20reduce_tokens_kernelIfEvPKf"  # no dynamic shared memory


@pytest.mark.parametrize("arch", sorted(gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN, key=lambda a: int(a[3:])))
def test_build_check_on_synthetic_rows_at_the_limit(arch):
    """A band kernel whose static shared memory is only the reservation the cubin counts fits exactly (its
    dynamic part may take the whole limit); one byte more of static shared memory fails. A kernel without dynamic
    shared memory fits with static = limit and fails one byte above."""
    limit = gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[arch]
    reserved = gpu_limits.RESERVED_SHARED_BYTES_IN_CUBIN[arch]
    static, dynamic, got_limit, failures = check_cuda_build.check_row(arch, FORWARD, {"REG": 40, "SHARED": reserved})
    assert (static, dynamic, got_limit, failures) == (0, limit, limit, [])
    assert check_cuda_build.check_row(arch, FORWARD, {"REG": 40, "SHARED": reserved + 1})[3]
    assert check_cuda_build.check_row(arch, REDUCE, {"REG": 40, "SHARED": reserved + limit})[3] == []
    assert check_cuda_build.check_row(arch, REDUCE, {"REG": 40, "SHARED": reserved + limit - 1})[3] == []
    assert check_cuda_build.check_row(arch, REDUCE, {"REG": 40, "SHARED": reserved + limit + 1})[3]


def test_build_check_refuses_stack_local_memory_and_unknown_archs():
    assert check_cuda_build.check_row("sm_90", REDUCE, {"REG": 40, "STACK": 8})[3] == [
        f"sm_90 {check_cuda_build.short_name(REDUCE)}: STACK=8"]
    assert check_cuda_build.check_row("sm_90", REDUCE, {"REG": 40, "LOCAL": 4})[3]
    assert check_cuda_build.check_row("sm_90", REDUCE, {"REG": 40, "STACK": 0, "LOCAL": 0})[3] == []
    assert check_cuda_build.check_row("sm_75", REDUCE, {"REG": 40})[3] == [
        "sm_75: no per-block shared memory limit in crepa_kernels.gpu_limits"]


def test_required_code_of_the_arch_list():
    sass, ptx = check_cuda_build.required_code("8.0;9.0;12.0+PTX")
    assert sass == {"sm_80", "sm_90", "sm_120"} and ptx == {"compute_120"}
