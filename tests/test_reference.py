"""The reference against the naive loop implementation, and gradcheck in float64."""
import math
import zlib

import pytest
import torch

from crepa_kernels import cross_frame_align_loss
from crepa_kernels.reference import per_frame_loss as reference_per_frame_loss
from crepa_kernels.spec import LossOptions
from harness import (
    EXACT_NORM_EPS,
    EXTREME_TAUS,
    OPTION_GRID,
    SHAPES,
    pair_straddling_eps,
    pair_with_norms_equal_to_eps,
    random_grad_output,
    random_pair,
)
from naive import _neighbour_frames, naive_loss


def _compare_with_naive(proj, target, **options):
    loss = cross_frame_align_loss(proj, target, backend="reference", **options)
    expected = naive_loss(proj, target, **options)
    grad_output = random_grad_output(loss)
    inputs = [proj, target] if target.requires_grad else [proj]
    grads = torch.autograd.grad(loss, inputs, grad_output)
    expected_grads = torch.autograd.grad(expected, inputs, grad_output.double())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-10, atol=1e-12)
    # a gradient's rounding error scales as 1/|x| (the tangent projection divides by the norm); it is all there is
    # where the exact gradient is 0 (D = 1), so the absolute bound follows the smallest norm
    eps = options.get("eps", LossOptions().eps)
    smallest_norm = max(min(proj.norm(dim=-1).min().item(), target.norm(dim=-1).min().item(), 1.0), eps)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-9, atol=1e-12 / smallest_norm)


# D=769 runs once per option set (tau=1 only), to keep the loops fast
CASES = [(shape, options) for shape in SHAPES for options in OPTION_GRID if shape[3] != 769 or options["tau"] == 1.0]


@pytest.mark.parametrize("shape,options", CASES, ids=str)
def test_reference_matches_naive_loops(shape, options):
    proj, target = random_pair(shape, torch.float64, seed=zlib.crc32(f"{shape}{options}".encode()) % 1000)  # str hashes vary per process
    _compare_with_naive(proj, target, **options)


@pytest.mark.parametrize("tau", EXTREME_TAUS)
@pytest.mark.parametrize("mode", ["adjacent", "cumulative"])
def test_extreme_tau(tau, mode):
    proj, target = random_pair((2, 5, 3, 6), torch.float64, seed=3)
    _compare_with_naive(proj, target, tau=tau, neighbors=2, neighbor_mode=mode, normalize_weights=True)
    _compare_with_naive(proj, target, tau=tau, neighbors=2, neighbor_mode=mode, normalize_weights=False)


def test_target_without_grad():
    proj, target = random_pair((2, 4, 3, 5), torch.float64, target_requires_grad=False)
    _compare_with_naive(proj, target, neighbors=1)


@pytest.mark.parametrize("proj_dtype,target_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                     (torch.float16, torch.float16), (torch.float32, torch.float64)])
def test_mixed_dtypes(proj_dtype, target_dtype):
    proj, target = random_pair((2, 5, 3, 17), proj_dtype, target_dtype)
    loss = cross_frame_align_loss(proj, target, neighbors=2, neighbor_mode="cumulative", backend="reference")
    wide = torch.float64 if torch.float64 in (proj_dtype, target_dtype) else torch.float32
    assert loss.dtype == wide
    loss.backward()
    assert proj.grad.dtype == proj_dtype and target.grad.dtype == target_dtype
    expected = naive_loss(proj.detach(), target.detach(), neighbors=2, neighbor_mode="cumulative")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [dict(neighbors=0), dict(neighbors=1), dict(neighbors=2, normalize_weights=True),
                                     dict(neighbors=2, neighbor_mode="cumulative", reduction="none", tau=0.5),
                                     dict(neighbors=4, neighbor_mode="cumulative", reduction="frame_sum")])
def test_reference_gradcheck(options):
    proj, target = random_pair((2, 4, 3, 5), torch.float64, seed=7)
    assert torch.autograd.gradcheck(
        lambda p, t: cross_frame_align_loss(p, t, backend="reference", **options), (proj, target)
    )


def test_zero_vectors_give_finite_values_and_grads():
    proj, target = random_pair((1, 3, 4, 5), torch.float64)
    with torch.no_grad():
        proj[0, 1, 2] = 0
        target[0, 0, 1] = 0
        target[0, 2, 3] = 1e-14
    _compare_with_naive(proj, target, neighbors=1)


# --- eps: each norm is clamped on its own, max(|x|, eps), as F.normalize does (issue 16: more than one guard) -----


