"""The readable pure-PyTorch reference: the executable specification and the fallback backend.

    cos(a, b) = a.b / (max(|a|, eps) * max(|b|, eps))            (torch.nn.functional.normalize's convention)
    w(delta)  = exp(-delta / tau)
    L[b, f]   = -(1/N) sum_n [ cos(p[b,f,n], y[b,f,n]) + sum_{k in K(f)} w(|k-f|) cos(p[b,f,n], y[b,k,n]) ] / Z_f

Autograd differentiates it; it keeps normalised fp32 (or fp64) copies of both inputs alive for the backward,
which is the memory the fused backends avoid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import LossOptions, compute_dtype


def _mean_token_cosine(p_hat: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """[B, F', N, D] unit vectors -> [B, F'] mean over tokens of the per-token cosine."""
    return (p_hat * y_hat).sum(dim=-1).mean(dim=-1)


def frame_overlap(offset: int, num_frames: int) -> tuple[int, int]:
    """The frames f whose neighbour f + offset exists: f in [first, last)."""
    return max(0, -offset), min(num_frames, num_frames - offset)


def frame_weight_sums(options: LossOptions, num_frames: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Z_f = 1 + sum of w(|k - f|) over k in K(f), shape [F]."""
    weight_sum = torch.ones(num_frames, dtype=dtype, device=device)
    for offset in options.offsets(num_frames):
        first, last = frame_overlap(offset, num_frames)
        # ones * w rather than torch.full: under torch.compile a varying tau then stays symbolic
        weights = torch.ones(last - first, dtype=dtype, device=device) * options.weight(offset)
        weight_sum = weight_sum + F.pad(weights, (first, num_frames - last))
    return weight_sum


def clamped_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """max(|x|, eps) over the last dim (kept), as F.normalize clamps it; |x| = eps counts as clamped.

    torch.where rather than clamp_min: a varying eps then stays symbolic under torch.compile (clamp_min's Scalar
    pins it), and the gradient at the kink is 0 on every torch version (clamp_min's changed in torch 2.14)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.where(norm > eps, norm, torch.ones_like(norm) * eps)


def per_frame_loss(proj: torch.Tensor, target: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """[B, F, N, D] x 2 -> L of shape [B, F]."""
    dtype = compute_dtype(proj, target)
    p, y = proj.to(dtype), target.to(dtype)
    p_hat, y_hat = p / clamped_norm(p, options.eps), y / clamped_norm(y, options.eps)
    num_frames = proj.shape[1]

    similarity = _mean_token_cosine(p_hat, y_hat)
    for offset in options.offsets(num_frames):
        first, last = frame_overlap(offset, num_frames)
        neighbour = _mean_token_cosine(p_hat[:, first:last], y_hat[:, first + offset : last + offset])
        similarity = similarity + F.pad(options.weight(offset) * neighbour, (first, num_frames - last))

    if options.normalize_weights:
        similarity = similarity / frame_weight_sums(options, num_frames, dtype, proj.device)
    return -similarity
