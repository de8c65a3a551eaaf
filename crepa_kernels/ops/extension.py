"""The C++/CUDA extension as the "cpu" and "cuda" backends.

One pair of ops, ``torch.ops.crepa_kernels.align_forward`` / ``align_backward``, dispatches on the device to the
fused CPU kernel or the CUDA kernel (csrc/). This module loads the extension (the prebuilt ``crepa_kernels._C``, or a
JIT build of the shipped sources on first use), gives the ops fake (meta) implementations for torch.compile and
wires the backward op in as the forward op's autograd formula.

Nothing is compiled at import: only ``unavailable_reason`` or ``per_frame_loss`` load the extension.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path

import torch

from ..spec import LossOptions, compute_dtype

logger = logging.getLogger(__name__)

_PACKAGE = Path(__file__).resolve().parent.parent
# A wheel ships the sources as package data; a source checkout has them at the top level.
_CSRC_CANDIDATES = (_PACKAGE / "csrc", _PACKAGE.parent / "csrc")

_lock = threading.Lock()
_module = None
_load_error: str | None = None


def _csrc_dir() -> Path | None:
    for candidate in _CSRC_CANDIDATES:
        if (candidate / "build_config.py").exists():
            return candidate
    return None


def _build_config(csrc: Path):
    spec = importlib.util.spec_from_file_location("crepa_kernels_build_config", csrc / "build_config.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    return config


def _jit_build():
    """Compiles the shipped sources with ninja into torch's extension cache (rebuilt only when they change)."""
    csrc = _csrc_dir()
    if csrc is None:
        raise RuntimeError(f"no prebuilt crepa_kernels._C and no C++ sources in {[str(c) for c in _CSRC_CANDIDATES]}")
    config = _build_config(csrc)
    home = config.cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)  # before cpp_extension settles its own guess at import
    from torch.utils import cpp_extension

    home = home or cpp_extension.CUDA_HOME
    with_cuda = bool(torch.cuda.is_available() and torch.version.cuda and home)
    if with_cuda:
        cpp_extension.CUDA_HOME = home
    name = "crepa_kernels_jit_cuda" if with_cuda else "crepa_kernels_jit_cpu"
    logger.warning("crepa_kernels: no prebuilt extension; loading the JIT build %s (compiled from %s on first use, "
                   "about a minute, then cached)", name, csrc)
    return cpp_extension.load(
        name=name,
        sources=config.sources(with_cuda, csrc),
        extra_cflags=config.CXX_FLAGS + ([config.CUDA_DEFINE] if with_cuda else []),
        extra_cuda_cflags=config.NVCC_FLAGS + [config.CUDA_DEFINE],
        extra_ldflags=config.LINK_FLAGS,
        extra_include_paths=[str(csrc)],
        with_cuda=with_cuda,
        verbose=False,
    )


def _load():
    """The extension module, loaded once; on failure None, with the reason in _load_error."""
    global _module, _load_error
    with _lock:
        if _module is not None or _load_error is not None:
            return _module
        try:
            try:
                from .. import _C as module
            except ImportError as prebuilt_error:  # absent, or built against another torch
                logger.debug("crepa_kernels._C not importable: %s", prebuilt_error)
                module = _jit_build()
            _register_python_parts()
            _module = module
        except Exception as error:  # a build failure is a reason to fall back, not a crash
            _load_error = f"the C++ extension failed to build or load: {type(error).__name__}: {error}"
        return _module


def build_info() -> dict:
    """How the loaded extension was compiled, and which build of the CPU kernels runs here; raises if unusable.

    {'cuda': bool, 'openmp': bool, 'torch': str, 'cpu_isa': 'avx2' or 'baseline'}
    """
    module = _load()
    if module is None:
        raise RuntimeError(_load_error)
    return dict(module.build_info())


def set_poison_buffers(enabled: bool) -> None:
    """Test switch: every buffer the kernels allocate starts as NaN, so an unwritten element shows."""
    build_info()
    _module.set_poison_buffers(enabled)


def set_cpu_baseline_forced(forced: bool) -> None:
    """Test switch: the CPU kernels run their baseline-ISA build even where the AVX2 + FMA build could."""
    build_info()
    _module.set_cpu_baseline_forced(forced)


def unavailable_reason(device: torch.device) -> str | None:
    if device.type not in ("cpu", "cuda"):
        return f"the C++ extension has kernels for CPU and CUDA, not {device.type}"
    if _load() is None:
        return _load_error
    if device.type == "cuda":
        if not _module.build_info()["cuda"]:
            return "the C++ extension was compiled without CUDA (set FORCE_CUDA=1 or install nvcc and reinstall)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    return None


SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # csrc/crepa_ops.cpp check_floating
# csrc/crepa_cuda.cu: kMaxSharedBytes (no opt-in past the default per-block limit), kChunk, kWarp, kMaxThreads
CUDA_MAX_SHARED_BYTES = 48 * 1024
_CUDA_CHUNK, _CUDA_WARP, _CUDA_MAX_THREADS = 8, 32, 256
_INT32_MAX = 2**31 - 1


