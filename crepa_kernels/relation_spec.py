"""What the token relation distillation (TRD) loss is: its options, argument checks and pair counting.

VideoREPA's TRD (arXiv 2505.23656) matches the cosine-similarity matrix of the projected DiT tokens to the
encoder's. For one sample with T = F*N tokens (frame-major: token t is in frame t // N):

    p^ = p / max(|p|, eps),  y^ = y / max(|y|, eps)                      (the package's cosine convention)
    delta[i, j] = p^_i . p^_j - y^_i . y^_j
    term[i, j]  = relu(|delta[i, j]| - margin)

``pairs`` chooses the (i, j) that count: "all" (every ordered pair, the diagonal included), "spatial" (same
frame) or "temporal" (different frames). ``anchors`` restricts j to a list of token positions in [0, T) (a
position listed twice counts twice). The per-frame loss is L[b, f] = sum over i in frame f, counted j of term;
reduction "mean" divides the total by the number M of counted pairs over the batch, "none" returns L [B, F].

Every backend receives inputs that passed through here: proj and target [B, F, N, D] views (spec.as_frames), a
validated :class:`RelationOptions`, and the anchors as a per-token multiplicity ``key_weight`` [T].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .spec import _is_real_number

PAIRS = ("all", "spatial", "temporal")
RELATION_REDUCTIONS = ("mean", "none")


@dataclass(frozen=True)
class RelationOptions:
    pairs: str = "all"
    margin: float = 0.0
    reduction: str = "mean"
    eps: float = 1e-12

    def __post_init__(self) -> None:
        check_relation_options(self)


def check_relation_options(options: RelationOptions) -> None:
    if not isinstance(options.pairs, str) or options.pairs not in PAIRS:
        raise ValueError(f"pairs: expected one of {PAIRS}, got {options.pairs!r}")
    if not _is_real_number(options.margin):
        raise TypeError(f"margin: expected a non-negative finite number, got {type(options.margin).__name__} "
                        f"{options.margin!r}")
    if not (options.margin >= 0 and options.margin < math.inf):
        raise ValueError(f"margin: expected a non-negative finite number, got {options.margin!r}")
    if not isinstance(options.reduction, str) or options.reduction not in RELATION_REDUCTIONS:
        raise ValueError(f"reduction: expected one of {RELATION_REDUCTIONS}, got {options.reduction!r}")
    if not _is_real_number(options.eps):
        raise TypeError(f"eps: expected a positive finite number, got {type(options.eps).__name__} {options.eps!r}")
    if not (options.eps > 0 and options.eps < math.inf):
        raise ValueError(f"eps: expected a positive finite number, got {options.eps!r}")


def check_anchors(anchors, tokens: int) -> None:
    """anchors: None, or a non-empty 1-D integer tensor of token positions in [0, tokens)."""
    if anchors is None:
        return
    if not isinstance(anchors, torch.Tensor):
        raise TypeError(f"anchors: expected None or a 1-D integer torch.Tensor, got {type(anchors).__name__}")
    if anchors.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"anchors: expected an integer dtype, got {anchors.dtype}")
    if anchors.dim() != 1 or anchors.numel() == 0:
        raise ValueError(f"anchors: expected a non-empty 1-D tensor of token positions, got shape "
                         f"{tuple(anchors.shape)}")
    # a host read (a synchronisation for anchors on a GPU): anchors are a few indices, usually chosen on the host
    low, high = int(anchors.min()), int(anchors.max())
    if low < 0 or high >= tokens:
        raise ValueError(f"anchors: expected token positions in [0, F*N) = [0, {tokens}), got values from {low} "
                         f"to {high}")


def key_weight(anchors, tokens: int, dtype: torch.dtype, device) -> torch.Tensor:
    """a[j]: how many times token position j counts as a j (1 everywhere without anchors), shape [T]."""
    if anchors is None:
        return torch.ones(tokens, dtype=dtype, device=device)
    return torch.bincount(anchors.to(device=device, dtype=torch.int64), minlength=tokens).to(dtype)


def pairs_per_sample(options: RelationOptions, num_frames: int, tokens_per_frame: int, anchors) -> int:
    """The number of (i, j) pairs one sample counts: each counted j (every token, or each listed anchor) pairs with
    the N rows of its frame ("spatial"), the other (F - 1) N rows ("temporal"), or all F N rows ("all"). From the
    sizes alone: no read of device memory."""
    keys = num_frames * tokens_per_frame if anchors is None else anchors.numel()
    rows = {"all": num_frames * tokens_per_frame, "spatial": tokens_per_frame,
            "temporal": (num_frames - 1) * tokens_per_frame}[options.pairs]
    return rows * keys


def check_pair_count(count: float, options: RelationOptions, shape) -> None:
    if options.reduction == "mean" and count == 0:
        raise ValueError(f"pairs={options.pairs!r}: no token pair counts for shape {tuple(shape)} [B, F, N, D] "
                         "(\"temporal\" needs at least 2 frames), so the mean is undefined")
