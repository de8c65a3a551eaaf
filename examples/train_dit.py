"""CREPA inside a real DiT training loop: a tiny diffusers WanTransformer3DModel trained with rectified flow +
lambda * CREPA on synthetic videos, run in lockstep with the reference loss and a fused backend.

    python examples/train_dit.py                                   # lockstep: reference vs --backend (auto)
    python examples/train_dit.py --backend triton --steps 3        # under TRITON_INTERPRET=1 on the CPU
    torchrun --nproc_per_node 2 examples/train_dit.py              # the same under DistributedDataParallel

Both runs start from the same seed and see the same batches; per step the total loss, the alignment loss and the
gradient norm are compared, and the parameters at the end. The exit status is 1 past tolerance. Nothing is
downloaded: the VAE and the encoder (standing in for DINOv2) are fixed random modules seeded once.

Under torchrun each rank trains on its contiguous slice of the same global batch (generated identically on every
rank from the seed and step), so a run on W processes equals a run on one, up to float reduction order.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from crepa_kernels.backends import select_backend
from crepa_kernels.training import (
    CrepaRegularizer,
    HiddenStateCapture,
    dit_token_grid,
    encoder_features_to_tokens,
    latent_frame_count,
    pool_frames,
)

# Largest relative difference allowed between the reference run and the fused run, by compute dtype. Per step:
# the total loss, the alignment loss, the gradient norm before clipping, and that of the projector alone (only the
# alignment loss feeds it, so it is the most direct check of a fused backward); at the end: all parameters as one
# vector, |difference| / |value| in the 2-norm. Per tensor or per element would flag tensors whose gradient is near
# zero, which AdamW's division by sqrt(v) + eps moves by up to lr * |gradient difference| / eps.
# fp32: the two loss implementations differ by reduction order only. Measured on this CPU over 10-20 steps
# (docs/training.md): <= 2e-7 on the per-step metrics (1.7e-6 once, on a total loss where the flow and alignment
# terms nearly cancel) and <= 9e-8 on the parameters, while changing tau by 0.1% (a smaller error than any kernel
# bug we care about) moves the alignment loss and the projector's gradient norm by 4e-4 and the parameters by 5e-5
# within 3 steps. The runs drift apart as training goes on: the bounds are for short lockstep runs (tens of steps).
# bf16 autocast: the projected states and their gradients are bf16, so a 1-ulp fp32 difference can flip the bf16
# rounding (2^-8 relative) of an element. Measured with CPU autocast over 10 steps: 1e-4 (loss), 9e-5 (alignment
# loss), 2.6e-4 and 3e-4 (gradient norms), 7e-5 (parameters); the bounds leave ~7x for GPU kernels, not measured.
TOLERANCES = {
    torch.float32: {"loss": 1e-5, "align_loss": 1e-5, "grad_norm": 1e-5, "projector_grad_norm": 1e-5, "params": 1e-6},
    torch.bfloat16: {"loss": 2e-3, "align_loss": 1e-3, "grad_norm": 1e-2, "projector_grad_norm": 1e-2, "params": 5e-4},
}
# A run on W processes against one process: gradients are averaged over ranks (a different summation order) and
# the DiT's matmuls see a smaller batch, so differences are of fp32 rounding size on both sides.
DISTRIBUTED_TOLERANCES = TOLERANCES


@dataclass
class TrainConfig:
    steps: int = 10
    global_batch: int = 4
    pixel_frames: int = 17  # 1 + 4k for the causal VAE
    height: int = 48
    width: int = 80
    temporal_ratio: int = 4  # Wan's VAE: 4x in time, 8x in space
    spatial_ratio: int = 8
    latent_channels: int = 4
    encoder_resolution: int = 28  # frames are resized to a square, as DINOv2 is fed
    encoder_patch: int = 7
    encoder_dim: int = 48
    text_tokens: int = 7
    align_block: int = 0
    projector_width: int = 128
    projector_depth: int = 3
    loss_weight: float = 0.5  # lambda
    tau: float = 1.0
    neighbors: int = 1
    neighbor_mode: str = "adjacent"
    normalize_weights: bool = False
    reduction: str = "mean"
    temporal_mode: str = "mean"
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    device: str = "cpu"
    precision: str = "auto"  # "fp32", "bf16" (autocast) or "auto": bf16 on CUDA, fp32 on the CPU
    illumination: float = 0.3  # amplitude of each video's slow global brightness change
    encoder_flicker: float = 1.0  # RMS of the encoder's brightness-dependent perturbation (its features have RMS 1)
    encoder_flicker_gain: float = 15.0  # radians per unit of frame brightness: how sensitive the flicker is
    diagnostics_every: int = 0
    diagnostics_json: str | None = None
    diagnostics_videos: int = 16  # the diagnostics use one fixed held-out batch ...
    diagnostics_t: float = 0.1  # ... at this fixed noise level, where the DiT can see each frame's content


@dataclass
class RunResult:
    backend: str  # the module that computed the loss
    records: list[dict]  # per step: loss, flow_loss, align_loss, grad_norm, self/neighbor similarity, step_time_s
    params: dict[str, torch.Tensor]  # final parameters on the CPU (transformer.* and projector.*)
    step_time_s: float  # median over steps after the first
    memory: dict[str, float]


def compute_dtype(config: TrainConfig) -> torch.dtype:
    if config.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision: expected 'auto', 'fp32' or 'bf16', got {config.precision!r}")
    if config.precision == "auto":
        return torch.bfloat16 if torch.device(config.device).type == "cuda" else torch.float32
    return torch.bfloat16 if config.precision == "bf16" else torch.float32


def build_transformer(config: TrainConfig) -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=config.latent_channels,
        out_channels=config.latent_channels, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    )


class FrozenVideoVAE(nn.Module):
    """Stands in for a causal video VAE: frame 0 alone and groups of r frames averaged, s x s average pooling and a
    fixed random channel mix. Only the latent shape and the frame grouping matter here."""

    def __init__(self, config: TrainConfig, generator: torch.Generator) -> None:
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

    def __init__(self, config: TrainConfig, generator: torch.Generator) -> None:
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


def synthetic_batch(config: TrainConfig, step: int, videos: int | None = None) -> dict[str, torch.Tensor]:
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


def diagnostics_batch(config: TrainConfig) -> dict[str, torch.Tensor]:
    """A fixed batch no training step sees (step -1), every video at noise level ``diagnostics_t``."""
    batch = synthetic_batch(config, -1, videos=config.diagnostics_videos)
    batch["t"] = torch.full_like(batch["t"], config.diagnostics_t)
    return batch


class CrepaDiT(nn.Module):
    """The trained modules (transformer + projector) behind one forward, so DDP syncs both."""

    def __init__(self, transformer: nn.Module, regularizer: CrepaRegularizer, align_block: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.regularizer = regularizer
        self.capture = HiddenStateCapture(transformer, align_block)

    def forward(self, noisy, timestep, text, velocity, targets):
        prediction = self.transformer(noisy, timestep, text, return_dict=False)[0]
        flow_loss = F.mse_loss(prediction.float(), velocity.float())
        return flow_loss, self.regularizer(self.capture.pop(), targets)


class PeakMemory:
    """Peak memory of a run: max_memory_allocated on CUDA; on the CPU the peak RSS of the process, whose high-water
    mark is reset at the start (Linux /proc/self/clear_refs), so sequential runs are measured separately."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_reset = _reset_peak_rss()
        self.rss_start_mib = _rss_mib("VmRSS")
        return self

    def __exit__(self, *exc_info) -> None:
        self.figures = {"rss_start_mib": self.rss_start_mib, "peak_rss_mib": _rss_mib("VmHWM"),
                        "peak_rss_is_per_run": self.rss_reset}
        if self.device.type == "cuda":
            self.figures["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _rss_mib(field: str) -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    rank, world = _world()
    if world > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= world
    return values


@torch.no_grad()
def _diagnostics_record(step: int, config: TrainConfig, model: CrepaDiT, noisy, timestep, text, velocity,
                        targets) -> dict:
    """The diagnostics of the model's projected states on the fixed diagnostics batch (diagnostics_batch)."""
    from crepa_kernels import diagnostics  # imported lazily: optional for training

    autocast = (torch.autocast(noisy.device.type, dtype=torch.bfloat16)
                if compute_dtype(config) == torch.bfloat16 else contextlib.nullcontext())
    with autocast:
        _, alignment = model(noisy, timestep, text, velocity, targets)
    projected = alignment.projected.float()
    # one row per token, L2-normalised as in the CKNNA authors' measurement (platonic-rep, normalize=True)
    flat_proj = F.normalize(projected.flatten(0, 2), dim=-1)
    flat_target = F.normalize(targets.flatten(0, 2).float(), dim=-1)
    if flat_proj.shape[0] > 4096:
        keep = torch.randperm(flat_proj.shape[0], generator=torch.Generator().manual_seed(0))[:4096]
        keep = keep.to(flat_proj.device)
        flat_proj, flat_target = flat_proj[keep], flat_target[keep]
    return {
        "step": step,
        "neighbors": config.neighbors,
        "cknna": float(diagnostics.cknna(flat_proj, flat_target)),
        "cross_frame_similarity": diagnostics.cross_frame_similarity(projected, targets).tolist(),
        "smoothness_proj": float(diagnostics.temporal_smoothness(projected)),
        "smoothness_target": float(diagnostics.temporal_smoothness(targets)),
    }


def train(config: TrainConfig, backend: str) -> RunResult:
    """One training run; under an initialised process group, this rank's share of it."""
    if config.reduction == "none":
        raise ValueError("reduction='none' gives no scalar loss to train on")
    rank, world = _world()
    if config.global_batch % world != 0:
        raise ValueError(f"global batch {config.global_batch} does not split over {world} processes")
    device = torch.device(config.device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if compute_dtype(config) == torch.bfloat16
                else contextlib.nullcontext())

    torch.manual_seed(config.seed)
    frozen = torch.Generator().manual_seed(config.seed + 1)
    vae = FrozenVideoVAE(config, frozen).to(device)
    encoder = FrozenPatchEncoder(config, frozen).to(device)
    transformer = build_transformer(config)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    regularizer = CrepaRegularizer(
        transformer.config.num_attention_heads * transformer.config.attention_head_dim, config.encoder_dim,
        loss_weight=config.loss_weight, tau=config.tau, neighbors=config.neighbors, neighbor_mode=config.neighbor_mode,
        normalize_weights=config.normalize_weights, reduction=config.reduction, backend=backend,
        projector_width=config.projector_width, projector_depth=config.projector_depth,
    )
    model = CrepaDiT(transformer, regularizer, config.align_block).to(device)
    trained = model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)

    def model_inputs(batch: dict[str, torch.Tensor], shard: slice = slice(None)) -> tuple[torch.Tensor, ...]:
        """The DiT's inputs, the flow target and the alignment targets of (a shard of) a batch."""
        batch = {name: value[shard].to(device) for name, value in batch.items()}
        x0 = vae(batch["video"])
        grid = dit_token_grid(x0.shape[2:], transformer.config.patch_size)
        targets = encoder_features_to_tokens(encoder(batch["video"]), grid, temporal_ratio=config.temporal_ratio,
                                             temporal_mode=config.temporal_mode)
        t = batch["t"].view(-1, 1, 1, 1, 1)
        noisy = (1 - t) * x0 + t * batch["noise"]  # rectified flow, as Wan is trained
        return noisy, batch["t"] * 1000, batch["text"], batch["noise"] - x0, targets

    records, times = [], []
    with PeakMemory(device) as memory:
        for step in range(config.steps):
            last = step == config.steps - 1
            diagnose = config.diagnostics_every and rank == 0 and (step % config.diagnostics_every == 0 or last)
            if diagnose:  # the model as it is before this step's update: step 0 is the initialisation
                entry = _diagnostics_record(step, config, model, *model_inputs(diagnostics_batch(config)))

            batch = synthetic_batch(config, step)
            shard = slice(rank * config.global_batch // world, (rank + 1) * config.global_batch // world)
            noisy, timestep, text, velocity, targets = model_inputs(batch, shard)

            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with autocast:
                flow_loss, alignment = trained(noisy, timestep, text, velocity, targets)
            loss = flow_loss + alignment.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # the projector's gradient comes from the alignment loss alone: the most sensitive check of its backward
            projector_grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in regularizer.projector.parameters()]))
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)

            neighbor = alignment.neighbor_similarity
            figures = torch.stack([
                loss.detach(), flow_loss.detach(), alignment.align_loss, alignment.self_similarity,
                neighbor if neighbor is not None else torch.full_like(alignment.self_similarity, float("nan")),
            ]).double()
            figures = _mean_over_ranks(figures).tolist()  # the global batch's values: equal shards on every rank
            record = dict(zip(("loss", "flow_loss", "align_loss", "self_similarity", "neighbor_similarity"), figures))
            record.update(step=step, grad_norm=float(grad_norm), projector_grad_norm=float(projector_grad_norm),
                          step_time_s=times[-1])
            records.append(record)

            if diagnose:
                entry["align_loss"] = record["align_loss"]  # of the training batch
                with open(config.diagnostics_json, "a") as out:
                    out.write(json.dumps(entry) + "\n")
    model.capture.remove()

    return RunResult(
        backend=select_backend(backend, device).__name__,
        records=records,
        params={name: value.detach().cpu().clone() for name, value in model.named_parameters()},
        step_time_s=statistics.median(times[1:]) if len(times) > 1 else times[0],
        memory=memory.figures,
    )


