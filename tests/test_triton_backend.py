"""The Triton backend against the float64 reference, on CPU under the Triton interpreter (and on CUDA if present).

Without CUDA, TRITON_INTERPRET=1 must be set before crepa_kernels.ops.triton_loss is imported (@triton.jit picks
the interpreter at decoration time), so it is set here before that import; tests/conftest.py should set it too,
for test files that may import the module earlier in the same process. With CUDA the kernels run compiled.
"""
import itertools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from crepa_kernels.function import per_frame_loss_on  # noqa: E402
from crepa_kernels.ops import triton_loss, triton_plan  # noqa: E402
from crepa_kernels.reference import per_frame_loss as reference  # noqa: E402
from crepa_kernels.spec import LossOptions, band_offsets, coefficient_table, compute_dtype  # noqa: E402
from harness import (  # noqa: E402
    EXACT_NORM_EPS,
    EXTREME_TAUS,
    OPTION_GRID,
    SHAPES,
    assert_backend_matches_reference,
    assert_close_and_finite,
    assert_within_ulps,
    loss_and_grads,
    pair_straddling_eps,
    pair_with_norms_equal_to_eps,
    random_pair,
    reference_in_float64,
)

DEVICE = "cuda" if torch.cuda.is_available() and not triton_loss.INTERPRETED else "cpu"
if triton_loss.unavailable_reason(torch.device(DEVICE)) is not None:
    pytest.fail(f"triton backend unusable here: {triton_loss.unavailable_reason(torch.device(DEVICE))} "
                "(was crepa_kernels.ops.triton_loss imported before TRITON_INTERPRET=1 was set?)",
                pytrace=False)


def _pair(shape, proj_dtype=torch.float32, target_dtype=None, **kwargs):
    return random_pair(shape, proj_dtype, target_dtype, device=DEVICE, **kwargs)


def _tiling(options: LossOptions, frames: int, window: int = triton_plan.MAX_SINGLE_WINDOW_FRAMES):
    return triton_plan.frame_tiling(frames, triton_plan.max_offset(band_offsets(options, frames)), window)


def _table(options: LossOptions, proj, target):
    """The call's coefficient table and its slot offsets, as the backend receives them."""
    frames = proj.shape[1]
    return (coefficient_table(options, frames, compute_dtype(proj, target), proj.device),
            band_offsets(options, frames))


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """Lets the bf16 tensor-core paths (native bf16 forward dot, hi/lo split backward dot) run under the
    interpreter: its tl.dot multiplies bf16 bit patterns (triton-lang/triton#11584), so convert them first."""
    if not triton_loss.INTERPRETED:
        return
    from triton.runtime import interpreter
    import triton.language as tl

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar == tl.bfloat16:
                return interpreter.TensorHandle(interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None)
                                                .view("float32"), tl.float32)
            return x
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(triton_loss, "BF16_DOT", True)


# every option combination on two shapes, fp32
@pytest.mark.parametrize("options", OPTION_GRID, ids=str)
def test_option_grid_fp32(options):
    for shape in [(2, 5, 3, 7), (1, 6, 2, 33)]:
        proj, target = _pair(shape)
        assert_backend_matches_reference("triton", proj, target, **options)


DTYPE_CASES = [
    (torch.float64, None), (torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float64, torch.float32), (torch.bfloat16, torch.float64),
]
SOME_OPTIONS = [OPTION_GRID[2], OPTION_GRID[15], OPTION_GRID[26], OPTION_GRID[-1]]


def _assert_d1_matches_reference(proj, target, options):
    """D = 1: cos = +-1 and the exact gradient is 0, so the harness's tolerance (relative to the largest expected
    value, itself round-off) cannot apply; the loss must match and the gradients must be round-off small."""
    options = LossOptions(**options)
    loss = per_frame_loss_on("triton", proj, target, options)
    ref = reference(proj.detach().double(), target.detach().double(), options)
    assert_close_and_finite(loss, ref, f"D = 1 loss {options}")  # the loss dtype's tolerance: fp64 for fp64 inputs
    grads = torch.autograd.grad(loss, (proj, target), torch.rand_like(loss) + 0.5)
    for grad in grads:
        assert torch.isfinite(grad).all() and grad.abs().max() < 1e-5


