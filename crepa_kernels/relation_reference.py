"""The token relation distillation loss in plain PyTorch: the specification.

The loss is written once, in :func:`per_row_loss` (see relation_spec for the formula). It works on a chunk of
rows i against every j at a time, so it holds [B, chunk, T] relation tiles instead of the [B, T, T] matrices
VideoREPA builds. The "reference" backend (crepa_kernels.ops.relation_reference) runs it chunk by chunk and
differentiates that same code with autograd, so the reference gradient is the specification's, kinks included.
"""
from __future__ import annotations

import torch

from .reference import clamped_norm
from .relation_spec import RelationOptions

def unit_rows(x: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """[B, F, N, D] -> x^ = x / max(|x|, eps) as [B, T, D] in ``dtype``."""
    x = x.to(dtype)
    return (x / clamped_norm(x, eps)).flatten(1, 2)


def pair_mask(row_frames: torch.Tensor, key_frames: torch.Tensor, pairs: str) -> torch.Tensor | None:
    """[rows, T] bool: which (i, j) count under ``pairs`` (None: all of them)."""
    if pairs == "all":
        return None
    same = row_frames[:, None] == key_frames[None, :]
    return same if pairs == "spatial" else ~same


def per_row_loss(p_hat: torch.Tensor, y_hat: torch.Tensor, rows: slice, key_weight: torch.Tensor,
                 options: RelationOptions, tokens_per_frame: int) -> torch.Tensor:
    """[B, rows] sum over counted j of a[j] relu(|delta[i, j]| - margin), for unit rows p^, y^ of shape [B, T, D].

    A pair that does not count contributes nothing, not even a NaN (torch.where, not a product with 0)."""
    tokens = p_hat.shape[1]
    delta = p_hat[:, rows] @ p_hat.mT - y_hat[:, rows] @ y_hat.mT  # [B, rows, T]
    terms = torch.relu(delta.abs() - options.margin) * key_weight
    counted = key_weight > 0
    frames = torch.arange(tokens, device=p_hat.device) // tokens_per_frame
    mask = pair_mask(frames[rows], frames, options.pairs)
    counted = counted if mask is None else counted & mask
    return torch.where(counted, terms, torch.zeros_like(terms)).sum(dim=-1)
