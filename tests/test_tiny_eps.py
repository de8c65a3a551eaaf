"""A tiny eps with zero vectors, on every backend that runs here, against the float64 reference (issue 20, defect 4).

The fused kernels divide a dot product by max(|p|, eps) max(|y|, eps). Below eps = sqrt(smallest normal) (fp32:
1.1e-19, fp64: 1.5e-154) that product underflows, to 0 from eps = 3.7e-23 in fp32: a pair of zero vectors then gave
0 / 0 = NaN in the loss, and alpha / 0 = inf times a zero vector NaN in the gradients, where the reference (which
normalises each vector first) gives 0. The inputs hold every kind of pair: both vectors zero (the same frame and
neighbours), a zero proj against a live target and the converse; the gradient of a zero vector with a live
partner is alpha y^ / eps, ~1e27 at eps = 1e-30, so the gradients are compared token by token.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from crepa_kernels import available_backends, cross_frame_align_loss  # noqa: E402
from harness import TOLERANCES, assert_close_and_finite, loss_and_grads, random_pair, reference_in_float64  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("reference", "cpu", "triton") if DEVICE == "cpu" else ("reference", "cuda", "triton")
# below sqrt(smallest normal) of each dtype, down to near its smallest normal (fp64)
TINY_EPS = [(torch.float32, 1e-23), (torch.float32, 1e-30), (torch.float64, 1e-160), (torch.float64, 1e-300)]
OPTIONS = [dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True), dict(neighbors=1)]


def pair_with_zero_tokens(dtype, shape=(2, 5, 3, 33)):
    """random_pair with, at token 1: proj zero in frames 0 and 2, target zero in frames 0 and 1 (so zero pairs in
    one frame and across frames, and zero-live pairs both ways), and at token 2 of batch 1 every vector zero."""
    proj, target = (x.detach() for x in random_pair(shape, dtype, seed=41))
    proj[:, (0, 2), 1] = 0
    target[:, (0, 1), 1] = 0
    proj[1, :, 2] = 0
    target[1, :, 2] = 0
    return proj.to(DEVICE).requires_grad_(True), target.to(DEVICE).requires_grad_(True)


def assert_close_per_token(actual, expected, what):
    """Each token's gradient within the dtype's tolerance of its own largest element: the gradients of zero vectors
    (~1 / eps) and of live ones (~1) differ by up to 30 orders of magnitude."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    rtol, _ = TOLERANCES[actual.dtype]
    actual, expected = actual.detach().double().cpu(), expected.double()
    scale = expected.abs().amax(dim=-1, keepdim=True)
    error = (actual - expected).abs()
    worst = (error / scale.clamp_min(1e-300)).max().item()
    assert (error <= rtol * scale).all(), f"{what}: worst error {worst:.3g} of its token's largest element"


def backend_or_skip(name):
    ok = available_backends(DEVICE)[name]
    if ok is not True:
        pytest.skip(f"{name} unavailable: {ok}")
    return name


@pytest.mark.parametrize("options", OPTIONS, ids=["cumulative2-normalized", "adjacent1"])
@pytest.mark.parametrize("dtype,eps", TINY_EPS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_vectors_at_tiny_eps_match_the_float64_reference(backend, dtype, eps, options):
    proj, target = pair_with_zero_tokens(dtype)
    loss, grads, grad_output = loss_and_grads(proj, target, backend_or_skip(backend), eps=eps, reduction="none",
                                              **options)
    expected, expected_grads = reference_in_float64(proj, target, grad_output, eps=eps, reduction="none", **options)
    assert_close_and_finite(loss, expected, f"{backend} loss at eps={eps}")
    for name, grad, expected_grad in zip(("proj", "target"), grads, expected_grads):
        assert_close_per_token(grad, expected_grad, f"{backend} grad {name} at eps={eps}")
    # a zero vector whose partners are all zero has no gradient; one with a live partner has alpha y^ / eps
    assert (grads[0][1, :, 2] == 0).all() and (grads[1][1, :, 2] == 0).all()
    assert grads[0][0, 2, 1].abs().max() > 1e-3 / eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_eps_below_the_smallest_normal_of_the_compute_dtype_is_refused(dtype):
    """Below it eps is subnormal or 0 in the compute dtype, and a zero vector's cosine 0 / 0 again; refused with the
    limit before any kernel runs, on every backend."""
    proj, target = pair_with_zero_tokens(dtype)
    smallest = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=f"eps: expected at least {smallest:.4g}.*got {smallest / 4!r}"):
            cross_frame_align_loss(proj, target, eps=smallest / 4, backend=backend)
    assert torch.isfinite(cross_frame_align_loss(proj, target, eps=smallest, backend="reference"))
