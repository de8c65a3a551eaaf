"""The token relation distillation (TRD) regulariser: CrepaRegularizer's projectors, schedule, weighting and
logging with VideoREPA's relation loss (crepa_kernels.token_relation_loss) in place of CREPA's.

``alignment_regularizer(loss="crepa" | "trd", ...)`` builds either, so a trainer can offer both behind one flag.
"""
from __future__ import annotations

import torch

from ..api import cross_frame_align_loss
from ..relation_api import token_relation_loss
from ..relation_spec import RelationOptions
from ..spec import LossOptions
from .regularizer import CrepaRegularizer

ALIGNMENT_LOSSES = ("crepa", "trd")


class TokenRelationRegularizer(CrepaRegularizer):
    """lambda * TRD(h_phi(hidden states), encoder targets), VideoREPA (arXiv 2505.23656).

    ``pairs`` and ``margin`` as in :func:`crepa_kernels.token_relation_loss`; every other argument as in
    :class:`CrepaRegularizer` (its CREPA options tau / neighbors / neighbor_mode / normalize_weights are not used).
    Per frame, the loss is the mean of the frame's rows' relation terms over the pairs they count, so that the
    mean over (video, frame) — ``reduction="mean"`` with no sample weights or frame masks — is TRD's mean over all
    counted pairs; sample weights and frame masks then weight and select frames as for CREPA. The logged
    ``self_similarity`` is CREPA's mean cos(p_f, y_f) (one forward-only pass, nothing kept), which a similarity
    threshold of the schedule watches; there is no neighbour similarity.
    """

    def __init__(self, hidden_dim: int, encoder_dim, *, pairs: str = "all", margin: float = 0.0, **kwargs) -> None:
        super().__init__(hidden_dim, encoder_dim, **kwargs)
        if self.similarity_signal != "self":  # "total" and "normalized" are sums over CREPA's neighbour terms
            raise ValueError(f"similarity_signal: loss='trd' watches the self similarity ('self'), got "
                             f"{self.similarity_signal!r}")
        self.relation = RelationOptions(pairs=pairs, margin=margin, reduction="none", eps=self.options.eps)

    def extra_repr(self) -> str:
        return f"loss='trd', pairs={self.relation.pairs!r}, margin={self.relation.margin}, " + super().extra_repr()

    def _per_frame_loss(self, proj: torch.Tensor, target: torch.Tensor, options: LossOptions) -> torch.Tensor:
        frames, tokens = proj.shape[1], proj.shape[2]
        keys = {"all": frames * tokens, "spatial": tokens, "temporal": (frames - 1) * tokens}[self.relation.pairs]
        if keys == 0:
            raise ValueError(f"pairs='temporal' needs at least 2 frames, got {frames}")
        per_frame = token_relation_loss(proj, target, pairs=self.relation.pairs, margin=self.relation.margin,
                                        reduction="none", eps=self.relation.eps, backend=self.backend)
        return per_frame / (tokens * keys)  # each frame's N rows count `keys` pairs each

    @torch.no_grad()
    def _figures(self, proj, target, per_frame, frame_mask, options):
        """(self similarity, no neighbour similarity, the self similarity as the cutoff's signal)."""
        included = torch.ones_like(per_frame) if frame_mask is None else frame_mask.to(per_frame.dtype)
        similarity = -cross_frame_align_loss(proj, target, neighbors=0, reduction="none", eps=self.options.eps,
                                             backend=self.backend)
        self_similarity = (similarity * included).sum() / included.sum()
        return self_similarity, None, self_similarity


def alignment_regularizer(hidden_dim: int, encoder_dim, *, loss: str = "crepa", pairs: str = "all",
                          margin: float = 0.0, **kwargs) -> CrepaRegularizer:
    """CrepaRegularizer for loss="crepa" (pairs and margin must stay at their defaults), TokenRelationRegularizer
    for loss="trd"."""
    if loss not in ALIGNMENT_LOSSES:
        raise ValueError(f"loss: expected one of {ALIGNMENT_LOSSES}, got {loss!r}")
    if loss == "crepa":
        if pairs != "all" or margin != 0.0:
            raise ValueError(f"pairs and margin are options of loss='trd', got pairs={pairs!r}, margin={margin!r} "
                             "with loss='crepa'")
        return CrepaRegularizer(hidden_dim, encoder_dim, **kwargs)
    return TokenRelationRegularizer(hidden_dim, encoder_dim, pairs=pairs, margin=margin, **kwargs)
