"""Shared by the backend tests: random inputs, the option grid, per-dtype tolerances and the comparison
of any backend against the reference computed in float64 on the same input values."""
from __future__ import annotations

import itertools
import math

import torch

from crepa_kernels import cross_frame_align_loss

# (rtol, atol) for a result of this dtype, compared with a float64 reference on the same input values.
# atol is relative to the largest expected magnitude, since gradients scale with 1 / (B F N).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-2, 1e-3),
}

# Odd, non-power-of-two shapes [B, F, N, D], plus the edge cases F=1, N=1, D=1.
SHAPES = [(2, 5, 3, 7), (1, 1, 4, 5), (3, 4, 1, 1), (1, 3, 2, 769), (2, 6, 5, 33)]

OPTION_GRID = [
    dict(neighbors=d, neighbor_mode=mode, normalize_weights=norm, reduction=red, tau=tau)
    for (d, mode, norm), red, tau in itertools.product(
        [(0, "adjacent", False), (1, "adjacent", False), (2, "adjacent", True), (3, "cumulative", False),
         (2, "cumulative", True), (9, "adjacent", False), (9, "cumulative", True)],
        ["mean", "frame_sum", "none"],
        [1.0, 0.3],
    )
]
EXTREME_TAUS = [1e-4, 1e4]


def random_pair(shape, proj_dtype=torch.float32, target_dtype=None, *, seed=0, device="cpu",
                target_requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    target_dtype = target_dtype or proj_dtype
    proj = torch.randn(shape, generator=generator, dtype=torch.float64)
    # correlate target with proj so that cosines are far from 0 and errors are not hidden by cancellation
    target = 0.7 * proj + torch.randn(shape, generator=generator, dtype=torch.float64)
    proj = proj.to(device=device, dtype=proj_dtype).requires_grad_(True)
    target = target.to(device=device, dtype=target_dtype).requires_grad_(target_requires_grad)
    return proj, target


def pair_straddling_eps(shape, eps, dtype=torch.float32, *, seed=0, device="cpu"):
    """random_pair with every token rescaled to a norm log-uniform in [eps / 20, 5 eps]: about half of the norms
    are clamped to eps, so a backend that ignores ``eps`` or clamps differently (the product of the norms, or
    |x| + eps) gives other values."""
    generator = torch.Generator().manual_seed(seed + 1000)
    pair = []
    for x in random_pair(shape, torch.float64, seed=seed):
        x = x.detach()
        norms = torch.exp(torch.empty(shape[:-1] + (1,), dtype=torch.float64).uniform_(
            math.log(eps / 20), math.log(5 * eps), generator=generator))
        pair.append((x / x.norm(dim=-1, keepdim=True) * norms).to(device=device, dtype=dtype).requires_grad_(True))
    return tuple(pair)


# |(0.375, 0.5)| = 0.625 exactly, in every float dtype
EXACT_NORM_EPS = 0.625


def pair_with_norms_equal_to_eps(dtype=torch.float64, *, device="cpu"):
    """Random [1, 3, 4, 2] inputs with one proj and one target token of norm exactly EXACT_NORM_EPS: there the
    clamp max(|x|, eps) is at its kink, which the specification counts as clamped (the radial term vanishes)."""
    proj, target = (x.detach() for x in random_pair((1, 3, 4, 2), torch.float64, seed=37))
    proj[0, 1, 2] = torch.tensor([0.375, 0.5])
    target[0, 2, 1] = torch.tensor([-0.5, 0.375])
    assert proj[0, 1, 2].norm().item() == target[0, 2, 1].norm().item() == EXACT_NORM_EPS
    return tuple(x.to(device=device, dtype=dtype).requires_grad_(True) for x in (proj, target))


def random_grad_output(loss: torch.Tensor, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=generator, dtype=torch.float64) * 2.5 - 0.5).to(loss.dtype).to(
        loss.device
    )


def assert_close_and_finite(actual: torch.Tensor, expected: torch.Tensor, what: str, dtype=None):
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    atol = atol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol, msg=what)


