"""Targets from the DiT itself instead of a frozen encoder: the output of a deeper block of the trained DiT
(musubi-tuner's and takenoko's "backbone" mode) or of an exponential-moving-average copy of it (an EMA teacher,
as SimpleTuner's self-flow uses).

* :class:`EmaTeacher`: a frozen copy of a module whose parameters follow the trained ones,
  theta_teacher <- m * theta_teacher + (1 - m) * theta_student after each optimizer step (m = ``momentum``).
  Buffers are copied as they are. Every rank of DDP or sequence parallelism holds the same trained parameters, so
  every rank's teacher is the same. Under FSDP2 the teacher is copied from the module before it is sharded and
  stays whole on every rank; each update gathers the student's shards (one all-gather per parameter).
* :func:`block_targets`: a captured block output [B, F * N, D] (frame-major) as targets [B, F, N, D]; detached
  (musubi-tuner detaches the teacher; takenoko does not: ``detach=False``).

Token pooling (musubi-tuner's backbone mode averages each frame's tokens of both sides) is the regulariser's
``pool_tokens=True``, applied after the projector as upstream does.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class EmaTeacher(nn.Module):
    """A frozen copy of ``module`` (eval mode, no gradients, none of the original's hooks) updated by
    :meth:`update` after each optimizer step."""

    def __init__(self, module: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0.0 <= momentum <= 1.0 \
                or not math.isfinite(momentum):
            raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        for submodule in self.module.modules():  # the copied hooks would feed the original's captures
            for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                          "_forward_hooks_always_called"):
                getattr(submodule, hooks, {}).clear()
        self.updates = 0

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> EmaTeacher:
        super().train(mode)
        self.module.eval()  # a teacher never runs in training mode (dropout off)
        return self

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """theta <- m * theta + (1 - m) * theta_student for each parameter; buffers copied. ``student`` must have
        the teacher's parameter names and shapes (the module it was copied from)."""
        teacher_params = dict(self.module.named_parameters())
        student_params = dict(student.named_parameters())
        if teacher_params.keys() != student_params.keys():
            raise ValueError("student: expected the parameters of the module the teacher was copied from, got "
                             f"{sorted(student_params.keys() ^ teacher_params.keys())[:3]} differing")
        for name, theta in teacher_params.items():
            source = _whole(student_params[name].detach())
            theta.mul_(self.momentum).add_(source.to(theta.dtype), alpha=1.0 - self.momentum)
        student_buffers = dict(student.named_buffers())
        for name, buffer in self.module.named_buffers():
            buffer.copy_(_whole(student_buffers[name]))
        self.updates += 1


def _whole(x: torch.Tensor) -> torch.Tensor:
    """``x``, or the whole of a DTensor (an FSDP2-sharded student: an all-gather; the teacher stays whole)."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def block_targets(states: torch.Tensor, frames: int, *, detach: bool = True) -> torch.Tensor:
    """A block's output [B, F * N, D] (frame-major) as targets [B, F, N, D], detached unless ``detach=False``."""
    if states.dim() != 3 or states.shape[1] % frames:
        raise ValueError(f"states: expected [B, F * N, D] with F = {frames} dividing the tokens, got shape "
                         f"{tuple(states.shape)}")
    targets = states.unflatten(1, (frames, states.shape[1] // frames))
    return targets.detach() if detach else targets
