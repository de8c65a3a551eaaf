"""TokenRelationFunction: the token relation distillation loss as a torch.autograd.Function, on any backend.

The functional form (relation_api.token_relation_loss) and the module (relation_api.TokenRelationLoss) run it too.
A backend (see ops/relation_reference.py for the interface) gives the per-frame sums L [B, F]; the reduction and the
scaling of the gradient by the incoming grad_output happen here.

Gradient in the forward pass: with reduction="mean" every frame has the same weight, so a fused backend can produce
the gradient in the pass that computes the loss (the relation tiles are formed once, as fused linear-cross-entropy
kernels do); backward then only scales it. That holds two input-sized fp32 gradients from forward to backward.
``TokenRelationFunction.apply`` returns the bare loss (setup_context sees only outputs), so it always computes the
gradient in backward, in a second pass; the functional form and the module keep the forward's gradient as extra,
non-differentiable outputs (``_GradientKeepingFunction``).
"""
from __future__ import annotations

import importlib
import inspect

import torch

from .function import refuse_double_backward
from .relation_spec import (RelationOptions, check_anchors, check_pair_count, key_weight, pairs_per_sample)
from .spec import as_frames, compute_dtype

RELATION_BACKEND_MODULES = {
    "reference": "crepa_kernels.ops.relation_reference",
    "cpu": "crepa_kernels.ops.relation_cpu",
    "triton": "crepa_kernels.ops.relation_triton",
}
RELATION_BACKENDS = (*RELATION_BACKEND_MODULES, "cuda")
# why there is no "cuda" backend: see docs/token_relation.md
NO_CUDA_BACKEND = ("token_relation_loss has no CUDA C++ kernel: its work is matrix products that need tensor cores, "
                   "which the Triton backend reaches through tl.dot; use backend='triton' on CUDA")
AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}

ARGUMENTS = ("pairs", "margin", "anchors", "num_frames", "reduction", "eps", "backend")
DEFAULTS = ("all", 0.0, None, None, "mean", 1e-12, "auto")


def check_relation_backend(backend) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, one of {('auto',) + RELATION_BACKENDS}, got "
                        f"{type(backend).__name__}")
    if backend != "auto" and backend not in RELATION_BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + RELATION_BACKENDS}, got {backend!r}")


