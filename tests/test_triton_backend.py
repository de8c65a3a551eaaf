"""The Triton backend against the float64 reference, on CPU under the Triton interpreter (and on CUDA if present).

Without CUDA, TRITON_INTERPRET=1 must be set before crepa_kernels.ops.triton_loss is imported (@triton.jit picks
the interpreter at decoration time), so it is set here before that import; tests/conftest.py should set it too,
for test files that may import the module earlier in the same process. With CUDA the kernels run compiled.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from crepa_kernels.ops import triton_loss  # noqa: E402
from crepa_kernels.reference import per_frame_loss as reference  # noqa: E402
from crepa_kernels.spec import LossOptions  # noqa: E402
from harness import EXTREME_TAUS, OPTION_GRID, SHAPES, assert_backend_matches_reference, random_pair  # noqa: E402

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
    loss = triton_loss.per_frame_loss(proj, target, options)
    ref = reference(proj.detach().double(), target.detach().double(), options)
    torch.testing.assert_close(loss.double().cpu(), ref.cpu(), rtol=1e-2, atol=1e-2)
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


def test_gradcheck_both_inputs():
    proj, target = _pair((1, 4, 2, 3), torch.float64)
    for options in (LossOptions(neighbors=1, tau=0.7), LossOptions(neighbors=2, neighbor_mode="cumulative",
                                                                    normalize_weights=True)):
        assert torch.autograd.gradcheck(lambda p, y: triton_loss.per_frame_loss(p, y, options), (proj, target))


def test_clamped_norms_follow_the_clamped_formula():
    proj, target = _pair((1, 3, 4, 5), torch.float64)
    with torch.no_grad():
        proj[0, 1, 2] = 0.0
        target[0, 2, 1] = 1e-14
    assert_backend_matches_reference("triton", proj, target, neighbors=1, reduction="none")


def test_bitwise_deterministic():
    proj, target = _pair((2, 5, 6, 40), torch.bfloat16)
    runs = []
    for _ in range(2):
        p, y = proj.detach().requires_grad_(True), target.detach().requires_grad_(True)
        loss = triton_loss.per_frame_loss(p, y, LossOptions(neighbors=2, neighbor_mode="cumulative"))
        grads = torch.autograd.grad(loss, (p, y), torch.ones_like(loss) * 0.37)
        runs.append((loss, *grads))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_every_output_element_is_written():
    options = LossOptions(neighbors=2, neighbor_mode="cumulative", normalize_weights=True)
    for shape, dtypes in [((2, 5, 3, 7), (torch.float32, None)), ((1, 37, 2, 5), (torch.float32, None)),
                          ((2, 5, 9, 7), (torch.bfloat16, torch.float64))]:
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
        loss = triton_loss.per_frame_loss(proj, target, options)
        expected = reference(proj.detach(), target.detach(), options)
        assert torch.equal(loss.isnan(), expected.isnan()), (options, loss)
        assert loss.isnan().any()
        torch.testing.assert_close(loss[~loss.isnan()], expected[~expected.isnan()], rtol=1e-10, atol=1e-12)


def test_unavailable_reason():
    assert triton_loss.unavailable_reason(torch.device(DEVICE)) is None
    assert "mps" in triton_loss.unavailable_reason(torch.device("mps"))


def test_opcheck_registered_ops():
    proj, target = _pair((1, 3, 2, 5))
    options = (0.7, 1, "adjacent", True, 1e-12)
    torch.library.opcheck(torch.ops.crepa_kernels.triton_forward.default, (proj, target, *options))
    loss, norms, band = torch.ops.crepa_kernels.triton_forward(proj.detach(), target.detach(), *options)
    grad_loss = torch.rand_like(loss)
    for target_grad in (True, False):
        torch.library.opcheck(torch.ops.crepa_kernels.triton_backward.default,
                              (grad_loss, proj.detach(), target.detach(), norms, band, *options, target_grad))


def test_torch_compile_fullgraph_matches_eager():
    """On CUDA Inductor sees the kernels (triton_op); under the interpreter the op is opaque (custom_op). Either
    way the compiled graph must give the eager loss and gradients, bit for bit."""
    options = LossOptions(neighbors=2, neighbor_mode="cumulative", normalize_weights=True)
    proj, target = _pair((2, 5, 3, 7))

    def loss_fn(p, y):
        return triton_loss.per_frame_loss(p, y, options)

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        p, y = proj.detach().requires_grad_(True), target.detach().requires_grad_(True)
        loss = fn(p, y)
        grads = torch.autograd.grad(loss, (p, y), torch.full_like(loss, 0.3))
        results.append((loss, *grads))
    for eager, from_compiled in zip(*results):
        assert torch.equal(eager, from_compiled)
