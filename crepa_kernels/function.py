"""The autograd wiring of the CREPA loss: the one place where a backend's backward is wired to its forward.

Every form checks its call once, at its entry point, with :func:`prepare`: the options (one validated
:class:`~crepa_kernels.spec.LossOptions`), the inputs' layout, the backend that runs the call and the call's
coefficient table. What it returns travels down unchanged: ``_AlignFunction`` runs the backend's forward and wires
its hand-written backward, reading nothing but the prepared call. The backends' torch.library ops carry no autograd
formula of their own.

A backend module provides (see backends.py)
    forward(proj, target, coefficients, options) -> (L [B, F], *saved)    # saved: statistics its backward reads
    backward(grad_L [B, F], proj, target, coefficients, saved, options, needs_proj_grad, needs_target_grad)
        -> (grad_proj | None, grad_target | None)
with proj and target as spec.as_frames gives them, [B, F, N, D], and coefficients spec.coefficient_table's.

Where the statistics live: ``setup_context`` (which torch.func needs) sees only the inputs and the outputs of
``forward``, so a statistic the backward reads must be an output. The functional form, the module and the trainer
side keep them as extra, non-differentiable outputs of ``_AlignFunction``: a few floats per token kept instead of a
second forward pass. ``CrossFrameAlignFunction.apply`` returns the bare loss, as a drop-in must, so its backward
recomputes them with the backend's forward kernel (same kernel, same bits; one more read of proj and target).
"""
from __future__ import annotations

import dataclasses
import inspect
import threading
from dataclasses import dataclass

import torch

from .backends import call_key, check_backend_name, resolve_backend_name, select_backend
from .spec import (LossOptions, as_frames, check_eps_for_dtype, coefficient_table, compute_dtype, reduce_frames,
                   unchecked_frames)


@dataclass(frozen=True)
class AlignCall:
    """One checked call, without its tensors: what the autograd Function reads besides them."""
    options: LossOptions  # validated, neighbors already clamped to the call's F when clamp_neighbors is set
    backend: str  # the backend that runs it
    num_frames: int | None  # as the caller gave it: how proj and target view as [B, F, N, D]


def prepare(proj, target, options: LossOptions, num_frames=None, backend: str = "auto"
            ) -> tuple[AlignCall, torch.Tensor]:
    """Checks one call before any kernel runs -> (the call, its coefficient table)."""
    check_backend_name(backend)
    proj_frames, target_frames = as_frames(proj, target, num_frames)
    frames = proj_frames.shape[1]
    options = options.for_frames(frames)
    dtype = compute_dtype(proj_frames, target_frames)
    check_eps_for_dtype(options.eps, dtype)
    device = proj_frames.device
    key = call_key(proj_frames, target_frames, options)  # the backend depends on the call (dtypes, shape, options)
    name = resolve_backend_name(backend, device.type, device.index, key)
    return AlignCall(options, name, num_frames), coefficient_table(options, frames, dtype, device)


def _reduction_backward(grad_loss: torch.Tensor, reduction: str, batch: int, frames: int) -> torch.Tensor:
    """d(reduced loss) -> dL [B, F], contiguous."""
    if reduction == "mean":
        return grad_loss.expand(batch, frames) / (batch * frames)
    if reduction == "frame_sum":
        return grad_loss.expand(batch, frames) / batch
    return grad_loss.contiguous()


def refuse_double_backward(message: str) -> type[torch.autograd.Function]:
    """An autograd Function that passes a gradient computed under create_graph=True through (its ``sources``: the
    tensors the gradient depends on, so that a node is recorded) and raises ``message`` if differentiated again."""

    class DoubleBackwardError(torch.autograd.Function):
        @staticmethod
        def forward(grad, *sources):
            return grad.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, _):
            raise RuntimeError(message)

    return DoubleBackwardError


_DoubleBackwardError = refuse_double_backward(
    "CrossFrameAlignFunction does not support double backward: its backward runs hand-written kernels "
    "(or, for the reference backend, a hand-written formula) that have no derivative of their own. "
    "For higher derivatives differentiate crepa_kernels.reference.per_frame_loss directly.")


def _run_forward(proj, target, coefficients, call: AlignCall) -> tuple:
    """(reduced loss, *saved) of a prepared call."""
    proj_frames, target_frames = (unchecked_frames(x, call.num_frames) for x in (proj, target))
    backend = select_backend(call.backend, proj.device)
    per_frame, *saved = backend.forward(proj_frames, target_frames, coefficients, call.options)
    return (reduce_frames(per_frame, call.options.reduction), *saved)


def _save(ctx, proj, target, coefficients, call: AlignCall, saved) -> None:
    ctx.save_for_backward(proj, target, coefficients, *saved)
    ctx.call = call


def _backward(ctx, grad_loss):
    """(grad_proj | None, grad_target | None) of a call saved by _save."""
    proj, target, coefficients, *saved = ctx.saved_tensors
    needs_proj_grad, needs_target_grad = ctx.needs_input_grad[:2]
    if not (needs_proj_grad or needs_target_grad):
        return None, None
    call = ctx.call
    proj_frames, target_frames = (unchecked_frames(x, call.num_frames) for x in (proj, target))
    batch, frames = proj_frames.shape[:2]
    grad_per_frame = _reduction_backward(grad_loss, call.options.reduction, batch, frames)
    backend = select_backend(call.backend, proj.device)
    with torch.no_grad():
        if not saved and backend.BACKWARD_READS_STATISTICS:  # CrossFrameAlignFunction's: not kept, recomputed
            _, *saved = backend.forward(proj_frames, target_frames, coefficients, call.options)
        grads = backend.backward(grad_per_frame, proj_frames, target_frames, coefficients, tuple(saved),
                                 call.options, needs_proj_grad, needs_target_grad)
    grads = tuple(None if g is None else g.view(x.shape) for g, x in zip(grads, (proj, target)))
    if torch.is_grad_enabled():  # create_graph=True: the gradients must not be differentiable silently
        grads = tuple(None if g is None else _DoubleBackwardError.apply(g, grad_loss, proj, target) for g in grads)
    return grads


