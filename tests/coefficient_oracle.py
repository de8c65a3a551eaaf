"""The loss restated in float64 for ANY coefficient table C [F, W] (slots as spec.band_offsets), not only one that
spec.coefficient_table derives from tau: what the compiled kernels must compute when handed that table.

    L[b, f] = -(1/N) sum_n sum_slot C[f, slot] cos(p[b, f, n], y[b, f + o_slot, n]),  slots landing in [0, F)
    cos(a, b) = a.b / (max(|a|, eps) max(|b|, eps))

Gradients come from autograd on this float64 expression (clamp_min passes no gradient at |x| = eps, as the kernels).
"""
from __future__ import annotations

import torch

from crepa_kernels.spec import LossOptions, band_offsets


def table_loss(proj: torch.Tensor, target: torch.Tensor, table: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """L [B, F] in float64 for [B, F, N, D] inputs and the [F, W] ``table``; options give the slots and eps."""
    frames = proj.shape[1]
    offsets = band_offsets(options, frames)
    assert table.shape == (frames, len(offsets)), (table.shape, offsets)
    p, y, c = proj.double(), target.double(), table.double()
    p = p / p.norm(dim=-1, keepdim=True).clamp_min(options.eps)
    y = y / y.norm(dim=-1, keepdim=True).clamp_min(options.eps)
    rows = []
    for f in range(frames):
        total = torch.zeros(p.shape[0], dtype=torch.float64)
        for slot, offset in enumerate(offsets):
            k = f + offset
            if 0 <= k < frames:
                total = total + c[f, slot] * (p[:, f] * y[:, k]).sum(-1).mean(-1)
        rows.append(-total)
    return torch.stack(rows, dim=1)


def table_oracle(proj: torch.Tensor, target: torch.Tensor, table: torch.Tensor, options: LossOptions,
                 grad_loss: torch.Tensor):
    """(L, dL/dproj, dL/dtarget) in float64, the gradients of sum(grad_loss * L)."""
    p = proj.detach().double().requires_grad_(True)
    y = target.detach().double().requires_grad_(True)
    loss = table_loss(p, y, table, options)
    grad_proj, grad_target = torch.autograd.grad(loss, [p, y], grad_loss.double())
    return loss.detach(), grad_proj, grad_target


def arbitrary_table(options: LossOptions, frames: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A random non-negative [F, W] table no tau gives: independent values per row and slot (so a kernel reading
    another row or slot, or computing weights of its own, is wrong), zero where a slot does not land."""
    offsets = band_offsets(options, frames)
    generator = torch.Generator().manual_seed(seed)
    table = torch.rand(frames, len(offsets), generator=generator, dtype=torch.float64) * 2 + 0.1
    for f in range(frames):
        for slot, offset in enumerate(offsets):
            if not 0 <= f + offset < frames:
                table[f, slot] = 0.0
    return table.to(dtype)
