"""CrossFrameAlignFunction: the one place where a backend's backward is wired to its forward.

The functional form (api.cross_frame_align_loss) and the module (module.CrossFrameAlignLoss) both run it, so the
three forms run the same code. The backends' torch.library ops carry no autograd formula of their own.

A backend module provides (see backends.py)
    forward(proj, target, options) -> (L [B, F], *saved)    # saved: per-token statistics its backward reads
    backward(grad_L [B, F], proj, target, saved, options, needs_proj_grad, needs_target_grad) -> (grad_proj | None,
                                                                                              grad_target | None)
with proj and target as spec.as_frames gives them, [B, F, N, D].

Where the statistics live: ``setup_context`` (which torch.func needs) sees only the inputs and the outputs of
``forward``, so a statistic the backward reads must be an output. ``CrossFrameAlignFunction.apply`` returns the
bare loss, as a drop-in must, so its backward recomputes them with the backend's forward kernel (same kernel, same
bits; one more read of proj and target). The functional form and the module run the same Function with the
statistics as extra, non-differentiable outputs (``_StatisticsKeepingFunction``), and drop them: a few floats per
token kept instead of a second forward pass.
"""
from __future__ import annotations

import inspect

import torch

from .backends import call_key, check_backend_name, resolve_backend_name, select_backend
from .spec import LossOptions, as_frames, check_eps_for_dtype, compute_dtype, reduce_frames

# forward's arguments after proj and target, with their defaults: setup_context may receive fewer inputs than
# forward declares (torch.compile passes them as the caller wrote them), so it completes them from here
ARGUMENTS = ("tau", "neighbors", "neighbor_mode", "normalize_weights", "reduction", "num_frames", "eps", "backend",
             "clamp_neighbors")
DEFAULTS = (1.0, 1, "adjacent", False, "mean", None, 1e-12, "auto", False)


def _check_clamp(clamp_neighbors) -> None:
    if not isinstance(clamp_neighbors, bool):
        raise TypeError(f"clamp_neighbors: expected a bool, got {type(clamp_neighbors).__name__} {clamp_neighbors!r}")


def call_options(tau, neighbors, neighbor_mode, normalize_weights, reduction, eps, clamp_neighbors,
                 num_frames: int) -> LossOptions:
    """The validated options of one call on clips of ``num_frames`` frames.

    clamp_neighbors=True uses d = min(neighbors, F - 1), as SimpleTuner's CrepaRegularizer and takenoko's
    CrepaHelper do: with d >= F the adjacent pair becomes the frames at distance F - 1 instead of being dropped.
    """
    _check_clamp(clamp_neighbors)
    options = LossOptions(tau=tau, neighbors=neighbors, neighbor_mode=neighbor_mode,
                          normalize_weights=normalize_weights, reduction=reduction, eps=eps)
    if clamp_neighbors and options.neighbors > num_frames - 1:
        options = LossOptions(tau=tau, neighbors=num_frames - 1, neighbor_mode=neighbor_mode,
                              normalize_weights=normalize_weights, reduction=reduction, eps=eps)
    return options


def _prepare(proj, target, arguments):
    """Checks one call (before any kernel runs) -> frame views, options and the backend that runs it."""
    tau, neighbors, neighbor_mode, normalize_weights, reduction, num_frames, eps, backend, clamp_neighbors = arguments
    check_backend_name(backend)
    proj_frames, target_frames = as_frames(proj, target, num_frames)
    options = call_options(tau, neighbors, neighbor_mode, normalize_weights, reduction, eps, clamp_neighbors,
                           proj_frames.shape[1])
    check_eps_for_dtype(options.eps, compute_dtype(proj_frames, target_frames))
    device = proj_frames.device
    key = call_key(proj_frames, target_frames, options)  # the backend depends on the call (dtypes, shape, options)
    return proj_frames, target_frames, options, resolve_backend_name(backend, device.type, device.index, key)


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


