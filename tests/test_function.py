"""CrossFrameAlignFunction and CrossFrameAlignLoss: the three forms of the loss, the hand-written backwards,
torch.func, double backward and the module's options (issue 11)."""
import pytest
import torch

import crepa_kernels
from crepa_kernels import CrossFrameAlignFunction, CrossFrameAlignLoss, available_backends, cross_frame_align_loss
from crepa_kernels.backends import select_backend
from crepa_kernels.function import _AlignFunction, prepare
from crepa_kernels.reference import per_frame_loss as reference_per_frame_loss
from crepa_kernels.spec import LossOptions
from harness import OPTION_GRID, assert_backend_matches_reference, random_grad_output, random_pair

BACKENDS = [name for name, ok in available_backends("cpu").items() if ok is True]
DTYPES = [(torch.float64, None), (torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
          (torch.float32, torch.bfloat16)]
OPTIONS = dict(tau=0.6, neighbors=2, neighbor_mode="cumulative", normalize_weights=True, reduction="frame_sum")
FUNCTION_ARGS = ("tau", "neighbors", "neighbor_mode", "normalize_weights", "reduction", "num_frames", "eps", "backend")


def _apply(proj, target, **kwargs):
    """CrossFrameAlignFunction.apply with the functional form's keywords, passed positionally."""
    defaults = dict(tau=1.0, neighbors=1, neighbor_mode="adjacent", normalize_weights=False, reduction="mean",
                    num_frames=None, eps=1e-12, backend="auto")
    defaults.update(kwargs)
    return CrossFrameAlignFunction.apply(proj, target, *(defaults[name] for name in FUNCTION_ARGS))


def _module(proj, target, num_frames=None, **kwargs):
    return CrossFrameAlignLoss(**kwargs)(proj, target, num_frames=num_frames)


FORMS = {"function": _apply, "module": _module, "functional": cross_frame_align_loss}


def _loss_and_grads(form, proj, target, **kwargs):
    proj = proj.detach().requires_grad_(True)
    target = target.detach().requires_grad_(True)
    loss = FORMS[form](proj, target, **kwargs)
    grads = torch.autograd.grad(loss, (proj, target), random_grad_output(loss))
    return (loss, *grads)


def test_function_is_an_autograd_function():
    assert issubclass(crepa_kernels.CrossFrameAlignFunction, torch.autograd.Function)
    assert issubclass(crepa_kernels.CrossFrameAlignLoss, torch.nn.Module)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=str)
def test_three_forms_are_bitwise_identical(backend, dtypes):
    proj, target = random_pair((2, 5, 3, 7), *dtypes, seed=3)
    flat = dict(num_frames=5)
    results = {form: _loss_and_grads(form, proj.flatten(1, 2), target.flatten(1, 2), backend=backend, **flat,
                                     **OPTIONS) for form in FORMS}
    expected = results.pop("functional")
    assert torch.isfinite(expected[0]).all()
    for form, result in results.items():
        for name, actual, wanted in zip(("loss", "grad proj", "grad target"), result, expected):
            assert actual.dtype == wanted.dtype and actual.shape == wanted.shape, (form, name)
            assert torch.equal(actual, wanted), f"{backend} {dtypes}: {form} {name} differs from the functional form"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTION_GRID[::5], ids=str)
def test_apply_matches_the_float64_reference(backend, options):
    proj, target = random_pair((2, 6, 5, 33), torch.float64, seed=4)
    loss = _apply(proj, target, backend=backend, **options)
    expected = crepa_kernels.cross_frame_align_loss(proj.detach(), target.detach(), backend="reference", **options)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert_backend_matches_reference(backend, proj, target, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_of_apply_both_inputs(backend):
    # frame-major 3-D inputs; the Triton interpreter makes each evaluation slow, so its case is the smallest
    shape, cases = (2, 4, 3, 5), [dict(neighbors=1, tau=0.7), dict(neighbors=3, reduction="frame_sum"),
                                  dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True, reduction="none")]
    if backend == "triton":
        shape, cases = (1, 3, 2, 3), cases[2:]
    proj, target = random_pair(shape, torch.float64, seed=5)
    proj, target = proj.detach().flatten(1, 2).requires_grad_(True), target.detach().flatten(1, 2).requires_grad_(True)
    for options in cases:
        assert torch.autograd.gradcheck(
            lambda p, y: _apply(p, y, backend=backend, num_frames=shape[1], **options), (proj, target))


