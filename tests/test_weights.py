"""The neighbour weights as data: spec.coefficient_table, the weights= option on every form, and the table as the
one source of every backend's coefficients."""
import math

import pytest
import torch

from crepa_kernels import CrossFrameAlignFunction, CrossFrameAlignLoss, LossOptions, available_backends
from crepa_kernels import cross_frame_align_loss
from crepa_kernels.backends import select_backend
from crepa_kernels.function import prepare
from crepa_kernels.spec import band_offsets, coefficient_table
from crepa_kernels.training import CrepaRegularizer
from coefficient_oracle import arbitrary_table, table_oracle
from harness import assert_close_and_finite, random_grad_output, random_pair
from naive import naive_loss, naive_weight

BACKENDS = [name for name, ok in available_backends("cpu").items() if ok is True]
PROFILE = (0.7, 0.05, 1.3)  # w[1..3] by hand: not monotone, one weight above the frame's own
WEIGHTS = ["exponential", "gaussian", PROFILE]
WEIGHT_IDS = ["exponential", "gaussian", "profile"]
CALLS = [dict(neighbors=3, neighbor_mode="cumulative", normalize_weights=True, tau=0.7),
         dict(neighbors=3, neighbor_mode="adjacent", normalize_weights=False, tau=1.9),
         dict(neighbors=3, neighbor_mode="cumulative", normalize_weights=False, tau=2.3)]


def _naive_table(num_frames, tau, neighbors, neighbor_mode, normalize_weights, weights):
    """C[f][slot] written out with Python floats, apart from the package."""
    offsets = [0] + ([-neighbors, neighbors] if neighbor_mode == "adjacent" and 0 < neighbors < num_frames else [])
    if neighbor_mode == "cumulative":
        reach = min(neighbors, num_frames - 1)
        offsets = [0] + list(range(-reach, 0)) + list(range(1, reach + 1))
    table = []
    for f in range(num_frames):
        row = [0.0 if not 0 <= f + o < num_frames else (1.0 if o == 0 else naive_weight(abs(o), tau, weights))
               for o in offsets]
        z = math.fsum(row) if normalize_weights else 1.0
        table.append([c / z for c in row])
    return table


@pytest.mark.parametrize("weights", WEIGHTS, ids=WEIGHT_IDS)
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("num_frames", [1, 2, 4, 7])
def test_coefficient_table_is_the_naive_table(weights, call, num_frames):
    """fp64 table within a few ulps of the weights written out by hand (the Gaussian's exponent is formed in
    another order), zero where a slot lands outside the clip; the fp32 table is the fp64 one rounded once."""
    options = LossOptions(weights=weights, **call)
    table = coefficient_table(options, num_frames)
    expected = torch.tensor(_naive_table(num_frames, weights=weights, **call), dtype=torch.float64)
    assert table.dtype == torch.float64 and table.is_contiguous()
    assert table.shape == (num_frames, len(band_offsets(options, num_frames)))
    torch.testing.assert_close(table, expected, rtol=1e-14, atol=0.0)  # exp(-x) carries x * (x rounding)
    assert torch.equal(table == 0, expected == 0)
    assert torch.equal(coefficient_table(options, num_frames, torch.float32), table.float())


def test_default_weights_are_the_papers_exponential():
    """weights="exponential" is the default and gives exp(-|k - f| / tau), so today's calls keep their results."""
    options = LossOptions(tau=0.8, neighbors=2, neighbor_mode="cumulative")
    assert options.weights == "exponential"
    for offset in (-2, -1, 1, 2):
        assert options.weight(offset) == pytest.approx(math.exp(-abs(offset) / 0.8), rel=4.5e-16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", WEIGHTS, ids=WEIGHT_IDS)
@pytest.mark.parametrize("call", CALLS)
def test_every_backend_follows_the_weights_option(backend, weights, call):
    """Loss and both gradients of every backend against the naive float64 loop with the same weights, odd sizes,
    a grad_output other than 1."""
    proj, target = random_pair((2, 5, 3, 7), torch.float64, seed=5)
    target.requires_grad_(True)
    p, y = proj.detach().requires_grad_(True), target.detach().requires_grad_(True)
    loss = cross_frame_align_loss(p, y, weights=weights, reduction="none", backend=backend, **call)
    grad_output = random_grad_output(loss, seed=3)
    grads = torch.autograd.grad(loss, (p, y), grad_output)
    p64, y64 = proj.detach().requires_grad_(True), target.detach().requires_grad_(True)
    expected = naive_loss(p64, y64, weights=weights, reduction="none", **call)
    expected_grads = torch.autograd.grad(expected, (p64, y64), grad_output)
    assert_close_and_finite(loss, expected, f"{backend} loss")
    for name, grad, expected_grad in zip(("proj", "target"), grads, expected_grads):
        assert_close_and_finite(grad, expected_grad, f"{backend} grad {name}")


@pytest.mark.parametrize("weights", WEIGHTS, ids=WEIGHT_IDS)
def test_gradcheck_with_each_weighting(weights):
    proj, target = random_pair((1, 4, 2, 3), torch.float64, seed=2)
    proj.requires_grad_(True), target.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p, y: cross_frame_align_loss(p, y, neighbors=3, neighbor_mode="cumulative", normalize_weights=True,
                                            weights=weights, tau=0.9, reduction="none"), (proj, target))


