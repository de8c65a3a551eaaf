"""Synthetic stand-ins for the data side of examples/train_dit.py: videos, a causal video VAE and a frame-wise image
encoder with content-dependent flicker, all fixed random modules seeded once. Nothing is downloaded.

``config`` below is the trainer's TrainConfig (any object with the same fields).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from crepa_kernels.training import latent_frame_count, pool_frames


class FrozenVideoVAE(nn.Module):
    """Stands in for a causal video VAE: frame 0 alone and groups of r frames averaged, s x s average pooling and a
    fixed random channel mix. Only the latent shape and the frame grouping matter here."""

    def __init__(self, config, generator: torch.Generator) -> None:
        super().__init__()
        self.temporal_ratio, self.spatial_ratio = config.temporal_ratio, config.spatial_ratio
        self.register_buffer("mix", torch.randn(config.latent_channels, 3, generator=generator) / math.sqrt(3))

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:  # [B, 3, F_pix, H, W] -> [B, C, F_lat, H/s, W/s]
        frames = pool_frames(video.transpose(1, 2), self.temporal_ratio, "mean")  # [B, F_lat, 3, H, W]
        pooled = F.avg_pool2d(frames.flatten(0, 1), self.spatial_ratio).unflatten(0, frames.shape[:2])
        return torch.einsum("oc,bfchw->bofhw", self.mix, pooled)


class FrozenPatchEncoder(nn.Module):
    """Stands in for a frame-wise image encoder such as DINOv2, with a temporal inconsistency that depends on content.

    Each pixel frame is resized to a square (as DINOv2 is fed), embedded by a fixed random conv patch encoder and
    layer-normalised per token (DINOv2 ends in a LayerNorm), so every token's feature has unit RMS. An image encoder
    sees one frame at a time, and nothing keeps its features consistent across small changes of the input; that is
    modelled by adding to every token of frame i the vector ``encoder_flicker`` * h(b_i), where b_i is the frame's
    mean brightness (over pixels and colour channels) and h a fixed random high-gain function of it:
        h(b) = sqrt(2) * W sin(gain * k * b + phi),  k ~ N(0, 1)^m, phi ~ U(0, 2 pi)^m, W ~ N(0, 1/m)^(D x m),
    unit RMS per component. A brightness change of 1/gain turns wave j's phase by |k_j| radians, so frames that look
    almost alike get clearly different features; unlike a flicker tied to the frame index, it is a deterministic
    function of what the frame shows, which the DiT can see (the VAE keeps each latent frame's mean colour).
    """

    flicker_waves = 8

    def __init__(self, config, generator: torch.Generator) -> None:
        super().__init__()
        self.resolution = config.encoder_resolution
        self.flicker_scale = config.encoder_flicker
        self.patchify = nn.Conv2d(3, config.encoder_dim, config.encoder_patch, stride=config.encoder_patch)
        self.mix = nn.Conv2d(config.encoder_dim, config.encoder_dim, 1)
        with torch.no_grad():
            for conv in (self.patchify, self.mix):
                # weights N(0, 1/fan_in) keep the activations' scale; zero biases, so no constant direction
                # dominates the features (N(0, 1) biases gave a mean pairwise token cosine of 0.87)
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / math.sqrt(fan_in))
                conv.bias.zero_()
        self.requires_grad_(False)
        m = self.flicker_waves
        self.register_buffer("flicker_frequency", config.encoder_flicker_gain * torch.randn(m, generator=generator))
        self.register_buffer("flicker_phase", 2 * math.pi * torch.rand(m, generator=generator))
        self.register_buffer("flicker_mix", torch.randn(config.encoder_dim, m, generator=generator) / math.sqrt(m))

    def flicker(self, video: torch.Tensor) -> torch.Tensor:  # [B, 3, F_pix, H, W] -> [B, F_pix, D]
        brightness = video.mean(dim=(1, 3, 4))
        waves = torch.sin(brightness[..., None] * self.flicker_frequency + self.flicker_phase)
        return self.flicker_scale * math.sqrt(2) * waves @ self.flicker_mix.T

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:  # [B, 3, F_pix, H, W] -> [B, F_pix, h, w, D]
        frames = video.transpose(1, 2).flatten(0, 1)
        frames = F.interpolate(frames, size=(self.resolution,) * 2, mode="bilinear", antialias=True)
        features = self.mix(F.gelu(self.patchify(frames))).permute(0, 2, 3, 1)
        features = F.layer_norm(features, features.shape[-1:]).unflatten(0, (video.shape[0], video.shape[2]))
        return features + self.flicker(video)[:, :, None, None, :]


def synthetic_batch(config, step: int, videos: int | None = None) -> dict[str, torch.Tensor]:
    """The global batch of a step, the same on every rank: smoothly moving sinusoid videos under a slowly changing
    illumination, noise, times, text embeddings. The videos do not flicker: only the encoder's features do
    (FrozenPatchEncoder), as a function of each frame's brightness."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    b = config.global_batch if videos is None else videos
    f, h, w = config.pixel_frames, config.height, config.width
    waves = 3
    frequency = torch.randn(b, waves, 2, generator=g) * 0.1  # radians per pixel, (y, x): survives the 8x VAE
    velocity = torch.randn(b, waves, generator=g) * 0.1  # radians per pixel frame: smooth motion
    phase = torch.rand(b, waves, generator=g) * 2 * math.pi
    amplitude = torch.randn(b, waves, 3, generator=g) / math.sqrt(waves)
    y = torch.arange(h, dtype=torch.float32).view(1, 1, 1, h, 1)
    x = torch.arange(w, dtype=torch.float32).view(1, 1, 1, 1, w)
    t = torch.arange(f, dtype=torch.float32).view(1, 1, f, 1, 1)
    angle = (frequency[..., 0, None, None, None] * y + frequency[..., 1, None, None, None] * x
             + velocity[..., None, None, None] * t + phase[..., None, None, None])  # [B, waves, F, H, W]
    video = torch.einsum("bkc,bkfhw->bcfhw", amplitude, torch.sin(angle))
    # a grey level added to the whole frame, changing at 0.1-0.3 radians per frame: smooth, but never static
    sign = torch.randint(0, 2, (b, 1), generator=g) * 2 - 1
    light_velocity = sign * (0.1 + 0.2 * torch.rand(b, 1, generator=g))
    light_phase = torch.rand(b, 1, generator=g) * 2 * math.pi
    light = config.illumination * torch.sin(light_velocity * t.view(1, f) + light_phase)  # [B, F]
    video = video + light[:, None, :, None, None]
    latent_frames = latent_frame_count(f, config.temporal_ratio)
    latent_shape = (b, config.latent_channels, latent_frames, h // config.spatial_ratio, w // config.spatial_ratio)
    return {
        "video": video,
        "noise": torch.randn(latent_shape, generator=g),
        "t": torch.rand(b, generator=g),
        "text": torch.randn(b, config.text_tokens, 32, generator=g),
    }


def diagnostics_batch(config) -> dict[str, torch.Tensor]:
    """A fixed batch no training step sees (step -1), every video at noise level ``diagnostics_t``."""
    batch = synthetic_batch(config, -1, videos=config.diagnostics_videos)
    batch["t"] = torch.full_like(batch["t"], config.diagnostics_t)
    return batch

