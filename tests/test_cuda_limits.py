"""The CUDA kernels' launch configuration against the hardware limits of every checked architecture, without a GPU.

The grid, block and dynamic shared memory come from the C++ planner the CUDA launcher itself uses
(csrc/crepa_cuda_plan.h, exposed as native.cuda_launch_plan in every build of the extension). What no GPU here
can show: that the kernels use exactly that much shared memory (read the layout comments in csrc/crepa_cuda_kernels.cu) and that
the opt-in call succeeds (the GPU tests at the end).
"""
from __future__ import annotations

import itertools
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from crepa_kernels import LossOptions, backends, gpu_limits
from crepa_kernels.ops import native
from crepa_kernels.spec import coefficient_table
from harness import assert_backend_matches_reference, random_pair

reason = native.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"C++ extension unavailable: {reason}")

ACC_BYTES = {torch.float32: 4, torch.float64: 8}
INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Where the 48 KB cap made the backward fail after a successful forward (issue 12, defect 3), [F, mode, d range, acc]
ISSUE_CASES = [(49, range(31, 49), torch.float32), (61, range(25, 61), torch.float32), (33, range(23, 33), torch.float64)]
# Realistic and extreme sizes; N up to 2^40 tokens and B * N past the grid's x limit.
SHAPES = [(1, 13, 1350, 768), (2, 33, 3600, 1536), (1, 61, 8040, 3072), (3, 7, 2**33 + 5, 1), (2**12, 5, 2**30, 3),
          (1, 1, 1, 1), (1, 2, 1, 4097), (2**31 + 3, 1, 1, 8), (1, 300, 17, 200)]
NEIGHBOURS = [(0, "adjacent"), (1, "adjacent"), (7, "adjacent"), (2, "cumulative"), (25, "cumulative"),
              (299, "cumulative")]


def options_for(neighbors: int, mode: str) -> LossOptions:
    return LossOptions(neighbors=neighbors, neighbor_mode=mode)