class CrossFrameAlignFunction(torch.autograd.Function):
    """The CREPA loss as a torch.autograd.Function, on any backend.

    ``CrossFrameAlignFunction.apply(proj, target, tau, neighbors, neighbor_mode, normalize_weights, reduction,
    num_frames, eps, backend, clamp_neighbors)`` (arguments as in :func:`crepa_kernels.cross_frame_align_loss`;
    positional, all but proj and target optional) returns the loss, as the functional form does.

    forward runs the selected backend's fused forward; backward runs that backend's hand-written backward (for the
    reference backend, a hand-written PyTorch formula), computing only the gradients ``ctx.needs_input_grad`` asks
    for. The per-token statistics the fused backwards read are recomputed there by the forward kernel (the
    functional form keeps them instead; see the module docstring). setup_context makes it usable under torch.func;
    double backward raises.
    """

    @staticmethod
    def forward(proj, target, tau=1.0, neighbors=1, neighbor_mode="adjacent", normalize_weights=False,
                reduction="mean", num_frames=None, eps=1e-12, backend="auto", clamp_neighbors=False):
        return _forward(proj, target, tau, neighbors, neighbor_mode, normalize_weights, reduction, num_frames, eps,
                        backend, clamp_neighbors)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, saved=())

    @staticmethod
    def backward(ctx, grad_loss, *_grad_saved):
        proj, target, *saved = ctx.saved_tensors
        needs_proj_grad, needs_target_grad = ctx.needs_input_grad[:2]
        grads = (None, None)
        if needs_proj_grad or needs_target_grad:
            batch, frames, tokens, _ = ctx.frames_shape
            grad_per_frame = _reduction_backward(grad_loss, ctx.options.reduction, batch, frames)
            backend = select_backend(ctx.backend_name, proj.device)
            proj_frames, target_frames = proj.view(ctx.frames_shape), target.view(ctx.frames_shape)
            with torch.no_grad():
                if not saved and backend.BACKWARD_READS_STATISTICS:  # apply's: not kept, recomputed
                    _, *saved = backend.forward(proj_frames, target_frames, ctx.options)
                grads = backend.backward(grad_per_frame, proj_frames, target_frames, tuple(saved), ctx.options,
                                         needs_proj_grad, needs_target_grad)
            grads = tuple(None if g is None else g.view(x.shape) for g, x in zip(grads, (proj, target)))
            if torch.is_grad_enabled():  # create_graph=True: the gradients must not be differentiable silently
                grads = tuple(None if g is None else _DoubleBackwardError.apply(g, grad_loss, proj, target)
                              for g in grads)
        return (*grads, *(None for _ in ARGUMENTS))


class _StatisticsKeepingFunction(CrossFrameAlignFunction):
    """CrossFrameAlignFunction whose ``apply`` returns ``(loss, *saved)``: the statistics are outputs, kept for the
    backward (which is CrossFrameAlignFunction's) instead of recomputed. What the functional form and module run."""

    @staticmethod
    def forward(proj, target, tau=1.0, neighbors=1, neighbor_mode="adjacent", normalize_weights=False,
                reduction="mean", num_frames=None, eps=1e-12, backend="auto", clamp_neighbors=False):
        return _forward(proj, target, tau, neighbors, neighbor_mode, normalize_weights, reduction, num_frames, eps,
                        backend, clamp_neighbors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, *saved = output
        ctx.mark_non_differentiable(*saved)
        _setup(ctx, inputs, saved)


def _forward(proj, target, *arguments):
    """(reduced loss, *saved) of one call."""
    proj_frames, target_frames, options, name = _prepare(proj, target, arguments)
    per_frame, *saved = select_backend(name, proj_frames.device).forward(proj_frames, target_frames, options)
    return (reduce_frames(per_frame, options.reduction), *saved)


def _setup(ctx, inputs, saved) -> None:
    proj, target, *arguments = inputs
    arguments = (*arguments, *DEFAULTS[len(arguments):])
    proj_frames, _, options, name = _prepare(proj, target, arguments)
    ctx.save_for_backward(proj, target, *saved)
    ctx.options = options
    ctx.backend_name = name
    ctx.frames_shape = tuple(proj_frames.shape)


# Function.apply binds forward's default arguments on every call (setup_context is given all of them) through
# inspect.signature, which rebuilds the signature each time unless the function carries one: ~30 us per call.
for _function in (CrossFrameAlignFunction, _StatisticsKeepingFunction):
    _function.forward.__signature__ = inspect.signature(_function.forward)


def align_loss_keeping_statistics(proj, target, *arguments) -> torch.Tensor:
    """The loss of CrossFrameAlignFunction.apply(proj, target, *arguments), its statistics kept for the backward."""
    return _StatisticsKeepingFunction.apply(proj, target, *arguments)[0]


def per_frame_loss_on(backend: str, proj: torch.Tensor, target: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """L [B, F] of a named backend for [B, F, N, D] inputs and validated options, with autograd."""
    return align_loss_keeping_statistics(proj, target, options.tau, options.neighbors, options.neighbor_mode,
                                         options.normalize_weights, "none", None, options.eps, backend)
