"""The CUDA kernels executed: the "cuda_emulated" backend (csrc/crepa_cuda_kernels.cu built by g++ against the HIP
CPU Runtime, with the "cuda" backend's glue and launch plan) against the float64 reference, at the bar of the cpu and
triton backends, and what only running the launch code can show: the opt-in per kernel, the refusal at each
architecture's limit, several launches, more than 48 KB of shared memory, the block order.

The backend-parametrised tests of test_function.py and test_compile_autocast.py take it too (it is available on
CPU tensors); test_training.py runs examples/train_dit.py with it in lockstep with the reference.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from crepa_kernels import available_backends, backends, cross_frame_align_loss, explain_backend, gpu_limits
from crepa_kernels.ops import cuda_emulated, native
from crepa_kernels.spec import LossOptions, coefficient_table, compute_dtype
from harness import (
    EXACT_NORM_EPS,
    EXTREME_TAUS,
    OPTION_GRID,
    SHAPES,
    assert_backend_matches_reference,
    pair_straddling_eps,
    pair_with_norms_equal_to_eps,
    random_grad_output,
    random_pair,
)

BACKEND = "cuda_emulated"
reason = backends.unavailable_reason(BACKEND, torch.device("cpu"))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"cuda_emulated unavailable: {reason}")

SHAPES_WITH_DIRECTIONS = [shape for shape in SHAPES if shape[3] > 1]
MIXED_DTYPES = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                (torch.float64, torch.float32)]
# More than 48 KB of dynamic shared memory (kCudaDefaultSharedBytes): the opt-in path. The examples.
WIDE_BANDS = [((1, 128, 3, 64), 64, torch.bfloat16), ((1, 61, 2, 40), 60, torch.float64)]


def module():
    return cuda_emulated.require()


def op_arguments(proj, target, options: LossOptions):
    """The ops' arguments after (proj, target): the call's coefficient table, neighbors, cumulative, eps."""
    frames = proj.shape[1]
    table = coefficient_table(options, frames, compute_dtype(proj, target), proj.device)
    return table, options.neighbors, options.neighbor_mode == "cumulative", float(options.eps)


def emulated_forward(proj, target, **options):
    options = LossOptions(**options)
    table, *_ = op_arguments(proj, target, options)
    return cuda_emulated.forward(proj.detach(), target.detach(), table, options)


def counts() -> dict:
    return dict(module().runtime_counts())


@contextlib.contextmanager
def grid_limit(blocks: int, reversed_order: bool = False):
    """At most ``blocks`` blocks per launch, launched last to first if ``reversed_order`` (the plan's test switches)."""
    module().set_cuda_grid_limit(blocks)
    module().set_cuda_launches_reversed(reversed_order)
    try:
        yield
    finally:
        module().set_cuda_grid_limit(0)
        module().set_cuda_launches_reversed(False)


@pytest.fixture
def poisoned_buffers():
    module().set_poison_buffers(True)
    try:
        yield
    finally:
        module().set_poison_buffers(False)


# --- the portability header's bf16 ----------------------------------------------------------------------------


def test_bf16_widening_is_exact_for_all_65536_patterns():
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    got = module().bfloat16_widen(bits)
    expected = bits.view(torch.bfloat16).float()
    assert torch.equal(got.isnan(), expected.isnan()) and expected.isnan().sum() == 2 * 127
    finite = ~expected.isnan()
    assert torch.equal(got[finite].view(torch.int32), expected[finite].view(torch.int32))  # -0.0 included


def bf16_rounding_sweep() -> torch.Tensor:
    """Every bf16 value, the midpoints between neighbours (the ties), one fp32 ulp either side of each midpoint,
    the fp32 specials and extremes, and 2^20 random fp32 bit patterns."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    values = values[~values.isnan()]
    as_bits = values.view(torch.int32)
    midpoints = (as_bits + 0x8000).view(torch.float32)  # halfway to the next pattern away from zero
    generator = torch.Generator().manual_seed(71)
    random_bits = torch.randint(-(2**31), 2**31, (2**20,), generator=generator, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4028235e38, -3.4028235e38, 1e-45, -1e-45,
                             1.1754944e-38, 3.3961776e38, 3.3963107e38])
    sweep = torch.cat([values, midpoints, (midpoints.view(torch.int32) + 1).view(torch.float32),
                       (midpoints.view(torch.int32) - 1).view(torch.float32), random_bits.view(torch.float32),
                       specials])
    return sweep


def test_bf16_rounding_is_torchs_round_to_nearest_even_and_nan_stays_nan():
    sweep = bf16_rounding_sweep()
    got = module().bfloat16_round(sweep)
    nan = sweep.isnan()
    assert 1000 < nan.sum() < len(sweep) // 100  # random patterns include NaNs, which must come out NaN
    expected = sweep.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(got[~nan], expected[~nan]), (sweep[~nan][got[~nan] != expected[~nan]][:5])
    assert got[nan].view(torch.bfloat16).isnan().all()
    # a NaN keeps its sign
    assert torch.equal(got[nan] < 0, sweep[nan].view(torch.int32) < 0)


# --- the float64 oracle -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTION_GRID, ids=str)
@pytest.mark.parametrize("shape", SHAPES_WITH_DIRECTIONS, ids=str)
def test_float32_matches_reference(shape, options):
    proj, target = random_pair(shape, torch.float32, seed=51)
    assert_backend_matches_reference(BACKEND, proj, target, **options)


@pytest.mark.parametrize("options", OPTION_GRID[::4], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES_WITH_DIRECTIONS, ids=str)
def test_other_dtypes_match_reference(shape, dtype, options):
    proj, target = random_pair(shape, dtype, seed=52)
    assert_backend_matches_reference(BACKEND, proj, target, **options)


@pytest.mark.parametrize("options", OPTION_GRID[1::6], ids=str)
@pytest.mark.parametrize("proj_dtype,target_dtype", MIXED_DTYPES, ids=str)
def test_mixed_dtypes_match_reference(proj_dtype, target_dtype, options):
    proj, target = random_pair((2, 5, 3, 7), proj_dtype, target_dtype, seed=53)
    assert_backend_matches_reference(BACKEND, proj, target, **options)


@pytest.mark.parametrize("shape", [(1, 1, 3, 40), (2, 3, 1, 16), (1, 4, 2, 9), (1, 3, 2, 1100)], ids=str)
@pytest.mark.parametrize("neighbors", [3, 7])
def test_neighbors_beyond_the_frames(shape, neighbors):
    """d >= F (every pair of frames is a neighbour, or none is), F = 1, N = 1, and D past one block of threads."""
    proj, target = random_pair(shape, torch.float32, seed=54)
    for mode in ("adjacent", "cumulative"):
        assert_backend_matches_reference(BACKEND, proj, target, neighbors=neighbors, neighbor_mode=mode,
                                         normalize_weights=True)


@pytest.mark.parametrize("tau", EXTREME_TAUS)
@pytest.mark.parametrize("mode", ["adjacent", "cumulative"])
def test_extreme_temperatures(tau, mode):
    proj, target = random_pair((2, 5, 3, 7), torch.float64, seed=55)
    assert_backend_matches_reference(BACKEND, proj, target, tau=tau, neighbors=2, neighbor_mode=mode,
                                     normalize_weights=True)


@pytest.mark.parametrize("shape", [shape for shape in SHAPES if shape[3] == 1] + [(2, 3, 4, 1)], ids=str)
def test_one_dimensional_features(shape):
    """D = 1: every cosine is +-1, so the loss is exact and both gradients vanish up to a few ulps of the terms that
    cancel (the bound of test_cpu_backend.py's test of the same name)."""
    proj, target = random_pair(shape, torch.float32, seed=56)
    options = dict(neighbors=1, tau=0.7)
    loss = cross_frame_align_loss(proj, target, backend=BACKEND, reduction="none", **options)
    expected = cross_frame_align_loss(proj.double(), target.double(), backend="reference", reduction="none",
                                      **options)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    grad_output = random_grad_output(loss)
    grads = torch.autograd.grad(loss, [proj, target], grad_output)
    coefficients = torch.tensor(LossOptions(**options).frame_coefficients(shape[1]), dtype=torch.float64)
    total_weight = max(coefficients.sum(dim=1).max().item(), coefficients.sum(dim=0).max().item())
    smallest_norm = min(proj.detach().abs().min().item(), target.detach().abs().min().item())
    bound = 16 * torch.finfo(torch.float32).eps * grad_output.abs().max().item() * total_weight / (
        shape[2] * smallest_norm)
    for grad in grads:
        assert torch.isfinite(grad).all() and grad.abs().max().item() <= bound


@pytest.mark.parametrize("options", [OPTION_GRID[2], OPTION_GRID[20], OPTION_GRID[-1]], ids=str)
def test_gradcheck_float64(options):
    proj, target = random_pair((2, 4, 3, 5), torch.float64, seed=57)
    assert torch.autograd.gradcheck(lambda p, y: cross_frame_align_loss(p, y, backend=BACKEND, **options),
                                    (proj, target), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("proj_grad,target_grad", [(True, True), (True, False), (False, True)], ids=str)
def test_backward_computes_only_the_gradients_asked_for(proj_grad, target_grad):
    proj, target = (x.detach() for x in random_pair((2, 5, 3, 16), torch.float32, torch.bfloat16, seed=58))
    loss, stats = emulated_forward(proj, target, neighbors=2, neighbor_mode="cumulative")
    args = op_arguments(proj, target, LossOptions(neighbors=2, neighbor_mode="cumulative"))
    grad_proj, grad_target = torch.ops.crepa_kernels_emulated.align_backward(
        random_grad_output(loss), proj, target, stats, *args, proj_grad, target_grad)
    assert grad_proj.shape == (proj.shape if proj_grad else (0,))
    assert grad_target.shape == (target.shape if target_grad else (0,))
    proj.requires_grad_(proj_grad)
    target.requires_grad_(target_grad)
    assert_backend_matches_reference(BACKEND, proj, target, neighbors=2, neighbor_mode="cumulative")


def test_nan_reaches_exactly_the_frames_that_see_it():
    """A NaN in target frame 4 reaches L[3], L[4], L[5] with d = 1 (adjacent) and nothing else, as in the
    reference: a block must not read a neighbour it has no business reading."""
    proj, target = (x.detach() for x in random_pair((1, 8, 3, 24), torch.float64, seed=59))
    target[0, 4, 1, 0] = float("nan")
    for options in (dict(neighbors=1), dict(neighbors=2, neighbor_mode="cumulative")):
        loss = cross_frame_align_loss(proj, target, backend=BACKEND, reduction="none", **options)
        expected = cross_frame_align_loss(proj, target, backend="reference", reduction="none", **options)
        assert torch.equal(loss.isnan(), expected.isnan()) and loss.isnan().any(), (options, loss)
        torch.testing.assert_close(loss[~loss.isnan()], expected[~expected.isnan()], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [OPTION_GRID[0], OPTION_GRID[6], OPTION_GRID[19], OPTION_GRID[-1]], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 19, 7), (1, 1, 4, 5), (1, 3, 2, 769), (2, 3, 5, 40)], ids=str)
def test_every_output_element_is_written(poisoned_buffers, shape, options):
    """Outputs, stats and the per-token scratch start as NaN: any element a kernel skips poisons a result."""
    proj, target = random_pair(shape, torch.float32, seed=60)
    assert_backend_matches_reference(BACKEND, proj, target, **options)
    _, stats = emulated_forward(proj, target, **options)
    assert torch.isfinite(stats).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("eps", [0.5, 3.0])
def test_large_eps_reaches_the_kernel(eps, dtype):
    proj, target = pair_straddling_eps((2, 5, 19, 7), eps, dtype, seed=61)
    for options in (dict(neighbors=1, reduction="none"), dict(neighbors=2, neighbor_mode="cumulative",
                                                              normalize_weights=True)):
        assert_backend_matches_reference(BACKEND, proj, target, eps=eps, **options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_norm_exactly_eps_gets_the_references_gradient(dtype):
    proj, target = pair_with_norms_equal_to_eps(dtype)
    assert_backend_matches_reference(BACKEND, proj, target, eps=EXACT_NORM_EPS, neighbors=1, reduction="none")


# --- views: the vector and the element paths ------------------------------------------------------------------


def misaligned(x: torch.Tensor, offset: int = 3) -> torch.Tensor:
    """The same values at a storage offset of ``offset`` elements (not a multiple of 8: rows not 16-byte aligned)."""
    storage = torch.empty(x.numel() + offset, dtype=x.dtype)
    view = storage[offset:].view(x.shape)
    view.copy_(x.detach())
    return view


def permuted_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The same values with D strided: stored [B, F, D, N] and transposed back."""
    return x.detach().transpose(2, 3).contiguous().transpose(2, 3)


def frame_permuted(x: torch.Tensor) -> torch.Tensor:
    """The same values stored [B, N, F, D]: rows still contiguous and aligned, so the vector path applies."""
    return x.detach().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)


VIEWS = {"contiguous": lambda x: x.detach(), "misaligned": misaligned, "permuted_last_dim": permuted_last_dim,
         "frame_permuted": frame_permuted}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("proj_view,target_view", [("contiguous", "contiguous"), ("misaligned", "contiguous"),
                                                   ("contiguous", "permuted_last_dim"),
                                                   ("frame_permuted", "frame_permuted"),
                                                   ("misaligned", "permuted_last_dim")])
def test_views_take_the_vector_or_the_element_path_and_match(proj_view, target_view, dtype):
    """D = 40 (a whole number of 8-element chunks): aligned rows take the vector path, a misaligned or strided
    input the element path; both agree with the reference, and the element path's result is the same bits."""
    proj, target = random_pair((2, 5, 3, 40), dtype, seed=62)
    proj, target = VIEWS[proj_view](proj), VIEWS[target_view](target)
    assert_backend_matches_reference(BACKEND, proj.requires_grad_(True), target.requires_grad_(True),
                                     neighbors=2, neighbor_mode="cumulative", normalize_weights=True)


def test_both_paths_run_and_give_the_same_bits():
    """The vector path's chunks hold the same elements as the element path's, summed in the same order: the same
    bits. The runtime's record of the kernels that ran shows each path: the vector pair and the token reduction,
    then the element pair as well."""
    proj, target = (x.detach() for x in random_pair((2, 5, 3, 48), torch.bfloat16, seed=63))
    options = dict(neighbors=1)
    module().reset_runtime_counts()
    vector = run_everything(proj, target, **options)
    assert counts()["distinct_kernels"] == 3
    element = run_everything(misaligned(proj), misaligned(target, 5), **options)
    assert counts()["distinct_kernels"] == 5
    for a, b in zip(vector, element):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dim", [7, 33, 769])
def test_odd_widths_and_a_misaligned_offset(dim):
    """D % 8 != 0 (element path, partial last chunk) and D = 769 past 96 chunks of 8 (several chunks per thread)."""
    proj, target = random_pair((2, 3, 5, dim), torch.float32, seed=64)
    proj, target = misaligned(proj, 1).requires_grad_(True), misaligned(target, 2).requires_grad_(True)
    assert_backend_matches_reference(BACKEND, proj, target, neighbors=2, neighbor_mode="cumulative")


# --- launches: several, past 48 KB, the opt-in, the refusal ------------------------------------------------------


@pytest.mark.parametrize("blocks", [1, 7])
@pytest.mark.parametrize("shape,dtype", [((2, 5, 10, 40), torch.float32), ((3, 4, 3, 33), torch.bfloat16)], ids=str)
def test_several_launches_match_reference(shape, dtype, blocks):
    """Column offsets of later launches and the reduction's grid-stride loop (only B * N > 2^31 - 1 reaches them
    otherwise): both paths, vector (D = 40) and element (D = 33)."""
    proj, target = random_pair(shape, dtype, seed=65)
    with grid_limit(blocks):
        launches = counts()["launches"]
        assert_backend_matches_reference(BACKEND, proj, target, neighbors=2, neighbor_mode="cumulative")
        columns = shape[0] * shape[2]
        per_pass = -(-columns // blocks)
        # forward, then backward: one launch per `blocks` columns each, plus the token reduction
        assert counts()["launches"] - launches == 2 * per_pass + 1


def test_many_tokens_per_frame_sum():
    """N = 300 > 256 threads: the token reduction's threads each add several tokens before the tree (the only shape
    where its first barrier matters), on one block per (b, f) and, capped, several items per block."""
    proj, target = random_pair((2, 3, 300, 8), torch.float64, seed=73)
    assert_backend_matches_reference(BACKEND, proj, target, neighbors=1)
    with grid_limit(2):
        assert_backend_matches_reference(BACKEND, proj, target, neighbors=1)


def run_everything(proj, target, **options):
    proj, target = proj.detach().requires_grad_(True), target.detach().requires_grad_(True)
    loss = cross_frame_align_loss(proj, target, backend=BACKEND, reduction="none", **options)
    grads = torch.autograd.grad(loss, [proj, target], random_grad_output(loss))
    _, stats = emulated_forward(proj, target, **options)
    return (loss, stats, *grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic_across_runs_and_block_orders(dtype):
    """Each block reduces its column alone and the token sum is a fixed tree: the same bits every run, and when
    the columns run one block per launch in reverse order."""
    proj, target = random_pair((2, 7, 9, 40), dtype, seed=66)
    options = dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True)
    first = run_everything(proj, target, **options)
    second = run_everything(proj, target, **options)
    with grid_limit(1, reversed_order=True):
        reversed_order = run_everything(proj, target, **options)
    with grid_limit(4, reversed_order=True):
        reversed_groups = run_everything(proj, target, **options)
    for results in (second, reversed_order, reversed_groups):
        for a, b in zip(first, results):
            assert torch.equal(a, b)


def plan_bytes(shape, options: LossOptions, acc: torch.dtype) -> int:
    plan = native.cuda_launch_plan(shape, options, acc)
    return max(plan["forward"]["shared_bytes"], plan["backward"]["shared_bytes"])


@pytest.mark.parametrize("shape,neighbors,dtype", WIDE_BANDS, ids=str)
def test_more_than_48_kb_of_shared_memory_runs_on_both_paths(shape, neighbors, dtype):
    """The issue's cases (bf16 F=128 cumulative d=64: 66,572 bytes; fp64 F=61 d=60) run to completion, first with
    aligned rows (vector kernels) and then misaligned (element kernels). Each of the four kernels opts in for
    itself: with one record per kernel type (review defect 1) the second pair launched past 48 KB without opting
    in, which a GPU, and the emulated runtime, refuse."""
    options = dict(neighbors=neighbors, neighbor_mode="cumulative")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert plan_bytes(shape, LossOptions(**options), acc) > 48 * 1024  # what a kernel gets without the opt-in
    proj, target = random_pair(shape, dtype, seed=67)
    module().reset_runtime_counts()
    assert_backend_matches_reference(BACKEND, proj, target, **options)
    assert counts()["distinct_kernels"] == 3  # forward and backward on the vector path, and the token reduction
    assert_backend_matches_reference(BACKEND, misaligned(proj).requires_grad_(True),
                                     misaligned(target).requires_grad_(True), **options)
    assert counts()["distinct_kernels"] == 5  # and the element path's
    assert counts()["refused_launches"] == 0


def test_the_refusal_and_the_opt_in_use_one_limit():
    """Review defect 5: on sm_90 the cubins report 1 KB of static shared memory, so the kernels may use 1 KB less
    than the device's per-block figure. A plan in that last KB is refused before any work (NotImplementedError),
    not launched into a failure."""
    for arch in ("sm_80", "sm_86", "sm_90", "sm_120"):
        expected = gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[arch] - gpu_limits.RESERVED_SHARED_BYTES_IN_CUBIN[arch]
        for acc in (torch.float32, torch.float64):
            assert cuda_emulated.dynamic_shared_limit(arch, acc) == expected, (arch, acc)
    optin = gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN["sm_90"]
    limit = cuda_emulated.dynamic_shared_limit("sm_90", torch.float32)
    # a shape whose plan needs more than the dynamic limit but no more than the whole per-block figure
    shape, neighbors = next(((1, frames, 2, 8), neighbors) for frames in range(150, 240)
                            for neighbors in range(frames // 2, frames)
                            if limit < plan_bytes((1, frames, 2, 8), LossOptions(neighbors=neighbors,
                                                                                 neighbor_mode="cumulative"),
                                                  torch.float32) <= optin)
    proj, target = (x.detach() for x in random_pair(shape, torch.float32, seed=68))
    before = counts()
    with cuda_emulated.emulating("sm_90"), pytest.raises(NotImplementedError, match=f"more than the {limit} bytes"):
        emulated_forward(proj, target, neighbors=neighbors, neighbor_mode="cumulative")
    assert counts()["launches"] == before["launches"]
    why = available_backends(proj=proj, target=target, neighbors=neighbors, neighbor_mode="cumulative")[BACKEND]
    assert isinstance(why, str) and f"{limit} bytes" in why and "sm_90" in why


def test_the_architecture_decides_the_refusal(monkeypatch):
    """fp64 F=128 cumulative d=64 needs about 132 KB: it runs on an emulated sm_90 (227 KB) and is refused on
    sm_86 (99 KB), chosen by set_arch / emulating or by CREPA_KERNELS_EMULATED_ARCH."""
    shape = (1, 128, 2, 16)
    options = dict(neighbors=64, neighbor_mode="cumulative")
    proj, target = random_pair(shape, torch.float64, seed=69)
    assert cuda_emulated.current_arch() == "sm_90"
    with cuda_emulated.emulating("sm_90"):
        assert_backend_matches_reference(BACKEND, proj, target, **options)
    with cuda_emulated.emulating("sm_86"), pytest.raises(NotImplementedError, match="101376|100352"):
        emulated_forward(proj, target, **options)
    monkeypatch.setenv(cuda_emulated.ARCH_VARIABLE, "sm_86")
    assert cuda_emulated.current_arch() == "sm_86"
    with pytest.raises(NotImplementedError, match="bytes of shared memory"):
        emulated_forward(proj, target, **options)
    monkeypatch.setenv(cuda_emulated.ARCH_VARIABLE, "sm_75")
    with pytest.raises(ValueError, match="CREPA_KERNELS_EMULATED_ARCH.*'sm_75'"):
        cuda_emulated.current_arch()
    with pytest.raises(ValueError, match="arch: expected one of"):
        cuda_emulated.set_arch("sm_9")


# --- selection -------------------------------------------------------------------------------------------------


def test_auto_never_picks_it():
    proj, target = random_pair((1, 3, 2, 8), torch.float32, seed=70)
    choice = explain_backend(proj, target)
    assert choice.backend == "cpu" and BACKEND not in choice.candidates
    assert choice.reasons[BACKEND] is None
    assert available_backends("cpu")[BACKEND] is True


def test_without_the_runtime_the_reason_is_given(monkeypatch, tmp_path):
    monkeypatch.setenv("HIP_CPU_ROOT", str(tmp_path))
    loaded = cuda_emulated._extension.module
    cuda_emulated._extension.forget()
    backends._unavailable_reason.cache_clear()
    try:
        why = available_backends("cpu")[BACKEND]
        assert isinstance(why, str) and "HIP CPU Runtime was not found" in why and "HIP_CPU_ROOT" in why
        proj, target = random_pair((1, 3, 2, 8), torch.float32, seed=70)
        assert "HIP CPU Runtime was not found" in str(explain_backend(proj, target))
        with pytest.raises(RuntimeError, match="HIP CPU Runtime was not found"):
            cross_frame_align_loss(proj, target, backend=BACKEND)
    finally:
        cuda_emulated._extension.forget()
        cuda_emulated._extension.module = loaded
        backends._unavailable_reason.cache_clear()
        backends._resolve.cache_clear()


def test_only_cpu_tensors_and_the_kernels_dtypes():
    assert "CPU tensors" in cuda_emulated.unavailable_reason(torch.device("meta"))
    proj, target = random_pair((1, 2, 2, 8), torch.float32, seed=72)
    why = cuda_emulated.call_unsupported_reason(proj, target.detach().to(torch.int32), LossOptions())
    assert "target is torch.int32" in why
