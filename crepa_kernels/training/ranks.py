"""The few torch.distributed figures a trainer needs around the regulariser, that also work without a process group."""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def mean_over_ranks(values: torch.Tensor, group=None) -> torch.Tensor:
    """The mean of ``values`` over the ranks of ``group`` (a new tensor; ``values`` itself when there is one rank).

    Every rank must call it, in the same order as its other collectives."""
    _, world = rank_and_world(group)
    if world == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, group=group)
    return values / world
