"""CrossFrameAlignLoss: the loss as an nn.Module, its options fixed and checked at construction."""
from __future__ import annotations

import torch
from torch import nn

from .api import cross_frame_align_loss
from .backends import check_backend_name
from .function import call_options


class CrossFrameAlignLoss(nn.Module):
    """``CrossFrameAlignLoss(tau=..., neighbors=...)(proj, target, num_frames=None)``.

    Options as in :func:`crepa_kernels.cross_frame_align_loss`; a bad one raises here, not at the first call.
    The module has no parameters; it calls the same autograd Function as the functional form.
    """

    def __init__(self, *, tau: float = 1.0, neighbors: int = 1, neighbor_mode: str = "adjacent",
                 normalize_weights: bool = False, reduction: str = "mean", eps: float = 1e-12, backend: str = "auto",
                 clamp_neighbors: bool = False) -> None:
        super().__init__()
        call_options(tau, neighbors, neighbor_mode, normalize_weights, reduction, eps, clamp_neighbors, num_frames=1)
        check_backend_name(backend)
        self.tau = tau
        self.neighbors = neighbors
        self.neighbor_mode = neighbor_mode
        self.normalize_weights = normalize_weights
        self.reduction = reduction
        self.eps = eps
        self.backend = backend
        self.clamp_neighbors = clamp_neighbors

    def forward(self, proj: torch.Tensor, target: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        return cross_frame_align_loss(
            proj, target, tau=self.tau, neighbors=self.neighbors, neighbor_mode=self.neighbor_mode,
            normalize_weights=self.normalize_weights, reduction=self.reduction, num_frames=num_frames, eps=self.eps,
            backend=self.backend, clamp_neighbors=self.clamp_neighbors,
        )

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, neighbors={self.neighbors}, neighbor_mode={self.neighbor_mode!r}, "
                f"normalize_weights={self.normalize_weights}, reduction={self.reduction!r}, eps={self.eps}, "
                f"backend={self.backend!r}, clamp_neighbors={self.clamp_neighbors}")
