"""Mapping frozen encoder features onto the DiT's latent token grid, so that every DiT token has a target.

The encoder (DINOv2, VideoMAE, ...) sees the F_pix pixel frames on its own patch grid (h, w); the DiT sees the VAE
latents, F_lat = (F_pix - 1) / r + 1 frames (r = 4 for Wan and CogVideoX, 8 for LTX), patchified to (H', W').
The encoder side is resampled, never the DiT side: the DiT's tokens are what is trained, and its grid is fixed
by the VAE and the patch size.

* Time: the causal VAE encodes pixel frame 0 alone into latent frame 0 and each later group of r pixel frames
  into one latent frame. "mean" averages each group; "subsample" takes its last frame (pixel frames 0, r, 2r, ...).
* Space: bilinear interpolation of each frame's (h, w) feature map to (H', W') with half-pixel centres
  (align_corners=False), antialiased when shrinking. Interpolating the flattened h*w token sequence in 1-D instead
  would mix tokens from different rows and break spatial correspondence whenever h != H' or w != W'.

Both steps are linear in the features, so their order does not matter; time goes first because it shrinks the data.
Tokens come out frame-major, (f, y, x) with x fastest, as diffusers' patch embeddings flatten them.

The upstream trainers' own conventions, for reproducing their runs (docs/porting.md): :func:`pick_frames` (frames
picked at linspace(0, F - 1, n) rounded down, any frame counts, either side), :func:`resample_tokens` (1-D linear
interpolation over each frame's flattened token sequence) and :func:`resample_token_grid` (SimpleTuner's rule:
bilinear on square token counts, else 1-D).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TEMPORAL_MODES = ("mean", "subsample")


def latent_frame_count(num_pixel_frames: int, temporal_ratio: int) -> int:
    """(F_pix - 1) / r + 1, checking that r divides F_pix - 1."""
    if temporal_ratio < 1:
        raise ValueError(f"temporal_ratio: expected a positive int, got {temporal_ratio}")
    if num_pixel_frames < 1 or (num_pixel_frames - 1) % temporal_ratio != 0:
        raise ValueError(
            f"num_pixel_frames: a causal VAE with temporal ratio {temporal_ratio} needs 1 + k * {temporal_ratio} "
            f"frames, got {num_pixel_frames}"
        )
    return (num_pixel_frames - 1) // temporal_ratio + 1


def pool_frames(features: torch.Tensor, temporal_ratio: int, mode: str = "mean") -> torch.Tensor:
    """[B, F_pix, ...] -> [B, F_lat, ...]: frame 0 alone, then one frame per group of ``temporal_ratio`` frames."""
    if mode not in TEMPORAL_MODES:
        raise ValueError(f"mode: expected one of {TEMPORAL_MODES}, got {mode!r}")
    num_latent = latent_frame_count(features.shape[1], temporal_ratio)
    if num_latent == features.shape[1]:
        return features
    groups = features[:, 1:].unflatten(1, (num_latent - 1, temporal_ratio))
    pooled = groups.mean(dim=2) if mode == "mean" else groups[:, :, -1]
    return torch.cat([features[:, :1], pooled], dim=1)


def group_frames(features: torch.Tensor, frames_per_token: int, mode: str = "mean") -> torch.Tensor:
    """[B, F_lat, ...] -> [B, F_lat / p_t, ...]: one frame per group of p_t latent frames (temporal patch size)."""
    if mode not in TEMPORAL_MODES:
        raise ValueError(f"mode: expected one of {TEMPORAL_MODES}, got {mode!r}")
    if frames_per_token == 1:
        return features
    if features.shape[1] % frames_per_token != 0:
        raise ValueError(f"temporal patch size {frames_per_token} does not divide {features.shape[1]} latent frames")
    groups = features.unflatten(1, (features.shape[1] // frames_per_token, frames_per_token))
    return groups.mean(dim=2) if mode == "mean" else groups[:, :, -1]


def resize_frames(features: torch.Tensor, size: tuple[int, int], *, antialias: bool = True) -> torch.Tensor:
    """[B, F, h, w, D] -> [B, F, H, W, D] by 2-D bilinear interpolation of each frame, computed in fp32 or wider."""
    batch, frames, height, width, channels = features.shape
    if (height, width) == tuple(size):
        return features
    wide = torch.promote_types(features.dtype, torch.float32)
    maps = features.to(wide).permute(0, 1, 4, 2, 3).reshape(batch * frames, channels, height, width)
    resized = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)
    return resized.reshape(batch, frames, channels, *size).permute(0, 1, 3, 4, 2).to(features.dtype)


def dit_token_grid(latent_shape: tuple[int, int, int], patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """(F_lat, H_lat, W_lat) latents and the DiT's (p_t, p_h, p_w) patch size -> its (F', H', W') token grid."""
    for extent, patch in zip(latent_shape, patch_size):
        if extent % patch != 0:
            raise ValueError(f"patch size {tuple(patch_size)} does not divide the latent shape {tuple(latent_shape)}")
    return tuple(extent // patch for extent, patch in zip(latent_shape, patch_size))


def encoder_features_to_tokens(
    features: torch.Tensor,
    token_grid: tuple[int, int, int],
    *,
    temporal_ratio: int,
    temporal_patch: int = 1,
    temporal_mode: str = "mean",
    antialias: bool = True,
) -> torch.Tensor:
    """Per-pixel-frame encoder features [B, F_pix, h, w, D] -> targets [B, F', H' * W', D] on the DiT token grid.

    ``token_grid`` is the DiT's (F', H', W') (see :func:`dit_token_grid`); ``temporal_ratio`` the VAE's r;
    ``temporal_patch`` the DiT's p_t (1 for Wan, 2 for CogVideoX 1.5).
    """
    if features.dim() != 5:
        raise ValueError(f"features: expected [B, F_pix, h, w, D], got shape {tuple(features.shape)}")
    frames = group_frames(pool_frames(features, temporal_ratio, temporal_mode), temporal_patch, temporal_mode)
    if frames.shape[1] != token_grid[0]:
        raise ValueError(
            f"{features.shape[1]} pixel frames give {frames.shape[1]} token frames, the DiT grid has {token_grid[0]}"
        )
    return resize_frames(frames, token_grid[1:], antialias=antialias).flatten(2, 3)


def pick_frames(features: torch.Tensor, count: int) -> torch.Tensor:
    """[B, F, ...] -> [B, count, ...]: the frames at linspace(0, F - 1, count) (float32, rounded down), as SimpleTuner
    and musubi-tuner pick encoder frames, and SimpleTuner the DiT's frames when the DiT has more. Any F >= count;
    for a causal VAE's F = 1 + r (count - 1) these are pool_frames(..., mode="subsample")'s frames."""
    frames = features.shape[1]
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= frames:
        raise ValueError(f"count: expected an int in [1, {frames}] (the frames of features), got {count!r}")
    if count == frames:
        return features
    index = torch.linspace(0, frames - 1, count, dtype=torch.float32, device=features.device).long()
    return features.index_select(1, index)


def resample_tokens(features: torch.Tensor, count: int) -> torch.Tensor:
    """[B, F, N, D] -> [B, F, count, D]: 1-D linear interpolation over each frame's flattened token sequence with
    half-token centres (align_corners=False), computed in fp32 or wider, as musubi-tuner (dino mode, minimax-h3)
    resamples the DiT's tokens to the encoder's count. On a 2-D grid it mixes tokens of different rows (see the
    module docstring): an upstream convention to reproduce, not a mapping of ours."""
    if features.dim() != 4:
        raise ValueError(f"features: expected [B, F, N, D], got shape {tuple(features.shape)}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count: expected a positive int, got {count!r}")
    batch, frames, tokens, channels = features.shape
    if tokens == count:
        return features
    wide = torch.promote_types(features.dtype, torch.float32)
    rows = features.to(wide).reshape(batch * frames, tokens, channels).transpose(1, 2)
    resampled = F.interpolate(rows, size=count, mode="linear", align_corners=False)
    return resampled.transpose(1, 2).reshape(batch, frames, count, channels).to(features.dtype)


def resample_token_grid(features: torch.Tensor, count: int) -> torch.Tensor:
    """[B, F, N, D] -> [B, F, count, D] by SimpleTuner's rule: when N and count are both perfect squares, bilinear
    interpolation (align_corners=False, no antialiasing) of the square token maps; otherwise resample_tokens."""
    batch, frames, tokens, channels = features.shape
    side, new_side = math.isqrt(tokens), math.isqrt(count)
    if tokens == count or side * side != tokens or new_side * new_side != count:
        return resample_tokens(features, count)
    grid = features.reshape(batch, frames, side, side, channels)
    return resize_frames(grid, (new_side, new_side), antialias=False).flatten(2, 3)


def spatial_normalize(features: torch.Tensor, gamma: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial normalisation of targets [B, F, N, D]: per frame and channel over the N tokens,
    (x - gamma * mean) / (std + eps), std with Bessel's correction, computed in fp32 or wider. gamma = 1 is a
    spatial z-score: what is common to all of a frame's tokens is removed and only the spatial pattern remains."""
    if features.dim() != 4:
        raise ValueError(f"features: expected [B, F, N, D], got shape {tuple(features.shape)}")
    if features.shape[2] < 2:
        raise ValueError(f"features: a spatial normalisation needs at least 2 tokens per frame, got {features.shape[2]}")
    wide = features.to(torch.promote_types(features.dtype, torch.float32))
    mean = wide.mean(dim=2, keepdim=True)
    std = wide.std(dim=2, keepdim=True)
    return ((wide - gamma * mean) / (std + eps)).to(features.dtype)
