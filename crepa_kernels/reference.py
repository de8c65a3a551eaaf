"""The readable pure-PyTorch reference: the executable specification and the fallback backend's forward.

    cos(a, b) = a.b / (max(|a|, eps) * max(|b|, eps))            (torch.nn.functional.normalize's convention)
    C[f, s]   = spec.coefficient_table: 1 / Z_f for the frame itself (s = 0), w(|o_s|) / Z_f for its neighbour at
                offset o_s, with w the options' weights (exp(-delta / tau) by default)
    L[b, f]   = -(1/N) sum_n sum_s C[f, s] cos(p[b,f,n], y[b,f+o_s,n])

Autograd differentiates it; it keeps normalised fp32 (or fp64) copies of both inputs alive for the backward,
which is the memory the fused backends avoid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import LossOptions, coefficient_table, compute_dtype


def _mean_token_cosine(p_hat: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """[B, F', N, D] unit vectors -> [B, F'] mean over tokens of the per-token cosine."""
    return (p_hat * y_hat).sum(dim=-1).mean(dim=-1)


def frame_overlap(offset: int, num_frames: int) -> tuple[int, int]:
    """The frames f whose neighbour f + offset exists: f in [first, last)."""
    return max(0, -offset), min(num_frames, num_frames - offset)


def clamped_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """max(|x|, eps) over the last dim (kept), as F.normalize clamps it; |x| = eps counts as clamped.

    torch.where rather than clamp_min: a varying eps then stays symbolic under torch.compile (clamp_min's Scalar
    pins it), and the gradient at the kink is 0 on every torch version (clamp_min's changed in torch 2.14)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.where(norm > eps, norm, torch.ones_like(norm) * eps)


def per_frame_loss(proj: torch.Tensor, target: torch.Tensor, options: LossOptions,
                   coefficients: torch.Tensor | None = None) -> torch.Tensor:
    """[B, F, N, D] x 2 -> L of shape [B, F]. ``coefficients``: the call's table (default: the options' own)."""
    dtype = compute_dtype(proj, target)
    num_frames = proj.shape[1]
    if coefficients is None:
        coefficients = coefficient_table(options, num_frames, dtype, proj.device)
    p, y = proj.to(dtype), target.to(dtype)
    p_hat, y_hat = p / clamped_norm(p, options.eps), y / clamped_norm(y, options.eps)

    similarity = coefficients[:, 0] * _mean_token_cosine(p_hat, y_hat)
    for slot, offset in enumerate(options.offsets(num_frames), start=1):
        first, last = frame_overlap(offset, num_frames)
        neighbour = _mean_token_cosine(p_hat[:, first:last], y_hat[:, first + offset : last + offset])
        similarity = similarity + F.pad(coefficients[first:last, slot] * neighbour, (first, num_frames - last))
    return -similarity