def _relative(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-30)  # a NaN on either side gives NaN, which fails every check


def _relative_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    if torch.equal(a, b):
        return 0.0
    return (a - b).norm().item() / max(a.norm().item(), b.norm().item(), 1e-30)


def compare(first: RunResult, second: RunResult, tolerances: dict[str, float]) -> dict[str, dict]:
    """Largest relative differences: per-step metrics (and the step where each peaks), and the final parameters
    (all tensors as one vector, |difference| / |value| in the 2-norm; the tensor differing most is named)."""
    report = {}
    for metric in ("loss", "align_loss", "grad_norm", "projector_grad_norm"):
        diffs = [_relative(a[metric], b[metric]) for a, b in zip(first.records, second.records)]
        if len(first.records) != len(second.records) or not diffs:
            diffs.append(math.inf)
        step = max(range(len(diffs)), key=lambda i: math.inf if math.isnan(diffs[i]) else diffs[i])
        report[metric] = {"max_rel_diff": diffs[step], "step": step, "tolerance": tolerances[metric]}
    names = sorted(first.params)
    if names != sorted(second.params):
        report["params"] = {"max_rel_diff": math.inf, "tensor": "<parameter names differ>"}
    else:
        flat = [torch.cat([run.params[n].double().flatten() for n in names]) for run in (first, second)]
        worst = max(names, key=lambda n: _relative_norm(first.params[n].double(), second.params[n].double()))
        report["params"] = {"max_rel_diff": _relative_norm(*flat), "tensor": worst}
    report["params"]["tolerance"] = tolerances["params"]
    for entry in report.values():
        entry["ok"] = entry["max_rel_diff"] <= entry["tolerance"]  # False for NaN
    return report


