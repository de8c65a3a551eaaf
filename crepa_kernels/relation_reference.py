"""The token relation distillation loss in plain PyTorch: the specification, and the "reference" backend.

The loss is written once, in :func:`per_row_loss` (see relation_spec for the formula). It works on a chunk of
rows i against every j at a time, so it holds [B, chunk, T] relation tiles instead of the [B, T, T] matrices
VideoREPA builds. The backward differentiates that same code with autograd, chunk by chunk (recomputing each
chunk's tiles), so the reference gradient is the specification's, kinks included: at |delta| = margin, and at
delta = 0 with margin 0, a term contributes no gradient (torch's relu'(0) = 0 and abs'(0) = 0).

A backend of this loss provides
    unavailable_reason(device) -> str | None
    forward(proj, target, key_weight, options, grad_proj, grad_target) -> (L [B, F], grad_proj | None,
                                                                          grad_target | None)
        where the gradients, when the backend can produce them in the same pass (the reference cannot), are those of
        L.sum() (every frame weighted 1);
    backward(frame_weight [B, F], proj, target, key_weight, options, needs_proj_grad, needs_target_grad)
        -> the gradients of (frame_weight * L).sum(), each None unless asked for, in its input's dtype.
"""
from __future__ import annotations

import torch

from .reference import clamped_norm
from .relation_spec import RelationOptions
from .spec import compute_dtype

# a chunk's relation tiles hold at most this many elements per input (two tiles, their difference and the terms)
CHUNK_ELEMENTS = 1 << 24


def unavailable_reason(device: torch.device) -> str | None:
    return None


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


def _chunk_rows(batch: int, tokens: int) -> int:
    return max(1, CHUNK_ELEMENTS // (batch * tokens))


def forward(proj: torch.Tensor, target: torch.Tensor, key_weight: torch.Tensor, options: RelationOptions,
            grad_proj: bool = False, grad_target: bool = False):
    """(L [B, F], None, None): the reference computes its gradients in backward."""
    batch, frames, tokens_per_frame, _ = proj.shape
    dtype = compute_dtype(proj, target)
    p_hat, y_hat = unit_rows(proj, options.eps, dtype), unit_rows(target, options.eps, dtype)
    weight = key_weight.to(dtype)
    tokens = p_hat.shape[1]
    chunk = _chunk_rows(batch, tokens)
    rows = torch.cat([per_row_loss(p_hat, y_hat, slice(start, min(start + chunk, tokens)), weight, options,
                                   tokens_per_frame) for start in range(0, tokens, chunk)], dim=1)
    return rows.view(batch, frames, tokens_per_frame).sum(dim=-1), None, None


def backward(frame_weight: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, key_weight: torch.Tensor,
             options: RelationOptions, needs_proj_grad: bool, needs_target_grad: bool):
    """Autograd of :func:`per_row_loss`, one chunk of rows at a time, weighted per frame by frame_weight [B, F]."""
    batch, frames, tokens_per_frame, _ = proj.shape
    dtype = compute_dtype(proj, target)
    weight = key_weight.to(dtype)
    row_weight = frame_weight.to(dtype).repeat_interleave(tokens_per_frame, dim=1)  # [B, T]
    tokens = frames * tokens_per_frame
    chunk = _chunk_rows(batch, tokens)
    with torch.enable_grad():
        p = proj.detach().to(dtype).requires_grad_(needs_proj_grad)
        y = target.detach().to(dtype).requires_grad_(needs_target_grad)
        leaves = [x for x in (p, y) if x.requires_grad]
        totals = [torch.zeros_like(x) for x in leaves]
        for start in range(0, tokens, chunk):
            rows = slice(start, min(start + chunk, tokens))
            p_hat, y_hat = unit_rows(p, options.eps, dtype), unit_rows(y, options.eps, dtype)
            chunk_loss = (per_row_loss(p_hat, y_hat, rows, weight, options, tokens_per_frame)
                          * row_weight[:, rows]).sum()
            for total, grad in zip(totals, torch.autograd.grad(chunk_loss, leaves)):
                total += grad
    grads = iter(totals)
    grad_proj = next(grads).to(proj.dtype) if needs_proj_grad else None
    grad_target = next(grads).to(target.dtype) if needs_target_grad else None
    return grad_proj, grad_target
