"""Backend registry and selection: which backend runs a call, and why.

A backend is a module of crepa_kernels.ops with these functions (no autograd inside: the one autograd wiring is
crepa_kernels.function):
    unavailable_reason(device: torch.device) -> str | None      # None when it can run on that device at all
    call_unsupported_reason(proj, target, options) -> str | None  # None when it can run this call
    forward(proj, target, coefficients, options) -> (L [B, F], *saved)  # saved: statistics its backward reads
    BACKWARD_READS_STATISTICS: bool                             # False when saved is always empty
    backward(grad_L, proj, target, coefficients, saved, options, needs_proj_grad, needs_target_grad)
        -> (grad_proj | None, grad_target | None)
with proj and target as spec.as_frames gives them, coefficients spec.coefficient_table's for the call (the only
source of the neighbour weights: no backend computes one), and, for a backend that refuses some sizes,
    size_limits(proj, target, options) -> ((max_dim | None, max_frames), ...) | None
                                        # the F and D it runs for calls like this one (shape None); None: any

``call_unsupported_reason`` sees the call through :class:`InputSpec` (shape, dtype, device, requires_grad; a
tensor has the same attributes) and a :class:`~crepa_kernels.spec.LossOptions`. ``shape`` is None while
torch.compile traces (sizes may be symbolic there): the traced sizes are then compared with each backend's
``size_limits`` instead, so that a compiled call runs where the eager call runs, and only a call that crosses a
limit recompiles. ``tau``, ``weights``, ``eps`` and ``reduction`` never decide the backend and are left at their
defaults.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import torch

from .spec import LossOptions, as_frames

BACKEND_MODULES = {
    "reference": "crepa_kernels.ops.reference",
    "triton": "crepa_kernels.ops.triton_loss",
    "cpu": "crepa_kernels.ops.native",
    "cuda": "crepa_kernels.ops.native",
    # the CUDA kernels on CPU tensors through the HIP CPU Runtime, for testing them: never an "auto" candidate
    "cuda_emulated": "crepa_kernels.ops.cuda_emulated",
}
BACKEND_NAMES = tuple(BACKEND_MODULES)
# device types a backend can ever run on; the module's unavailable_reason decides the rest
BACKEND_DEVICE_TYPES = {"cpu": ("cpu",), "cuda": ("cuda",), "cuda_emulated": ("cpu",)}
ENV_OVERRIDE = "CREPA_KERNELS_BACKEND"

# "auto" tries these in order, per device type. Both GPU backends move the minimum bytes (docs/triton.md,
# docs/cpp.md). Triton goes first: each program takes a block of tokens and forms the frame Gram matrix with
# tl.dot, while the CUDA kernel takes one token column per thread block and pays a block-wide reduction per
# statistic. The order is a design choice, not a measurement; benchmarks/bench_loss.py on a GPU measures it.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}


@dataclass(frozen=True)
class InputSpec:
    """One input of a call without its data: what call_unsupported_reason may look at."""
    shape: tuple[int, ...] | None  # [B, F, N, D]; None while torch.compile traces
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool


@dataclass(frozen=True)
class BackendChoice:
    """What explain_backend returns: the backend a call would run on, and every backend's reason."""
    requested: str  # "auto" or a backend name, after CREPA_KERNELS_BACKEND
    backend: str | None  # the backend that would run; None when the call would raise
    reasons: dict[str, str | None]  # each backend -> None if it can run this call, else why not
    candidates: tuple[str, ...]  # the backends "auto" tries on this device, in order (just the named one otherwise)
    error: str | None = None  # the call's error when backend is None

    def __str__(self) -> str:
        lines = [f"requested {self.requested!r}: " + (f"runs on {self.backend!r}" if self.backend else self.error)]
        others = [name for name in self.reasons if name not in self.candidates]
        for name in (*self.candidates, *others):  # in the order they are tried, then the rest
            reason = self.reasons[name]
            mark = "" if name in self.candidates else " (not a candidate)"
            lines.append(f"  {name:9s} {'can run it' if reason is None else reason}{mark}")
        return "\n".join(lines)


def _load(name: str):
    return importlib.import_module(BACKEND_MODULES[name])


@functools.lru_cache(maxsize=None)
def _unavailable_reason(name: str, device_type: str, device_index: int | None) -> str | None:
    device_types = BACKEND_DEVICE_TYPES.get(name)
    if device_types is not None and device_type not in device_types:
        return f"the {name!r} backend runs on {' or '.join(device_types)} tensors, not {device_type}"
    try:
        module = _load(name)
    except Exception as error:  # an import failure is a reason, not a crash
        return f"cannot import {BACKEND_MODULES[name]}: {type(error).__name__}: {error}"
    return module.unavailable_reason(torch.device(device_type, device_index))