def save_params(result: RunResult, path: str) -> None:
    torch.save(result.params, path)


def load_params(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _parse(argv) -> tuple[TrainConfig, argparse.Namespace]:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", help="the fused backend to check (default: auto)")
    parser.add_argument("--reference-backend", default="reference")
    parser.add_argument("--no-lockstep", action="store_true", help="only run --backend, no comparison")
    parser.add_argument("--output", help="write the runs and the comparison as JSON (rank 0)")
    parser.add_argument("--save-params", help="save the final parameters of the --backend run (rank 0), torch.save")
    parser.add_argument("--compare-with", metavar="JSON",
                        help="also compare the --backend run with an earlier run's --output (written with "
                             "--save-params), e.g. one process against torchrun")
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("device",):
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default)
        else:
            parser.add_argument(flag, type=type(default) if default is not None else str, default=default)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if config.diagnostics_every and not config.diagnostics_json:
        parser.error("--diagnostics-every needs --diagnostics-json PATH")
    return config, args


def _summary(result: RunResult) -> dict:
    return {"backend": result.backend, "records": result.records, "step_time_s": result.step_time_s,
            "memory": result.memory}


def _load_run(path: str) -> tuple[dict, RunResult]:
    """A run written by --output with --save-params: its config and its (last) run with the final parameters."""
    with open(path) as source:
        summary = json.load(source)
    if not summary.get("params_path"):
        raise ValueError(f"{path}: written without --save-params, no parameters to compare")
    run = summary["runs"]["fused"]
    return summary["config"], RunResult(backend=run["backend"], records=run["records"],
                                        params=load_params(summary["params_path"]),
                                        step_time_s=run["step_time_s"], memory=run["memory"])


