"""The compiled kernels as the "cpu" and "cuda" backends.

One pair of ops, ``torch.ops.crepa_kernels.align_forward`` / ``align_backward``, dispatches on the device to the
fused CPU kernel (csrc/crepa_cpu.cpp) or the CUDA kernels (csrc/crepa_cuda.cpp). This module gives the ops fake
(meta) implementations for torch.compile, exposes them as a backend's ``forward`` / ``backward`` pair (the protocol
of crepa_kernels.backends), and holds the CUDA launch plan, its size limits and the test switches. The ops have no
autograd formula of their own: crepa_kernels.CrossFrameAlignFunction is the one place that wires a backward to a
forward. Loading (the prebuilt ``crepa_kernels._C``, or a JIT build on first use) is ops/build.py's.

Nothing is compiled at import: only ``unavailable_reason``, ``forward`` or the planning functions load the extension.
"""
from __future__ import annotations

import torch

from .. import gpu_limits
from ..spec import LossOptions, compute_dtype
from . import build


_extension = build.Extension("the C++ extension", build.load_native, lambda module: _register_python_parts())


def _load():
    """The extension module, loaded once; on failure None, with the reason in _extension.error."""
    return _extension.load()


def _require():
    """The loaded extension module; raises with the reason it cannot load."""
    return _extension.require()


def build_info() -> dict:
    """How the loaded extension was compiled, and which build of the CPU kernels runs here; raises if unusable.

    {'cuda': bool, 'openmp': bool, 'torch': str, 'cpu_isa': 'avx2' or 'baseline'}
    """
    return dict(_require().build_info())


def set_poison_buffers(enabled: bool) -> None:
    """Test switch: every buffer the kernels allocate starts as NaN, so an unwritten element shows."""
    _require().set_poison_buffers(enabled)


def set_cuda_grid_limit(blocks: int) -> None:
    """Test switch: the CUDA launch plans use at most ``blocks`` blocks per launch (0: CUDA's grid limit), so small
    inputs take the several-launch path that only B * N > 2^31 - 1 takes otherwise."""
    _planner("set_cuda_grid_limit")(int(blocks))


def set_cpu_baseline_forced(forced: bool) -> None:
    """Test switch: the CPU kernels run their baseline-ISA build even where the AVX2 + FMA build could."""
    _require().set_cpu_baseline_forced(forced)


def unavailable_reason(device: torch.device) -> str | None:
    if device.type not in ("cpu", "cuda"):
        return f"the C++ extension has kernels for CPU and CUDA, not {device.type}"
    module = _load()
    if module is None:
        return _extension.error
    if device.type == "cuda":
        if not module.build_info()["cuda"]:
            return "the C++ extension was compiled without CUDA (set FORCE_CUDA=1 or install nvcc and reinstall)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    return None


def accumulation_bytes(dtype: torch.dtype) -> int:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected the accumulation dtype, torch.float32 or torch.float64, got {dtype}")
    return 8 if dtype == torch.float64 else 4


def _plan_arguments(shape, options: LossOptions, dtype: torch.dtype) -> tuple:
    if len(shape) != 4:
        raise ValueError(f"shape: expected [B, F, N, D], got {tuple(shape)}")
    cumulative = options.neighbor_mode == "cumulative"
    return (*(int(size) for size in shape), options.neighbors, cumulative, accumulation_bytes(dtype))


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


def op_options(options: LossOptions) -> tuple:
    """The ops' option arguments (neighbors, cumulative, eps). Under torch.compile eps is a 0-d float64 CPU tensor
    for the *_traced ops (see below)."""
    eps = options.eps
    if torch.compiler.is_compiling():
        eps = torch.ones((), dtype=torch.float64) * eps  # stays symbolic
    return options.neighbors, options.neighbor_mode == "cumulative", eps


BACKWARD_READS_STATISTICS = True


def forward(proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
            options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [B, F], the per-token statistics the backward reads), with the neighbour weights read from
    ``coefficients`` (spec.coefficient_table of this call)."""
    if _extension.module is None:
        _extension.load()
    op = align_forward_traced if torch.compiler.is_compiling() else torch.ops.crepa_kernels.align_forward
    return op(proj, target, coefficients, *op_options(options))


def backward(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
             saved: tuple, options: LossOptions, needs_proj_grad: bool, needs_target_grad: bool):
    """grad_loss [B, F] -> (dL/dproj or None, dL/dtarget or None): the kernel computes only the ones asked for."""
    (stats,) = saved
    op = align_backward_traced if torch.compiler.is_compiling() else torch.ops.crepa_kernels.align_backward
    grad_proj, grad_target = op(grad_loss, proj, target, stats, coefficients, *op_options(options), needs_proj_grad,
                                needs_target_grad)
    return grad_proj if needs_proj_grad else None, grad_target if needs_target_grad else None


def band_width(num_frames: int, neighbors: int, cumulative: bool) -> int:
    """Dot-product slots per frame (mirrors crepa::Band::width): the frame itself plus its neighbour offsets."""
    if cumulative:
        return 1 + 2 * min(neighbors, num_frames - 1)
    return 3 if 0 < neighbors < num_frames else 1


# Shapes and dtypes only: the C++ ops check the arguments when they run.
def align_forward_fake(proj, target, coefficients, neighbors, cumulative, eps):
    batch, frames, tokens, _ = proj.shape
    dtype = compute_dtype(proj, target)
    stats_per_frame = 2 + band_width(frames, neighbors, cumulative)
    return (
        proj.new_empty((batch, frames), dtype=dtype),
        proj.new_empty((batch, tokens, frames, stats_per_frame), dtype=dtype),
    )


def align_backward_fake(grad_loss, proj, target, stats, coefficients, neighbors, cumulative, eps, needs_proj_grad,
                        needs_target_grad):
    def gradient(x, needed):
        return torch.empty_like(x, memory_format=torch.contiguous_format) if needed else x.new_empty((0,))

    return gradient(proj, needs_proj_grad), gradient(target, needs_target_grad)


# Under torch.compile an eps that changes between calls is a symbolic float. AOTAutograd keeps it symbolic only
# inside tensor arithmetic: one reaching an op's float (or Scalar) argument is pinned to the traced value, so each
# new eps would recompile. Under torch.compile the calls therefore go through these ops, which take eps as a 0-d
# float64 CPU tensor (read on the host, no device synchronisation) and call the C++ ops. The coefficient table is a
# tensor of the graph already (a varying tau stays symbolic in it).
@torch.library.custom_op("crepa_kernels::align_forward_traced", mutates_args=())
def align_forward_traced(proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, neighbors: int,
                         cumulative: bool, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.crepa_kernels.align_forward(proj, target, coefficients, neighbors, cumulative, eps.item())


@torch.library.custom_op("crepa_kernels::align_backward_traced", mutates_args=())
def align_backward_traced(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
                          coefficients: torch.Tensor, neighbors: int, cumulative: bool, eps: torch.Tensor,
                          needs_proj_grad: bool, needs_target_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.crepa_kernels.align_backward(grad_loss, proj, target, stats, coefficients, neighbors, cumulative,
                                                  eps.item(), needs_proj_grad, needs_target_grad)


align_forward_traced.register_fake(align_forward_fake)
align_backward_traced.register_fake(align_backward_fake)


def _register_python_parts() -> None:
    torch.library.register_fake("crepa_kernels::align_forward", align_forward_fake)
    torch.library.register_fake("crepa_kernels::align_backward", align_backward_fake)