def unavailable_reason(name: str, device: torch.device) -> str | None:
    return _unavailable_reason(name, device.type, device.index)


def call_unsupported_reason(name: str, proj, target, options: LossOptions) -> str | None:
    """None if backend ``name`` can run this call (device, shape, dtypes, options), else the reason."""
    return unavailable_reason(name, proj.device) or _load(name).call_unsupported_reason(proj, target, options)


# ----------------------------------------------------------------------------------------------------------------
# The call as a hashable key: resolution is cached per key in eager mode and is a constant under torch.compile.


def call_key(proj: torch.Tensor, target: torch.Tensor, options: LossOptions | None) -> tuple | None:
    """What selection depends on, as Python constants: (shape, dtypes, requires_grad, options, refused_sizes).

    While torch.compile traces, the sizes may be symbolic and pinning them would recompile for every shape: shape is
    None, and refused_sizes names the backends whose size_limits the traced F and D exceed. Those comparisons become
    the graph's guards, so only a call that crosses a limit recompiles (and none when no backend has limits).
    """
    if options is None:
        return None
    key = (proj.dtype, target.dtype, proj.requires_grad, target.requires_grad,
           options.neighbors, options.neighbor_mode, options.normalize_weights)
    if not torch.compiler.is_compiling():
        return (tuple(proj.shape), *key, ())
    refused = ()
    for name, limits in size_limits(proj.device.type, proj.device.index, (None, *key, ())):
        if not within_size_limits(limits, proj.shape[1], proj.shape[3]):
            refused += (name,)
    return (None, *key, refused)


def within_size_limits(limits: tuple, frames, dim) -> bool:
    """Whether F and D lie within a backend's size_limits; comparisons only, so symbolic sizes become range guards."""
    for max_dim, max_frames in limits:
        if max_dim is None or dim <= max_dim:
            return frames <= max_frames
    return False


@torch.compiler.assume_constant_result  # read while torch.compile traces, from constants only: no graph break
def size_limits(device_type: str, device_index: int | None, key: tuple) -> tuple[tuple[str, tuple], ...]:
    """(backend, its size_limits) for each backend that can run calls like ``key`` (shape None) but not all sizes."""
    return _size_limits(device_type, device_index, key)


@functools.lru_cache(maxsize=1024)
def _size_limits(device_type: str, device_index: int | None, key: tuple) -> tuple[tuple[str, tuple], ...]:
    device = torch.device(device_type, device_index)
    proj, target, options = _specs(device, key)
    found = []
    for name in BACKEND_NAMES:
        if call_unsupported_reason(name, proj, target, options) is None and hasattr(_load(name), "size_limits"):
            limits = _load(name).size_limits(proj, target, options)
            if limits is not None:
                found.append((name, limits))
    return tuple(found)


def _specs(device: torch.device, key: tuple) -> tuple[InputSpec, InputSpec, LossOptions]:
    shape, proj_dtype, target_dtype, proj_grad, target_grad, neighbors, mode, normalize, _ = key
    options = LossOptions(neighbors=neighbors, neighbor_mode=mode, normalize_weights=normalize)
    return (InputSpec(shape, proj_dtype, device, proj_grad), InputSpec(shape, target_dtype, device, target_grad),
            options)


def _reasons(device: torch.device, key: tuple | None) -> dict[str, str | None]:
    if key is None:
        return {name: unavailable_reason(name, device) for name in BACKEND_NAMES}
    proj, target, options = _specs(device, key)
    reasons = {name: call_unsupported_reason(name, proj, target, options) for name in BACKEND_NAMES}
    limits = dict(_size_limits(device.type, device.index, key[:-1] + ((),))) if key[-1] else {}
    for name in key[-1]:
        steps = ", ".join(f"F <= {frames} for D <= {dim}" if dim is not None else f"F <= {frames} for larger D"
                          for dim, frames in limits[name])
        reasons[name] = f"the traced sizes are past the sizes {name!r} runs for this call ({steps})"
    return reasons


