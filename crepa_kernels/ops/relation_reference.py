"""The token relation distillation loss's specification as the "reference" backend.

It runs crepa_kernels.relation_reference.per_row_loss on a chunk of rows at a time, and its backward
differentiates that same code with autograd, chunk by chunk (recomputing each chunk's tiles): the reference
gradient is the specification's, kinks included: at |delta| = margin, and at delta = 0 with margin 0, a term
contributes no gradient (torch's relu'(0) = 0 and abs'(0) = 0).

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

from ..relation_reference import per_row_loss, unit_rows
from ..relation_spec import RelationOptions
from ..spec import compute_dtype

# a chunk's relation tiles hold at most this many elements per input (two tiles, their difference and the terms)
CHUNK_ELEMENTS = 1 << 24


def unavailable_reason(device: torch.device) -> str | None:
    return None


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