def cuda_shared_bytes(kernel: str, shape, proj_dtype, target_dtype, options: LossOptions) -> int:
    """Dynamic shared memory per block of the CUDA kernels (mirrors launch_forward / launch_backward)."""
    _, num_frames, _, dim = shape
    width = band_width(num_frames, options.neighbors, options.neighbor_mode == "cumulative")
    stats_per_frame = 2 + width
    element = 8 if torch.float64 in (proj_dtype, target_dtype) else 4
    if kernel == "forward":
        chunks = -(-dim // _CUDA_CHUNK)
        threads = min(-(-chunks // _CUDA_WARP) * _CUDA_WARP, _CUDA_MAX_THREADS)
        count = num_frames * width + num_frames * stats_per_frame + (threads // _CUDA_WARP) * stats_per_frame
    else:
        count = 3 * num_frames * width + num_frames * stats_per_frame + 2 * num_frames
    return count * element


def call_unsupported_reason(proj, target, options: LossOptions) -> str | None:
    """None if the kernel for proj.device can run this call (see crepa_kernels.backends); limits that depend on the
    shape are checked only when proj.shape is known."""
    for name, x in (("proj", proj), ("target", target)):
        if x.dtype not in SUPPORTED_DTYPES:
            return f"the C++/CUDA kernels take {', '.join(map(str, SUPPORTED_DTYPES))}; {name} is {x.dtype}"
    if proj.device.type != "cuda" or proj.shape is None:
        return None
    batch, num_frames, num_tokens, _ = proj.shape
    if batch * num_tokens > _INT32_MAX:
        return f"the CUDA kernels launch one block per token column: B * N = {batch * num_tokens} > {_INT32_MAX}"
    for kernel in ("forward", "backward"):  # the backward needs more; both are refused before the forward runs
        need = cuda_shared_bytes(kernel, proj.shape, proj.dtype, target.dtype, options)
        if need > CUDA_MAX_SHARED_BYTES:
            return (f"the CUDA {kernel} kernel needs {need} bytes of shared memory per block for F={num_frames} with "
                    f"{options.neighbor_mode} d={options.neighbors}, more than its limit of {CUDA_MAX_SHARED_BYTES}")
    return None


def per_frame_loss(proj: torch.Tensor, target: torch.Tensor, options: LossOptions) -> torch.Tensor:
    if _module is None:
        _load()
    loss, _stats = torch.ops.crepa_kernels.align_forward(
        proj,
        target,
        options.neighbors,
        options.neighbor_mode == "cumulative",
        float(options.tau),
        options.normalize_weights,
        float(options.eps),
    )
    return loss


def band_width(num_frames: int, neighbors: int, cumulative: bool) -> int:
    """Dot-product slots per frame (mirrors crepa::Band::width): the frame itself plus its neighbour offsets."""
    if cumulative:
        return 1 + 2 * min(neighbors, num_frames - 1)
    return 3 if 0 < neighbors < num_frames else 1


def _align_forward_fake(proj, target, neighbors, cumulative, tau, normalize_weights, eps):
    batch, frames, tokens, _ = proj.shape
    dtype = compute_dtype(proj, target)
    stats_per_frame = 2 + band_width(frames, neighbors, cumulative)
    return (
        proj.new_empty((batch, frames), dtype=dtype),
        proj.new_empty((batch, tokens, frames, stats_per_frame), dtype=dtype),
    )


def _align_backward_fake(grad_loss, proj, target, stats, neighbors, cumulative, tau, normalize_weights, eps,
                         needs_proj_grad, needs_target_grad):
    def gradient(x, needed):
        return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else x.new_empty((0,))

    return gradient(proj, needs_proj_grad), gradient(target, needs_target_grad)


def _setup_context(ctx, inputs, output):
    proj, target, neighbors, cumulative, tau, normalize_weights, eps = inputs
    _, stats = output
    ctx.save_for_backward(proj, target, stats)
    ctx.options = (neighbors, cumulative, tau, normalize_weights, eps)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_loss, _grad_stats):
    proj, target, stats = ctx.saved_tensors
    needs_proj_grad, needs_target_grad = ctx.needs_input_grad[:2]
    # the kernel computes and allocates only the gradients asked for; the others come back as empty [0] tensors
    grad_proj, grad_target = torch.ops.crepa_kernels.align_backward(
        grad_loss, proj, target, stats, *ctx.options, needs_proj_grad, needs_target_grad
    )
    return (
        grad_proj if needs_proj_grad else None,
        grad_target if needs_target_grad else None,
        None,
        None,
        None,
        None,
        None,
    )


def _register_python_parts() -> None:
    torch.library.register_fake("crepa_kernels::align_forward", _align_forward_fake)
    torch.library.register_fake("crepa_kernels::align_backward", _align_backward_fake)
    torch.library.register_autograd("crepa_kernels::align_forward", _backward, setup_context=_setup_context)