def _spy(monkeypatch, module, seen):
    """Records the coefficient table each forward and backward of a backend module receives."""
    forward, backward = module.forward, module.backward

    def spied_forward(proj, target, coefficients, options):
        seen.append(("forward", coefficients.clone()))
        return forward(proj, target, coefficients, options)

    def spied_backward(grad, proj, target, coefficients, *rest):
        seen.append(("backward", coefficients.clone()))
        return backward(grad, proj, target, coefficients, *rest)

    monkeypatch.setattr(module, "forward", spied_forward)
    monkeypatch.setattr(module, "backward", spied_backward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", WEIGHTS, ids=WEIGHT_IDS)
def test_every_backend_gets_the_same_coefficients_bit_for_bit(monkeypatch, dtype, weights):
    """The forward and the backward of every backend receive the same table, bit for bit: spec's, in the compute
    dtype. (That the kernels read it, and compute no weight of their own, is the next test.)"""
    options = dict(neighbors=3, neighbor_mode="cumulative", normalize_weights=True, tau=0.45, weights=weights)
    proj, target = random_pair((2, 6, 3, 5), dtype, seed=4)
    expected = coefficient_table(LossOptions(**options), 6, dtype)
    tables = {}
    for backend in BACKENDS:
        seen = []
        _spy(monkeypatch, select_backend(backend, proj.device), seen)
        p = proj.detach().requires_grad_(True)
        cross_frame_align_loss(p, target, backend=backend, **options).backward()
        assert [kind for kind, _ in seen] == ["forward", "backward"], backend
        tables[backend] = [table for _, table in seen]
        monkeypatch.undo()
    for backend, received in tables.items():
        for table in received:
            assert table.dtype == dtype and torch.equal(table, expected), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("neighbor_mode", ["adjacent", "cumulative"])
def test_every_backend_reads_the_table_it_is_given(backend, neighbor_mode):
    """Each backend's forward and backward run with an arbitrary table (per-frame values that no tau, weights or
    normalisation produce) and match the loss restated in float64 for that table: the kernels read the table and
    compute no coefficient of their own. (tests/test_native_coefficients.py and the Triton tests go further for
    their kernels.)"""
    options = LossOptions(neighbors=2, neighbor_mode=neighbor_mode)
    shape = (2, 5, 3, 9)
    proj, target = random_pair(shape, torch.float32, seed=11)
    table = arbitrary_table(options, shape[1], torch.float32, seed=12)
    module = select_backend(backend, proj.device)
    per_frame, *saved = module.forward(proj, target, table, options)
    grad_output = random_grad_output(per_frame, seed=13)
    grads = module.backward(grad_output.contiguous(), proj, target, table, tuple(saved), options, True, True)
    expected, *expected_grads = table_oracle(proj, target, table, options, grad_output)
    assert_close_and_finite(per_frame, expected, f"{backend} loss")
    for name, grad, expected_grad in zip(("proj", "target"), grads, expected_grads):
        assert_close_and_finite(grad, expected_grad, f"{backend} grad {name}")


def _forms(weights):
    """The loss of every form with these weights, on one pair of inputs."""
    proj, target = random_pair((2, 4, 3, 5), torch.float64, seed=6)
    options = dict(neighbors=3, neighbor_mode="cumulative", tau=0.6, normalize_weights=True)
    regularizer = CrepaRegularizer(5, 5, projector="linear", loss_weight=1.0, weights=weights, reduction="mean",
                                   **options).double()
    return {
        "functional": cross_frame_align_loss(proj, target, weights=weights, **options),
        "module": CrossFrameAlignLoss(weights=weights, **options)(proj, target),
        "function": CrossFrameAlignFunction.apply(proj, target, 0.6, 3, "cumulative", True, "mean", None, 1e-12,
                                                  "auto", False, weights),
        "naive": naive_loss(proj, target, weights=weights if isinstance(weights, str) else weights.tolist(),
                            **options),
        "regularizer options": regularizer.options_for(4),
    }


@pytest.mark.parametrize("weights", ["gaussian", torch.tensor(PROFILE, dtype=torch.float64)], ids=["gaussian", "tensor"])
def test_weights_on_every_form(weights):
    forms = _forms(weights)
    expected = forms.pop("naive")
    regularizer_options = forms.pop("regularizer options")
    for form, loss in forms.items():
        assert_close_and_finite(loss, expected, form)
    assert regularizer_options.weights == (weights if isinstance(weights, str) else PROFILE)


def test_module_weights_attribute_is_checked_when_set():
    loss = CrossFrameAlignLoss(neighbors=2)
    loss.weights = torch.tensor([0.5, 0.25])
    assert loss.options.weights == (0.5, 0.25)
    with pytest.raises(ValueError, match="weights: expected one weight per distance"):
        loss.weights = torch.tensor([0.5])
    assert loss.options.weights == (0.5, 0.25), "a refused value must leave the options as they were"


def test_clamp_neighbors_cuts_a_profile_to_the_clip():
    """clamp_neighbors on a 3-frame clip with neighbors=4: d = 2, and w[1..2] of the profile apply."""
    proj, target = random_pair((1, 3, 2, 4), torch.float64, seed=7)
    loss = cross_frame_align_loss(proj, target, neighbors=4, neighbor_mode="cumulative", clamp_neighbors=True,
                                  weights=torch.tensor([0.3, 0.9, 5.0, 7.0], dtype=torch.float64))
    expected = naive_loss(proj, target, neighbors=2, neighbor_mode="cumulative", weights=[0.3, 0.9])
    assert_close_and_finite(loss, expected, "clamped profile")


@pytest.mark.parametrize("weights, error, message", [
    (torch.tensor([0.5, 0.2], requires_grad=True), ValueError, "weights: expected a tensor that does not require "
                                                               "grad"),
    ("laplace", ValueError, r"weights: expected one of \('exponential', 'gaussian'\)"),
    (torch.tensor([0.5]), ValueError, r"weights: expected one weight per distance 1..neighbors \(2\), got 1"),
    (torch.tensor([0.5, 0.2, 0.1]), ValueError, "weights: expected one weight per distance"),
    (torch.ones(2, 1), ValueError, "weights: expected a 1-D real tensor"),
    (torch.tensor([True, False]), ValueError, "weights: expected a 1-D real tensor"),
    (torch.tensor([0.5, -0.1]), ValueError, "weights: expected finite non-negative weights, got -0.1"),
    (torch.tensor([0.5, math.nan]), ValueError, "weights: expected finite non-negative weights, got nan"),
    (torch.tensor([0.5, math.inf]), ValueError, "weights: expected finite non-negative weights, got inf"),
    (3.0, TypeError, "weights: expected one of"),
    (["a", 1.0], TypeError, "weights: expected numbers, got str"),
])
def test_bad_weights_are_refused_before_any_kernel(monkeypatch, weights, error, message):
    proj, target = random_pair((1, 4, 2, 3), torch.float32)
    module = select_backend("reference", proj.device)
    monkeypatch.setattr(module, "forward", lambda *args: pytest.fail("a kernel ran"))
    with pytest.raises(error, match=message):
        cross_frame_align_loss(proj, target, neighbors=2, weights=weights, backend="reference")
    with pytest.raises(error, match=message):
        CrossFrameAlignLoss(neighbors=2, weights=weights)


def test_the_table_is_built_once_per_call_shape_in_eager_mode():
    """Eager calls with the same options, F, dtype and device share one table (no per-call weight maths)."""
    proj, target = random_pair((1, 5, 2, 3), torch.float32)
    options = LossOptions(tau=0.3, neighbors=2, weights="gaussian")
    _, first = prepare(proj, target, options)
    _, second = prepare(proj, target, options)
    assert first is second
    _, other = prepare(proj.double(), target, options)
    assert other.dtype == torch.float64 and other is not first


def test_compiled_gaussian_keeps_tau_symbolic():
    """Under torch.compile the table is part of the graph: a new tau (here the gaussian's width) recompiles
    nothing."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(
        lambda p, y, tau: cross_frame_align_loss(p, y, tau=tau, neighbors=2, neighbor_mode="cumulative",
                                                 weights="gaussian", normalize_weights=True, backend="reference"),
        backend=counter, fullgraph=True, dynamic=True)
    proj, target = random_pair((2, 5, 3, 4), torch.float32)
    for tau in (0.5, 0.8, 1.7):
        expected = naive_loss(proj, target, tau=tau, neighbors=2, neighbor_mode="cumulative", weights="gaussian",
                              normalize_weights=True)
        assert_close_and_finite(compiled(proj, target, tau), expected, f"tau={tau}")
    assert counter.frame_count == 1


def test_compiled_module_with_hand_set_weights():
    """The module holds a hand-set profile as numbers (read once, at construction); compiled, the graph's table
    takes w[delta] for each distance, as eager does."""
    torch._dynamo.reset()
    module = CrossFrameAlignLoss(neighbors=3, neighbor_mode="cumulative", normalize_weights=True,
                                 weights=torch.tensor(PROFILE, dtype=torch.float64), backend="reference")
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    proj, target = random_pair((2, 5, 3, 4), torch.float64, seed=9)
    expected = naive_loss(proj, target, neighbors=3, neighbor_mode="cumulative", normalize_weights=True,
                          weights=PROFILE)
    assert_close_and_finite(compiled(proj, target), expected, "compiled profile")
