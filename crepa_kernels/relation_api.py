"""The token relation distillation loss as a function and as an nn.Module (autograd: TokenRelationFunction)."""
from __future__ import annotations

import torch
from torch import nn

from .relation_function import check_relation_backend, token_relation_loss_keeping_gradients
from .relation_spec import RelationOptions


def token_relation_loss(
    proj: torch.Tensor,
    target: torch.Tensor,
    *,
    pairs: str = "all",
    margin: float = 0.0,
    anchors: torch.Tensor | None = None,
    num_frames: int | None = None,
    reduction: str = "mean",
    eps: float = 1e-12,
    backend: str = "auto",
) -> torch.Tensor:
    """VideoREPA's token relation distillation (TRD) loss (arXiv 2505.23656), without (F*N)^2 buffers.

    Args:
        proj: projected DiT features, [B, F, N, D] or frame-major [B, F*N, D].
        target: encoder features, same layout rules; gradients flow to it if it requires grad.
        pairs: which token pairs (i, j) of a sample count: "all" (VideoREPA's token_relation_distillation, every
            ordered pair with the diagonal), "spatial" (same frame, ..._only_spatial) or "temporal" (different
            frames, ..._only_temporal).
        margin: each pair contributes relu(|cos(p_i, p_j) - cos(y_i, y_j)| - margin); >= 0.
        anchors: None, or a 1-D integer tensor of token positions in [0, F*N): j is restricted to them (a position
            listed twice counts twice).
        num_frames: F, required when an input is 3-D.
        reduction: "mean" over the counted pairs of the batch, or "none": per-frame sums [B, F] (frame of i).
        eps: norms are clamped to at least eps, as in torch.nn.functional.normalize.
        backend: "auto" (cpu on CPU, triton on CUDA), "reference", "cpu", "triton" ("cuda" raises: see
            docs/token_relation.md).

    Returns:
        The loss, fp32 (fp64 when an input is fp64): a scalar, or [B, F] for reduction="none".
    """
    return token_relation_loss_keeping_gradients(proj, target, pairs, margin, anchors, num_frames, reduction, eps,
                                                 backend)


class TokenRelationLoss(nn.Module):
    """``TokenRelationLoss(pairs=..., margin=...)(proj, target, num_frames=None, anchors=None)``.

    Options as in :func:`token_relation_loss`; a bad one raises here, not at the first call. No parameters."""

    def __init__(self, *, pairs: str = "all", margin: float = 0.0, reduction: str = "mean", eps: float = 1e-12,
                 backend: str = "auto") -> None:
        super().__init__()
        RelationOptions(pairs=pairs, margin=margin, reduction=reduction, eps=eps)
        check_relation_backend(backend)
        self.pairs, self.margin, self.reduction, self.eps, self.backend = pairs, margin, reduction, eps, backend

    def forward(self, proj: torch.Tensor, target: torch.Tensor, num_frames: int | None = None,
                anchors: torch.Tensor | None = None) -> torch.Tensor:
        return token_relation_loss(proj, target, pairs=self.pairs, margin=self.margin, anchors=anchors,
                                   num_frames=num_frames, reduction=self.reduction, eps=self.eps,
                                   backend=self.backend)

    def extra_repr(self) -> str:
        return (f"pairs={self.pairs!r}, margin={self.margin}, reduction={self.reduction!r}, eps={self.eps}, "
                f"backend={self.backend!r}")