@pytest.mark.parametrize("proj_dtype,target_dtype", DTYPE_CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dtypes_and_odd_shapes(shape, proj_dtype, target_dtype):
    for options in SOME_OPTIONS:
        if shape[-1] == 1:
            proj, target = _pair(shape, proj_dtype, target_dtype)
            _assert_d1_matches_reference(proj, target, options)
            continue
        proj, target = _pair(shape, proj_dtype, target_dtype)
        assert_backend_matches_reference("triton", proj, target, **options)


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 3, 2, 769)], ids=str)
def test_bf16_tensor_core_paths(shape, interpreter_bf16_dot):
    for options in SOME_OPTIONS:
        proj, target = _pair(shape, torch.bfloat16)
        assert_backend_matches_reference("triton", proj, target, **options)


def test_target_without_grad():
    for options in SOME_OPTIONS:
        proj, target = _pair((2, 5, 3, 7), target_requires_grad=False)
        assert_backend_matches_reference("triton", proj, target, **options)


def test_non_contiguous_inputs():
    proj, target = _pair((2, 6, 3, 8), torch.float64)
    proj_t = proj.detach().transpose(0, 2).contiguous().transpose(0, 2).requires_grad_(True)
    target_sliced = torch.cat([target.detach(), target.detach()], dim=-1)[..., ::2].requires_grad_(True)
    assert not proj_t.is_contiguous() and not target_sliced.is_contiguous()
    for options in SOME_OPTIONS:
        assert_backend_matches_reference("triton", proj_t, target_sliced, **options)


def test_long_video_takes_the_tiled_path():
    """F > 32 is cut into frame tiles with halo frames; normalize_weights needs Z_f of the halo rows too."""
    options = LossOptions(neighbors=3, neighbor_mode="cumulative", normalize_weights=True)
    tiling = _tiling(options, 37)
    assert tiling.num_tiles > 1 and tiling.halo == 3
    proj, target = _pair((1, 37, 2, 5), torch.float64)
    for kwargs in (dict(neighbors=3, neighbor_mode="cumulative", normalize_weights=True, tau=0.3),
                   dict(neighbors=2, normalize_weights=True, reduction="none")):
        assert_backend_matches_reference("triton", proj, target, **kwargs)


# F > 32 with offsets up to F - 1: halo mode (d <= 10) and shifted column windows (farther), fp64 with 16-frame
# windows; the old tiling needed 64- and 128-frame windows here (spills, too much shared memory)
LARGE_OFFSETS = [((1, 33, 3, 5), dict(neighbors=9, neighbor_mode="cumulative", normalize_weights=True, tau=2.0)),
                 ((2, 33, 2, 6), dict(neighbors=11, neighbor_mode="cumulative", tau=5.0)),
                 ((1, 61, 2, 5), dict(neighbors=57, normalize_weights=True, tau=30.0)),
                 ((1, 61, 2, 4), dict(neighbors=25, neighbor_mode="cumulative", normalize_weights=True, tau=8.0)),
                 ((1, 70, 3, 3), dict(neighbors=40, tau=20.0))]


@pytest.mark.parametrize("shape,options", LARGE_OFFSETS, ids=str)
def test_large_offsets_on_long_videos(shape, options):
    frames = shape[1]
    for dtypes in ((torch.float64, None), (torch.float32, torch.bfloat16)):
        tiling = _tiling(LossOptions(**options), frames, triton_plan.max_window(*(d or dtypes[0] for d in dtypes)))
        assert tiling.frames <= 32 and tiling.num_tiles > 1
        proj, target = _pair(shape, *dtypes)
        assert_backend_matches_reference("triton", proj, target, **options)


@pytest.mark.parametrize("shape,options", LARGE_OFFSETS[2:4], ids=str)
def test_large_offsets_bf16_tensor_core_paths(shape, options, interpreter_bf16_dot):
    proj, target = _pair(shape, torch.bfloat16)
    assert_backend_matches_reference("triton", proj, target, **options)