def loss_and_grads(proj, target, backend, grad_seed=1, **options):
    proj = proj.detach().requires_grad_(True)
    target = target.detach().requires_grad_(target.requires_grad)
    loss = cross_frame_align_loss(proj, target, backend=backend, **options)
    grad_output = random_grad_output(loss, grad_seed)
    inputs = [proj, target] if target.requires_grad else [proj]
    grads = torch.autograd.grad(loss, inputs, grad_output)
    return loss, grads, grad_output


def reference_in_float64(proj, target, grad_output, **options):
    """(loss, gradients) of the reference in float64 on the values of ``proj`` and ``target``; gradients for
    ``proj`` and, when it requires grad, ``target``."""
    ref_proj = proj.detach().cpu().double().requires_grad_(True)
    ref_target = target.detach().cpu().double().requires_grad_(target.requires_grad)
    expected = cross_frame_align_loss(ref_proj, ref_target, backend="reference", **options)
    inputs = [ref_proj, ref_target] if target.requires_grad else [ref_proj]
    return expected, torch.autograd.grad(expected, inputs, grad_output.double().cpu())


def assert_backend_matches_reference(backend, proj, target, **options):
    """Loss and gradients of ``backend`` against the reference in float64 on the same input values."""
    loss, grads, grad_output = loss_and_grads(proj, target, backend, **options)
    expected, expected_grads = reference_in_float64(proj, target, grad_output, **options)

    wide = torch.float64 if torch.float64 in (proj.dtype, target.dtype) else torch.float32
    assert loss.dtype == wide, f"loss dtype {loss.dtype}, expected {wide}"
    assert loss.shape == expected.shape
    assert_close_and_finite(loss, expected, f"{backend} loss {options}")
    for name, grad, expected_grad, source in zip(("proj", "target"), grads, expected_grads, (proj, target)):
        assert grad.dtype == source.dtype, f"grad {name} dtype {grad.dtype}, expected {source.dtype}"
        assert grad.shape == source.shape
        assert_close_and_finite(grad, expected_grad, f"{backend} grad {name} {options}")


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at the magnitude of each element of ``x`` (float64), subnormals included."""
    finfo = torch.finfo(dtype)
    smallest = finfo.smallest_normal * finfo.eps
    _, exponent = torch.frexp(x.double().abs())  # |x| = m 2^e with m in [0.5, 1); frexp(0) = (0, 0)
    spacing = torch.ldexp(torch.full_like(x, finfo.eps, dtype=torch.float64), exponent - 1)
    return torch.where(x == 0, smallest, spacing.clamp(min=smallest))


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, what: str, max_ulps: float = 1.0,
                       slack: float = 2.0**-12):
    """Per element: |actual - expected| <= max_ulps ulps of actual's dtype at expected's magnitude, plus ``slack``
    times the largest |expected|.

    ``expected`` is the float64 result. A 16-bit output computed in fp32 and then rounded is within 0.5 ulp of it
    (round to nearest, GPUs) or 1 ulp (truncation: the Triton interpreter's fp32 -> bf16 cast). Elements much
    smaller than their terms carry the terms' fp32 (or bf16 hi/lo: ~2^-16) rounding, hence the slack; at 2^-12 of
    the largest magnitude it is ~1/16 ulp there, so an error of a few ulps in the large elements fails, which a
    tolerance relative to the whole tensor (1% of it for bf16) would hide.
    """
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    expected = expected.double().cpu()
    error = (actual.double().cpu() - expected).abs()
    spacing = ulp(expected, actual.dtype)
    allowed = max_ulps * spacing + slack * expected.abs().max().item()
    worst = (error / allowed).argmax()
    assert (error <= allowed).all(), (
        f"{what}: {int((error > allowed).sum())} of {error.numel()} elements off by more than {max_ulps} ulp "
        f"(+ {slack:.1e} of the largest); worst {error.flatten()[worst].item():.3e} = "
        f"{(error / spacing).flatten()[worst].item():.1f} ulp at expected {expected.flatten()[worst].item():.6e}"
    )
