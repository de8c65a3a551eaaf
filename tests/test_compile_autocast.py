"""torch.compile(fullgraph=True) through the public API, and autocast (issues 7 and 11).

Backend-specific op checks (opcheck, fake tensors) live with each backend's tests.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from crepa_kernels import CrossFrameAlignFunction, CrossFrameAlignLoss, available_backends, cross_frame_align_loss
from harness import assert_close_and_finite, random_pair, reference_in_float64

CPU_COMPILABLE = [name for name, ok in available_backends("cpu").items() if ok is True and name != "triton"]


def _loss_and_grads(loss_fn, proj, target):
    proj = proj.detach().requires_grad_(True)
    target = target.detach().requires_grad_(True)
    loss = loss_fn(proj, target)
    grads = torch.autograd.grad(loss, (proj, target))
    return loss, grads


@pytest.mark.parametrize("backend", CPU_COMPILABLE + ["auto"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def step(proj, target):
        return cross_frame_align_loss(proj, target, neighbors=2, neighbor_mode="cumulative", tau=0.7,
                                      normalize_weights=True, backend=backend)

    proj, target = random_pair((2, 5, 3, 11), torch.float32)
    compiled = torch.compile(step, fullgraph=True)  # fullgraph: any graph break is an error
    loss, grads = _loss_and_grads(compiled, proj, target)
    expected, expected_grads = _loss_and_grads(step, proj, target)
    assert_close_and_finite(loss, expected, f"compiled {backend} loss")
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close_and_finite(grad, expected_grad, f"compiled {backend} grad")
    # compiled and eager may share a bug: both also against the float64 reference
    reference_loss, reference_grads = reference_in_float64(proj, target, torch.ones(()), neighbors=2,
                                                           neighbor_mode="cumulative", tau=0.7, normalize_weights=True)
    assert_close_and_finite(loss, reference_loss, f"compiled {backend} loss against the reference")
    for grad, expected_grad in zip(grads, reference_grads):
        assert_close_and_finite(grad, expected_grad, f"compiled {backend} grad against the reference")


# Clips of varying length and a tau / eps schedule: B, F, N, D, num_frames, tau and eps all change between calls
# (3-D frame-major inputs, num_frames=F). No size is 1: torch.compile always specialises sizes 0 and 1.
VARYING_CALLS = [(2, 5, 3, 7, 0.5, 1e-12), (3, 6, 4, 9, 0.7, 1e-8), (2, 4, 5, 6, 1.3, 1e-10), (4, 7, 2, 11, 0.9, 1e-6)]
LOSS_OPTIONS = dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True, reduction="frame_sum")


def _functional(backend):
    def loss(proj, target, tau, eps, num_frames):
        return cross_frame_align_loss(proj, target, tau=tau, eps=eps, num_frames=num_frames, backend=backend,
                                      **LOSS_OPTIONS)
    return loss, loss


def _function(backend):
    def loss(proj, target, tau, eps, num_frames):
        o = LOSS_OPTIONS
        return CrossFrameAlignFunction.apply(proj, target, tau, o["neighbors"], o["neighbor_mode"],
                                             o["normalize_weights"], o["reduction"], num_frames, eps, backend)
    return loss, loss


def _module(backend):
    """The module's tau and eps are attributes that a schedule sets before each call."""
    module = CrossFrameAlignLoss(backend=backend, **LOSS_OPTIONS)

    def make(target_module):
        def loss(proj, target, tau, eps, num_frames):
            module.tau, module.eps = tau, eps
            return target_module(proj, target, num_frames)
        return loss
    return make(module), lambda compile_: make(compile_(module))


FORMS = {"functional": _functional, "function": _function, "module": _module}


def _compiled(form, backend, compiler, dynamic):
    """(eager loss, compiled loss, compile counter) for one of the three forms."""
    counter = CompileCounterWithBackend(compiler)
    eager, to_compile = FORMS[form](backend)

    def compile_(fn):
        return torch.compile(fn, backend=counter, fullgraph=True, dynamic=dynamic)

    compiled = to_compile(compile_) if form == "module" else compile_(to_compile)
    return eager, compiled, counter


def _run_varying_calls(eager, compiled, counter, calls, expected_frames):
    """Runs the calls; each must match eager, and compilation counts must follow ``expected_frames``."""
    for index, (batch, frames, tokens, dim, tau, eps) in enumerate(calls):
        proj, target = random_pair((batch, frames * tokens, dim), torch.float32, seed=index)
        loss, grads = _loss_and_grads(lambda p, y: compiled(p, y, tau, eps, frames), proj, target)
        expected, expected_grads = _loss_and_grads(lambda p, y: eager(p, y, tau, eps, frames), proj, target)
        assert_close_and_finite(loss, expected, f"call {index} loss")
        for grad, expected_grad in zip(grads, expected_grads):
            assert_close_and_finite(grad, expected_grad, f"call {index} grad")
        assert counter.frame_count == expected_frames[index], (
            f"call {index}: {counter.frame_count} compilations, expected {expected_frames[index]}")


@pytest.mark.parametrize("form", FORMS)
def test_compile_dynamic_true_never_recompiles_for_new_shapes_tau_or_eps(form):
    """Inductor with dynamic=True: one graph serves every clip length and every tau / eps."""
    torch._dynamo.reset()
    eager, compiled, counter = _compiled(form, "auto", "inductor", dynamic=True)
    _run_varying_calls(eager, compiled, counter, VARYING_CALLS, expected_frames=[1, 1, 1, 1])