def test_no_tiling_needs_a_window_over_32_frames():
    """Every F up to 300 with every largest offset: windows of 16 or 32 frames that cover every frame."""
    for frames in range(1, 301):
        for halo in range(0, frames):
            for window in (16, 32):
                tiling = triton_plan.frame_tiling(frames, halo, window)
                assert tiling.frames in (16, 32) and tiling.frames <= max(window, 16)
                assert tiling.rows_per_tile * tiling.num_tiles >= frames
                # every written frame's neighbours lie in the row window (halo) or in the visited shifts
                assert tiling.halo + tiling.shifts * tiling.frames >= (halo if frames > window else 0)
                assert tiling.rows_per_tile + 2 * tiling.halo <= tiling.frames


def test_gradcheck_both_inputs():
    proj, target = _pair((1, 4, 2, 3), torch.float64)
    for options in (LossOptions(neighbors=1, tau=0.7), LossOptions(neighbors=2, neighbor_mode="cumulative",
                                                                    normalize_weights=True)):
        assert torch.autograd.gradcheck(lambda p, y: per_frame_loss_on("triton", p, y, options), (proj, target))


def test_clamped_norms_follow_the_clamped_formula():
    proj, target = _pair((1, 3, 4, 5), torch.float64)
    with torch.no_grad():
        proj[0, 1, 2] = 0.0
        target[0, 2, 1] = 1e-14
    assert_backend_matches_reference("triton", proj, target, neighbors=1, reduction="none")


@pytest.mark.skipif(triton_loss.INTERPRETED, reason="the interpreter runs a launch's programs one after another in "
                    "grid order, so two runs cannot differ; the order-independence test above covers the GPU race")
def test_bitwise_deterministic():
    proj, target = _pair((2, 5, 6, 40), torch.bfloat16)
    runs = []
    for _ in range(2):
        p, y = proj.detach().requires_grad_(True), target.detach().requires_grad_(True)
        loss = per_frame_loss_on("triton", p, y, LossOptions(neighbors=2, neighbor_mode="cumulative"))
        grads = torch.autograd.grad(loss, (p, y), torch.ones_like(loss) * 0.37)
        runs.append((loss, *grads))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_every_output_element_is_written():
    """Halo and shifted tilings included: each band slot has exactly one owning window."""
    options = LossOptions(neighbors=2, neighbor_mode="cumulative", normalize_weights=True)
    cases = [((2, 5, 3, 7), (torch.float32, None), options), ((1, 37, 2, 5), (torch.float32, None), options),
             ((2, 5, 9, 7), (torch.bfloat16, torch.float64), options),
             ((1, 61, 2, 5), (torch.float32, torch.bfloat16), LossOptions(neighbors=57, normalize_weights=True)),
             ((2, 61, 3, 4), (torch.float32, None), LossOptions(neighbors=25, neighbor_mode="cumulative")),
             ((1, 45, 2, 3), (torch.float64, None), LossOptions(neighbors=20, neighbor_mode="cumulative"))]
    for shape, dtypes, options in cases:
        proj, target = _pair(shape, *dtypes)
        proj, target = proj.detach(), target.detach()
        table, slot_offsets = _table(options, proj, target)
        shapes = triton_loss.stats_shapes(proj, target, slot_offsets)
        stat_dtype = torch.float64 if torch.float64 in (proj.dtype, target.dtype) else torch.float32
        norms, band, partial = (torch.full(shapes[k], float("nan"), dtype=stat_dtype, device=DEVICE)
                                for k in ("norms", "band", "partial"))
        eps = triton_loss.eps_tensor(options, proj)
        triton_loss.forward_into(proj, target, table, slot_offsets, norms, band, partial, eps)
        for name, buffer in (("norms", norms), ("band", band), ("partial", partial)):
            assert not buffer.isnan().any(), f"{name} has unwritten elements"
        grad_loss = torch.rand(shape[:2], dtype=stat_dtype, device=DEVICE) + 0.1
        grad_proj, grad_target = torch.full_like(proj, float("nan")), torch.full_like(target, float("nan"))
        triton_loss.backward_into(grad_loss, proj, target, table, slot_offsets, norms, band, grad_proj, grad_target,
                                  eps)
        assert not grad_proj.isnan().any() and not grad_target.isnan().any()