class _AlignFunction(torch.autograd.Function):
    """``apply(proj, target, coefficients, call)`` of a prepared call -> ``(loss, *saved)``: the statistics are
    outputs, kept for the backward instead of recomputed. What the functional form, the module and the trainer side
    run."""

    @staticmethod
    def forward(proj, target, coefficients, call):
        return _run_forward(proj, target, coefficients, call)

    @staticmethod
    def setup_context(ctx, inputs, output):
        proj, target, coefficients, call = inputs
        _, *saved = output
        ctx.mark_non_differentiable(*saved)
        _save(ctx, proj, target, coefficients, call, saved)

    @staticmethod
    def backward(ctx, grad_loss, *_grad_saved):
        return (*_backward(ctx, grad_loss), None, None)


def align_loss(proj, target, options: LossOptions, num_frames=None, backend: str = "auto") -> torch.Tensor:
    """The loss of one call with validated options, its statistics kept for the backward."""
    call, coefficients = prepare(proj, target, options, num_frames, backend)
    return _AlignFunction.apply(proj, target, coefficients, call)[0]


def per_frame_loss_on(backend: str, proj: torch.Tensor, target: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """L [B, F] of a named backend for [B, F, N, D] inputs and validated options, with autograd."""
    return align_loss(proj, target, dataclasses.replace(options, reduction="none"), None, backend)


# CrossFrameAlignFunction.forward prepares its call; setup_context, given the same argument objects right after,
# takes that call from here instead of checking it again (torch.func and torch.compile may pass other objects, or
# trace: it then prepares anew).
_last_prepared = threading.local()


def _prepare_arguments(proj, target, arguments: tuple) -> tuple[AlignCall, torch.Tensor]:
    last = getattr(_last_prepared, "entry", None)
    if last is not None:
        _last_prepared.entry = None
        if last[0] is proj and last[1] is target and len(last[2]) == len(arguments) and all(
                a is b for a, b in zip(last[2], arguments)):
            return last[3]
    tau, neighbors, neighbor_mode, normalize_weights, reduction, num_frames, eps, backend, clamp_neighbors, \
        weights = (*arguments, *_DEFAULTS[len(arguments):])
    options = LossOptions(tau=tau, neighbors=neighbors, neighbor_mode=neighbor_mode,
                          normalize_weights=normalize_weights, reduction=reduction, eps=eps,
                          clamp_neighbors=clamp_neighbors, weights=weights)
    return prepare(proj, target, options, num_frames, backend)


class CrossFrameAlignFunction(torch.autograd.Function):
    """The CREPA loss as a torch.autograd.Function, on any backend.

    ``CrossFrameAlignFunction.apply(proj, target, tau, neighbors, neighbor_mode, normalize_weights, reduction,
    num_frames, eps, backend, clamp_neighbors, weights)`` (arguments as in :func:`crepa_kernels.cross_frame_align_loss`;
    positional, all but proj and target optional) returns the loss, as the functional form does.

    forward runs the selected backend's fused forward; backward runs that backend's hand-written backward (for the
    reference backend, a hand-written PyTorch formula), computing only the gradients ``ctx.needs_input_grad`` asks
    for. The per-token statistics the fused backwards read are recomputed there by the forward kernel (the
    functional form keeps them instead; see the module docstring). setup_context makes it usable under torch.func;
    double backward raises.
    """

    @staticmethod
    def forward(proj, target, tau=1.0, neighbors=1, neighbor_mode="adjacent", normalize_weights=False,
                reduction="mean", num_frames=None, eps=1e-12, backend="auto", clamp_neighbors=False,
                weights="exponential"):
        arguments = (tau, neighbors, neighbor_mode, normalize_weights, reduction, num_frames, eps, backend,
                     clamp_neighbors, weights)
        prepared = _prepare_arguments(proj, target, arguments)
        if not torch.compiler.is_compiling():
            _last_prepared.entry = (proj, target, arguments, prepared)
        call, coefficients = prepared
        return _run_forward(proj, target, coefficients, call)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        proj, target, *arguments = inputs
        call, coefficients = _prepare_arguments(proj, target, tuple(arguments))
        _save(ctx, proj, target, coefficients, call, saved=())

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_backward(ctx, grad_loss), *(None for _ in _DEFAULTS))


# forward's arguments after proj and target, with their defaults: setup_context may receive fewer inputs than
# forward declares (torch.compile passes them as the caller wrote them), so they are completed from here
_DEFAULTS = tuple(parameter.default for parameter in
                  list(inspect.signature(CrossFrameAlignFunction.forward).parameters.values())[2:])

# Function.apply binds forward's default arguments on every call (setup_context is given all of them) through
# inspect.signature, which rebuilds the signature each time unless the function carries one: ~30 us per call.
CrossFrameAlignFunction.forward.__signature__ = inspect.signature(CrossFrameAlignFunction.forward)
