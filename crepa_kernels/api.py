"""The functional form of the loss; its autograd is CrossFrameAlignFunction's (statistics kept for the backward)."""
from __future__ import annotations

import torch

from .function import align_loss
from .spec import LossOptions


def cross_frame_align_loss(
    proj: torch.Tensor,
    target: torch.Tensor,
    *,
    tau: float = 1.0,
    neighbors: int = 1,
    neighbor_mode: str = "adjacent",
    normalize_weights: bool = False,
    reduction: str = "mean",
    num_frames: int | None = None,
    eps: float = 1e-12,
    backend: str = "auto",
    clamp_neighbors: bool = False,
    weights: str | torch.Tensor = "exponential",
) -> torch.Tensor:
    """CREPA cross-frame representation alignment loss (arXiv 2506.09229).

    Args:
        proj: projected DiT hidden states h_phi(h_t), [B, F, N, D] or frame-major [B, F*N, D].
        target: pretrained encoder features, same layout rules as ``proj``; gradients flow to it if it requires grad.
        tau: the scale of the neighbour weights w(|k - f|): exp(-|k - f| / tau) for weights="exponential",
            exp(-|k - f|^2 / (2 tau^2)) for "gaussian"; > 0. Unused with hand-set weights.
        neighbors: d >= 0. 0 is REPA* (frame-wise alignment only).
        neighbor_mode: "adjacent", K(f) = {f - d, f + d} (the paper), or "cumulative", K(f) = {k: 1 <= |k - f| <= d}.
            Frames outside [0, F) are dropped.
        normalize_weights: divide each frame's weighted similarity by Z_f = 1 + sum of its neighbour weights.
        reduction: "mean" over batch and frames, "frame_sum" (sum over frames, mean over batch) or "none" ([B, F]).
        num_frames: F, required when an input is 3-D.
        eps: norms are clamped to at least eps, as in torch.nn.functional.normalize.
        backend: "auto", "reference", "triton", "cpu" or "cuda". The environment variable CREPA_KERNELS_BACKEND
            overrides "auto". "auto" takes the first backend that can run this call (device, shape, dtypes,
            options), warning once about any it passes over; a named backend that cannot run it raises with the
            reason. ``crepa_kernels.explain_backend`` tells which one a call would use, and why.
        clamp_neighbors: use d = min(neighbors, F - 1) on each call, as SimpleTuner and takenoko do, so that with
            d >= F the frames at distance F - 1 are still aligned (by default they are dropped).
        weights: the neighbour weights w(delta), delta = |k - f| >= 1: "exponential" (the paper's), "gaussian", or
            a 1-D tensor of w[1..neighbors] set by hand (read on the host once per call: for a CUDA tensor or a
            compiled call, build the options once with CrossFrameAlignLoss). Not learnable: a tensor that
            requires grad is refused. normalize_weights applies to all of them.

    Returns:
        The loss, fp32 (fp64 when an input is fp64): a scalar, or [B, F] for reduction="none".
    """
    options = LossOptions(tau=tau, neighbors=neighbors, neighbor_mode=neighbor_mode,
                          normalize_weights=normalize_weights, reduction=reduction, eps=eps,
                          clamp_neighbors=clamp_neighbors, weights=weights)
    return align_loss(proj, target, options, num_frames, backend)