@pytest.mark.parametrize("tau", EXTREME_TAUS)
def test_extreme_tau(tau):
    proj, target = _pair((2, 5, 3, 7))
    for kwargs in (dict(neighbors=1), dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True)):
        assert_backend_matches_reference("triton", proj, target, tau=tau, **kwargs)


def test_nan_reaches_exactly_the_frames_that_see_it():
    """G holds every frame pair of the window; a NaN in frame 4 must reach L[3] and L[4] only, as in the
    reference (pairs outside the neighbourhood are selected away, not multiplied by 0)."""
    proj, target = _pair((1, 6, 2, 4), torch.float64)
    with torch.no_grad():
        target[0, 4, 1, 0] = float("nan")
    for options in (LossOptions(neighbors=1), LossOptions(neighbors=2, neighbor_mode="cumulative"),
                    LossOptions(neighbors=1, tau=1e-4)):
        loss = per_frame_loss_on("triton", proj, target, options)
        expected = reference(proj.detach(), target.detach(), options)
        assert torch.equal(loss.isnan(), expected.isnan()), (options, loss)
        assert loss.isnan().any()
        torch.testing.assert_close(loss[~loss.isnan()], expected[~expected.isnan()], rtol=1e-10, atol=1e-12)


def test_unavailable_reason():
    assert triton_loss.unavailable_reason(torch.device(DEVICE)) is None
    assert "mps" in triton_loss.unavailable_reason(torch.device("mps"))


def test_opcheck_registered_ops():
    proj, target = (x.detach() for x in _pair((1, 3, 2, 5)))
    options = LossOptions(tau=0.7, neighbors=1, normalize_weights=True)
    table, slot_offsets = _table(options, proj, target)
    eps = triton_loss.eps_tensor(options, proj)
    # the ops carry no autograd formula (crepa_kernels.CrossFrameAlignFunction wires their backward), so they are
    # checked on inputs that do not require grad
    torch.library.opcheck(torch.ops.crepa_kernels.triton_forward.default,
                          (proj, target, table, list(slot_offsets), eps))
    loss, norms, band = torch.ops.crepa_kernels.triton_forward(proj, target, table, list(slot_offsets), eps)
    grad_loss = torch.rand_like(loss)
    for target_grad in (True, False):
        torch.library.opcheck(torch.ops.crepa_kernels.triton_backward.default,
                              (grad_loss, proj, target, table, norms, band, list(slot_offsets), eps, target_grad))


def test_ops_refuse_eps_other_than_a_0d_fp64_tensor():
    proj, target = (x.detach() for x in _pair((1, 3, 2, 5)))
    table, slot_offsets = _table(LossOptions(), proj, target)
    for bad in (torch.tensor(1e-12), torch.tensor([1e-12], dtype=torch.float64)):
        with pytest.raises(ValueError, match="eps: expected a 0-d float64 tensor"):
            torch.ops.crepa_kernels.triton_forward(proj, target, table, list(slot_offsets), bad)


@pytest.mark.parametrize("case", ["fp64 table for fp32 inputs", "one column short", "transposed", "slots unsorted"])
def test_ops_refuse_a_table_that_does_not_fit(case):
    """The kernels index the table as C[f * W + slot]: a table of another shape, dtype or layout (or slot offsets
    out of spec.band_offsets' order) is refused before any kernel runs, naming the argument."""
    proj, target = (x.detach() for x in _pair((1, 3, 2, 5)))
    options = LossOptions(neighbors=1, normalize_weights=True)
    table, slot_offsets = _table(options, proj, target)
    square = torch.rand(3, 3)
    coefficients, offsets = {"fp64 table for fp32 inputs": (table.double(), slot_offsets),
                             "one column short": (table[:, :2].contiguous(), slot_offsets),
                             "transposed": (torch.rand(3, 3).t(), slot_offsets),
                             "slots unsorted": (table, (0, 1, -1))}[case]
    with pytest.raises(ValueError, match="coefficients: expected|slot_offsets: expected"):
        torch.ops.crepa_kernels.triton_forward(proj, target, coefficients, list(offsets),
                                               triton_loss.eps_tensor(options, proj))


