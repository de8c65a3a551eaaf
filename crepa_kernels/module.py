"""CrossFrameAlignLoss: the loss as an nn.Module, its options checked once, at construction or when one is set."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .backends import check_backend_name
from .function import align_loss
from .spec import LossOptions

_OPTION_NAMES = tuple(field.name for field in dataclasses.fields(LossOptions))


class CrossFrameAlignLoss(nn.Module):
    """``CrossFrameAlignLoss(tau=..., neighbors=...)(proj, target, num_frames=None)``.

    Options as in :func:`crepa_kernels.cross_frame_align_loss`; a bad one raises here, not at the first call. Each
    option is an attribute (``loss.tau = 0.5`` between steps, as a schedule does), checked when set; ``options``
    holds them all as one :class:`~crepa_kernels.spec.LossOptions`. The module has no parameters; it calls the same
    autograd Function as the functional form.
    """

    def __init__(self, *, tau: float = 1.0, neighbors: int = 1, neighbor_mode: str = "adjacent",
                 normalize_weights: bool = False, reduction: str = "mean", eps: float = 1e-12, backend: str = "auto",
                 clamp_neighbors: bool = False, weights: str | torch.Tensor = "exponential") -> None:
        super().__init__()
        self.options = LossOptions(tau=tau, neighbors=neighbors, neighbor_mode=neighbor_mode,
                                   normalize_weights=normalize_weights, reduction=reduction, eps=eps,
                                   clamp_neighbors=clamp_neighbors, weights=weights)
        check_backend_name(backend)
        self.backend = backend

    def __getattr__(self, name: str):
        if name in _OPTION_NAMES:
            return getattr(self.__dict__["options"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in _OPTION_NAMES:
            value = dataclasses.replace(self.options, **{name: value})
            name = "options"
        elif name == "backend":
            check_backend_name(value)
        super().__setattr__(name, value)

    def forward(self, proj: torch.Tensor, target: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        return align_loss(proj, target, self.options, num_frames, self.backend)

    def extra_repr(self) -> str:
        fields = ", ".join(f"{name}={getattr(self.options, name)!r}" for name in _OPTION_NAMES)
        return f"{fields}, backend={self.backend!r}"