def _print_run(role: str, result: RunResult) -> None:
    memory, last = result.memory, result.records[-1]
    line = (f"{role:9s} {result.backend:34s} {result.step_time_s * 1e3:8.1f} ms/step  "
            f"peak RSS {memory['peak_rss_mib']:.0f} MiB (start {memory['rss_start_mib']:.0f})")
    if "max_memory_allocated_mib" in memory:
        line += f"  max_memory_allocated {memory['max_memory_allocated_mib']:.1f} MiB"
    print(line + f"  final loss {last['loss']:.6f} align {last['align_loss']:.6f}")


def _print_report(title: str, report: dict, dtype: torch.dtype) -> None:
    print(title)
    for metric, entry in report.items():
        where = f"at step {entry['step']}" if "step" in entry else f"(most in {entry['tensor']})"
        print(f"  {metric:19s} max rel diff {entry['max_rel_diff']:.3e} {where}  "
              f"(tolerance {entry['tolerance']:.0e}, {dtype})  {'ok' if entry['ok'] else 'FAIL'}")


def main(argv=None) -> int:
    config, args = _parse(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        device = torch.device(config.device)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            config = dataclasses.replace(config, device=f"cuda:{torch.cuda.current_device()}")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = _world()
    if config.diagnostics_json and rank == 0 and os.path.exists(config.diagnostics_json):
        os.remove(config.diagnostics_json)  # one file per invocation: records are appended while training
    try:
        runs = []
        if not args.no_lockstep:  # the diagnostics are logged for the fused run only
            reference_config = dataclasses.replace(config, diagnostics_every=0)
            runs.append(("reference", train(reference_config, args.reference_backend)))
        runs.append(("fused", train(config, args.backend)))
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank != 0:
        return 0  # every rank holds the same figures; rank 0 reports and decides the exit status

    dtype = compute_dtype(config)
    reports = {}
    for role, result in runs:
        _print_run(role, result)
    if len(runs) == 2:
        if runs[0][1].backend == runs[1][1].backend:
            print(f"note: both runs used {runs[0][1].backend}; the comparison only checks determinism")
        reports["lockstep"] = compare(runs[0][1], runs[1][1], TOLERANCES[dtype])
        _print_report(f"lockstep {args.reference_backend} vs {args.backend}, {world} process(es):",
                      reports["lockstep"], dtype)
    if args.compare_with:
        other_config, other = _load_run(args.compare_with)
        ignored = ("device", "diagnostics_every", "diagnostics_json")
        differing = [k for k, v in dataclasses.asdict(config).items() if k not in ignored and other_config[k] != v]
        if differing:
            raise SystemExit(f"--compare-with {args.compare_with}: a different configuration ({differing})")
        reports["compare_with"] = compare(other, runs[-1][1], DISTRIBUTED_TOLERANCES[dtype])
        _print_report(f"this run ({world} process(es)) vs {args.compare_with}:", reports["compare_with"], dtype)
    if args.save_params:
        save_params(runs[-1][1], args.save_params)
    if args.output:
        with open(args.output, "w") as out:
            json.dump({"config": dataclasses.asdict(config), "world_size": world,
                       "runs": {role: _summary(result) for role, result in runs}, "comparisons": reports,
                       "params_path": os.path.abspath(args.save_params) if args.save_params else None},
                      out, indent=1)
    failed = any(not entry["ok"] for report in reports.values() for entry in report.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
