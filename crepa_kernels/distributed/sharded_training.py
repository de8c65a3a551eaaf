"""Trainer-side pieces for CREPA under FSDP2 and context parallelism (used by examples/train_dit.py).

* ``shard_model``: FSDP2 (``fully_shard``) on a :class:`~crepa_kernels.training.CrepaTransformer`: every DiT block
  is a unit, the projector either shares the root unit with the rest of the model ("joint") or is a unit of its
  own ("separate").
* :class:`SequenceParallelRegularizer`: the CREPA regulariser of a context-parallel DiT. Its hidden states are this
  rank's shard of the sequence; the loss and the logged figures are those of the whole sequence.
* ``sum_gradients``: under context parallelism each rank's gradients come from its own tokens; sum them.
* ``context_parallel_shard``: the shard of a full sequence that diffusers' context-parallel plan gives a rank
  (``tensor_split`` along the sequence: ``chunk`` when the length divides, its "anything" mode otherwise). A DiT
  run with ``enable_parallelism`` hands the regulariser this shard directly; without it (a CPU-only machine, where
  ``enable_parallelism`` cannot run) ``SequenceParallelRegularizer(shard_full_states=True)`` reproduces it from the
  full captured states.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..training.capture import find_blocks
from ..training.model import CrepaTransformer
from ..training.projector import ConvProjector
from ..spec import LossOptions
from ..training.regularizer import CrepaRegularizer
from .loss import sequence_parallel_loss

FSDP_MODES = ("joint", "separate")


def shard_model(model: CrepaTransformer, mode: str, mesh=None) -> CrepaTransformer:
    """``fully_shard`` the model in place (its parameters become DTensors sharded over ``mesh``, default: the
    world). mode "joint": the projectors' parameters share the root unit with the transformer's non-block ones;
    "separate": each projector is its own unit (gathered and freed on its own)."""
    from torch.distributed.fsdp import fully_shard

    if mode not in FSDP_MODES:
        raise ValueError(f"mode: expected one of {FSDP_MODES}, got {mode!r}")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for block in find_blocks(model.transformer):
        fully_shard(block, mesh=mesh)
    if mode == "separate":
        for projector in model.regularizer.projectors:
            fully_shard(projector, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def context_parallel_shard_sizes(seq_len: int, world_size: int) -> list[int]:
    """Tokens per rank of ``tensor_split(world_size)``: the first seq_len % world_size ranks hold one more."""
    base, extra = divmod(seq_len, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


def context_parallel_shard(hidden_states: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's slice of ``hidden_states`` [B, S, ...] along the sequence, as diffusers' context-parallel plan
    splits the hidden states entering ``blocks.0`` (EquipartitionSharder / PartitionAnythingSharder)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return hidden_states.tensor_split(world, dim=1)[rank]


def sum_gradients(parameters, group=None) -> None:
    """Sum each parameter's gradient over the ranks of a context-parallel group (each rank's gradient comes from
    its own tokens; the sum is the gradient of the whole sequence)."""
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, group=group)


class SequenceParallelRegularizer(CrepaRegularizer):
    """:class:`CrepaRegularizer` for a context-parallel DiT: ``forward(hidden_states, targets, ...)`` takes this
    rank's shard of each captured block's states, [B, S_local, hidden] in diffusers' ``tensor_split`` layout, and
    the whole targets [B, F, N, dim]. The loss, the figures and the weighting (``sample_weight``, ``frame_mask``) are
    those of the whole sequence, the same on every rank; ``projected`` is this rank's shard as [B, 1, S_local, dim].
    Each rank's parameter gradients cover its own tokens: sum them over the group (``sum_gradients``).

    ``shard_full_states=True``: the states given are the whole sequence (a transformer run without context
    parallelism, e.g. on a CPU where ``enable_parallelism`` cannot run); each rank takes its shard of them first,
    as diffusers' plan would have given it."""

    def __init__(self, hidden_dim: int, encoder_dim, *, group=None, shard_full_states: bool = False,
                 **options) -> None:
        super().__init__(hidden_dim, encoder_dim, **options)
        if self.frame_align != "exact" or self.token_align != "exact" or self.pool_tokens:
            raise ValueError(f"frame_align / token_align / pool_tokens: a sequence-parallel regulariser needs the "
                             f"hidden states on the targets' grid ('exact', no pooling), got {self.frame_align!r} / "
                             f"{self.token_align!r} / {self.pool_tokens}")
        if any(isinstance(p, ConvProjector) for p in self.projectors):
            raise ValueError("projector: a sequence-parallel regulariser projects a shard of the sequence, which "
                             "holds no whole token grid for the 'conv' projector; use 'mlp' or 'linear'")
        self.group = group
        self.shard_full_states = shard_full_states

    def _project(self, projector, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.shard_full_states:
            hidden_states = context_parallel_shard(hidden_states, self.group)
        # one pseudo-frame holding the shard: the base class then leaves the [B, F, N] grid check to the loss
        return super()._project(projector, hidden_states).unsqueeze(1)

    def _per_frame_loss(self, proj: torch.Tensor, target: torch.Tensor, options: LossOptions) -> torch.Tensor:
        frames, tokens = target.shape[1], target.shape[2]
        return sequence_parallel_loss(
            proj.flatten(1, 2), target, dataclasses.replace(options, reduction="none"), num_frames=frames,
            backend=self.backend, group=self.group,
            shard_sizes=context_parallel_shard_sizes(frames * tokens, dist.get_world_size(self.group)),
        )


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or the whole of a DTensor (for logging and checking only: never on the loss's path)."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


__all__ = ["SequenceParallelRegularizer", "context_parallel_shard",
           "context_parallel_shard_sizes", "full_tensor", "shard_model", "sum_gradients"]
