"""CREPA inside a real DiT training loop: a tiny diffusers WanTransformer3DModel trained with rectified flow +
lambda * CREPA on synthetic videos, run in lockstep with the reference loss and a fused backend.

    python examples/train_dit.py                                   # lockstep: reference vs --backend (auto)
    python examples/train_dit.py --backend triton --steps 3        # under TRITON_INTERPRET=1 on the CPU
    torchrun --nproc_per_node 2 examples/train_dit.py              # the same under DistributedDataParallel
    torchrun --nproc_per_node 2 examples/train_dit.py --fsdp joint # FSDP2 (separate: each projector its own unit)
    torchrun --nproc_per_node 3 examples/train_dit.py --sequence-parallel  # CREPA on sequence shards
    python examples/train_dit.py --loss trd --pairs temporal --margin 0.1  # VideoREPA's TRD instead of CREPA

Both runs start from the same seed and see the same batches; per step the total loss, the alignment loss and the
gradient norm are compared, and the parameters at the end. The exit status is 1 past tolerance. Nothing is
downloaded: the VAE and the encoder (standing in for DINOv2) are fixed random modules seeded once.

Under torchrun each rank trains on its contiguous slice of the same global batch (generated identically on every
rank from the seed and step), so a run on W processes equals a run on one, up to float reduction order.

The targets come from the stand-in encoder by default, from a transformers encoder through its adapter
(``--encoder random:dinov2``, a small random DINOv2 here; a checkpoint name or folder elsewhere), or from an offline
feature cache built beforehand with the same encoder:

    python examples/train_dit.py --encoder random:dinov2 --build-feature-cache cache/    # encode every video once
    python examples/train_dit.py --encoder random:dinov2 --feature-cache cache/          # train without the encoder

Each step's peak memory (targets, forward, backward, update) is recorded and reported for either source.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from crepa_kernels.backends import select_backend
from crepa_kernels.distributed.sharded_training import SequenceParallelRegularizer, full_tensor, shard_model, sum_gradients
from crepa_kernels.spec import WEIGHT_PROFILES
from crepa_kernels.training import (
    CrepaRegularizer,
    CrepaTransformer,
    HiddenStateCapture,
    LambdaSchedule,
    SavedTensorMeter,
    dit_token_grid,
    encoder_features_to_tokens,
    flow_matching_loss,
    latent_frame_count,
    mean_over_ranks,
    rank_and_world,
    rectified_flow_pair,
    save_crepa_state,
    self_flow_views,
    timestep_weight,
)
from crepa_kernels.training.encoders import load_encoder
from crepa_kernels.training.feature_cache import STORAGE_DTYPES, FeatureCache, build_feature_cache
from crepa_kernels.training.flow import TIMESTEP_SCALE
from crepa_kernels.training.relation_regularizer import TokenRelationRegularizer
from crepa_kernels.training.teacher import EmaTeacher, block_targets

# the example's own helpers, next to this file (run as a script, the directory is on sys.path)
from lockstep import (  # noqa: F401  (re-exported for the tests and plot_alignment.py)
    DISTRIBUTED_TOLERANCES,
    TOLERANCES,
    PeakMemory,
    RunResult,
    compare,
    load_run,
    print_report,
    print_run,
    save_params,
    summary,
)
from synthetic_video import FrozenPatchEncoder, FrozenVideoVAE, diagnostics_batch, synthetic_batch  # noqa: F401


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
    align_blocks: str = "0"  # comma-separated indices of the blocks whose output is aligned, e.g. "0,1"
    share_projector: bool = False  # one projector for all aligned blocks instead of one each
    projector: str = "mlp"  # "mlp" (REPA's), "linear" (LayerNorm + Linear) or "conv" (iREPA's 3 x 3 convolution)
    projector_width: int = 128
    projector_depth: int = 3
    checkpoint_projector: bool = False  # recompute the projector's activations in the backward
    loss_weight: float = 0.5  # lambda (the schedule's peak)
    schedule: str = "constant"  # lambda after the warm-up: "constant", "linear", "cosine" or "polynomial" decay
    warmup_steps: int = 0
    decay_steps: int = 0  # 0: decay until the last step
    final_weight: float = 0.0  # lambda at the end of the decay
    schedule_power: float = 1.0  # of the polynomial decay
    cutoff_step: int = -1  # lambda = 0 from this step on (negative: never)
    similarity_threshold: float = math.inf  # lambda = 0 once the all-reduced similarity EMA reaches it
    similarity_ema_decay: float = 0.99
    # upstream trainers' conventions (docs/porting.md has the mapping of each upstream option)
    warmup_nonzero_start: bool = False  # warm-up weight*(s+1)/W instead of upstream's weight*s/W (0 at step 0)
    threshold_mode: str = "permanent"  # or "recoverable": lambda returns once the similarity EMA falls back
    cutoff_timing: str = "next_step"  # or "same_step": the forward's own similarity decides its lambda (upstream)
    similarity_every_step: bool = False  # also fold the similarity into the EMA where the shape gives lambda 0
    similarity_signal: str = "self"  # what the cutoff watches: "self", "total" (SimpleTuner), "normalized" (musubi)
    clamp_neighbors: bool = False  # d = min(neighbors, F - 1), as SimpleTuner and takenoko
    skip_nonfinite: bool = False  # leave out (and count) a step whose alignment loss is not finite, as musubi
    pool_tokens: bool = False  # average each frame's tokens on both sides after the projector (musubi's backbone)
    # targets from the DiT itself: "encoder" (the frozen encoder), "backbone" (a deeper block of the trained DiT, in
    # the same forward: musubi-tuner / takenoko) or "ema_teacher" (that block of an EMA copy of the DiT)
    target_source: str = "encoder"
    teacher_block: int = -1  # the block whose output is the target (backbone / ema_teacher); -1: the last
    teacher_momentum: float = 0.999  # ema_teacher: theta <- m theta + (1 - m) theta_student after each step
    teacher_grad: bool = False  # backbone: let the alignment's gradient reach the teacher block too (takenoko)
    # ema_teacher: SimpleTuner's crepa_self_flow_mask_ratio: this fraction of the student's tokens noised at a second
    # time, the teacher at the cleaner of the two times (0: off)
    self_flow_mask_ratio: float = 0.0
    target_norm: str = "none"  # "spatial": iREPA's spatial normalisation of the targets (per frame, over tokens)
    spatial_norm_gamma: float = 1.0  # the fraction of the token mean it removes (1: a spatial z-score)
    condition_frames: int = 0  # leading token frames of every video left out of the loss, as I2V conditioning
    sample_weighting: str = "none"  # per-video weight from the diffusion time: "hard", "sigmoid", "cosine", "snr"
    tau: float = 1.0
    neighbors: int = 1
    neighbor_mode: str = "adjacent"
    normalize_weights: bool = False
    # the loss's weights: "exponential" (tau), "gaussian" (tau the width), or w[1..neighbors] as "0.5,0.25"
    neighbor_weights: str = "exponential"
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
    encoder: str = "stand-in"  # the targets' encoder: the stand-in, a checkpoint, or random:MODEL_TYPE[:SEED]
    feature_cache: str | None = None  # read the targets from this cache (--build-feature-cache) instead of encoding
    fsdp: str = "off"  # under torchrun: FSDP2 instead of DDP, the projectors "joint" with the model or "separate"
    sequence_parallel: bool = False  # under torchrun: every rank the whole batch, the CREPA loss on its sequence shard
    loss: str = "crepa"  # the alignment loss: "crepa", or "trd" (VideoREPA's token relation distillation)
    pairs: str = "all"  # --loss trd: "all", "spatial" or "temporal" token pairs
    margin: float = 0.0  # --loss trd: relation differences below it cost nothing



def compute_dtype(config: TrainConfig) -> torch.dtype:
    if config.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision: expected 'auto', 'fp32' or 'bf16', got {config.precision!r}")
    if config.precision == "auto":
        return torch.bfloat16 if torch.device(config.device).type == "cuda" else torch.float32
    return torch.bfloat16 if config.precision == "bf16" else torch.float32


PATCH_SIZE = (1, 2, 2)  # the tiny DiT's (p_t, p_h, p_w)


def build_transformer(config: TrainConfig) -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=PATCH_SIZE, num_attention_heads=2, attention_head_dim=16, in_channels=config.latent_channels,
        out_channels=config.latent_channels, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    )



@torch.no_grad()
def _diagnostics_record(step: int, config: TrainConfig, model: CrepaTransformer, noisy, t, text, velocity,
                        targets) -> dict:
    """The diagnostics of the model's projected states on the fixed diagnostics batch (diagnostics_batch), while
    lambda > 0 (afterwards nothing is projected any more)."""
    from crepa_kernels import diagnostics  # imported lazily: optional for training

    autocast = (torch.autocast(noisy.device.type, dtype=torch.bfloat16)
                if compute_dtype(config) == torch.bfloat16 else contextlib.nullcontext())
    with autocast:
        _, alignment = model(noisy, t * TIMESTEP_SCALE, text, targets=targets, return_dict=False)
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



def build_model(config: TrainConfig, backend: str, device: torch.device, encoder_dim: int) -> CrepaTransformer:
    """The trained modules: the DiT and its CREPA regulariser (projector + loss), the capture between them."""
    transformer = build_transformer(config)
    if config.target_source != "encoder":  # the targets are the DiT's own hidden states
        encoder_dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    blocks = align_blocks(config)
    # under --sequence-parallel the transformer runs whole on every rank (no enable_parallelism on a CPU): the
    # regulariser takes each rank's shard of the captured states as diffusers' context-parallel plan would
    regularizer_class, parallel = ((SequenceParallelRegularizer, dict(shard_full_states=True))
                                   if config.sequence_parallel else (CrepaRegularizer, {}))
    if config.loss == "trd":  # VideoREPA's loss on the same projectors, schedule and weighting
        if config.sequence_parallel:
            raise ValueError("--loss trd has no sequence-parallel form: every token pairs with every other")
        regularizer_class, parallel = TokenRelationRegularizer, dict(pairs=config.pairs, margin=config.margin)
    elif config.loss != "crepa":
        raise ValueError(f"loss: expected 'crepa' or 'trd', got {config.loss!r}")
    regularizer = regularizer_class(
        transformer.config.num_attention_heads * transformer.config.attention_head_dim, encoder_dim,
        loss_weight=build_schedule(config), tau=config.tau, neighbors=config.neighbors,
        neighbor_mode=config.neighbor_mode, normalize_weights=config.normalize_weights,
        weights=neighbor_weights(config.neighbor_weights), reduction=config.reduction, backend=backend, projector=config.projector, projector_width=config.projector_width,
        projector_depth=config.projector_depth, checkpoint_projector=config.checkpoint_projector,
        num_layers=len(blocks), share_projector=config.share_projector,
        layer_names=[f"block{index}" for index in blocks], clamp_neighbors=config.clamp_neighbors,
        similarity_signal=config.similarity_signal, skip_nonfinite=config.skip_nonfinite,
        pool_tokens=config.pool_tokens, target_norm=config.target_norm,
        spatial_norm_gamma=config.spatial_norm_gamma, projector_grid=token_grid(config, PATCH_SIZE)[1:], **parallel,
    )
    return CrepaTransformer(transformer, regularizer, blocks).to(device)


TARGET_SOURCES = ("encoder", "backbone", "ema_teacher")


def self_targets(config: TrainConfig, model: CrepaTransformer):
    """(EMA teacher or None, capture of the teacher block or None) for --target-source backbone / ema_teacher."""
    if config.target_source not in TARGET_SOURCES:
        raise ValueError(f"target_source: expected one of {TARGET_SOURCES}, got {config.target_source!r}")
    if config.self_flow_mask_ratio and (config.target_source != "ema_teacher" or rank_and_world()[1] > 1
                                        or config.sample_weighting != "none"):
        raise ValueError("--self-flow-mask-ratio: only with --target-source ema_teacher, in one process and without "
                         f"--sample-weighting; got target_source={config.target_source!r}, "
                         f"{rank_and_world()[1]} processes, sample_weighting={config.sample_weighting!r}")
    if config.target_source == "encoder":
        return None, None
    if config.diagnostics_every or (config.fsdp != "off" and config.target_source == "backbone"):
        raise ValueError(f"--target-source {config.target_source}: not supported with --diagnostics-every, nor "
                         "backbone with --fsdp")
    if config.target_source == "backbone":
        return None, HiddenStateCapture(model.transformer, config.teacher_block)
    teacher = EmaTeacher(model.transformer, config.teacher_momentum)
    return teacher, HiddenStateCapture(teacher.module, config.teacher_block)


def neighbor_weights(text: str) -> str | tuple[float, ...]:
    """--neighbor-weights: a weighting's name, or the weights w[1..d] by hand as comma-separated numbers."""
    if text in WEIGHT_PROFILES:
        return text
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError:
        raise ValueError(f"--neighbor-weights: expected one of {WEIGHT_PROFILES} or comma-separated numbers "
                         f"w[1..neighbors], got {text!r}") from None