def test_torch_compile_fullgraph_matches_eager():
    """On CUDA Inductor sees the kernels (triton_op); under the interpreter the op is opaque (custom_op). Either
    way the compiled graph must give the eager loss and gradients, bit for bit, and both the float64 reference's."""
    options = LossOptions(neighbors=2, neighbor_mode="cumulative", normalize_weights=True)
    proj, target = _pair((2, 5, 3, 7))

    def loss_fn(p, y):
        return per_frame_loss_on("triton", p, y, options)

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        p, y = proj.detach().requires_grad_(True), target.detach().requires_grad_(True)
        loss = fn(p, y)
        grads = torch.autograd.grad(loss, (p, y), torch.full_like(loss, 0.3))
        results.append((loss, *grads))
    for eager, from_compiled in zip(*results):
        assert torch.equal(eager, from_compiled)
    expected = reference_in_float64(proj, target, torch.full(proj.shape[:2], 0.3), neighbors=2,
                                    neighbor_mode="cumulative", normalize_weights=True, reduction="none")
    for name, actual, wanted in zip(("loss", "grad proj", "grad target"), results[1], (expected[0], *expected[1])):
        assert_close_and_finite(actual, wanted, f"compiled triton {name}")


# --- the grid's programs in isolation and in any order (issue 16) ----------------------------------------------
# On a GPU the programs of a launch run in no fixed order; the interpreter runs them in grid order. So a program that
# also wrote a row of its neighbour (a write mask off by one at a tile edge) would be overwritten by that neighbour
# here and race with it there. These tests run each program alone into NaN-filled buffers: every output element must
# be written by exactly one program, with the value of the full launch, and the launch in reverse order must give the
# same result. They use only the launch plan (forward_launch / backward_launches: kernel, grid, arguments).

needs_interpreter = pytest.mark.skipif(not triton_loss.INTERPRETED,
                                       reason="selects single programs of a launch through the Triton interpreter")


