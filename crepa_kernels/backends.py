"""Backend registry and selection.

A backend is a module with two functions:
    unavailable_reason(device: torch.device) -> str | None   # None when it can run on that device
    per_frame_loss(proj, target, options) -> Tensor [B, F]    # autograd-aware, inputs as spec.as_frames gives them
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKEND_MODULES = {
    "reference": "crepa_kernels.reference_backend",
    "triton": "crepa_kernels.ops.triton_loss",
    "cpu": "crepa_kernels.ops.extension",
    "cuda": "crepa_kernels.ops.extension",
}
BACKEND_NAMES = tuple(BACKEND_MODULES)
# device types a backend can ever run on; the module's unavailable_reason decides the rest
BACKEND_DEVICE_TYPES = {"cpu": ("cpu",), "cuda": ("cuda",)}
ENV_OVERRIDE = "CREPA_KERNELS_BACKEND"

# "auto" tries these in order, per device type. Both GPU backends move the minimum bytes (docs/triton.md,
# docs/cpp.md); neither has been timed on a GPU yet. Triton goes first: each program takes a block of tokens and
# forms the frame Gram matrix with tl.dot, while the CUDA kernel takes one token column per thread block and pays
# a block-wide reduction per statistic. Revisit with benchmarks/bench_loss.py on a GPU.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}


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


def available_backends(device: torch.device | str | None = None) -> dict[str, bool | str]:
    """Each backend name -> True, or the reason it cannot run on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: unavailable_reason(name, device) or True for name in BACKEND_NAMES}


def _check_name(name, source: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{source}: expected a str, one of {('auto',) + BACKEND_NAMES}, got {type(name).__name__}")
    if name != "auto" and name not in BACKEND_MODULES:
        raise ValueError(f"{source}: expected one of {('auto',) + BACKEND_NAMES}, got {name!r}")


@functools.lru_cache(maxsize=None)
def _warn_fallback(name: str, reason: str) -> None:
    warnings.warn(f"crepa_kernels: backend {name!r} is not usable, falling back: {reason}", RuntimeWarning, stacklevel=4)


def check_backend_name(backend) -> None:
    _check_name(backend, "backend")


@torch.compiler.assume_constant_result  # resolved once while torch.compile traces: no graph break
def resolve_backend_name(backend: str, device_type: str, device_index: int | None) -> str:
    """The backend that runs for ``backend`` on this device; raises if a named backend cannot run.

    Under torch.compile this, and so CREPA_KERNELS_BACKEND, is read when the graph is traced.
    """
    _check_name(backend, "backend")
    device = torch.device(device_type, device_index)
    source = "backend"
    if backend == "auto" and os.environ.get(ENV_OVERRIDE):
        backend = os.environ[ENV_OVERRIDE]
        source = f"environment variable {ENV_OVERRIDE}"
        _check_name(backend, source)
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"{source}={backend!r} cannot run on {device}: {reason}")
        _LOADED[backend] = _load(backend)
        return backend
    for name in AUTO_ORDER.get(device.type, ("reference",)):
        reason = unavailable_reason(name, device)
        if reason is None:
            _LOADED[name] = _load(name)
            return name
        if name != "reference":
            _warn_fallback(name, reason)
    raise RuntimeError(f"no crepa_kernels backend can run on {device}")


_LOADED: dict = {}


def select_backend(backend: str, device: torch.device):
    """The backend module to run for tensors on ``device``."""
    return _LOADED[resolve_backend_name(backend, device.type, device.index)]
