"""The rectified-flow pieces of a training step, as Wan, HunyuanVideo and LTX are trained.

x_t = (1 - t) x_0 + t * noise for t in [0, 1] (t = 1 is pure noise); the model predicts the velocity
dx_t/dt = noise - x_0. diffusers' flow-matching transformers take the timestep as t * 1000.
"""
from __future__ import annotations

import math
from typing import NamedTuple

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


class SelfFlowViews(NamedTuple):
    """The two noisy views of SimpleTuner's self-flow token masking (``crepa_self_flow_mask_ratio``)."""

    student_latents: torch.Tensor  # [B, C, F, H, W]: masked tokens noised at alt_t, the others at t
    teacher_latents: torch.Tensor  # [B, C, F, H, W]: every token at min(t, alt_t), the cleaner of the two
    token_mask: torch.Tensor  # [B, F // p_t, H // p_h, W // p_w] bool: the tokens noised at alt_t
    token_t: torch.Tensor  # [B, tokens] (frame-major, the DiT's token order): the student's time of each token
    teacher_t: torch.Tensor  # [B]: min(t, alt_t)


def self_flow_views(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alt_t: torch.Tensor,
                    patch_size: tuple[int, int, int], mask_ratio: float,
                    generator: torch.Generator) -> SelfFlowViews:
    """SimpleTuner's self-flow views: each token of the DiT's patch grid is masked with probability ``mask_ratio``
    (one uniform draw per token from ``generator``, on the latents' device and in their dtype, masked where it is
    below the ratio); masked tokens of the student's view are noised at ``alt_t``, the rest at ``t``; the EMA
    teacher's view is noised at min(t, alt_t) everywhere. The velocity target noise - latents does not depend on the time, so it is the one
    :func:`rectified_flow_pair` gives. Timesteps are these times times :data:`TIMESTEP_SCALE`."""
    if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or not latents.is_floating_point():
        raise TypeError(f"latents: expected a floating tensor [B, C, F, H, W], got "
                        f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
    if not isinstance(noise, torch.Tensor) or noise.shape != latents.shape:
        raise ValueError(f"noise: expected the latents' shape {tuple(latents.shape)}, got "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    for name, times in (("t", t), ("alt_t", alt_t)):
        if not isinstance(times, torch.Tensor) or times.shape != latents.shape[:1]:
            raise ValueError(f"{name}: expected shape [{latents.shape[0]}] (one time per sample), got "
                             f"{tuple(times.shape) if isinstance(times, torch.Tensor) else type(times).__name__}")
    if (not isinstance(patch_size, (tuple, list)) or len(patch_size) != 3
            or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch_size)):
        raise ValueError(f"patch_size: expected three positive ints (p_t, p_h, p_w), got {patch_size!r}")
    if any(size % p for size, p in zip(latents.shape[2:], patch_size)):
        raise ValueError(f"patch_size: expected (p_t, p_h, p_w) dividing the latents' (F, H, W) = "
                         f"{tuple(latents.shape[2:])}, got {tuple(patch_size)}")
    if (not isinstance(mask_ratio, (int, float)) or isinstance(mask_ratio, bool) or not math.isfinite(mask_ratio)
            or not 0.0 <= mask_ratio <= 1.0):
        raise ValueError(f"mask_ratio: expected a number in [0, 1], got {mask_ratio!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != latents.device.type:
        raise ValueError(f"generator: expected one on the latents' device ({latents.device.type}), got one on "
                         f"{generator.device.type}")

    grid = tuple(size // p for size, p in zip(latents.shape[2:], patch_size))
    # a draw below the ratio: ratio 0 masks nothing and ratio 1 everything (the draws lie in [0, 1))
    token_mask = torch.rand((latents.shape[0], *grid), generator=generator, device=latents.device,
                            dtype=latents.dtype) < mask_ratio
    t, alt_t = t.to(latents.dtype), alt_t.to(latents.dtype)
    token_t = torch.where(token_mask, alt_t.view(-1, 1, 1, 1), t.view(-1, 1, 1, 1))
    student_t = token_t
    for dim, p in zip((1, 2, 3), patch_size):  # each token's time on its p_t x p_h x p_w latent pixels
        student_t = student_t.repeat_interleave(p, dim=dim)
    student_t = student_t.unsqueeze(1)  # broadcast over the channels
    teacher_t = torch.minimum(t, alt_t)
    teacher_view = teacher_t.view(-1, 1, 1, 1, 1)
    return SelfFlowViews(
        student_latents=(1 - student_t) * latents + student_t * noise,
        teacher_latents=(1 - teacher_view) * latents + teacher_view * noise,
        token_mask=token_mask, token_t=token_t.flatten(1), teacher_t=teacher_t,
    )
