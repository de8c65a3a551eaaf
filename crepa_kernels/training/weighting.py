"""Per-sample weights and frame masks for the alignment loss, and the reduction that honours them.

``sample_weight`` [B] scales each video's alignment loss, typically as a function of its diffusion time; the
helpers below give the common shapes as functions of the rectified-flow time t in [0, 1] (t = 1 is pure noise),
all in [0, 1] and largest for the least noisy inputs, where the DiT can see the content it is asked to align:

* hard:    1 where t <= threshold, else 0;
* sigmoid: sigmoid(sharpness * (center - t));
* cosine:  (1 + cos(pi t)) / 2;
* snr:     SNR / (1 + SNR) with SNR = ((1 - t) / t)^2, the signal-to-noise ratio of x_t = (1 - t) x_0 + t noise,
           i.e. (1 - t)^2 / ((1 - t)^2 + t^2).

``frame_mask`` [B, F] (True = in the loss) leaves frames out of the loss, e.g. the conditioning frames of
image-to-video training. A masked frame f loses its own term L[b, f], so its projected states get no gradient,
but its encoder features still serve as the neighbour targets y_f of frames f - 1 and f + 1 (conditioning frames
are real content of the video). This is exactly the per-frame loss of ``reduction="none"`` with rows dropped, so
no kernel changes.

Reductions of the per-frame loss L [B, F] with weights w [B] and mask m [B, F]:
* "mean":      sum_{b,f} w_b m_bf L_bf / sum_{b,f} m_bf   (the mean over the frames actually included);
* "frame_sum": sum_{b,f} w_b m_bf L_bf / #{b : some m_bf}  (per video a sum over frames, then the mean over the
  videos that have an included frame);
* "none":      w_b m_bf L_bf.
The weights scale, they do not renormalise: a batch whose weights are all 0.5 gives half the loss (with the
denominator a sum of weights it would give the same loss, and a timestep weighting would have no effect on a
batch of equally noisy videos). With nothing included the loss is 0.
"""
from __future__ import annotations

import math

import torch

from ..spec import reduce_frames


def hard_timestep_weight(t: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return (t <= threshold).to(t.dtype if t.is_floating_point() else torch.float32)


def sigmoid_timestep_weight(t: torch.Tensor, center: float = 0.5, sharpness: float = 10.0) -> torch.Tensor:
    return torch.sigmoid(sharpness * (center - t))


def cosine_timestep_weight(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def snr_timestep_weight(t: torch.Tensor) -> torch.Tensor:
    signal, noise = (1.0 - t) ** 2, t ** 2
    return signal / (signal + noise)


TIMESTEP_WEIGHTS = {
    "hard": hard_timestep_weight,
    "sigmoid": sigmoid_timestep_weight,
    "cosine": cosine_timestep_weight,
    "snr": snr_timestep_weight,
}


def timestep_weight(kind: str, t: torch.Tensor, **options) -> torch.Tensor:
    """``TIMESTEP_WEIGHTS[kind](t, **options)``, with a clear error for an unknown kind."""
    if kind not in TIMESTEP_WEIGHTS:
        raise ValueError(f"kind: expected one of {tuple(TIMESTEP_WEIGHTS)}, got {kind!r}")
    return TIMESTEP_WEIGHTS[kind](t, **options)


def check_weights(per_frame_shape: torch.Size, sample_weight: torch.Tensor | None,
                  frame_mask: torch.Tensor | None, device: torch.device | None = None) -> None:
    """Shapes and dtypes of the weights and the mask against the per-frame loss [B, F], and their device against
    ``device`` (where the loss is computed) when given."""
    batch, frames = per_frame_shape
    for name, value in (("sample_weight", sample_weight), ("frame_mask", frame_mask)):
        if value is not None and device is not None and value.device != device:
            raise ValueError(f"{name}: expected a tensor on {device}, where the loss is computed, got one on "
                             f"{value.device}")
    if sample_weight is not None and tuple(sample_weight.shape) != (batch,):
        raise ValueError(f"sample_weight: expected shape [{batch}] (one weight per video), "
                         f"got {tuple(sample_weight.shape)}")
    if sample_weight is not None and not sample_weight.is_floating_point():
        raise TypeError(f"sample_weight: expected a floating-point tensor, got {sample_weight.dtype}")
    if frame_mask is not None and tuple(frame_mask.shape) != (batch, frames):
        raise ValueError(f"frame_mask: expected shape [{batch}, {frames}] (videos, token frames), "
                         f"got {tuple(frame_mask.shape)}")
    if frame_mask is not None and frame_mask.dtype != torch.bool:
        raise TypeError(f"frame_mask: expected a bool tensor (True = in the loss), got {frame_mask.dtype}")


def reduce_weighted(per_frame: torch.Tensor, reduction: str, sample_weight: torch.Tensor | None = None,
                    frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The per-frame loss [B, F] reduced as described in the module docstring (without weights and mask: exactly
    :func:`crepa_kernels.spec.reduce_frames`)."""
    if sample_weight is None and frame_mask is None:
        return reduce_frames(per_frame, reduction)
    check_weights(per_frame.shape, sample_weight, frame_mask, per_frame.device)
    scale = torch.ones_like(per_frame)
    if frame_mask is not None:
        scale = scale * frame_mask.to(per_frame.dtype)
    included = scale  # 0/1: which frames count in the denominator
    if sample_weight is not None:
        scale = scale * sample_weight.to(per_frame.dtype)[:, None]
    weighted = per_frame * scale
    if reduction == "none":
        return weighted
    if reduction == "mean":
        return weighted.sum() / included.sum().clamp(min=1)
    videos = (included.sum(dim=1) > 0).sum().clamp(min=1)  # "frame_sum"
    return weighted.sum() / videos
