"""The "cuda_emulated" backend: the CUDA kernels (csrc/crepa_cuda_kernels.cu) run on CPU tensors.

The same kernel source, ATen glue (csrc/crepa_cuda.cpp) and launch plan (csrc/crepa_cuda_plan.h) as the "cuda"
backend, built by the host compiler against ROCm's header-only HIP CPU Runtime: every thread block runs, its threads
as fibers, ``__syncthreads()`` a barrier between them, with the grid, block and shared-memory sizes a GPU would get.
The runtime calls of the launch code (the shared-memory opt-in, function attributes, errors) go to an emulated GPU
with the limits of one architecture (crepa_kernels.gpu_limits): ``set_arch``, else $CREPA_KERNELS_EMULATED_ARCH,
else sm_90. It refuses what that GPU would refuse, including a launch past 48 KB without the kernel's opt-in.

It exists to test the CUDA kernels where there is no GPU, so it is slow (fibers, not SIMD) and ``auto`` never picks
it. Built on first use into torch's extension cache (about a minute, then cached) when the runtime is found:
$HIP_CPU_ROOT, else ../shared/third_party/hip-cpu beside the checkout (csrc/build_config.py hip_cpu_root).
"""
from __future__ import annotations

import contextlib
import os

import torch

from .. import gpu_limits
from ..spec import LossOptions, compute_dtype
from . import build, native

ARCH_VARIABLE = "CREPA_KERNELS_EMULATED_ARCH"
DEFAULT_ARCH = "sm_90"
SUPPORTED_DTYPES = native.SUPPORTED_DTYPES

_devices: dict[str, int] = {}  # arch -> emulated device number
_arch: str | None = None  # set_arch's choice; None: the environment variable, else DEFAULT_ARCH


def _setup(module) -> None:
    """One emulated GPU per architecture, the current one selected, and the ops' fake implementations."""
    for arch, optin in gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN.items():
        _devices[arch] = module.add_device(optin, gpu_limits.RESERVED_SHARED_BYTES_IN_CUBIN[arch])
    module.set_current_device(_devices[current_arch()])
    _register_python_parts()


_extension = build.Extension("the emulated CUDA extension", build.load_emulated, _setup)


def require():
    """The loaded emulated extension module (test switches, runtime counts); raises with the reason it cannot load."""
    return _extension.require()


def _check_arch(arch, source: str) -> str:
    if arch not in gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN:
        raise ValueError(f"{source}: expected one of {tuple(gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN)}, got {arch!r}")
    return arch


def current_arch() -> str:
    """The architecture the next call emulates: set_arch's, else $CREPA_KERNELS_EMULATED_ARCH, else sm_90."""
    if _arch is not None:
        return _arch
    return _check_arch(os.environ.get(ARCH_VARIABLE) or DEFAULT_ARCH, f"environment variable {ARCH_VARIABLE}")


def set_arch(arch: str | None) -> None:
    """Emulate ``arch`` (a key of gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN) from now on; None: back to the
    environment variable or sm_90."""
    global _arch
    _arch = None if arch is None else _check_arch(arch, "arch")


@contextlib.contextmanager
def emulating(arch: str):
    """``with emulating("sm_86"): ...`` runs the calls inside on that architecture."""
    global _arch
    previous = _arch
    set_arch(arch)
    try:
        yield
    finally:
        _arch = previous


def _select_device() -> None:
    """Makes the emulated GPU of current_arch() the current device (cudaSetDevice), before each op call."""
    require().set_current_device(_devices[current_arch()])


def dynamic_shared_limit(arch: str, dtype: torch.dtype) -> int:
    """The dynamic shared memory the kernels accumulating in ``dtype`` may use on ``arch``: the refusal's and the
    opt-in's one number (the device's limit less the kernels' static shared memory)."""
    return require().dynamic_shared_limit(_devices[_check_arch(arch, "arch")], native.accumulation_bytes(dtype))


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the emulated CUDA kernels run on CPU tensors, not {device.type}"
    if _extension.load() is None:
        return _extension.error
    return None


def call_unsupported_reason(proj, target, options: LossOptions) -> str | None:
    """The dtypes of the C++ kernels, and the shared-memory refusal of the emulated architecture (none while
    torch.compile traces, where the shape is unknown: the op refuses again at run time)."""
    for name, x in (("proj", proj), ("target", target)):
        if x.dtype not in SUPPORTED_DTYPES:
            return f"the C++/CUDA kernels take {', '.join(map(str, SUPPORTED_DTYPES))}; {name} is {x.dtype}"
    if proj.shape is None:
        return None
    dtype = compute_dtype(proj, target)
    reason = native.cuda_shape_unsupported_reason(proj.shape, options, dtype,
                                                     dynamic_shared_limit(current_arch(), dtype))
    return None if reason is None else f"{reason} (emulating {current_arch()})"


BACKWARD_READS_STATISTICS = True


def forward(proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
            options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [B, F], the per-token statistics the backward reads), as native.forward."""
    if torch.compiler.is_compiling():  # the traced op selects the device at run time
        return align_forward_traced(proj, target, coefficients, *native.op_options(options))
    _select_device()
    return torch.ops.crepa_kernels_emulated.align_forward(proj, target, coefficients, *native.op_options(options))


def backward(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
             saved: tuple, options: LossOptions, needs_proj_grad: bool, needs_target_grad: bool):
    (stats,) = saved
    if torch.compiler.is_compiling():
        op = align_backward_traced
    else:
        _select_device()
        op = torch.ops.crepa_kernels_emulated.align_backward
    grad_proj, grad_target = op(grad_loss, proj, target, stats, coefficients, *native.op_options(options),
                                needs_proj_grad, needs_target_grad)
    return grad_proj if needs_proj_grad else None, grad_target if needs_target_grad else None


# As native.py's: under torch.compile, eps reaches the op as a 0-d float64 CPU tensor. These ops also select the
# emulated architecture, so that it is read at run time, not when the graph is traced.
@torch.library.custom_op("crepa_kernels_emulated::align_forward_traced", mutates_args=())
def align_forward_traced(proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, neighbors: int,
                         cumulative: bool, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _select_device()
    return torch.ops.crepa_kernels_emulated.align_forward(proj, target, coefficients, neighbors, cumulative,
                                                          eps.item())


@torch.library.custom_op("crepa_kernels_emulated::align_backward_traced", mutates_args=())
def align_backward_traced(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
                          coefficients: torch.Tensor, neighbors: int, cumulative: bool, eps: torch.Tensor,
                          needs_proj_grad: bool, needs_target_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _select_device()
    return torch.ops.crepa_kernels_emulated.align_backward(grad_loss, proj, target, stats, coefficients, neighbors,
                                                           cumulative, eps.item(), needs_proj_grad, needs_target_grad)


align_forward_traced.register_fake(native.align_forward_fake)
align_backward_traced.register_fake(native.align_backward_fake)


def _register_python_parts() -> None:
    torch.library.register_fake("crepa_kernels_emulated::align_forward", native.align_forward_fake)
    torch.library.register_fake("crepa_kernels_emulated::align_backward", native.align_backward_fake)
