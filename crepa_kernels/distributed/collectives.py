"""The three collectives of the sequence-parallel loss, as functional collectives (traceable by torch.compile).

* ``sum_over_ranks``: the forward all-reduce of the per-frame partial sums. Its backward is the identity: every rank
  holds the same loss and backpropagates it into its own partial sums, so each shard receives exactly its slice of
  the single-process gradient, with no backward communication.
* ``replicated_input``: identity forward, all-reduce of the gradient backward. Only used for a replicated target
  that requires grad: each rank's local gradient covers its own proj tokens; the sum over ranks is the full one.
* ``exchange_rows``: the halo exchange of the sharded-target mode, one all_to_all_single (its backward, only when
  the target requires grad, sends the halo's gradients back to their owners).
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial: torch.Tensor, group_name: str) -> torch.Tensor:
        return funcol.wait_tensor(funcol.all_reduce(partial.contiguous(), "sum", group_name))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ReplicatedInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.group_name = group_name
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.group_name)), None


def sum_over_ranks(partial: torch.Tensor, group_name: str) -> torch.Tensor:
    return _SumOverRanks.apply(partial, group_name)


def replicated_input(tensor: torch.Tensor, group_name: str) -> torch.Tensor:
    return _ReplicatedInput.apply(tensor, group_name) if tensor.requires_grad else tensor


def exchange_rows(send: torch.Tensor, send_counts: list[int], receive_counts: list[int], group_name: str) -> torch.Tensor:
    """all_to_all_single along dim 0 of ``send`` ([rows, ...]); differentiable when ``send`` requires grad."""
    received = funcol.all_to_all_single_autograd(send.contiguous(), receive_counts, send_counts, group_name)
    return funcol.wait_tensor(received)