@pytest.mark.parametrize("options", OPTION_GRID, ids=str)
def test_hand_written_reference_backward_matches_autograd_of_the_spec(options):
    """The reference backend's backward is a formula written out by hand; autograd through the specification
    (reference.per_frame_loss) checks it, in float64, on every option combination."""
    proj, target = random_pair((2, 6, 3, 7), torch.float64, seed=6)
    with torch.no_grad():  # a clamped norm on each side exercises the u / eps branch
        proj[0, 1, 2] = 0.0
        target[1, 3, 0] = 1e-14
    loss = _apply(proj, target, backend="reference", **options)
    grad_output = random_grad_output(loss)
    grads = torch.autograd.grad(loss, (proj, target), grad_output)
    spec_options = LossOptions(**{k: v for k, v in options.items()})
    per_frame = reference_per_frame_loss(proj, target, spec_options)
    expected_loss = crepa_kernels.spec.reduce_frames(per_frame, spec_options.reduction)
    expected = torch.autograd.grad(expected_loss, (proj, target), grad_output)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    for grad, wanted in zip(grads, expected):
        torch.testing.assert_close(grad, wanted, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("asked", [(True, True), (True, False), (False, True)], ids=str)
def test_backward_is_asked_only_for_the_gradients_needed(backend, asked, monkeypatch):
    module = select_backend(backend, torch.device("cpu"))
    calls = []
    original = module.backward

    def recording_backward(*args):
        result = original(*args)
        calls.append((args[-2:], result))
        return result

    monkeypatch.setattr(module, "backward", recording_backward)
    proj, target = random_pair((2, 5, 3, 7), torch.float32, seed=7)
    proj.requires_grad_(asked[0])
    target.requires_grad_(asked[1])
    loss = _apply(proj, target, backend=backend, neighbors=1)
    inputs = [x for x in (proj, target) if x.requires_grad]
    grads = torch.autograd.grad(loss, inputs)
    (flags, result), = calls
    assert flags == asked
    assert [g is not None for g in result] == list(asked)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("function", [CrossFrameAlignFunction, _AlignFunction], ids=lambda f: f.__name__)
def test_no_autograd_graph_inside_the_function(backend, function):
    """The loss's grad_fn is the Function's node and leads straight to the two leaves: nothing of the forward
    was recorded, and the Function saved the inputs (plus, when kept, non-differentiable statistics) only."""
    proj, target = random_pair((2, 5, 3, 7), torch.float32, seed=8)
    if function is CrossFrameAlignFunction:
        outputs = function.apply(proj, target, 1.0, 1, "adjacent", False, "none", None, 1e-12, backend)
    else:  # the prepared call's Function: the coefficient table is a third, non-differentiable input
        call, coefficients = prepare(proj, target, LossOptions(reduction="none"), None, backend)
        outputs = function.apply(proj, target, coefficients, call)
    if function is CrossFrameAlignFunction:
        assert isinstance(outputs, torch.Tensor), "apply must return the bare loss"
        loss, statistics = outputs, ()
    else:
        loss, statistics = outputs[0], outputs[1:]
        assert (backend == "reference") == (len(statistics) == 0)
    assert type(loss.grad_fn).__name__ == f"{function.__name__}Backward"
    leaves = [next_fn for next_fn, _ in loss.grad_fn.next_functions if next_fn is not None]
    assert [type(f).__name__ for f in leaves] == ["AccumulateGrad", "AccumulateGrad"]
    assert [f.variable for f in leaves] == [proj, target]
    assert all(not s.requires_grad for s in statistics)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_recomputes_the_statistics_the_functional_form_keeps(backend, monkeypatch):
    """apply returns the bare loss, so its backward runs the forward kernel again for the statistics; the
    functional form keeps them and runs it once. Both give the same gradients bitwise (test above)."""
    module = select_backend(backend, torch.device("cpu"))
    calls = []
    original = module.forward
    monkeypatch.setattr(module, "forward", lambda *args: calls.append(1) or original(*args))
    proj, target = random_pair((2, 5, 3, 7), torch.float32, seed=12)
    for form, forwards in (("function", 2), ("functional", 1)):
        calls.clear()
        loss = FORMS[form](proj, target, backend=backend, neighbors=2)
        assert isinstance(loss, torch.Tensor) and loss.shape == ()
        loss.backward()
        assert len(calls) == (1 if backend == "reference" else forwards), (form, len(calls))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_works_through_the_function(backend):
    proj, target = random_pair((2, 5, 3, 7), torch.float64, seed=9)
    proj, target = proj.detach(), target.detach()

    def loss(p, y):
        return _apply(p, y, backend=backend, **OPTIONS)

    func_grads = torch.func.grad(loss, argnums=(0, 1))(proj, target)
    p, y = proj.clone().requires_grad_(True), target.clone().requires_grad_(True)
    expected = torch.autograd.grad(loss(p, y), (p, y))
    for grad, wanted in zip(func_grads, expected):
        torch.testing.assert_close(grad, wanted, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_clearly(backend):
    proj, target = random_pair((2, 5, 3, 7), torch.float64, seed=10)
    loss = _apply(proj, target, backend=backend)
    grad_proj, grad_target = torch.autograd.grad(loss, (proj, target), create_graph=True)
    p, y = proj.detach().requires_grad_(True), target.detach().requires_grad_(True)
    expected = torch.autograd.grad(_apply(p, y, backend=backend), (p, y))
    torch.testing.assert_close(grad_proj, expected[0], rtol=0, atol=0)  # the first derivative is still right
    with pytest.raises(RuntimeError, match="CrossFrameAlignFunction does not support double backward"):
        torch.autograd.grad((grad_proj * grad_proj).sum() + grad_target.sum(), (proj, target))


def test_apply_accepts_only_proj_and_target():
    proj, target = random_pair((2, 5, 3, 7), torch.float64, seed=11)
    loss = CrossFrameAlignFunction.apply(proj, target)
    torch.testing.assert_close(loss, cross_frame_align_loss(proj, target), rtol=0, atol=0)
    torch.autograd.grad(loss, (proj, target))


@pytest.mark.parametrize("kwargs,exception,words", [
    (dict(tau=0.0), ValueError, ["tau", "0.0"]),
    (dict(tau="1"), TypeError, ["tau", "str"]),
    (dict(neighbors=-1), ValueError, ["neighbors", "-1"]),
    (dict(neighbor_mode="both"), ValueError, ["neighbor_mode", "'both'"]),
    (dict(normalize_weights=1), TypeError, ["normalize_weights", "int"]),
    (dict(reduction="sum"), ValueError, ["reduction", "'sum'"]),
    (dict(eps=-1.0), ValueError, ["eps", "-1.0"]),
    (dict(backend="cudnn"), ValueError, ["backend", "'cudnn'"]),
    (dict(clamp_neighbors="yes"), TypeError, ["clamp_neighbors", "str"]),
], ids=str)
def test_module_validates_its_options_at_construction(kwargs, exception, words):
    with pytest.raises(exception) as info:
        CrossFrameAlignLoss(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_function_and_functional_reject_a_bad_clamp_flag():
    proj, target = random_pair((1, 3, 2, 4), torch.float32)
    with pytest.raises(TypeError, match="clamp_neighbors"):
        cross_frame_align_loss(proj, target, clamp_neighbors=1)


def test_module_repr_and_forward():
    module = CrossFrameAlignLoss(tau=0.5, neighbors=3, neighbor_mode="cumulative", reduction="none", backend="reference")
    text = repr(module)
    for part in ("tau=0.5", "neighbors=3", "neighbor_mode='cumulative'", "normalize_weights=False",
                 "reduction='none'", "eps=1e-12", "backend='reference'", "clamp_neighbors=False"):
        assert part in text, text
    assert not list(module.parameters())
    proj, target = random_pair((2, 4, 3, 5), torch.float64)
    loss = module(proj.flatten(1, 2), target, num_frames=4)
    expected = cross_frame_align_loss(proj, target, tau=0.5, neighbors=3, neighbor_mode="cumulative",
                                      reduction="none", backend="reference")
    assert loss.shape == (2, 4)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