def align_blocks(config: TrainConfig) -> list[int]:
    try:
        return [int(index) for index in config.align_blocks.split(",")]
    except ValueError:
        raise ValueError(f"align_blocks: expected comma-separated block indices, got {config.align_blocks!r}") from None


def build_schedule(config: TrainConfig) -> LambdaSchedule:
    decaying = config.schedule != "constant"
    return LambdaSchedule(
        config.loss_weight, shape=config.schedule, warmup_steps=config.warmup_steps,
        decay_steps=(config.decay_steps or max(1, config.steps - config.warmup_steps)) if decaying else None,
        final_weight=config.final_weight, power=config.schedule_power,
        cutoff_step=config.cutoff_step if config.cutoff_step >= 0 else None,
        similarity_threshold=config.similarity_threshold if math.isfinite(config.similarity_threshold) else None,
        similarity_ema_decay=config.similarity_ema_decay, threshold_mode=config.threshold_mode,
        cutoff_timing=config.cutoff_timing, similarity_every_step=config.similarity_every_step,
        warmup_from_zero=not config.warmup_nonzero_start,
    )


def loss_weighting(config: TrainConfig, t: torch.Tensor, token_frames: int):
    """The per-video weights [B] (from the diffusion times t [B]) and the frame mask [B, token_frames] (False on the
    conditioning frames) of a batch, each None when not asked for."""
    sample_weight = None if config.sample_weighting == "none" else timestep_weight(config.sample_weighting, t)
    frame_mask = None
    if config.condition_frames:
        if not 0 < config.condition_frames < token_frames:
            raise ValueError(f"condition_frames: expected fewer than the {token_frames} token frames, "
                             f"got {config.condition_frames}")
        frame_mask = torch.ones((t.shape[0], token_frames), dtype=torch.bool, device=t.device)
        frame_mask[:, :config.condition_frames] = False
    return sample_weight, frame_mask


