"""The baseline: CREPA as it is written in training scripts today, independent of crepa_kernels.

F.normalize both inputs in fp32, then one elementwise product and token mean per frame offset, added with
its weight into the per-frame similarity. Every step is a separate kernel that materialises a full
[B, F', N, D] tensor, and autograd keeps the normalised copies of both inputs alive until the backward.
The benchmark checks that it computes the same loss as the package before it times anything.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def neighbour_offsets(num_frames: int, neighbors: int, mode: str) -> list[int]:
    """Offsets k - f of the neighbour frames, dropping those that can never land inside [0, num_frames)."""
    if mode == "adjacent":
        candidates = [-neighbors, neighbors] if neighbors > 0 else []
    elif mode == "cumulative":
        candidates = [sign * distance for distance in range(1, neighbors + 1) for sign in (-1, 1)]
    else:
        raise ValueError(f"mode: expected 'adjacent' or 'cumulative', got {mode!r}")
    return [offset for offset in candidates if abs(offset) < num_frames]


def crepa_loss(proj, target, *, tau=1.0, neighbors=1, mode="adjacent", normalize_weights=False, eps=1e-12):
    """[B, F, N, D] x 2 -> scalar: the mean over batch and frames of the per-frame CREPA loss."""
    upcast = torch.float64 if torch.float64 in (proj.dtype, target.dtype) else torch.float32
    p = F.normalize(proj.to(upcast), dim=-1, eps=eps)
    y = F.normalize(target.to(upcast), dim=-1, eps=eps)
    num_frames = p.shape[1]

    similarity = (p * y).sum(dim=-1).mean(dim=-1)  # [B, F]
    total_weight = [1.0] * num_frames
    for offset in neighbour_offsets(num_frames, neighbors, mode):
        weight = math.exp(-abs(offset) / tau)
        # frames f whose neighbour f + offset exists
        first, last = max(0, -offset), min(num_frames, num_frames - offset)
        neighbour = (p[:, first:last] * y[:, first + offset : last + offset]).sum(dim=-1).mean(dim=-1)
        similarity = similarity + F.pad(weight * neighbour, (first, num_frames - last))
        for f in range(first, last):
            total_weight[f] += weight

    if normalize_weights:
        similarity = similarity / torch.tensor(total_weight, dtype=upcast, device=p.device)
    return -similarity.mean()