@pytest.mark.parametrize("eps", [0.5, 3.0])
@pytest.mark.parametrize("options", [dict(neighbors=1, reduction="none"),
                                     dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True, tau=0.4)],
                         ids=str)
def test_large_eps_against_naive(eps, options):
    """Half of the norms below eps: values and gradients of the clamped formula, not only at zero vectors."""
    proj, target = pair_straddling_eps((2, 5, 3, 6), eps, torch.float64, seed=8)
    _compare_with_naive(proj, target, eps=eps, **options)


def test_eps_closed_form_for_one_token():
    """|p| = 0.5 < eps = 2 < |y| = 4: cos = p.y / (eps |y|); the clamped norm is a constant, so d cos / dp = y / (eps |y|)
    (no radial term) while d cos / dy keeps the usual one. Clamping |p||y| or adding eps gives other numbers."""
    eps = 2.0
    p = torch.tensor([[[[0.3, 0.4, 0.0]]]], dtype=torch.float64, requires_grad=True)  # |p| = 0.5
    y = torch.tensor([[[[0.0, 4.0 * 0.6, 4.0 * 0.8]]]], dtype=torch.float64, requires_grad=True)  # |y| = 4
    loss = cross_frame_align_loss(p, y, eps=eps, neighbors=0, backend="reference")
    dot = 0.4 * 2.4
    assert loss.item() == pytest.approx(-dot / (eps * 4.0), rel=1e-15)
    grad_p, grad_y = torch.autograd.grad(loss, (p, y))
    torch.testing.assert_close(grad_p, -y.detach() / (eps * 4.0), rtol=1e-15, atol=0)
    y_value = y.detach()
    expected_grad_y = -(p.detach() / (eps * 4.0) - dot / (eps * 4.0) * y_value / 16.0)
    torch.testing.assert_close(grad_y, expected_grad_y, rtol=1e-14, atol=1e-16)


def test_default_eps_is_that_of_f_normalize():
    proj, target = pair_straddling_eps((1, 3, 4, 5), 1e-12, torch.float64, seed=9)
    loss = cross_frame_align_loss(proj, target, neighbors=1, reduction="none", backend="reference")
    torch.testing.assert_close(loss, naive_loss(proj, target, neighbors=1, reduction="none", eps=1e-12),
                               rtol=1e-12, atol=1e-14)
    # and eps really is an argument: the same inputs with eps = 1e-6 (every norm below it) give another loss
    other = cross_frame_align_loss(proj, target, neighbors=1, reduction="none", eps=1e-6, backend="reference")
    assert (other - loss).abs().max() > 1e-3


def test_norm_exactly_eps_counts_as_clamped():
    """At |x| = eps the clamp is at its kink: the specification counts it as clamped (no radial term), as torch
    2.14's clamp_min does, on every torch version; the naive loops too; the fused kernels must agree
    (tests/test_*_backend.py)."""
    proj, target = pair_with_norms_equal_to_eps()
    _compare_with_naive(proj, target, eps=EXACT_NORM_EPS, neighbors=1, reduction="none")
    # the backend's backward is hand-written: differentiate the specification itself there too
    per_frame = reference_per_frame_loss(proj, target, LossOptions(neighbors=1, eps=EXACT_NORM_EPS))
    expected = naive_loss(proj, target, neighbors=1, reduction="none", eps=EXACT_NORM_EPS)
    grad_output = random_grad_output(per_frame)
    for grad, wanted in zip(torch.autograd.grad(per_frame, (proj, target), grad_output),
                            torch.autograd.grad(expected, (proj, target), grad_output)):
        torch.testing.assert_close(grad, wanted, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", OPTION_GRID[::3], ids=str)
def test_frame_coefficients_are_the_naive_weights(options):
    """LossOptions.frame_coefficients (used by the regulariser's figures and the distributed plan) against the
    weights of the naive loops: C[f][f] = 1 / Z_f and C[f][k] = w(|k - f|) / Z_f for k in K(f), 0 elsewhere."""
    spec = LossOptions(**options)
    for num_frames in (1, 2, 5, 11):
        coefficients = spec.frame_coefficients(num_frames)
        for f in range(num_frames):
            neighbours = _neighbour_frames(f, num_frames, options["neighbors"], options["neighbor_mode"])
            weights = {f: 1.0, **{k: math.exp(-abs(k - f) / options["tau"]) for k in neighbours}}
            z = sum(weights.values()) if options["normalize_weights"] else 1.0
            assert coefficients[f] == pytest.approx([weights.get(k, 0.0) / z for k in range(num_frames)],
                                                    rel=1e-14, abs=0)
