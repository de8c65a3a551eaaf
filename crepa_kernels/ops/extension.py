"""The C++/CUDA extension as the "cpu" and "cuda" backends.

One pair of ops, ``torch.ops.crepa_kernels.align_forward`` / ``align_backward``, dispatches on the device to the
fused CPU kernel or the CUDA kernel (csrc/). This module loads the extension (the prebuilt ``crepa_kernels._C``, or a
JIT build of the shipped sources on first use), gives the ops fake (meta) implementations for torch.compile, and
exposes them as a backend's ``forward`` / ``backward`` pair. The ops have no autograd formula of their own:
crepa_kernels.CrossFrameAlignFunction is the one place that wires a backward to a forward.

Nothing is compiled at import: only ``unavailable_reason`` or ``forward`` load the extension.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path

import torch

from .. import gpu_limits
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


def _check_prebuilt_is_ours() -> None:
    """ImportError unless crepa_kernels._C is a file of this package: an editable install's import finder maps
    the name to the checkout it was installed from, whose build lacks this checkout's sources. Checked before the
    import, since a loaded extension has registered its ops for good."""
    spec = importlib.util.find_spec(f"{__package__.rpartition('.')[0]}._C")
    if spec is None or spec.origin is None:
        raise ImportError("no prebuilt crepa_kernels._C")
    if Path(spec.origin).resolve().parent != _PACKAGE:
        raise ImportError(f"crepa_kernels._C resolves to {spec.origin}, outside this package {_PACKAGE}")


def _load():
    """The extension module, loaded once; on failure None, with the reason in _load_error."""
    global _module, _load_error
    with _lock:
        if _module is not None or _load_error is not None:
            return _module
        try:
            try:
                _check_prebuilt_is_ours()
                from .. import _C as module
            except ImportError as prebuilt_error:  # absent, another checkout's, or built against another torch
                logger.debug("crepa_kernels._C not importable: %s", prebuilt_error)
                module = _jit_build()
            _register_python_parts()
            _module = module
        except Exception as error:  # a build failure is a reason to fall back, not a crash
            _load_error = f"the C++ extension failed to build or load: {type(error).__name__}: {error}"
        return _module


def _require():
    """The loaded extension module; raises with the reason it cannot load."""
    module = _load()
    if module is None:
        raise RuntimeError(_load_error)
    return module


def build_info() -> dict:
    """How the loaded extension was compiled, and which build of the CPU kernels runs here; raises if unusable.

    {'cuda': bool, 'openmp': bool, 'torch': str, 'cpu_isa': 'avx2' or 'baseline'}
    """
    return dict(_require().build_info())


def set_poison_buffers(enabled: bool) -> None:
    """Test switch: every buffer the kernels allocate starts as NaN, so an unwritten element shows."""
    build_info()
    _module.set_poison_buffers(enabled)


def set_cuda_grid_limit(blocks: int) -> None:
    """Test switch: the CUDA launch plans use at most ``blocks`` blocks per launch (0: CUDA's grid limit), so small
    inputs take the several-launch path that only B * N > 2^31 - 1 takes otherwise."""
    _planner("set_cuda_grid_limit")(int(blocks))


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


def _accumulation_bytes(dtype: torch.dtype) -> int:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected the accumulation dtype, torch.float32 or torch.float64, got {dtype}")
    return 8 if dtype == torch.float64 else 4


def _plan_arguments(shape, options: LossOptions, dtype: torch.dtype) -> tuple:
    if len(shape) != 4:
        raise ValueError(f"shape: expected [B, F, N, D], got {tuple(shape)}")
    cumulative = options.neighbor_mode == "cumulative"
    return (*(int(size) for size in shape), options.neighbors, cumulative, _accumulation_bytes(dtype))


def _planner(name: str):
    """A launch-planning function of the extension; a clear error from a build older than its Python side."""
    module = _require()
    if not hasattr(module, name):
        raise RuntimeError(f"the loaded extension {getattr(module, '__file__', module)} has no {name}: it was built "
                           "from older sources; rebuild it (pip install --no-build-isolation -e ., or "
                           "python setup.py build_ext --inplace)")
    return getattr(module, name)


def cuda_launch_plan(shape, options: LossOptions, dtype: torch.dtype) -> dict:
    """How the CUDA kernels launch for [B, F, N, D] inputs accumulating in ``dtype`` (float32 or float64).

    {'forward' | 'reduce' | 'backward': {'grid': blocks per launch, 'launches', 'threads': per block,
    'shared_bytes': dynamic}}, from the planner the CUDA launcher itself uses (csrc/crepa_cuda_plan.h). Runs on any
    build, no GPU needed.
    """
    return dict(_planner("cuda_launch_plan")(*_plan_arguments(shape, options, dtype)))


def cuda_shape_unsupported_reason(shape, options: LossOptions, dtype: torch.dtype, shared_limit: int) -> str | None:
    """Why the CUDA kernels cannot run these sizes where a block may use ``shared_limit`` bytes of shared memory
    (cudaDevAttrMaxSharedMemoryPerBlockOptin), or None: the check the CUDA forward makes before any work."""
    return _planner("cuda_unsupported_reason")(*_plan_arguments(shape, options, dtype), int(shared_limit))


# Sizes the planner's refusal is probed up to while size_limits are derived: far past any real clip or width
_PROBE_MAX_SIZE = 2**40


def cuda_size_limits(options: LossOptions, dtype: torch.dtype, shared_limit: int) -> tuple[tuple[int | None, int], ...]:
    """The sizes the CUDA kernels run, where a block may use ``shared_limit`` bytes, as steps ((max_dim, max_frames),
    ...): F <= max_frames where D <= max_dim, max_dim increasing, the last one None (any larger D); max_frames 0:
    no F.

    Derived from cuda_shape_unsupported_reason by bisection, on two facts of the launch plan that
    tests/test_cuda_limits.py checks: the refusal reads F and D only (never B or N: the grid takes several launches),
    and a larger F or D never needs less shared memory. Under torch.compile these steps are compared with the
    symbolic F and D (crepa_kernels.backends.within_size_limits), so the guard is a range, not the exact sizes.
    """
    def fits(frames: int, dim: int) -> bool:
        return cuda_shape_unsupported_reason((1, frames, 1, dim), options, dtype, shared_limit) is None

    def last_true(predicate, low: int, high: int) -> int:
        """The largest x in [low, high) with predicate(x), given predicate(low) and not predicate(high)."""
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if predicate(middle) else (low, middle)
        return low

    steps = []
    dim = 1
    while True:
        frames = last_true(lambda f: fits(f, dim), 1, _PROBE_MAX_SIZE) if fits(1, dim) else 0
        if frames == 0 or fits(frames, _PROBE_MAX_SIZE):  # nothing fits at D, nor past it; or F fits at every D
            steps.append((None, frames))
            return tuple(steps)
        dim = last_true(lambda d: fits(frames, d), dim, _PROBE_MAX_SIZE)
        steps.append((dim, frames))
        dim += 1


def _shared_limit(device: torch.device) -> int:
    """Dynamic shared memory one block may use on this CUDA device: the opt-in figure less the reservation the
    kernels report as static shared memory, the number the C++ refusal and opt-in use (dynamic_shared_limit_of)."""
    return (torch.cuda.get_device_properties(device).shared_memory_per_block_optin
            - gpu_limits.reserved_shared_bytes(torch.cuda.get_device_capability(device)))


SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # csrc/crepa_ops.cpp check_floating
# the oldest GPUs the CUDA build has code for (csrc/build_config.py CUDA_ARCHS starts at 8.0)
CUDA_MIN_CAPABILITY = (8, 0)


def call_unsupported_reason(proj, target, options: LossOptions) -> str | None:
    """Why this extension cannot run this call, or None (see crepa_kernels.backends: tensors, or specs with their
    shape, dtype and device; shape None while torch.compile traces, when size_limits covers the sizes).

    The CPU kernel runs any shape. The CUDA kernels hold the band's [F][W] coefficient table in shared memory, so
    wide cumulative bands at large F (more so in fp64) can exceed the device's per-block limit.
    """
    for name, x in (("proj", proj), ("target", target)):
        if x.dtype not in SUPPORTED_DTYPES:
            return f"the C++/CUDA kernels take {', '.join(map(str, SUPPORTED_DTYPES))}; {name} is {x.dtype}"
    if proj.device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(proj.device)
    if capability < CUDA_MIN_CAPABILITY:
        return (f"the CUDA kernels are built for compute capability >= {CUDA_MIN_CAPABILITY[0]}."
                f"{CUDA_MIN_CAPABILITY[1]}, {proj.device} has {capability[0]}.{capability[1]}")
    if proj.shape is None:
        return None
    return cuda_shape_unsupported_reason(proj.shape, options, compute_dtype(proj, target), _shared_limit(proj.device))


def size_limits(proj, target, options: LossOptions) -> tuple[tuple[int | None, int], ...] | None:
    """The sizes this extension runs for calls like this one, shape aside (specs with shape None), as
    cuda_size_limits gives them; None when it runs any size (the CPU kernel) or not this call at all."""
    if proj.device.type != "cuda" or call_unsupported_reason(proj, target, options) is not None:
        return None
    return cuda_size_limits(options, compute_dtype(proj, target), _shared_limit(proj.device))


def _op_call(eager_op, traced_op, options: LossOptions):
    """The op to call and its option arguments (neighbors, cumulative, tau, normalize_weights, eps)."""
    tau, eps = options.tau, options.eps
    if torch.compiler.is_compiling():
        eager_op = traced_op
        tau, eps = (torch.ones((), dtype=torch.float64) * value for value in (tau, eps))  # stays symbolic
    return eager_op, (options.neighbors, options.neighbor_mode == "cumulative", tau, options.normalize_weights, eps)


BACKWARD_READS_STATISTICS = True


def forward(proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [B, F], the per-token statistics the backward reads)."""
    if _module is None:
        _load()
    op, arguments = _op_call(torch.ops.crepa_kernels.align_forward, align_forward_traced, options)
    return op(proj, target, *arguments)


def backward(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
             saved: tuple, options: LossOptions,
             needs_proj_grad: bool, needs_target_grad: bool):
    """grad_loss [B, F] -> (dL/dproj or None, dL/dtarget or None): the kernel computes only the ones asked for."""
    (stats,) = saved
    op, arguments = _op_call(torch.ops.crepa_kernels.align_backward, align_backward_traced, options)
    grad_proj, grad_target = op(grad_loss, proj, target, stats, *arguments, needs_proj_grad, needs_target_grad)
    return grad_proj if needs_proj_grad else None, grad_target if needs_target_grad else None



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


# Under torch.compile a tau or eps that changes between calls is a symbolic float. AOTAutograd keeps it symbolic
# only inside tensor arithmetic: one reaching an op's float (or Scalar) argument is pinned to the traced value, so
# each new tau would recompile. Under torch.compile the calls therefore go through these ops, which take tau and eps
# as 0-d float64 CPU tensors (read on the host, no device synchronisation) and call the C++ ops.
@torch.library.custom_op("crepa_kernels::align_forward_traced", mutates_args=())
def align_forward_traced(proj: torch.Tensor, target: torch.Tensor, neighbors: int, cumulative: bool,
                         tau: torch.Tensor, normalize_weights: bool, eps: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.crepa_kernels.align_forward(proj, target, neighbors, cumulative, tau.item(), normalize_weights,
                                                 eps.item())


@torch.library.custom_op("crepa_kernels::align_backward_traced", mutates_args=())
def align_backward_traced(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
                          neighbors: int, cumulative: bool, tau: torch.Tensor, normalize_weights: bool,
                          eps: torch.Tensor, needs_proj_grad: bool, needs_target_grad: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.crepa_kernels.align_backward(grad_loss, proj, target, stats, neighbors, cumulative, tau.item(),
                                                  normalize_weights, eps.item(), needs_proj_grad, needs_target_grad)


align_forward_traced.register_fake(_align_forward_fake)
align_backward_traced.register_fake(_align_backward_fake)


def _register_python_parts() -> None:
    torch.library.register_fake("crepa_kernels::align_forward", _align_forward_fake)
    torch.library.register_fake("crepa_kernels::align_backward", _align_backward_fake)
