"""The CREPA regulariser: projector h_phi + cross-frame alignment loss + cheap logging figures."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..api import cross_frame_align_loss
from ..backends import check_backend_name
from ..spec import LossOptions, reduce_frames
from .projector import build_projector


@dataclass
class AlignmentOutput:
    loss: torch.Tensor  # loss_weight * alignment loss: add it to the diffusion loss
    align_loss: torch.Tensor  # the unweighted alignment loss, detached
    self_similarity: torch.Tensor  # mean over batch, frames and tokens of cos(p_f, y_f), 0-dim, detached
    # weighted mean of cos(p_f, y_k) over the neighbour pairs k in K(f), weights w(|k - f|) (a plain mean in
    # "adjacent" mode, where both neighbours weigh the same); None when no frame has a neighbour
    neighbor_similarity: torch.Tensor | None
    projected: torch.Tensor = field(repr=False)  # h_phi(hidden states) as [B, F, N, encoder_dim], in the graph


class CrepaRegularizer(nn.Module):
    """loss_weight * CREPA(h_phi(hidden states), encoder targets), arXiv 2506.09229.

    Loss options as in :func:`crepa_kernels.cross_frame_align_loss`; ``loss_weight`` is the paper's lambda.
    The figures cost one extra forward-only pass of the fused loss with ``neighbors=0`` (no backward, nothing
    saved; none at all without neighbours): the self term S[b, f] comes from it and the neighbour term from the
    [B, F] loss already computed, -L[b, f] * Z_f - S[b, f].
    """

    def __init__(
        self,
        hidden_dim: int,
        encoder_dim: int,
        *,
        loss_weight: float = 0.5,
        tau: float = 1.0,
        neighbors: int = 1,
        neighbor_mode: str = "adjacent",
        normalize_weights: bool = False,
        reduction: str = "mean",
        eps: float = 1e-12,
        backend: str = "auto",
        projector_width: int = 2048,
        projector_depth: int = 3,
    ) -> None:
        super().__init__()
        self.projector = build_projector(hidden_dim, encoder_dim, width=projector_width, depth=projector_depth)
        self.options = LossOptions(
            tau=tau, neighbors=neighbors, neighbor_mode=neighbor_mode, normalize_weights=normalize_weights,
            reduction=reduction, eps=eps,
        )
        check_backend_name(backend)
        self.backend = backend
        self.loss_weight = float(loss_weight)

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}, backend={self.backend!r}, {self.options}"

    def _per_frame_loss(self, proj: torch.Tensor, target: torch.Tensor, neighbors: int) -> torch.Tensor:
        o = self.options
        return cross_frame_align_loss(
            proj, target, tau=o.tau, neighbors=neighbors, neighbor_mode=o.neighbor_mode,
            normalize_weights=o.normalize_weights, reduction="none", eps=o.eps, backend=self.backend,
        )

    def forward(self, hidden_states: torch.Tensor, target: torch.Tensor) -> AlignmentOutput:
        """hidden_states: [B, F*N, hidden_dim] frame-major (as a DiT block emits them) or [B, F, N, hidden_dim];
        target: encoder features on the same token grid, [B, F, N, encoder_dim] (see token_grid)."""
        if target.dim() != 4:
            raise ValueError(f"target: expected [B, F, N, encoder_dim], got shape {tuple(target.shape)}")
        batch, frames, tokens, _ = target.shape
        proj = self.projector(hidden_states)
        if proj.dim() == 3:
            if proj.shape[1] != frames * tokens:
                raise ValueError(
                    f"hidden_states: {proj.shape[1]} tokens, the target grid has {frames} frames x {tokens} tokens"
                )
            proj = proj.unflatten(1, (frames, tokens))
        per_frame = self._per_frame_loss(proj, target, self.options.neighbors)
        align_loss = reduce_frames(per_frame, self.options.reduction)
        self_similarity, neighbor_similarity = self._figures(proj, target, per_frame.detach())
        return AlignmentOutput(
            loss=self.loss_weight * align_loss,
            align_loss=align_loss.detach(),
            self_similarity=self_similarity,
            neighbor_similarity=neighbor_similarity,
            projected=proj,
        )

    @torch.no_grad()
    def _figures(self, proj, target, per_frame):
        frames = per_frame.shape[1]
        if not self.options.offsets(frames):  # no neighbours: the loss is the self term alone, Z_f = 1
            return (-per_frame).mean(), None
        self_terms = -self._per_frame_loss(proj, target, neighbors=0)  # mean_n cos(p_f, y_f), [B, F]
        # C[f][f] = 1 / Z_f, C[f][k] = w / Z_f: per frame, Z_f and the total neighbour weight (host constants)
        coefficients = self.options.frame_coefficients(frames)
        z = [1.0 / row[f] for f, row in enumerate(coefficients)]
        neighbour_weight = sum((sum(row) - row[f]) * z[f] for f, row in enumerate(coefficients))
        z = torch.tensor(z, dtype=per_frame.dtype).to(per_frame.device, non_blocking=True)
        neighbour_terms = -per_frame * z - self_terms  # sum_k w(|k-f|) mean_n cos(p_f, y_k), [B, F]
        return self_terms.mean(), neighbour_terms.sum() / (per_frame.shape[0] * neighbour_weight)