def _run_programs(launch, programs):
    """Runs the given programs of ``launch.grid``, in the given order, each as a launch of one program."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    with pytest.MonkeyPatch.context() as patch:
        for program in programs:
            # the one-program launch sets the grid to (1, 1, 1) and the index to (0, 0, 0): substitute the real ones
            patch.setattr(builder, "set_grid_dim", lambda *_: type(builder).set_grid_dim(builder, *launch.grid))
            patch.setattr(builder, "set_grid_idx", lambda *_, p=program: type(builder).set_grid_idx(builder, *p))
            launch.kernel[(1, 1, 1)](*launch.args, **launch.kwargs)


def _grid_programs(grid):
    return list(itertools.product(*(range(extent) for extent in grid)))


def _assert_programs_partition_outputs(make_launch, make_outputs):
    """``make_outputs()`` -> fresh NaN-filled output tensors; ``make_launch(outputs)`` -> the Launch writing them."""
    full = make_outputs()
    launch = make_launch(full)
    programs = _grid_programs(launch.grid)
    _run_programs(launch, programs)
    assert all(not output.isnan().any() for output in full), "the full launch left elements unwritten"
    writers = [torch.zeros(output.shape, dtype=torch.int64) for output in full]
    for program in programs:
        alone = make_outputs()
        _run_programs(make_launch(alone), [program])
        for index, (mine, reference_output) in enumerate(zip(alone, full)):
            written = ~mine.isnan()
            writers[index] += written.cpu()
            assert torch.equal(mine[written], reference_output[written]), (
                f"program {program} alone wrote other values into output {index} than the full launch")
    for index, count in enumerate(writers):
        assert count.max() == 1 and count.min() == 1, (
            f"output {index}: elements written by {count.min().item()}..{count.max().item()} programs, expected 1")
    reverse = make_outputs()
    _run_programs(make_launch(reverse), programs[::-1])
    for index, (backwards, forwards) in enumerate(zip(reverse, full)):
        assert torch.equal(backwards, forwards), f"output {index} depends on the program order"


TILING_CASES = [
    # several frame tiles with a 3-frame halo (cumulative d = 3, normalised), and several token blocks
    ((1, 37, 3, 5), torch.float32, None, LossOptions(neighbors=3, neighbor_mode="cumulative", normalize_weights=True)),
    # three frame tiles (adjacent d = 1), two batch items, mixed dtypes with an fp64 stat path
    ((2, 70, 2, 6), torch.bfloat16, torch.float64, LossOptions(neighbors=1, tau=0.6)),
    # one frame window, several token blocks with a ragged last one
    ((2, 5, 9, 7), torch.float32, torch.bfloat16, LossOptions(neighbors=2, normalize_weights=True)),
    # shifted column windows (d = 40 on F = 70): each band slot written by the one window holding its frame, and
    # the backward as one launch per gradient
    ((1, 70, 2, 3), torch.float32, None, LossOptions(neighbors=40, normalize_weights=True, tau=9.0)),
]


@needs_interpreter
@pytest.mark.parametrize("shape,proj_dtype,target_dtype,options", TILING_CASES, ids=str)
def test_each_program_writes_exactly_its_own_outputs_in_any_order(shape, proj_dtype, target_dtype, options):
    proj, target = (x.detach() for x in _pair(shape, proj_dtype, target_dtype))
    table, slot_offsets = _table(options, proj, target)
    shapes = triton_loss.stats_shapes(proj, target, slot_offsets)
    stat_dtype = torch.float64 if torch.float64 in (proj.dtype, target.dtype) else torch.float32

    def new_stats():
        return [torch.full(shapes[name], float("nan"), dtype=stat_dtype, device=DEVICE)
                for name in ("norms", "band", "partial")]

    eps = triton_loss.eps_tensor(options, proj)
    _assert_programs_partition_outputs(
        lambda outputs: triton_loss.forward_launch(proj, target, table, slot_offsets, *outputs, eps), new_stats)

    norms, band, partial = new_stats()
    triton_loss.forward_into(proj, target, table, slot_offsets, norms, band, partial, eps)
    grad_loss = torch.rand(shape[:2], dtype=stat_dtype, device=DEVICE) + 0.1

    def backward(index, grad_proj, grad_target):
        return triton_loss.backward_launches(grad_loss, proj, target, table, slot_offsets, norms, band, grad_proj,
                                             grad_target, eps)[index]

    def new_grads():
        return [torch.full_like(proj, float("nan")), torch.full_like(target, float("nan"))]

    launches = triton_loss.backward_launches(grad_loss, proj, target, table, slot_offsets, norms, band,
                                             *new_grads(), eps)
    for index, launch in enumerate(launches):
        # each launch against the gradients it writes (shifted mode: one each; the other is a never-written stand-in)
        writes = [launch.kwargs["PROJ_GRAD"], launch.kwargs["TARGET_GRAD"]]

        def make_launch(outputs, index=index, writes=writes):
            given = iter(outputs)
            grads = [next(given) if written else stand_in for written, stand_in in zip(writes, new_grads())]
            return backward(index, *grads)

        _assert_programs_partition_outputs(
            make_launch, lambda writes=writes: [grad for grad, written in zip(new_grads(), writes) if written])


# --- the bf16 hi/lo split of the backward, per element (issue 16) ----------------------------------------------
# A tolerance relative to the largest gradient lets every element be off by 1% of it; the split A = hi + lo must
# instead keep each 16-bit gradient element within an ulp of the float64 result rounded to bf16.

ULP_SHAPES = [(1, 5, 40, 256), (2, 5, 3, 7), (1, 3, 2, 769)]
ULP_OPTIONS = [dict(neighbors=1, tau=0.7, reduction="none"),
               dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True, reduction="frame_sum")]


@pytest.mark.parametrize("options", ULP_OPTIONS, ids=str)
@pytest.mark.parametrize("shape", ULP_SHAPES, ids=str)
def test_bf16_gradients_within_an_ulp_per_element(shape, options, interpreter_bf16_dot):
    assert triton_plan.dot_dtype("backward", torch.bfloat16, torch.bfloat16, triton_loss.BF16_DOT) == torch.bfloat16
    proj, target = _pair(shape, torch.bfloat16)
    loss, grads, grad_output = loss_and_grads(proj, target, "triton", **options)
    expected, expected_grads = reference_in_float64(proj, target, grad_output, **options)
    assert_close_and_finite(loss, expected, "bf16 loss")
    for name, grad, expected_grad in zip(("proj", "target"), grads, expected_grads):
        assert grad.dtype == torch.bfloat16
        assert_within_ulps(grad, expected_grad, f"grad {name} {shape} {options}")


@pytest.mark.parametrize("shape", ULP_SHAPES[:2], ids=str)
def test_bf16_split_path_agrees_with_the_fp32_path(shape, interpreter_bf16_dot):
    """The same bf16 inputs through the hi/lo split (bf16 tl.dot) and through the fp32 tl.dot: the fp32 results
    before rounding differ by ~1e-5 relative, so the bf16 gradients are equal but for rare rounding-boundary ties."""
    options = dict(neighbors=2, neighbor_mode="cumulative", tau=0.5, reduction="none")
    proj, target = _pair(shape, torch.bfloat16)
    _, split, _ = loss_and_grads(proj, target, "triton", **options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_loss, "BF16_DOT", False)
        assert triton_plan.dot_dtype("backward", torch.bfloat16, torch.bfloat16, triton_loss.BF16_DOT) == \
            torch.float32
        _, fp32, _ = loss_and_grads(proj, target, "triton", **options)
    for name, from_split, from_fp32 in zip(("proj", "target"), split, fp32):
        assert_within_ulps(from_split, from_fp32.double(), f"grad {name}: split against fp32 path")
        assert (from_split == from_fp32).double().mean() >= 0.95, f"grad {name}: split and fp32 paths differ often"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("eps", [0.5, 3.0])
def test_large_eps_reaches_the_kernels(eps, dtype):
    """Half of the norms below eps: both kernels clamp each norm with the caller's eps (issue 16)."""
    proj, target = pair_straddling_eps((2, 5, 9, 7), eps, dtype, seed=36, device=DEVICE)
    for options in (dict(neighbors=1, reduction="none"), dict(neighbors=2, neighbor_mode="cumulative",
                                                              normalize_weights=True)):
        assert_backend_matches_reference("triton", proj, target, eps=eps, **options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_norm_exactly_eps_gets_the_references_gradient(dtype):
    """|x| = eps exactly: the clamped norm's derivative is autograd's for clamp_min there, 0 (no radial term)."""
    proj, target = pair_with_norms_equal_to_eps(dtype, device=DEVICE)
    assert_backend_matches_reference("triton", proj, target, eps=EXACT_NORM_EPS, neighbors=1, reduction="none")


# --- the kernels read the coefficient table (issue 22) ------------------------------------------------------------
# An arbitrary non-negative table, different in every row and derivable from no tau or weight profile (zeros where
# a slot lands outside the clip): the loss and both gradients must follow it, through the backend protocol.


def _random_table(slot_offsets, frames, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    table = torch.rand((frames, len(slot_offsets)), generator=generator, dtype=torch.float64) * 2.0
    rows = torch.arange(frames)[:, None] + torch.tensor(slot_offsets)[None, :]
    table[(rows < 0) | (rows >= frames)] = 0.0
    return table.to(device=DEVICE, dtype=dtype)


def _loss_with_table_in_float64(proj, target, table, slot_offsets, eps):
    """L[b, f] = -1/N sum_n sum_slot C[f, slot] cos(p_bfn, y_b(f+o)n), norms clamped at eps: a float64
    restatement of the loss for any table."""
    p, y = proj.double(), target.double()
    frames = p.shape[1]
    p_unit = p / p.norm(dim=-1, keepdim=True).clamp_min(eps)
    y_unit = y / y.norm(dim=-1, keepdim=True).clamp_min(eps)
    loss = p.new_zeros(p.shape[:2])
    for slot, offset in enumerate(slot_offsets):
        first, last = max(0, -offset), min(frames, frames - offset)  # frames f whose f + offset lies in the clip
        if first >= last:
            continue
        cos = (p_unit[:, first:last] * y_unit[:, first + offset:last + offset]).sum(-1).mean(-1)
        loss = loss + torch.nn.functional.pad(-table.double()[first:last, slot] * cos, (first, frames - last))
    return loss


TABLE_CASES = [
    ((2, 5, 3, 7), LossOptions(neighbors=2, neighbor_mode="cumulative"), torch.float64),
    ((1, 6, 5, 33), LossOptions(neighbors=2), torch.float32),
    ((3, 4, 2, 5), LossOptions(neighbors=0), torch.float64),
    ((1, 37, 2, 5), LossOptions(neighbors=3, neighbor_mode="cumulative"), torch.float64),  # halo tiling
    ((1, 61, 2, 3), LossOptions(neighbors=57), torch.float32),  # shifted tiling, adjacent
    ((1, 33, 2, 3), LossOptions(neighbors=11, neighbor_mode="cumulative"), torch.float64),  # shifted, cumulative
    ((2, 5, 3, 7), LossOptions(neighbors=1), torch.bfloat16),
]


@pytest.mark.parametrize("shape,options,dtype", TABLE_CASES, ids=str)
def test_kernels_read_an_arbitrary_coefficient_table(shape, options, dtype):
    proj, target = (x.detach() for x in _pair(shape, dtype, seed=sum(shape)))
    frames = shape[1]
    slot_offsets = band_offsets(options, frames)
    compute = compute_dtype(proj, target)
    table = _random_table(slot_offsets, frames, compute, seed=frames)
    assert len(slot_offsets) == 1 or (table[:, 1:] > 0).any()
    assert len(set(table[:, 0].tolist())) == frames  # no row repeats another

    p64, y64 = (x.double().requires_grad_(True) for x in (proj, target))
    expected = _loss_with_table_in_float64(p64, y64, table, slot_offsets, options.eps)
    grad_loss = (torch.rand(shape[:2], generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 0.3) * 3
    expected_grads = torch.autograd.grad(expected, (p64, y64), grad_loss)

    loss, *saved = triton_loss.forward(proj, target, table, options)
    assert loss.dtype == compute
    assert_close_and_finite(loss, expected, f"loss {shape} {options}")
    for needs_target_grad in (True, False):
        grads = triton_loss.backward(grad_loss.to(DEVICE, compute), proj, target, table, tuple(saved), options, True,
                                     needs_target_grad)
        assert (grads[1] is None) == (not needs_target_grad)
        for name, grad, wanted in zip(("proj", "target"), grads, expected_grads):
            if grad is not None:
                assert grad.dtype == dtype
                assert_close_and_finite(grad, wanted, f"grad {name} {shape} {options}")


def test_another_table_changes_the_result():
    """The table, not the options, sets the coefficients: scaling one row's neighbour columns changes that frame's
    loss only."""
    options = LossOptions(neighbors=1)
    proj, target = (x.detach() for x in _pair((1, 5, 3, 7), torch.float64))
    table, _ = _table(options, proj, target)
    scaled = table.clone()
    scaled[2, 1:] *= 3.0
    loss = triton_loss.forward(proj, target, table, options)[0]
    other = triton_loss.forward(proj, target, scaled, options)[0]
    changed = (loss != other)[0].tolist()
    assert changed == [False, False, True, False, False]


PLAN_WITHOUT_TRITON = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
        return None

sys.meta_path.insert(0, NoTriton())
import torch
from crepa_kernels.ops import triton_plan
from crepa_kernels.ops import triton_loss

plan = triton_plan.plan_kernel("forward", (2, 61, 3600, 1536), torch.bfloat16, torch.bfloat16,
                               (0, *range(-25, 0), *range(1, 26)), True, (8, 6))
assert plan.tiling.shifted and plan.band == triton_plan.BandLayout(-25, 1, 51), plan
assert "triton" not in sys.modules and "crepa_kernels.ops.triton_kernels" not in sys.modules
assert "not importable" in triton_loss.unavailable_reason(torch.device("cpu"))
print("ok")
"""


def test_planning_imports_without_triton():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", PLAN_WITHOUT_TRITON], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("slot_offsets,band", [((0,), (0, 1, 1)), ((0, -3, 3), (-3, 3, 3)),
                                               ((0, -2, -1, 1, 2), (-2, 1, 5))])
def test_band_layout_of_the_table_slots(slot_offsets, band):
    assert triton_plan.band_layout(slot_offsets) == triton_plan.BandLayout(*band)
    for bad in ((0, 1, -1), (-1, 0, 1), (0, -3, 1, 3)):
        with pytest.raises(ValueError, match="slot_offsets"):
            triton_plan.band_layout(bad)