def wrap_model(model: CrepaTransformer, config: TrainConfig, device: torch.device) -> nn.Module:
    """The module the step calls: the model itself, or its data-parallel wrapper under torchrun (DDP, or FSDP2 in
    place; with --sequence-parallel the model itself: the gradients are summed over ranks after backward)."""
    if rank_and_world()[1] == 1 or config.sequence_parallel:
        return model
    if config.fsdp != "off":
        return shard_model(model, config.fsdp)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sample_ids(config: TrainConfig, step: int, videos: int | None = None) -> list[str]:
    """The ids of a step's synthetic videos (step -1: the diagnostics batch): the keys of the feature cache."""
    return [f"seed{config.seed}-step{step}-video{i}" for i in range(config.global_batch if videos is None else videos)]


def token_grid(config: TrainConfig, patch_size) -> tuple[int, int, int]:
    latent = (latent_frame_count(config.pixel_frames, config.temporal_ratio), config.height // config.spatial_ratio,
              config.width // config.spatial_ratio)
    return dit_token_grid(latent, patch_size)


class StandInTargets:
    """The stand-in encoder's features of the pixel frames, on the DiT's token grid."""

    def __init__(self, config: TrainConfig, generator: torch.Generator, device: torch.device) -> None:
        self.config, self.feature_dim = config, config.encoder_dim
        self.encoder = FrozenPatchEncoder(config, generator).to(device)

    def __call__(self, video: torch.Tensor, grid: tuple[int, int, int], ids: list[str]) -> torch.Tensor:
        return encoder_features_to_tokens(self.encoder(video), grid, temporal_ratio=self.config.temporal_ratio,
                                          temporal_mode=self.config.temporal_mode)


class EncoderTargets:
    """A transformers encoder (DINOv2, DINOv3, V-JEPA 2) through its adapter, at every step."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        # the synthetic videos are centred on 0 like diffusers' VAE input: the adapter maps [-1, 1] to [0, 1]
        self.adapter = load_encoder(config.encoder, temporal_ratio=config.temporal_ratio,
                                    temporal_mode=config.temporal_mode, value_range=(-1.0, 1.0)).to(device)
        self.feature_dim = self.adapter.feature_dim

    def __call__(self, video: torch.Tensor, grid: tuple[int, int, int], ids: list[str]) -> torch.Tensor:
        return self.adapter(video, grid)


class CachedTargets:
    """The same targets read from a feature cache: no encoder in memory. The cache must have been built for this
    data, this grid and frame mapping (and this --encoder, unless it is the default)."""

    def __init__(self, config: TrainConfig, grid: tuple[int, int, int], device: torch.device) -> None:
        expected = {"token_grid": list(grid), "input": synthetic_data_settings(config),
                    "frame_mapping": {"temporal_ratio": config.temporal_ratio, "temporal_mode": config.temporal_mode}}
        if config.encoder != "stand-in":
            expected["encoder"] = {"name_or_path": config.encoder}
        self.cache, self.device = FeatureCache(config.feature_cache, expected=expected), device
        self.feature_dim = self.cache.spec["feature_dim"]

    def __call__(self, video: torch.Tensor, grid: tuple[int, int, int], ids: list[str]) -> torch.Tensor:
        return self.cache.load_batch(ids).to(self.device, torch.float32)


def synthetic_data_settings(config: TrainConfig) -> dict:
    """What decides the synthetic videos besides their ids: recorded in the cache and checked when reading it."""
    fields = ("seed", "pixel_frames", "height", "width", "illumination")
    return {"data": "synthetic_video", **{name: getattr(config, name) for name in fields}}


def target_source(config: TrainConfig, generator: torch.Generator, device: torch.device, grid):
    if config.feature_cache:
        return CachedTargets(config, grid, device)
    if config.encoder == "stand-in":
        return StandInTargets(config, generator, device)
    return EncoderTargets(config, device)


def build_cache(config: TrainConfig, directory: str, storage_dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Encode every video the run will see (and the diagnostics batch, with --diagnostics-every) into a cache."""
    if config.encoder == "stand-in":
        raise ValueError("--build-feature-cache needs --encoder (a checkpoint or random:MODEL_TYPE)")
    device = torch.device(config.device)
    encoder = EncoderTargets(config, device).adapter
    steps = [*range(config.steps), *([-1] if config.diagnostics_every else [])]

    def samples():
        for step in steps:
            videos = config.diagnostics_videos if step == -1 else None
            video = synthetic_batch(config, step, videos=videos)["video"]
            yield from zip(sample_ids(config, step, videos), video)

    total = config.steps * config.global_batch + (config.diagnostics_videos if config.diagnostics_every else 0)
    grid = token_grid(config, PATCH_SIZE)
    return build_feature_cache(directory, samples(), encoder, grid, storage_dtype=storage_dtype,
                               extra=synthetic_data_settings(config), total=total)


def _step_record(loss: torch.Tensor, flow_loss: torch.Tensor, alignment) -> dict:
    """A step's figures averaged over ranks (the global batch's values: equal shards on every rank); the
    alignment's are None on steps where lambda was 0 and nothing was computed."""
    names = ["loss", "flow_loss"]
    values = [loss.detach(), flow_loss.detach()]
    if alignment.computed:
        names += ["align_loss", "self_similarity", "neighbor_similarity"]
        neighbor = alignment.neighbor_similarity
        values += [alignment.align_loss, alignment.self_similarity,
                   neighbor if neighbor is not None else torch.full_like(alignment.self_similarity, math.nan)]
        if len(alignment.terms) > 1:
            names += [f"align_loss/{name}" for name in alignment.terms]
            values += list(alignment.terms.values())
    figures = mean_over_ranks(torch.stack([v.double() for v in values])).tolist()
    record = dict.fromkeys(["align_loss", "self_similarity", "neighbor_similarity"])
    record.update(zip(names, figures))
    record["lambda"] = alignment.weight
    record.update({f"schedule/{k}": v for k, v in alignment.logs.items() if k in ("similarity_ema",
                                                                               "similarity_cutoff")})
    return record


def train(config: TrainConfig, backend: str, crepa_state: str | None = None) -> RunResult:
    """One training run; under an initialised process group, this rank's share of it. ``crepa_state``: a path to
    save the regulariser's projectors and schedule state to at the end (safetensors, rank 0)."""
    if config.reduction == "none":
        raise ValueError("reduction='none' gives no scalar loss to train on")
    rank, world = rank_and_world()
    if config.fsdp not in ("off", "joint", "separate") or (config.fsdp != "off" and config.sequence_parallel):
        raise ValueError(f"fsdp: expected 'off', 'joint' or 'separate', not with --sequence-parallel; "
                         f"got {config.fsdp!r}, sequence_parallel={config.sequence_parallel}")
    if config.sequence_parallel and (world == 1 or config.diagnostics_every):
        raise ValueError("--sequence-parallel runs under torchrun (2 or more processes), without --diagnostics-every "
                         "(which needs whole projected states)")
    if config.fsdp != "off" and config.diagnostics_every:
        # the diagnostics run the model on rank 0 alone; under FSDP2 that forward all-gathers on one rank and hangs
        raise ValueError("--diagnostics-every is not supported with --fsdp (it runs the sharded model on rank 0 only)")
    if crepa_state and config.fsdp != "off":
        raise ValueError("--save-crepa-state is not supported with --fsdp (the projectors are sharded DTensors)")
    if not config.sequence_parallel and config.global_batch % world != 0:  # else every rank sees every sample
        raise ValueError(f"global batch {config.global_batch} does not split over {world} processes")
    device = torch.device(config.device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if compute_dtype(config) == torch.bfloat16
                else contextlib.nullcontext())

    torch.manual_seed(config.seed)
    frozen = torch.Generator().manual_seed(config.seed + 1)
    vae = FrozenVideoVAE(config, frozen).to(device)
    grid = token_grid(config, PATCH_SIZE)
    targets_of = target_source(config, frozen, device, grid)  # the encoder and the cache leave the RNG alone
    model = build_model(config, backend, device, targets_of.feature_dim)
    teacher, teacher_capture = self_targets(config, model)  # before the wrapper: the plain transformer
    trained = wrap_model(model, config, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)

    def model_inputs(batch: dict[str, torch.Tensor], ids: list[str], shard: slice = slice(None),
                     mask_generator: torch.Generator | None = None):
        """The DiT's inputs, the flow target and the alignment targets of (a shard of) a batch; no targets (no
        encoder forward, no cache read) while lambda is 0. With --self-flow-mask-ratio the DiT's times are per token
        and ``mask_generator`` draws the token mask."""
        batch = {name: value[shard].to(device) for name, value in batch.items()}
        latents = vae(batch["video"])
        noisy, velocity = rectified_flow_pair(latents, batch["noise"], batch["t"])
        t, teacher_noisy, teacher_t = batch["t"], noisy, batch["t"]
        if config.self_flow_mask_ratio:  # the student per token at t or alt_t ([B, tokens]), the teacher cleaner
            views = self_flow_views(latents, batch["noise"], batch["t"], batch["alt_t"], PATCH_SIZE,
                                    config.self_flow_mask_ratio, mask_generator)
            noisy, t = views.student_latents, views.token_t
            teacher_noisy, teacher_t = views.teacher_latents, views.teacher_t
        targets = None
        if model.regularizer.active and config.target_source == "encoder":
            targets = targets_of(batch["video"], grid, ids[shard])
        elif model.regularizer.active and config.target_source == "ema_teacher":
            teacher(teacher_noisy, teacher_t * TIMESTEP_SCALE, batch["text"], return_dict=False)
            targets = block_targets(teacher_capture.pop(), grid[0])
        elif model.regularizer.active:  # backbone: read from the student's own forward, once it has run
            targets = lambda: block_targets(teacher_capture.pop(), grid[0], detach=not config.teacher_grad)  # noqa: E731
        return noisy, t, batch["text"], velocity, targets

    records, times = [], []
    with PeakMemory(device) as memory:
        for step in range(config.steps):
            last = step == config.steps - 1
            diagnose = (config.diagnostics_every and rank == 0 and model.regularizer.active
                        and (step % config.diagnostics_every == 0 or last))
            if diagnose:  # the model as it is before this step's update: step 0 is the initialisation
                diagnostics_ids = sample_ids(config, -1, config.diagnostics_videos)
                entry = _diagnostics_record(step, config, model,
                                            *model_inputs(diagnostics_batch(config), diagnostics_ids))
                memory.step_peak_mib()  # the step's peak below leaves the diagnostics out

            batch = synthetic_batch(config, step)
            mask_generator = None
            if config.self_flow_mask_ratio:  # the second time and the token mask: a stream of their own per step
                mask_generator = torch.Generator(device).manual_seed(2**40 + config.seed * 1_000_003 + step)
                batch["alt_t"] = torch.rand(config.global_batch, generator=mask_generator, device=device)
            shard = (slice(None) if config.sequence_parallel
                     else slice(rank * config.global_batch // world, (rank + 1) * config.global_batch // world))
            noisy, t, text, velocity, targets = model_inputs(batch, sample_ids(config, step), shard, mask_generator)
            sample_weight, frame_mask = loss_weighting(config, t, grid[0])

            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with autocast, SavedTensorMeter(exclude=model.parameters()) as saved:
                output, alignment = trained(noisy, t * TIMESTEP_SCALE, text, targets=targets,
                                            sample_weight=sample_weight, frame_mask=frame_mask, return_dict=False)
                flow_loss = flow_matching_loss(output[0], velocity)
            loss = flow_loss + alignment.loss
            optimizer.zero_grad(set_to_none=True)
            if config.sequence_parallel:  # the flow loss is computed whole on every rank, the alignment per shard
                (flow_loss / world + alignment.loss).backward()
                sum_gradients(model.parameters())
            else:
                loss.backward()
            # the projector's gradient comes from the alignment loss alone: the most sensitive check of its backward
            projector_grad_norm = torch.linalg.vector_norm(
                torch.stack([full_tensor(p.grad).norm() for p in model.regularizer.projectors.parameters()]))
            grad_norm = full_tensor(nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
            optimizer.step()
            model.regularizer.end_step(alignment)  # advances lambda's schedule (all ranks agree on the cutoff)
            if teacher is not None:
                teacher.update(model.transformer)  # every rank holds the same parameters: the same teacher
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)

            record = _step_record(loss, flow_loss, alignment)
            record.update(step=step, grad_norm=float(grad_norm), projector_grad_norm=float(projector_grad_norm),
                          step_time_s=times[-1], peak_memory_mib=memory.step_peak_mib(),
                          saved_mib=saved.bytes / 2**20)
            records.append(record)

            if diagnose:
                entry["align_loss"] = record["align_loss"]  # of the training batch
                with open(config.diagnostics_json, "a") as out:
                    out.write(json.dumps(entry) + "\n")
    model.remove_hooks()
    if teacher_capture is not None:
        teacher_capture.remove()
    if crepa_state and rank == 0:
        save_crepa_state(crepa_state, model.regularizer)

    return RunResult(
        backend=select_backend(backend, device).__name__,
        records=records,
        params={name: full_tensor(value.detach()).cpu().clone() for name, value in model.named_parameters()},
        step_time_s=statistics.median(times[1:]) if len(times) > 1 else times[0],
        memory=memory.figures,
    )


def _parse(argv) -> tuple[TrainConfig, argparse.Namespace]:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", help="the fused backend to check (default: auto)")
    parser.add_argument("--reference-backend", default="reference")
    parser.add_argument("--no-lockstep", action="store_true", help="only run --backend, no comparison")
    parser.add_argument("--output", help="write the runs and the comparison as JSON (rank 0)")
    parser.add_argument("--save-params", help="save the final parameters of the --backend run (rank 0), torch.save")
    parser.add_argument("--save-crepa-state", metavar="PATH",
                        help="save the --backend run's projectors and lambda schedule state (rank 0), safetensors")
    parser.add_argument("--build-feature-cache", metavar="DIR",
                        help="encode every video of the run with --encoder into a feature cache, then exit")
    parser.add_argument("--feature-cache-dtype", choices=tuple(STORAGE_DTYPES), default="fp32",
                        help="storage dtype of --build-feature-cache (fp32: the same targets as the encoder)")
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



def main(argv=None) -> int:
    config, args = _parse(argv)
    if args.build_feature_cache:
        counts = build_cache(config, args.build_feature_cache, STORAGE_DTYPES[args.feature_cache_dtype])
        print(f"{args.build_feature_cache}: {counts['written']} written, {counts['skipped']} already cached")
        return 0
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        device = torch.device(config.device)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            config = dataclasses.replace(config, device=f"cuda:{torch.cuda.current_device()}")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = rank_and_world()
    if config.diagnostics_json and rank == 0 and os.path.exists(config.diagnostics_json):
        os.remove(config.diagnostics_json)  # one file per invocation: records are appended while training
    try:
        runs = []
        if not args.no_lockstep:  # the diagnostics are logged for the fused run only
            reference_config = dataclasses.replace(config, diagnostics_every=0)
            runs.append(("reference", train(reference_config, args.reference_backend)))
        runs.append(("fused", train(config, args.backend, crepa_state=args.save_crepa_state)))
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank != 0:
        return 0  # every rank holds the same figures; rank 0 reports and decides the exit status

    dtype = compute_dtype(config)
    reports = {}
    for role, result in runs:
        print_run(role, result)
    if len(runs) == 2:
        if runs[0][1].backend == runs[1][1].backend:
            print(f"note: both runs used {runs[0][1].backend}; the comparison only checks determinism")
        reports["lockstep"] = compare(runs[0][1], runs[1][1], TOLERANCES[dtype])
        print_report(f"lockstep {args.reference_backend} vs {args.backend}, {world} process(es):",
                      reports["lockstep"], dtype)
    if args.compare_with:
        other_config, other = load_run(args.compare_with)
        ignored = ("device", "diagnostics_every", "diagnostics_json", "feature_cache", "fsdp",
                   "sequence_parallel")  # not the trajectory
        differing = [k for k, v in dataclasses.asdict(config).items() if k not in ignored and other_config[k] != v]
        if differing:
            raise SystemExit(f"--compare-with {args.compare_with}: a different configuration ({differing})")
        reports["compare_with"] = compare(other, runs[-1][1], DISTRIBUTED_TOLERANCES[dtype])
        print_report(f"this run ({world} process(es)) vs {args.compare_with}:", reports["compare_with"], dtype)
    if args.save_params:
        save_params(runs[-1][1], args.save_params)
    if args.output:
        with open(args.output, "w") as out:
            json.dump({"config": dataclasses.asdict(config), "world_size": world,
                       "runs": {role: summary(result) for role, result in runs}, "comparisons": reports,
                       "params_path": os.path.abspath(args.save_params) if args.save_params else None},
                      out, indent=1)
    failed = any(not entry["ok"] for report in reports.values() for entry in report.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