def expected_threads(dim: int) -> int:
    """ceil(D / 8) threads rounded up to a warp, at most 256 (docs/cpp.md)."""
    return min(256, -(-(-(-dim // 8)) // 32) * 32)


@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("neighbors,mode", NEIGHBOURS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_plan_fits_the_grid_and_block_limits(shape, neighbors, mode, acc):
    B, F, N, D = shape
    plan = native.cuda_launch_plan(shape, options_for(neighbors, mode), acc)
    assert set(plan) == {"forward", "reduce", "backward"}
    for kernel in ("forward", "backward", "reduce"):
        launch = plan[kernel]
        assert 1 <= launch["grid"] <= gpu_limits.MAX_GRID_X, kernel
        assert 32 <= launch["threads"] <= gpu_limits.MAX_THREADS_PER_BLOCK and launch["threads"] % 32 == 0, kernel
    # one block per token column: launches of at most MAX_GRID_X blocks cover all B * N, the last one partly
    for kernel in ("forward", "backward"):
        grid, launches = plan[kernel]["grid"], plan[kernel]["launches"]
        assert grid == min(B * N, gpu_limits.MAX_GRID_X)
        assert (launches - 1) * grid < B * N <= launches * grid, kernel
    assert plan["forward"]["threads"] == plan["backward"]["threads"] == expected_threads(D)
    # the token reduction grid-strides over B * F in one launch
    assert plan["reduce"] == {"grid": min(B * F, gpu_limits.MAX_GRID_X), "launches": 1, "threads": 256,
                              "shared_bytes": 0}


@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("neighbors,mode", NEIGHBOURS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_plan_shared_memory_is_the_kernels_layout(shape, neighbors, mode, acc):
    """forward: [F][W] coefficients + [warps][S] warp sums; backward: [F][W] + [F] + [F] self + [2][W] direct."""
    _, F, _, D = shape
    options = options_for(neighbors, mode)
    width = native.band_width(F, neighbors, mode == "cumulative")
    stats_per_frame = 2 + width
    plan = native.cuda_launch_plan(shape, options, acc)
    warps = expected_threads(D) // 32
    assert plan["forward"]["shared_bytes"] == (F * width + warps * stats_per_frame) * ACC_BYTES[acc]
    assert plan["backward"]["shared_bytes"] == (F * width + 2 * F + 2 * width) * ACC_BYTES[acc]


@pytest.mark.parametrize("arch", gpu_limits.CHECKED_ARCHS)
def test_every_shape_runs_within_the_limit_or_is_refused(arch):
    limit = gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[arch]
    checked = refused = 0
    for shape, (neighbors, mode), acc in itertools.product(SHAPES, NEIGHBOURS, ACC_BYTES):
        options = options_for(neighbors, mode)
        plan = native.cuda_launch_plan(shape, options, acc)
        need = max(plan["forward"]["shared_bytes"], plan["backward"]["shared_bytes"])
        why = native.cuda_shape_unsupported_reason(shape, options, acc, limit)
        if why is None:
            assert need <= limit, (shape, options, acc)
            checked += 1
        else:
            assert need > limit, (shape, options, acc)
            refused += 1
    assert checked > refused > 0


@pytest.mark.parametrize("arch", gpu_limits.CHECKED_ARCHS)
@pytest.mark.parametrize("dim", [768, 1536, 3072, 5])
def test_the_issue_shapes_now_run_forward_and_backward(arch, dim):
    """Issue 12 defect 3: with the 48 KB cap these passed the forward and failed in the backward."""
    limit = gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[arch]
    for frames, reaches, acc in ISSUE_CASES:
        for neighbors in reaches:
            shape = (2, frames, 3600, dim)
            options = options_for(neighbors, "cumulative")
            assert native.cuda_shape_unsupported_reason(shape, options, acc, limit) is None, (shape, neighbors)


def largest_full_band(limit: int, acc: torch.dtype, dim: int = 3072) -> int:
    """The most frames the CUDA kernels accept with every frame a neighbour of every other (cumulative, d = F)."""
    frames = 1
    while native.cuda_shape_unsupported_reason((1, frames + 1, 1, dim), options_for(frames + 1, "cumulative"),
                                                  acc, limit) is None:
        frames += 1
    return frames


def test_largest_full_bands_per_architecture():
    """Every frame a neighbour of every other: up to 108 frames in fp32 on the 99 KB archs, 75 in fp64."""
    got = {(arch, str(acc)): largest_full_band(gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[arch], acc)
           for arch in ("sm_80", "sm_86", "sm_90") for acc in ACC_BYTES}
    assert got == {("sm_80", "torch.float32"): 140, ("sm_80", "torch.float64"): 98,
                   ("sm_86", "torch.float32"): 108, ("sm_86", "torch.float64"): 75,
                   ("sm_90", "torch.float32"): 166, ("sm_90", "torch.float64"): 116}, got


def test_refusal_names_the_limit_and_the_shape():
    options = options_for(299, "cumulative")
    why = native.cuda_shape_unsupported_reason((1, 300, 17, 200), options, torch.float64, 101376)
    assert why is not None
    for part in ("F=300", "cumulative", "299 frames", "599 slots", "D=200", "fp64", "101376 bytes"):
        assert part in why, (part, why)
    plan = native.cuda_launch_plan((1, 300, 17, 200), options, torch.float64)
    need = max(plan["forward"]["shared_bytes"], plan["backward"]["shared_bytes"])
    assert f"needs {need} bytes" in why


def test_plan_arguments_are_checked():
    options = options_for(1, "adjacent")
    with pytest.raises(ValueError, match="expected positive sizes"):
        native.cuda_launch_plan((1, 0, 3, 4), options, torch.float32)
    with pytest.raises(ValueError, match="accumulation dtype"):
        native.cuda_launch_plan((1, 2, 3, 4), options, torch.bfloat16)
    with pytest.raises(ValueError, match=r"expected \[B, F, N, D\]"):
        native.cuda_launch_plan((2, 3, 4), options, torch.float32)


@pytest.fixture
def grid_limit():
    """Caps the blocks per launch (test switch); restores CUDA's limit afterwards."""
    yield native.set_cuda_grid_limit
    native.set_cuda_grid_limit(0)


def test_a_capped_grid_takes_several_launches(grid_limit):
    """The several-launch path of B * N > 2^31 - 1, on small sizes: 2 * 10 columns in launches of 7, 7 and 6."""
    options = options_for(2, "cumulative")
    grid_limit(7)
    plan = native.cuda_launch_plan((2, 5, 10, 33), options, torch.float32)
    for kernel in ("forward", "backward"):
        assert (plan[kernel]["grid"], plan[kernel]["launches"]) == (7, 3)
    assert (plan["reduce"]["grid"], plan["reduce"]["launches"]) == (7, 1)  # grid-strides over B * F = 10
    grid_limit(0)
    plan = native.cuda_launch_plan((2, 5, 10, 33), options, torch.float32)
    assert (plan["forward"]["grid"], plan["forward"]["launches"], plan["reduce"]["grid"]) == (20, 1, 10)
    with pytest.raises(ValueError, match="blocks: expected 0"):
        grid_limit(-1)


def test_a_stale_build_says_to_rebuild(monkeypatch):
    monkeypatch.setattr(native._extension, "module", types.SimpleNamespace(__file__="old/_C.so"))
    with pytest.raises(RuntimeError, match="old/_C.so has no cuda_launch_plan.*rebuild"):
        native.cuda_launch_plan((1, 2, 3, 4), options_for(1, "adjacent"), torch.float32)


def test_call_unsupported_reason_is_none_on_cpu():
    proj, target = random_pair((1, 300, 2, 3), torch.float64)
    assert native.call_unsupported_reason(proj, target, options_for(299, "cumulative")) is None


@pytest.mark.parametrize("arch", gpu_limits.CHECKED_ARCHS)
def test_call_unsupported_reason_on_cuda_tensors_uses_the_device_limit(arch, monkeypatch):
    """CUDA tensors without a GPU: fake tensors, and the device properties of ``arch``."""
    limit = gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[arch]
    properties = types.SimpleNamespace(shared_memory_per_block_optin=limit)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: divmod(int(arch[3:]), 10))
    for proj_dtype, target_dtype in itertools.product(INPUT_DTYPES, repeat=2):
        acc = torch.float64 if torch.float64 in (proj_dtype, target_dtype) else torch.float32
        for frames, neighbors in ((13, 1), (61, 60), (120, 119), (300, 299)):
            shape = (2, frames, 3600, 1536)
            options = options_for(neighbors, "cumulative")
            with FakeTensorMode():
                proj = torch.empty(shape, dtype=proj_dtype, device="cuda")
                target = torch.empty(shape, dtype=target_dtype, device="cuda")
            # the kernels' static shared memory (the driver's reservation, from sm_90 on) is not theirs to use
            dynamic_limit = limit - gpu_limits.RESERVED_SHARED_BYTES_IN_CUBIN[arch]
            expected = native.cuda_shape_unsupported_reason(shape, options, acc, dynamic_limit)
            assert native.call_unsupported_reason(proj, target, options) == expected
            # F=120 needs 118 KB in fp32 (235 KB in fp64), F=300 far more
            fits = frames <= 61 or (frames == 120 and acc == torch.float32 and limit >= 160 * 1024)
            assert (expected is None) == fits, (frames, acc, expected)


# --- on a GPU ---------------------------------------------------------------------------------------------------

cuda_reason = native.unavailable_reason(torch.device("cuda"))
needs_cuda = pytest.mark.skipif(cuda_reason is not None, reason=f"CUDA kernel unavailable: {cuda_reason}")


@needs_cuda
@pytest.mark.gpu
def test_cuda_forward_refuses_before_any_work():
    limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    frames = next(f for f in range(2, 1000) if native.cuda_shape_unsupported_reason(
        (1, f, 3, 16), options_for(f, "cumulative"), torch.float64, limit))
    proj, target = random_pair((1, frames, 3, 16), torch.float64, device="cuda")
    allocated = torch.cuda.memory_allocated()
    with pytest.raises(NotImplementedError, match=f"F={frames}.*{limit} bytes"):
        table = coefficient_table(options_for(frames, "cumulative"), frames, torch.float64, "cuda")
        torch.ops.crepa_kernels.align_forward(proj, target, table, frames, True, 1e-12)
    assert torch.cuda.memory_allocated() == allocated


# Cumulative bands past 48 KB of dynamic shared memory, within every checked architecture's limit: [F, d, dtype].
# (The cases this test had before planned 13-31 KB, so the opt-in never ran; review defect 2.)
WIDE_BAND_CASES = [(128, 64, torch.bfloat16), (61, 60, torch.float64), (100, 99, torch.float32)]
WIDE_BAND_DIMS = (768, 771)  # D % 8 == 0: the vector path (contiguous inputs); 771: the element path


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dim", WIDE_BAND_DIMS)
def test_the_wide_band_cases_pass_48_kb_and_fit_every_architecture(dim):
    for frames, neighbors, dtype in WIDE_BAND_CASES:
        shape, options = (2, frames, 3, dim), options_for(neighbors, "cumulative")
        plan = native.cuda_launch_plan(shape, options, _accumulation(dtype))
        for kernel in ("forward", "backward"):
            assert plan[kernel]["shared_bytes"] > 48 * 1024, (frames, dtype, kernel)  # past the no-opt-in default
        for arch in gpu_limits.CHECKED_ARCHS:
            limit = gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[arch] - gpu_limits.RESERVED_SHARED_BYTES_IN_CUBIN[arch]
            assert native.cuda_shape_unsupported_reason(shape, options, _accumulation(dtype), limit) is None


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dim", WIDE_BAND_DIMS)
@pytest.mark.parametrize("frames,neighbors,dtype", WIDE_BAND_CASES, ids=str)
def test_cuda_wide_bands_match_reference(frames, neighbors, dtype, dim):
    """Past 48 KB of shared memory: the opt-in path, forward and backward, on the vector path (D = 768) and the
    element path (D = 771); each kernel variant opts in for itself (review defect 1)."""
    proj, target = random_pair((2, frames, 3, dim), dtype, seed=31, device="cuda")
    assert_backend_matches_reference("cuda", proj, target, neighbors=neighbors, neighbor_mode="cumulative",
                                     normalize_weights=True)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("blocks", [1, 7])
def test_cuda_several_launches_match_reference(grid_limit, blocks):
    """Column offsets of later launches and the reduction's grid-stride loop, which otherwise only B * N > 2^31 - 1
    and B * F > 2^31 - 1 reach."""
    grid_limit(blocks)
    for shape, dtype in (((2, 5, 10, 40), torch.float32), ((3, 4, 3, 33), torch.bfloat16)):
        proj, target = random_pair(shape, dtype, seed=33, device="cuda")
        assert_backend_matches_reference("cuda", proj, target, neighbors=2, neighbor_mode="cumulative")


@pytest.mark.parametrize("arch", ["sm_86", "sm_90"])
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
def test_size_limits_are_the_refusal_whatever_b_and_n(arch, acc):
    """cuda_size_limits (what a compiled call is checked against, with F and D symbolic) accepts exactly the sizes
    the refusal accepts, for any B and N: the refusal reads F and D only, and more of either never fits better."""
    limit = gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[arch]
    for neighbors, mode in NEIGHBOURS:
        options = options_for(neighbors, mode)
        limits = native.cuda_size_limits(options, acc, limit)
        assert [dim for dim, _ in limits[:-1]] == sorted(dim for dim, _ in limits[:-1]) and limits[-1][0] is None
        edges = {frames + extra for _, frames in limits for extra in (0, 1)} | {dim + extra for dim, _ in limits
                                                                               if dim for extra in (0, 1)}
        for frames, dim in itertools.product(sorted({1, 2, 61, 128, 300} | edges), (1, 5, 256, 257, 1536, 4097)):
            fits = backends.within_size_limits(limits, frames, dim)
            for batch, tokens in ((1, 1), (3, 3600), (2**31 + 3, 2**33 + 5)):
                why = native.cuda_shape_unsupported_reason((batch, frames, tokens, dim), options, acc, limit)
                assert (why is None) == fits, (options, frames, dim, batch, tokens, limits)
    # the issue's case: fp64, cumulative d=64, F=128 fits sm_90 but not the 99 KB of sm_86
    limits = native.cuda_size_limits(options_for(64, "cumulative"), torch.float64, limit)
    assert backends.within_size_limits(limits, 128, 1536) == (arch == "sm_90")
