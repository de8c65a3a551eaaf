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
from crepa_kernels.ops import triton_loss  # noqa: E402
from crepa_kernels.reference import per_frame_loss as reference  # noqa: E402
from crepa_kernels.spec import LossOptions  # noqa: E402
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
    tiling = triton_loss.frame_tiling(37, triton_loss.max_offset(options, 37))
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
        tiling = triton_loss.frame_tiling(frames, triton_loss.max_offset(LossOptions(**options), frames),
                                          triton_loss.max_window(*(d or dtypes[0] for d in dtypes)))
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
                tiling = triton_loss.frame_tiling(frames, halo, window)
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
        shapes = triton_loss.stats_shapes(proj, target, options)
        stat_dtype = torch.float64 if torch.float64 in (proj.dtype, target.dtype) else torch.float32
        norms, band, partial = (torch.full(shapes[k], float("nan"), dtype=stat_dtype, device=DEVICE)
                                for k in ("norms", "band", "partial"))
        triton_loss.forward_into(proj, target, options, norms, band, partial)
        for name, buffer in (("norms", norms), ("band", band), ("partial", partial)):
            assert not buffer.isnan().any(), f"{name} has unwritten elements"
        grad_loss = torch.rand(shape[:2], dtype=stat_dtype, device=DEVICE) + 0.1
        grad_proj, grad_target = torch.full_like(proj, float("nan")), torch.full_like(target, float("nan"))
        triton_loss.backward_into(grad_loss, proj, target, norms, band, options, grad_proj, grad_target)
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
    proj, target = _pair((1, 3, 2, 5))
    tau, eps = triton_loss.device_scalars(LossOptions(tau=0.7, eps=1e-12), proj)
    options = (tau, 1, "adjacent", True, eps)
    # the ops carry no autograd formula (crepa_kernels.CrossFrameAlignFunction wires their backward), so they are
    # checked on inputs that do not require grad
    torch.library.opcheck(torch.ops.crepa_kernels.triton_forward.default, (proj.detach(), target.detach(), *options))
    loss, norms, band = torch.ops.crepa_kernels.triton_forward(proj.detach(), target.detach(), *options)
    grad_loss = torch.rand_like(loss)
    for target_grad in (True, False):
        torch.library.opcheck(torch.ops.crepa_kernels.triton_backward.default,
                              (grad_loss, proj.detach(), target.detach(), norms, band, *options, target_grad))


@pytest.mark.parametrize("name,bad", [("tau", torch.tensor(0.7)), ("eps", torch.tensor([1e-12], dtype=torch.float64))],
                         ids=["tau fp32", "eps 1-d"])
def test_ops_refuse_tau_and_eps_other_than_0d_fp64_tensors(name, bad):
    proj, target = _pair((1, 3, 2, 5))
    scalars = dict(zip(("tau", "eps"), triton_loss.device_scalars(LossOptions(tau=0.7), proj)), **{name: bad})
    with pytest.raises(ValueError, match=f"{name}: expected a 0-d float64 tensor"):
        torch.ops.crepa_kernels.triton_forward(proj.detach(), target.detach(), scalars["tau"], 1, "adjacent", True,
                                               scalars["eps"])


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
    shapes = triton_loss.stats_shapes(proj, target, options)
    stat_dtype = torch.float64 if torch.float64 in (proj.dtype, target.dtype) else torch.float32

    def new_stats():
        return [torch.full(shapes[name], float("nan"), dtype=stat_dtype, device=DEVICE)
                for name in ("norms", "band", "partial")]

    table = triton_loss.neighbour_table(proj, options, stat_dtype)
    _assert_programs_partition_outputs(
        lambda outputs: triton_loss.forward_launch(proj, target, options, *outputs, table), new_stats)

    norms, band, partial = new_stats()
    triton_loss.forward_into(proj, target, options, norms, band, partial)
    grad_loss = torch.rand(shape[:2], dtype=stat_dtype, device=DEVICE) + 0.1

    def backward(index, grad_proj, grad_target):
        return triton_loss.backward_launches(grad_loss, proj, target, norms, band, options, grad_proj, grad_target,
                                             table)[index]

    def new_grads():
        return [torch.full_like(proj, float("nan")), torch.full_like(target, float("nan"))]

    launches = triton_loss.backward_launches(grad_loss, proj, target, norms, band, options, *new_grads(), table)
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
    assert triton_loss.dot_dtype("backward", torch.bfloat16, torch.bfloat16) == torch.bfloat16  # the split path
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
        assert triton_loss.dot_dtype("backward", torch.bfloat16, torch.bfloat16) == torch.float32
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