@pytest.mark.parametrize("form", FORMS)
def test_compile_automatic_dynamic_recompiles_once_then_never(form):
    """Default (automatic dynamic shapes): the first call specialises, the first change of shapes, tau and eps makes
    them symbolic (one recompilation), and no later call recompiles. AOTAutograd traces forward and backward here
    as under Inductor; Inductor's code generation is left out to keep the test short."""
    torch._dynamo.reset()
    eager, compiled, counter = _compiled(form, "auto", "aot_eager", dynamic=None)
    _run_varying_calls(eager, compiled, counter, VARYING_CALLS, expected_frames=[1, 2, 2, 2])


@pytest.mark.parametrize("form", FORMS)
def test_compile_reference_backend_with_tau_and_eps_schedules_and_changing_shapes(form):
    """The reference backend traces the formula itself; tau and eps stay symbolic through its tensor arithmetic
    (an eps given to F.normalize or clamp_min would be pinned: one graph per eps)."""
    torch._dynamo.reset()
    eager, compiled, counter = _compiled(form, "reference", "aot_eager", dynamic=True)
    _run_varying_calls(eager, compiled, counter, VARYING_CALLS, expected_frames=[1, 1, 1, 1])


def test_compile_second_tau_does_not_fail():
    """Issue 11's reproduction: f(p, y, tau) compiled with fullgraph=True, called with tau=0.5 then 0.7."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda p, y, tau: cross_frame_align_loss(p, y, tau=tau), fullgraph=True)
    proj, target = random_pair((2, 4, 3, 5), torch.float32)
    for tau in (0.5, 0.7, 0.9):
        assert_close_and_finite(compiled(proj, target, tau), cross_frame_align_loss(proj, target, tau=tau),
                                f"tau={tau}")


@pytest.mark.parametrize("backend", CPU_COMPILABLE)
def test_autocast_cpu_bf16(backend):
    torch.manual_seed(0)
    projector = torch.nn.Linear(16, 9)
    hidden = torch.randn(2, 4 * 3, 16)
    target = torch.randn(2, 4, 3, 9, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        proj = projector(hidden)
        assert proj.dtype == torch.bfloat16
        loss = cross_frame_align_loss(proj, target, num_frames=4, neighbors=1, backend=backend)
    assert loss.dtype == torch.float32
    expected = cross_frame_align_loss(proj.detach().double(), target.double(), num_frames=4, neighbors=1,
                                      backend="reference")
    assert_close_and_finite(loss, expected, f"autocast {backend}", dtype=torch.float32)
    loss.backward()
    assert torch.isfinite(projector.weight.grad).all()



GPU_BACKENDS = ["triton", "cuda"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _usable_on_cuda(backend):
    reason = available_backends("cuda")[backend]
    if reason is not True:
        pytest.skip(f"{backend} unusable on CUDA: {reason}")


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    """Forward and backward captured in a CUDA graph: possible only without host syncs or data-dependent sizes."""
    _usable_on_cuda(backend)
    proj, target = random_pair((2, 13, 135, 768), torch.bfloat16, device="cuda")
    static_proj = proj.detach().clone().requires_grad_(True)
    static_target = target.detach().clone()

    def step():
        static_proj.grad = None
        loss = cross_frame_align_loss(static_proj, static_target, neighbors=2, neighbor_mode="cumulative",
                                      backend=backend)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: JIT compilation and autotuning happen outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()

    fresh_proj, fresh_target = random_pair((2, 13, 135, 768), torch.bfloat16, device="cuda", seed=5)
    with torch.no_grad():
        static_proj.copy_(fresh_proj)
        static_target.copy_(fresh_target)
    graph.replay()
    torch.cuda.synchronize()
    expected_proj = fresh_proj.detach().double().requires_grad_(True)
    expected = cross_frame_align_loss(expected_proj, fresh_target.double(), neighbors=2,
                                      neighbor_mode="cumulative", backend="reference")
    expected.backward()
    assert_close_and_finite(static_loss, expected, f"{backend} graph replay loss", dtype=torch.float32)
    assert_close_and_finite(static_proj.grad, expected_proj.grad, f"{backend} graph replay grad")


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_cuda_bf16(backend):
    _usable_on_cuda(backend)
    torch.manual_seed(0)
    projector = torch.nn.Linear(64, 96).cuda()
    hidden = torch.randn(2, 5 * 33, 64, device="cuda")
    target = torch.randn(2, 5, 33, 96, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        proj = projector(hidden)
        loss = cross_frame_align_loss(proj, target, num_frames=5, neighbors=1, backend=backend)
    assert proj.dtype == torch.bfloat16 and loss.dtype == torch.float32
    expected = cross_frame_align_loss(proj.detach().double(), target.double(), num_frames=5, neighbors=1,
                                      backend="reference")
    assert_close_and_finite(loss, expected, f"autocast cuda {backend}", dtype=torch.float32)


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_on_cuda(backend):
    _usable_on_cuda(backend)
    torch._dynamo.reset()

    def step(proj, target):
        return cross_frame_align_loss(proj, target, neighbors=1, backend=backend)

    proj, target = random_pair((1, 13, 135, 768), torch.bfloat16, device="cuda")
    loss, grads = _loss_and_grads(torch.compile(step, fullgraph=True), proj, target)
    expected, expected_grads = _loss_and_grads(step, proj, target)
    assert_close_and_finite(loss, expected, f"compiled {backend} loss", dtype=torch.float32)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close_and_finite(grad, expected_grad, f"compiled {backend} grad")
    reference_loss, reference_grads = reference_in_float64(proj, target, torch.ones(()), neighbors=1)
    assert_close_and_finite(loss, reference_loss, f"compiled {backend} loss against the reference")
    for grad, expected_grad in zip(grads, reference_grads):
        assert_close_and_finite(grad, expected_grad, f"compiled {backend} grad against the reference")
