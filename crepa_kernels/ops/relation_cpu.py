"""The token relation distillation loss on the C++ extension's CPU kernel (csrc/crepa_relation_cpu.cpp) as a
backend (interface: crepa_kernels.ops.relation_reference). The extension is loaded by ops.native, as for CREPA."""
from __future__ import annotations

import torch

from ..relation_spec import RelationOptions
from ..spec import compute_dtype
from . import native

SUPPORTED_DTYPES = native.SUPPORTED_DTYPES


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the 'cpu' backend runs on cpu tensors, not {device.type}"
    reason = native.unavailable_reason(device)
    if reason is None and not hasattr(torch.ops.crepa_kernels, "relation_cpu"):
        return "the loaded C++ extension was built from older sources without relation_cpu; rebuild it"
    return reason


def _run(proj, target, key_weight, frame_weight, options: RelationOptions, want_loss, grad_proj, grad_target):
    for name, x in (("proj", proj), ("target", target)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: the 'cpu' backend takes {', '.join(map(str, SUPPORTED_DTYPES))}, got {x.dtype}")
    return torch.ops.crepa_kernels.relation_cpu(proj, target, key_weight, frame_weight, options.pairs,
                                                float(options.margin), float(options.eps), want_loss, grad_proj,
                                                grad_target)


def forward(proj, target, key_weight, options: RelationOptions, grad_proj: bool = False, grad_target: bool = False):
    """(L [B, F], grad_proj | None, grad_target | None): one pass; the gradients are those of L.sum()."""
    dtype = compute_dtype(proj, target)
    ones = torch.ones(proj.shape[:2], dtype=dtype)
    per_frame, gp, gy = _run(proj, target, key_weight, ones, options, True, grad_proj, grad_target)
    return per_frame, gp if grad_proj else None, gy if grad_target else None


def backward(frame_weight, proj, target, key_weight, options: RelationOptions, needs_proj_grad: bool,
             needs_target_grad: bool):
    """The gradients of (frame_weight * L).sum(): the same kernel, without the loss."""
    dtype = compute_dtype(proj, target)
    _, gp, gy = _run(proj, target, key_weight, frame_weight.to(dtype), options, False, needs_proj_grad,
                     needs_target_grad)
    return gp if needs_proj_grad else None, gy if needs_target_grad else None