def relation_backend_reason(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run token_relation_loss on ``device``, else why not."""
    if name == "cuda":
        return NO_CUDA_BACKEND
    try:
        module = importlib.import_module(RELATION_BACKEND_MODULES[name])
    except Exception as error:  # an import failure is a reason, not a crash
        return f"cannot import {RELATION_BACKEND_MODULES[name]}: {type(error).__name__}: {error}"
    return module.unavailable_reason(device)


def select_relation_backend(backend: str, device: torch.device):
    """The backend module that runs ``backend`` ("auto" or a name) on ``device``; raises with the reason."""
    check_relation_backend(backend)
    if backend != "auto":
        reason = relation_backend_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run token_relation_loss on {device}: {reason}")
        return importlib.import_module(RELATION_BACKEND_MODULES[backend])
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        if relation_backend_reason(name, device) is None:
            return importlib.import_module(RELATION_BACKEND_MODULES[name])
    raise RuntimeError(f"no backend can run token_relation_loss on {device}")


def _prepare(proj, target, arguments):
    """Checks one call before any kernel runs -> (frame views, options, key weight, pair count, backend module)."""
    pairs, margin, anchors, num_frames, reduction, eps, backend = arguments
    check_relation_backend(backend)
    options = RelationOptions(pairs=pairs, margin=margin, reduction=reduction, eps=eps)
    proj_frames, target_frames = as_frames(proj, target, num_frames)
    batch, frames, tokens_per_frame, _ = proj_frames.shape
    check_anchors(anchors, frames * tokens_per_frame)
    weight = key_weight(anchors, frames * tokens_per_frame, compute_dtype(proj_frames, target_frames),
                        proj_frames.device)
    count = batch * pairs_per_sample(options, frames, tokens_per_frame, anchors)
    check_pair_count(count, options, proj_frames.shape)
    module = select_relation_backend(backend, proj_frames.device)
    return proj_frames, target_frames, options, weight, count, module


def _reduce(per_frame: torch.Tensor, options: RelationOptions, count: float) -> torch.Tensor:
    return per_frame.sum() / count if options.reduction == "mean" else per_frame


def _forward(proj, target, arguments, keep_gradients: bool):
    proj_frames, target_frames, options, weight, count, module = _prepare(proj, target, arguments)
    wants = keep_gradients and options.reduction == "mean"
    with torch.no_grad():
        per_frame, grad_proj, grad_target = module.forward(
            proj_frames, target_frames, weight, options, wants and proj.requires_grad,
            wants and target.requires_grad)
    return _reduce(per_frame, options, count), grad_proj, grad_target


_DoubleBackwardError = refuse_double_backward(
    "TokenRelationFunction does not support double backward: its backward runs hand-written kernels. For higher "
    "derivatives differentiate crepa_kernels.relation_reference.per_row_loss directly.")


class TokenRelationFunction(torch.autograd.Function):
    """``TokenRelationFunction.apply(proj, target, pairs, margin, anchors, num_frames, reduction, eps, backend)``
    (arguments as in :func:`crepa_kernels.token_relation_loss`, positional, all but proj and target optional)
    returns the loss. backward runs the backend's gradient pass for the gradients ``ctx.needs_input_grad`` asks
    for; double backward raises."""

    @staticmethod
    def forward(proj, target, pairs="all", margin=0.0, anchors=None, num_frames=None, reduction="mean", eps=1e-12,
                backend="auto"):
        return _forward(proj, target, (pairs, margin, anchors, num_frames, reduction, eps, backend), False)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, kept=(None, None))

    @staticmethod
    def backward(ctx, grad_loss, *_grad_kept):
        proj, target, weight, *kept = ctx.saved_tensors
        needs_proj_grad, needs_target_grad = ctx.needs_input_grad[:2]
        grads = (None, None)
        if needs_proj_grad or needs_target_grad:
            frames_shape = ctx.frames_shape
            proj_frames, target_frames = proj.view(frames_shape), target.view(frames_shape)
            with torch.no_grad():
                if ctx.kept_gradients:  # the forward's one-pass gradients of L.sum(): scale them
                    scale = grad_loss.to(kept[0].dtype) / ctx.count
                    kept_by_input = iter(kept)
                    kept_by_input = [next(kept_by_input) if had else None for had in ctx.kept_for]
                    grads = tuple((g * scale).to(x.dtype) if needed else None
                                  for needed, g, x in zip((needs_proj_grad, needs_target_grad), kept_by_input,
                                                          (proj, target)))
                else:
                    if ctx.options.reduction == "mean":
                        frame_weight = (grad_loss / ctx.count).expand(frames_shape[0], frames_shape[1])
                    else:
                        frame_weight = grad_loss
                    grads = ctx.module.backward(frame_weight.contiguous(), proj_frames, target_frames, weight,
                                                ctx.options, needs_proj_grad, needs_target_grad)
            grads = tuple(None if g is None else g.reshape(x.shape) for g, x in zip(grads, (proj, target)))
            if torch.is_grad_enabled():  # create_graph=True: the gradients must not be differentiable silently
                grads = tuple(None if g is None else _DoubleBackwardError.apply(g, grad_loss, proj, target)
                              for g in grads)
        return (*grads, *(None for _ in ARGUMENTS))


class _GradientKeepingFunction(TokenRelationFunction):
    """TokenRelationFunction whose ``apply`` returns ``(loss, grad_proj, grad_target)``: with reduction="mean" the
    backend's forward pass also gives the gradients (None if it cannot), kept for backward."""

    @staticmethod
    def forward(proj, target, pairs="all", margin=0.0, anchors=None, num_frames=None, reduction="mean", eps=1e-12,
                backend="auto"):
        return _forward(proj, target, (pairs, margin, anchors, num_frames, reduction, eps, backend), True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, *kept = output
        kept = [g for g in kept if g is not None]
        ctx.mark_non_differentiable(*kept)
        _setup(ctx, inputs, kept)


def _setup(ctx, inputs, kept) -> None:
    proj, target, *arguments = inputs
    arguments = (*arguments, *DEFAULTS[len(arguments):])
    proj_frames, _, options, weight, count, module = _prepare(proj, target, arguments)
    kept = [g for g in kept if g is not None]
    # kept only when every gradient autograd may ask for was produced
    expected = int(proj.requires_grad) + int(target.requires_grad)
    ctx.kept_gradients = bool(kept) and len(kept) == expected
    ctx.kept_for = (proj.requires_grad, target.requires_grad)
    ctx.save_for_backward(proj, target, weight, *(kept if ctx.kept_gradients else ()))
    ctx.options, ctx.count, ctx.module = options, count, module
    ctx.frames_shape = tuple(proj_frames.shape)


for _function in (TokenRelationFunction, _GradientKeepingFunction):
    _function.forward.__signature__ = inspect.signature(_function.forward)


def token_relation_loss_keeping_gradients(proj, target, *arguments) -> torch.Tensor:
    """The loss of TokenRelationFunction.apply(proj, target, *arguments), one-pass gradients kept for backward."""
    return _GradientKeepingFunction.apply(proj, target, *arguments)[0]
