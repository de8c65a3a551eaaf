"""The rectified-flow pieces of a training step, as Wan, HunyuanVideo and LTX are trained.

x_t = (1 - t) x_0 + t * noise for t in [0, 1] (t = 1 is pure noise); the model predicts the velocity
dx_t/dt = noise - x_0. diffusers' flow-matching transformers take the timestep as t * 1000.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TIMESTEP_SCALE = 1000.0  # diffusers' FlowMatchEulerDiscreteScheduler: timestep = sigma * num_train_timesteps


def rectified_flow_pair(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity target) for latents [B, ...], noise of the same shape and t [B] in [0, 1]."""
    if noise.shape != latents.shape:
        raise ValueError(f"noise: expected the latents' shape {tuple(latents.shape)}, got {tuple(noise.shape)}")
    if t.shape != latents.shape[:1]:
        raise ValueError(f"t: expected shape [{latents.shape[0]}] (one time per sample), got {tuple(t.shape)}")
    t = t.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return (1 - t) * latents + t * noise, noise - latents


def flow_matching_loss(prediction: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted velocity, computed in fp32 at least (the prediction is bf16 under
    autocast)."""
    dtype = torch.promote_types(torch.promote_types(prediction.dtype, velocity.dtype), torch.float32)
    return F.mse_loss(prediction.to(dtype), velocity.to(dtype))
