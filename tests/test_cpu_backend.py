"""The C++ extension's "cpu" backend (and, on a GPU machine, its "cuda" backend) against the reference."""
from __future__ import annotations

import itertools
import math
import platform
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crepa_kernels import cross_frame_align_loss
from crepa_kernels.ops import native
from crepa_kernels.reference import per_frame_loss as reference_per_frame_loss
from crepa_kernels.spec import LossOptions, coefficient_table, compute_dtype
from harness import (
    EXACT_NORM_EPS,
    EXTREME_TAUS,
    OPTION_GRID,
    SHAPES,
    TOLERANCES,
    assert_backend_matches_reference,
    assert_close_and_finite,
    pair_straddling_eps,
    pair_with_norms_equal_to_eps,
    random_grad_output,
    random_pair,
    reference_in_float64,
)

reason = native.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"C++ extension unavailable: {reason}")

# D = 1 makes every cosine +-1 and every gradient exactly 0: relative comparisons there compare rounding noise,
# so those shapes get their own test with an absolute bound.
SHAPES_WITH_DIRECTIONS = [shape for shape in SHAPES if shape[3] > 1]
MIXED_DTYPES = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                (torch.float64, torch.float32)]


def op_arguments(proj, target, options: LossOptions):
    """The ops' arguments after (proj, target) for these options: the call's coefficient table, neighbors,
    cumulative, eps."""
    frames = proj.shape[1]
    table = coefficient_table(options, frames, compute_dtype(proj, target), proj.device)
    return table, options.neighbors, options.neighbor_mode == "cumulative", float(options.eps)


@pytest.mark.parametrize("options", OPTION_GRID, ids=str)
@pytest.mark.parametrize("shape", SHAPES_WITH_DIRECTIONS, ids=str)
def test_float32_matches_reference(shape, options):
    proj, target = random_pair(shape, torch.float32, seed=sum(shape))
    assert_backend_matches_reference("cpu", proj, target, **options)


@pytest.mark.parametrize("options", OPTION_GRID[::4], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES_WITH_DIRECTIONS, ids=str)
def test_other_dtypes_match_reference(shape, dtype, options):
    proj, target = random_pair(shape, dtype, seed=3)
    assert_backend_matches_reference("cpu", proj, target, **options)


@pytest.mark.parametrize("options", OPTION_GRID[1::6], ids=str)
@pytest.mark.parametrize("proj_dtype,target_dtype", MIXED_DTYPES, ids=str)
def test_mixed_dtypes_match_reference(proj_dtype, target_dtype, options):
    proj, target = random_pair((2, 6, 5, 33), proj_dtype, target_dtype, seed=5)
    assert_backend_matches_reference("cpu", proj, target, **options)


@pytest.mark.parametrize("tau", EXTREME_TAUS)
@pytest.mark.parametrize("mode", ["adjacent", "cumulative"])
def test_extreme_temperatures(tau, mode):
    proj, target = random_pair((2, 5, 3, 7), torch.float32, seed=7)
    assert_backend_matches_reference("cpu", proj, target, tau=tau, neighbors=2, neighbor_mode=mode,
                                     normalize_weights=True, reduction="none")


@pytest.mark.parametrize("options", OPTION_GRID[::5], ids=str)
def test_target_without_grad(options):
    proj, target = random_pair((2, 5, 3, 7), torch.float32, seed=11, target_requires_grad=False)
    assert_backend_matches_reference("cpu", proj, target, **options)


def test_only_target_requires_grad():
    proj, target = random_pair((2, 5, 3, 7), torch.float32, seed=12)
    proj.requires_grad_(False)
    loss = cross_frame_align_loss(proj, target, backend="cpu", neighbors=1)
    (grad,) = torch.autograd.grad(loss, [target])
    ref_target = target.detach().double().requires_grad_(True)
    expected = cross_frame_align_loss(proj.double(), ref_target, backend="reference", neighbors=1)
    (expected_grad,) = torch.autograd.grad(expected, [ref_target])
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)


