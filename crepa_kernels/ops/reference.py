"""The reference as a backend: runs anywhere torch does.

The forward is the specification (crepa_kernels.reference.per_frame_loss). The backward is the gradient written
out by hand in PyTorch, not autograd through the forward, so the tests that compare it with autograd check the
formula the fused kernels implement. With p^ = p / max(|p|, eps), s[b, f] = -g[b, f] / N and C[f][k] the
coefficient of cos(p_f, y_k) (spec.coefficient_table, laid out by band slot):

    dL/dp[f, n] = J(p[f, n])^T sum_k C[f][k] s[f] y^[k, n]        dL/dy[k, n] = J(y[k, n])^T sum_f C[f][k] s[f] p^[f, n]

where J(x)^T u = (u - x^ (x^ . u)) / |x| when |x| > eps and u / eps when the norm is clamped, at |x| = eps too
(autograd's choice at clamp_min's kink, which the reference takes).
"""
from __future__ import annotations

import torch

from .. import reference
from ..reference import clamped_norm, frame_overlap
from ..spec import LossOptions, compute_dtype


def unavailable_reason(device: torch.device) -> str | None:
    return None


def call_unsupported_reason(proj, target, options) -> str | None:
    return None  # the specification runs every valid call


# the backward needs nothing but the inputs: CrossFrameAlignFunction.apply has nothing to recompute
BACKWARD_READS_STATISTICS = False


def forward(proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
            options: LossOptions) -> tuple[torch.Tensor]:
    """(L [B, F],): the reference keeps nothing but the inputs for its backward."""
    return (reference.per_frame_loss(proj, target, options, coefficients),)


def _normalize_backward(unit: torch.Tensor, clamped: torch.Tensor, u: torch.Tensor, eps: float):
    """J(x)^T u for x^ = x / max(|x|, eps) = unit; clamped is max(|x|, eps) with a trailing dim of 1."""
    projected = u - unit * (unit * u).sum(dim=-1, keepdim=True)
    return torch.where(clamped > eps, projected, u) / clamped


def _neighbour_sum(x: torch.Tensor, scale: torch.Tensor, coefficients: torch.Tensor, options: LossOptions,
                   transpose: bool) -> torch.Tensor:
    """out[:, f] = sum_k C[f][k] s[:, f] x[:, k] (transpose=False), or out[:, k] = sum_f C[f][k] s[:, f] x[:, f]
    (transpose=True); scale s is [B, F, 1, 1]."""
    num_frames = x.shape[1]
    out = (coefficients[:, 0, None, None] * scale) * x
    for slot, offset in enumerate(options.offsets(num_frames), start=1):
        first, last = frame_overlap(offset, num_frames)
        weighted = coefficients[first:last, slot, None, None] * scale[:, first:last]
        if transpose:  # frame k = f + offset receives C[f][k] s[f] p^[f]
            out[:, first + offset:last + offset] += weighted * x[:, first:last]
        else:  # frame f receives C[f][k] s[f] y^[f + offset]
            out[:, first:last] += weighted * x[:, first + offset:last + offset]
    return out


def backward(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
             saved: tuple, options: LossOptions, needs_proj_grad: bool, needs_target_grad: bool):
    """grad_loss [B, F] -> (dL/dproj or None, dL/dtarget or None), each in its input's dtype."""
    dtype = compute_dtype(proj, target)
    p, y = proj.to(dtype), target.to(dtype)
    p_norm, y_norm = clamped_norm(p, options.eps), clamped_norm(y, options.eps)
    p_hat, y_hat = p / p_norm, y / y_norm
    scale = (grad_loss.to(dtype) * (-1.0 / p.shape[2]))[:, :, None, None]  # s[b, f]

    grad_proj = grad_target = None
    if needs_proj_grad:
        u = _neighbour_sum(y_hat, scale, coefficients, options, transpose=False)
        grad_proj = _normalize_backward(p_hat, p_norm, u, options.eps).to(proj.dtype)
    if needs_target_grad:
        v = _neighbour_sum(p_hat, scale, coefficients, options, transpose=True)
        grad_target = _normalize_backward(y_hat, y_norm, v, options.eps).to(target.dtype)
    return grad_proj, grad_target