def _check_name(name, source: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{source}: expected a str, one of {('auto',) + BACKEND_NAMES}, got {type(name).__name__}")
    if name != "auto" and name not in BACKEND_MODULES:
        raise ValueError(f"{source}: expected one of {('auto',) + BACKEND_NAMES}, got {name!r}")


def check_backend_name(backend) -> None:
    _check_name(backend, "backend")


def _choose(backend: str, override: str | None, device: torch.device, key: tuple | None) -> BackendChoice:
    _check_name(backend, "backend")
    source = "backend"
    if backend == "auto" and override:
        backend, source = override, f"environment variable {ENV_OVERRIDE}"
        _check_name(backend, source)
    reasons = _reasons(device, key)
    what = "on " + str(device) if key is None else "this call"
    if backend != "auto":
        reason = reasons[backend]
        error = None if reason is None else f"{source}={backend!r} cannot run {what}: {reason}"
        return BackendChoice(backend, None if error else backend, reasons, (backend,), error)
    candidates = AUTO_ORDER.get(device.type, ("reference",))
    for name in candidates:
        if reasons[name] is None:
            return BackendChoice("auto", name, reasons, candidates)
    return BackendChoice("auto", None, reasons, candidates, f"no crepa_kernels backend can run {what}")


@functools.lru_cache(maxsize=1024)
def _resolve(backend: str, override: str | None, device_type: str, device_index: int | None, key) -> str:
    choice = _choose(backend, override, torch.device(device_type, device_index), key)
    if choice.backend is None:
        raise RuntimeError(choice.error)
    skipped = [f"{name!r}: {choice.reasons[name]}" for name in choice.candidates[:choice.candidates.index(choice.backend)]
               if name != "reference"]
    if skipped:  # one warning per distinct call, naming every backend passed over
        warnings.warn(f"crepa_kernels: backend 'auto' runs {choice.backend!r}, passing over " + "; ".join(skipped),
                      RuntimeWarning, stacklevel=5)
    _LOADED[choice.backend] = _load(choice.backend)
    return choice.backend


@torch.compiler.assume_constant_result  # resolved once while torch.compile traces: no graph break
def resolve_backend_name(backend: str, device_type: str, device_index: int | None, key: tuple | None = None) -> str:
    """The backend that runs ``backend`` for this call (``key`` from call_key; None: the device alone); raises if a
    named backend cannot run it. Under torch.compile this, and so CREPA_KERNELS_BACKEND, is read when the graph is
    traced."""
    return _resolve(backend, os.environ.get(ENV_OVERRIDE) or None, device_type, device_index, key)


_LOADED: dict = {}


def select_backend(backend: str, device: torch.device, proj: torch.Tensor | None = None,
                   target: torch.Tensor | None = None, options: LossOptions | None = None):
    """The backend module to run for this call (or, without proj/target/options, for any call on ``device``)."""
    key = None if proj is None else call_key(proj, target, options)
    return _LOADED[resolve_backend_name(backend, device.type, device.index, key)]


# ----------------------------------------------------------------------------------------------------------------
# Public queries


def _call(proj, target, num_frames, options: dict) -> tuple[torch.Tensor, torch.Tensor, LossOptions]:
    proj, target = as_frames(proj, target, num_frames)
    return proj, target, LossOptions(**options)


def available_backends(device: torch.device | str | None = None, *, proj: torch.Tensor | None = None,
                       target: torch.Tensor | None = None, num_frames: int | None = None,
                       **options) -> dict[str, bool | str]:
    """Each backend name -> True, or the reason it cannot run.

    With only ``device`` (default: CUDA if present, else CPU): whether it can run there at all. With ``proj`` and
    ``target`` (and the loss options of cross_frame_align_loss, e.g. ``neighbors=2``): whether it can run that call.
    """
    if proj is None and target is None:
        if options or num_frames is not None:
            raise TypeError(f"available_backends: loss options {sorted(options)} need proj and target")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        return {name: unavailable_reason(name, device) or True for name in BACKEND_NAMES}
    if proj is None or target is None:
        raise TypeError("available_backends: pass both proj and target, or neither")
    proj, target, loss_options = _call(proj, target, num_frames, options)
    if device is not None and torch.device(device) != proj.device:
        raise ValueError(f"device: expected None or the inputs' device {proj.device}, got {device}")
    return {name: call_unsupported_reason(name, proj, target, loss_options) or True for name in BACKEND_NAMES}


def explain_backend(proj: torch.Tensor, target: torch.Tensor, *, backend: str = "auto", num_frames: int | None = None,
                    **options) -> BackendChoice:
    """Which backend ``cross_frame_align_loss(proj, target, backend=backend, **options)`` would run, and why:
    every backend's reason for this call and the order "auto" tries them in. Runs no kernel; never raises for a
    backend that cannot run (``.error`` says what the call would raise). ``print(explain_backend(...))`` reads well.
    """
    check_backend_name(backend)
    proj, target, loss_options = _call(proj, target, num_frames, options)
    key = call_key(proj, target, loss_options)
    return _choose(backend, os.environ.get(ENV_OVERRIDE) or None, proj.device, key)