# (needs_proj_grad, needs_target_grad) as autograd can ask for them
GRAD_FLAGS = [(True, True), (True, False), (False, True)]


class RecordBackwardCalls(TorchDispatchMode):
    """Records the arguments and results of every align_backward call made under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is torch.ops.crepa_kernels.align_backward.default:
            self.calls.append((args, result))
        return result


@pytest.mark.parametrize("proj_grad,target_grad", GRAD_FLAGS, ids=str)
def test_backward_computes_only_the_gradients_asked_for(proj_grad, target_grad):
    proj, target = random_pair((2, 5, 3, 7), torch.float32, torch.bfloat16, seed=29)
    proj.requires_grad_(proj_grad)
    target.requires_grad_(target_grad)
    inputs = [x for x in (proj, target) if x.requires_grad]
    loss = cross_frame_align_loss(proj, target, backend="cpu", neighbors=2, neighbor_mode="cumulative",
                                  reduction="none")
    with RecordBackwardCalls() as recorder:
        grads = torch.autograd.grad(loss, inputs, random_grad_output(loss))
    (args, (grad_proj, grad_target)), = recorder.calls
    assert args[-2:] == (proj_grad, target_grad)
    assert grad_proj.shape == (proj.shape if proj_grad else (0,))
    assert grad_target.shape == (target.shape if target_grad else (0,))
    # and the gradients it did compute are right
    ref_inputs = [x.detach().double().requires_grad_(x.requires_grad) for x in (proj, target)]
    expected = cross_frame_align_loss(*ref_inputs, backend="reference", neighbors=2, neighbor_mode="cumulative",
                                      reduction="none")
    expected_grads = torch.autograd.grad(expected, [x for x in ref_inputs if x.requires_grad],
                                         random_grad_output(loss).double())
    for grad, expected_grad in zip(grads, expected_grads):
        rtol, atol = TOLERANCES[grad.dtype]
        torch.testing.assert_close(grad.double(), expected_grad, rtol=rtol, atol=atol * expected_grad.abs().max().item())


def test_backward_op_asked_for_nothing_returns_empty_gradients():
    proj, target = random_pair((1, 3, 2, 5), torch.float32, seed=30)
    args = op_arguments(proj, target, LossOptions(neighbors=1))
    loss, stats = torch.ops.crepa_kernels.align_forward(proj.detach(), target.detach(), *args)
    grad_proj, grad_target = torch.ops.crepa_kernels.align_backward(
        torch.ones_like(loss), proj.detach(), target.detach(), stats, *args, False, False)
    assert grad_proj.shape == (0,) and grad_target.shape == (0,)


# --- the two builds of the CPU kernels ----------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(platform.machine() != "x86_64" or not cpu_flags(), reason="reads x86-64 /proc/cpuinfo flags")
def test_avx2_build_runs_where_the_cpu_has_avx2_and_fma():
    expected = "avx2" if {"avx2", "fma"} <= cpu_flags() else "baseline"
    assert native.build_info()["cpu_isa"] == expected


@pytest.fixture
def baseline_isa():
    """Runs the baseline-ISA build of the CPU kernels, which CPUs with AVX2 + FMA would otherwise never run."""
    native.set_cpu_baseline_forced(True)
    try:
        assert native.build_info()["cpu_isa"] == "baseline"
        yield
    finally:
        native.set_cpu_baseline_forced(False)


@pytest.mark.parametrize("options", OPTION_GRID[1::5], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 3, 2, 769), (2, 6, 5, 33)], ids=str)
def test_baseline_isa_matches_reference(baseline_isa, shape, dtype, options):
    proj, target = random_pair(shape, dtype, seed=31)
    assert_backend_matches_reference("cpu", proj, target, **options)


def test_baseline_isa_with_mixed_strided_inputs(baseline_isa):
    proj, target = non_contiguous_views(*random_pair((2, 6, 5, 33), torch.float32, torch.float16, seed=32))
    assert_backend_matches_reference("cpu", proj, target, neighbors=3, neighbor_mode="cumulative")


def non_contiguous_views(proj: torch.Tensor, target: torch.Tensor):
    """The same values behind other layouts: permuted [B, N, F, D] storage, and D strided by 2 with an offset."""
    permuted = proj.detach().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    widened = torch.zeros(*target.shape[:-1], 2 * target.shape[-1] + 1, dtype=target.dtype)
    widened[..., 1::2] = target.detach()
    strided = widened[..., 1::2]
    assert not permuted.is_contiguous() and strided.stride(-1) == 2
    return permuted.requires_grad_(True), strided.requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", OPTION_GRID[2::7], ids=str)
def test_non_contiguous_inputs(dtype, options):
    proj, target = non_contiguous_views(*random_pair((2, 6, 5, 33), dtype, seed=13))
    assert_backend_matches_reference("cpu", proj, target, **options)


def test_frame_major_3d_input():
    proj, target = random_pair((2, 4, 5, 9), torch.float32, seed=14)
    flat_loss = cross_frame_align_loss(proj.flatten(1, 2), target.flatten(1, 2), num_frames=4, backend="cpu",
                                       reduction="none", neighbors=1)
    loss = cross_frame_align_loss(proj, target, backend="cpu", reduction="none", neighbors=1)
    assert torch.equal(flat_loss, loss)


@pytest.mark.parametrize("shape", [shape for shape in SHAPES if shape[3] == 1] + [(2, 3, 4, 1)], ids=str)
def test_one_dimensional_features(shape):
    """D = 1: every cosine is +-1, so the loss is exact and both gradients are 0 up to rounding.

    A gradient row is a sum of terms of magnitude at most |alpha| / min(|p|, |y|) (alpha = grad_L C / N) that
    cancel exactly; what is left is the rounding of those terms: a few fp32 ulps of their total. A kernel that
    dropped or mis-weighted one term would leave a whole term, ~1 / eps32 times more than the bound.
    """
    proj, target = random_pair(shape, torch.float32, seed=15)
    options = dict(neighbors=1, tau=0.7)
    loss = cross_frame_align_loss(proj, target, backend="cpu", reduction="none", **options)
    expected = cross_frame_align_loss(proj.double(), target.double(), backend="reference", reduction="none",
                                      **options)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    grad_output = random_grad_output(loss)
    grads = torch.autograd.grad(loss, [proj, target], grad_output)
    coefficients = torch.tensor(LossOptions(**options).frame_coefficients(shape[1]), dtype=torch.float64)
    # the largest total |C| any gradient row sums over: a frame's row of C (grad p) or column (grad y)
    total_weight = max(coefficients.sum(dim=1).max().item(), coefficients.sum(dim=0).max().item())
    smallest_norm = min(proj.detach().abs().min().item(), target.detach().abs().min().item())
    term_scale = grad_output.abs().max().item() * total_weight / (shape[2] * smallest_norm)
    bound = 16 * torch.finfo(torch.float32).eps * term_scale
    for grad in grads:
        assert torch.isfinite(grad).all()
        assert grad.abs().max().item() <= bound, (grad.abs().max().item(), bound)


def test_zero_vectors_follow_the_clamped_norm():
    """|x| < eps: the norm is the constant eps, so the self term of the gradient vanishes (as in the reference)."""
    proj, target = random_pair((1, 3, 4, 6), torch.float64, seed=16)
    with torch.no_grad():
        proj[0, 1, 2] = 0.0
        target[0, 2, 1] = 0.0
    assert_backend_matches_reference("cpu", proj, target, neighbors=1, reduction="none")


@pytest.mark.parametrize("options", [OPTION_GRID[2], OPTION_GRID[20], OPTION_GRID[-1]], ids=str)
def test_gradcheck_float64(options):
    proj, target = random_pair((2, 4, 3, 5), torch.float64, seed=17)
    options = {key: value for key, value in options.items()}

    def loss_of(p, y):
        return cross_frame_align_loss(p, y, backend="cpu", **options)

    assert torch.autograd.gradcheck(loss_of, (proj, target), eps=1e-6, atol=1e-7, rtol=1e-5)


def run_everything(proj, target, **options):
    loss = cross_frame_align_loss(proj, target, backend="cpu", reduction="none", **options)
    grads = torch.autograd.grad(loss, [proj, target], random_grad_output(loss))
    _, stats = torch.ops.crepa_kernels.align_forward(proj, target, *op_arguments(proj, target, LossOptions(**options)))
    return (loss, stats, *grads)


@pytest.mark.parametrize("isa", ["best", "baseline"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic_across_runs_and_thread_counts(dtype, isa, request):
    if isa == "baseline":
        request.getfixturevalue("baseline_isa")
    # 50 tokens: several fixed token blocks, so the loss really is a multi-block reduction
    proj, target = random_pair((2, 7, 50, 37), dtype, seed=18)
    options = dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_everything(proj, target, **options)
        torch.set_num_threads(2)
        first = run_everything(proj, target, **options)
        second = run_everything(proj, target, **options)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(single, first, second):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.fixture
def poisoned_buffers():
    native.set_poison_buffers(True)
    try:
        yield
    finally:
        native.set_poison_buffers(False)


def vma_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields[0].split("-")) == 2 and not fields[0].endswith(":"):
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "VmFlags:":
                return fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").exists(), reason="needs Linux with THP")
def test_gradient_buffers_ask_for_huge_pages():
    """Their first touch is most of the fp32 backward with 4 KB pages (see crepa_ops.cpp)."""
    proj, target = random_pair((1, 3, 1100, 768), torch.float32, seed=33)  # 10 MB per gradient
    loss = cross_frame_align_loss(proj, target, backend="cpu", neighbors=1)
    for grad in torch.autograd.grad(loss, [proj, target]):
        middle = grad.data_ptr() + grad.nbytes // 2
        assert "hg" in vma_flags(middle)


def test_poisoning_really_fills_buffers(poisoned_buffers):
    assert torch.isnan(native._load().new_buffer_for_test([3, 5])).all()


@pytest.mark.parametrize("options", [OPTION_GRID[0], OPTION_GRID[6], OPTION_GRID[19], OPTION_GRID[-1]], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 19, 7), (1, 1, 4, 5), (1, 3, 2, 769)], ids=str)
def test_every_output_element_is_written(poisoned_buffers, shape, options):
    """Outputs, stats and partial sums start as NaN: any element a kernel skips poisons a result."""
    proj, target = random_pair(shape, torch.float32, seed=19)
    assert_backend_matches_reference("cpu", proj, target, **options)
    _, stats = torch.ops.crepa_kernels.align_forward(proj, target, *op_arguments(proj, target, LossOptions(**options)))
    assert torch.isfinite(stats).all()


def test_stats_layout():
    """stats[b, n, f] = [|p_f|, |y_f|, p_f . y_{f+o} for each band slot (0 where f + o is off the range)]."""
    proj, target = random_pair((1, 4, 3, 6), torch.float64, seed=20)
    _, stats = torch.ops.crepa_kernels.align_forward(
        proj, target, *op_arguments(proj, target, LossOptions(neighbors=1, neighbor_mode="cumulative")))
    p, y = proj.detach()[0].transpose(0, 1), target.detach()[0].transpose(0, 1)  # [N, F, D]
    assert stats.shape == (1, 3, 4, 2 + 3)
    torch.testing.assert_close(stats[0, :, :, 0], p.norm(dim=-1))
    torch.testing.assert_close(stats[0, :, :, 1], y.norm(dim=-1))
    for slot, offset in enumerate([0, -1, 1]):
        for f in range(4):
            k = f + offset
            expected = (p[:, f] * y[:, k]).sum(-1) if 0 <= k < 4 else torch.zeros(3, dtype=torch.float64)
            torch.testing.assert_close(stats[0, :, f, 2 + slot], expected)


@pytest.mark.parametrize("neighbors,cumulative", [(0, False), (2, False), (9, False), (2, True), (9, True)])
def test_opcheck(neighbors, cumulative):
    proj, target = random_pair((2, 5, 3, 7), torch.float32, seed=21)
    options = LossOptions(neighbors=neighbors, neighbor_mode="cumulative" if cumulative else "adjacent", tau=0.7,
                          normalize_weights=True)
    args = op_arguments(proj, target, options)
    torch.library.opcheck(torch.ops.crepa_kernels.align_forward.default, (proj, target, *args))
    loss, stats = torch.ops.crepa_kernels.align_forward(proj, target, *args)
    grad_loss = random_grad_output(loss)
    for flags in GRAD_FLAGS:
        torch.library.opcheck(torch.ops.crepa_kernels.align_backward.default,
                              (grad_loss, proj.detach(), target.detach(), stats, *args, *flags))


def test_band_width_matches_the_kernel():
    for frames, neighbors, cumulative in itertools.product([1, 2, 5], [0, 1, 3, 9], [False, True]):
        options = LossOptions(neighbors=neighbors, neighbor_mode="cumulative" if cumulative else "adjacent")
        assert native.band_width(frames, neighbors, cumulative) == 1 + len(options.offsets(frames))


@pytest.mark.parametrize("proj_grad,target_grad", GRAD_FLAGS, ids=str)
def test_torch_compile_fullgraph(proj_grad, target_grad):
    proj, target = random_pair((2, 5, 3, 7), torch.float32, seed=22)
    proj.requires_grad_(proj_grad)
    target.requires_grad_(target_grad)
    inputs = [x for x in (proj, target) if x.requires_grad]

    def step(p, y):
        return cross_frame_align_loss(p, y, backend="cpu", neighbors=2, neighbor_mode="cumulative", tau=0.5)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(proj, target)
    grads = torch.autograd.grad(loss, inputs)
    expected = step(proj, target)
    expected_grads = torch.autograd.grad(expected, inputs)
    assert torch.equal(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.equal(grad, expected_grad)
    # and both are right: the float64 reference on the same values
    reference_loss, reference_grads = reference_in_float64(proj, target, torch.ones(()), neighbors=2,
                                                           neighbor_mode="cumulative", tau=0.5)
    assert_close_and_finite(loss, reference_loss, "compiled cpu loss")
    if not proj_grad:  # reference_in_float64 differentiates proj always, target when it requires grad
        reference_grads = reference_grads[1:]
    for grad, expected_grad in zip(grads, reference_grads):
        assert_close_and_finite(grad, expected_grad, "compiled cpu grad")


def test_unavailable_reasons():
    assert native.unavailable_reason(torch.device("cpu")) is None
    assert "not meta" in native.unavailable_reason(torch.device("meta"))
    cuda_reason = native.unavailable_reason(torch.device("cuda"))
    assert (cuda_reason is None) == (native.build_info()["cuda"] and torch.cuda.is_available())


# --- beyond 2^31 elements per input -------------------------------------------------------------------------

# [B, F, N, D] bf16 with ~1.05 * 2^31 elements per input. Values tile a random block of PERIOD tokens (PERIOD does
# not divide 2^31 or F * N), so every token column is one of PERIOD kinds per batch element and a 32-bit offset
# anywhere would read a column of another kind. target is the same storage shifted by SHIFT tokens: one 4.5 GB
# buffer for both inputs plus 4.5 GB for grad_proj (target needs no grad).
BIG_B, BIG_F, BIG_D, PERIOD, SHIFT = 2, 5, 96, 7, 3
BIG_N = math.ceil(1.05 * 2**31 / (BIG_B * BIG_F * BIG_D))


def token_kinds(b: int, n: int) -> list[int]:
    """The pattern token each frame of column (b, n) holds: flat token index modulo PERIOD."""
    return [((b * BIG_F + f) * BIG_N + n) % PERIOD for f in range(BIG_F)]


@pytest.mark.slow
def test_inputs_beyond_two_to_the_31_elements():
    assert BIG_B * BIG_F * BIG_N * BIG_D > 2**31 and 2**31 % PERIOD and (BIG_F * BIG_N) % PERIOD
    generator = torch.Generator().manual_seed(23)
    pattern = torch.randn(PERIOD, BIG_D, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    tokens = BIG_B * BIG_F * BIG_N
    rows = math.ceil((tokens + SHIFT) / PERIOD) * PERIOD
    storage = pattern.repeat(rows // PERIOD, 1)  # [rows, D]
    proj = storage[:tokens].view(BIG_B, BIG_F, BIG_N, BIG_D).requires_grad_(True)
    target = storage[SHIFT:SHIFT + tokens].view(BIG_B, BIG_F, BIG_N, BIG_D)
    options = dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True, reduction="none")

    loss = cross_frame_align_loss(proj, target, backend="cpu", **options)
    grad_output = random_grad_output(loss)
    (grad_proj,) = torch.autograd.grad(loss, [proj], grad_output)

    pattern64 = pattern.double()
    counts = [len(range(m, BIG_N, PERIOD)) for m in range(PERIOD)]
    for b in range(BIG_B):
        # L[b] = sum over the PERIOD column kinds of (their count / N) x the one-token loss of that kind
        expected = torch.zeros(BIG_F, dtype=torch.float64)
        for m in range(PERIOD):
            p = pattern64[token_kinds(b, m)].view(1, BIG_F, 1, BIG_D)
            y = pattern64[[(k + SHIFT) % PERIOD for k in token_kinds(b, m)]].view(1, BIG_F, 1, BIG_D)
            expected += counts[m] / BIG_N * reference_per_frame_loss(p, y, LossOptions(**options))[0]
        torch.testing.assert_close(loss[b].double(), expected, rtol=1e-4, atol=1e-6)

    # gradient columns at the very end of the tensor, beyond 2^31: each is 1/N times a one-token gradient
    b = BIG_B - 1
    for n in (BIG_N - 1, BIG_N - 2, BIG_N - 5):
        p = pattern64[token_kinds(b, n)].view(1, BIG_F, 1, BIG_D).requires_grad_(True)
        y = pattern64[[(k + SHIFT) % PERIOD for k in token_kinds(b, n)]].view(1, BIG_F, 1, BIG_D)
        one_token = reference_per_frame_loss(p, y, LossOptions(**options))
        (expected_grad,) = torch.autograd.grad(one_token, [p], grad_output[b:b + 1].double())
        actual = grad_proj[b, :, n].double()
        expected_grad = expected_grad[0, :, 0] / BIG_N
        rtol, atol = TOLERANCES[torch.bfloat16]
        torch.testing.assert_close(actual, expected_grad, rtol=rtol, atol=atol * expected_grad.abs().max().item())


# --- CUDA (skipped without a GPU) -------------------------------------------------------------------------------

cuda_reason = native.unavailable_reason(torch.device("cuda"))
needs_cuda = pytest.mark.skipif(cuda_reason is not None, reason=f"CUDA kernel unavailable: {cuda_reason}")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("options", OPTION_GRID[::3], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES_WITH_DIRECTIONS + [(2, 13, 40, 768)], ids=str)
def test_cuda_matches_reference(shape, dtype, options):
    proj, target = random_pair(shape, dtype, seed=24, device="cuda")
    assert_backend_matches_reference("cuda", proj, target, **options)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_strided_and_mixed_inputs(dtype):
    proj, target = non_contiguous_views(*random_pair((2, 6, 5, 40), dtype, seed=25))
    assert_backend_matches_reference("cuda", proj.cuda(), target.cuda(), neighbors=1)
    proj, target = random_pair((2, 6, 5, 40), torch.float32, torch.bfloat16, seed=26, device="cuda")
    assert_backend_matches_reference("cuda", proj, target, neighbors=2, neighbor_mode="cumulative")


@needs_cuda
@pytest.mark.gpu
def test_cuda_deterministic_and_fully_written(poisoned_buffers):
    proj, target = random_pair((2, 13, 300, 768), torch.bfloat16, seed=27, device="cuda")
    first = run_everything(proj, target, neighbors=1)
    second = run_everything(proj, target, neighbors=1)
    for a, b in zip(first, second):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@needs_cuda
@pytest.mark.gpu
def test_cuda_agrees_with_triton():
    from crepa_kernels.backends import unavailable_reason

    triton_reason = unavailable_reason("triton", torch.device("cuda"))
    if triton_reason is not None:
        pytest.skip(f"triton backend unavailable: {triton_reason}")
    proj, target = random_pair((2, 13, 100, 768), torch.bfloat16, seed=28, device="cuda")
    results = {}
    for backend in ("cuda", "triton"):
        loss = cross_frame_align_loss(proj, target, backend=backend, neighbors=2, reduction="none")
        results[backend] = (loss, *torch.autograd.grad(loss, [proj, target], random_grad_output(loss)))
    for ours, theirs in zip(results["cuda"], results["triton"]):
        rtol, atol = TOLERANCES[ours.dtype]
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=rtol, atol=atol * theirs.abs().max().item())


# --- determinism across thread counts that split the token blocks unevenly (issue 16) ----------------------------
# B = 1 and 7 or 11 blocks of 16 tokens: 2, 3 and 4 threads cut the block range at different places, none of them
# at a batch boundary, so any partial sum kept per parallel task (instead of per fixed block) shows as a bit change.


@pytest.mark.parametrize("isa", ["best", "baseline"])
@pytest.mark.parametrize("tokens", [100, 171], ids=lambda n: f"{n} tokens")
def test_bitwise_identical_with_1_to_4_threads_on_uneven_splits(tokens, isa, request):
    if isa == "baseline":
        request.getfixturevalue("baseline_isa")
    proj, target = random_pair((1, 6, tokens, 21), torch.float32, seed=34)
    options = dict(neighbors=1, tau=0.8)
    threads = torch.get_num_threads()
    results = {}
    try:
        for count in (1, 2, 3, 4):
            torch.set_num_threads(count)
            assert torch.get_num_threads() == count
            results[count] = run_everything(proj, target, **options)
    finally:
        torch.set_num_threads(threads)
    for count in (2, 3, 4):
        for name, single, many in zip(("loss", "stats", "grad proj", "grad target"), results[1], results[count]):
            assert torch.equal(single, many), f"{name} with {count} threads differs from 1 thread"
    assert_backend_matches_reference("cpu", proj, target, reduction="none", **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("eps", [0.5, 3.0])
def test_large_eps_reaches_the_kernel(eps, dtype):
    """Half of the norms below eps: the kernels clamp each norm with the caller's eps, forward and backward."""
    proj, target = pair_straddling_eps((2, 5, 19, 7), eps, dtype, seed=35)
    for options in (dict(neighbors=1, reduction="none"), dict(neighbors=2, neighbor_mode="cumulative",
                                                              normalize_weights=True)):
        assert_backend_matches_reference("cpu", proj, target, eps=eps, **options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_norm_exactly_eps_gets_the_references_gradient(dtype):
    """|x| = eps exactly: the clamped norm's derivative is autograd's for clamp_min there, 0 (no radial term)."""
    proj, target = pair_with_norms_equal_to_eps(dtype)
    assert_backend_matches_reference("cpu", proj, target, eps=EXACT_NORM_EPS, neighbors=1, reduction="none")


def test_bitwise_identical_when_every_thread_takes_blocks():
    """Many large token blocks, so that with 4 threads each takes some from the work queue: a partial sum kept per
    thread instead of per block changes the bits (the mutant cpu-partial-per-thread, issue 16)."""
    proj, target = random_pair((1, 6, 16 * 61 + 5, 96), torch.float32, seed=38)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run_everything(proj, target, neighbors=1)
        torch.set_num_threads(4)
        runs = [run_everything(proj, target, neighbors=1) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for many in runs:
        for name, a, b in zip(("loss", "stats", "grad proj", "grad target"), single, many):
            assert torch.equal(a, b), f"{name} with 4 threads differs from 1 thread"
