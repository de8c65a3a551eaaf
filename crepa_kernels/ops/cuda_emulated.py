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
import logging
import os
import threading

import torch

from .. import gpu_limits
from ..spec import LossOptions, compute_dtype
from . import extension

logger = logging.getLogger(__name__)

ARCH_VARIABLE = "CREPA_KERNELS_EMULATED_ARCH"
DEFAULT_ARCH = "sm_90"
SUPPORTED_DTYPES = extension.SUPPORTED_DTYPES

_lock = threading.Lock()
_module = None
_load_error: str | None = None
_devices: dict[str, int] = {}  # arch -> emulated device number
_arch: str | None = None  # set_arch's choice; None: the environment variable, else DEFAULT_ARCH


def _build():
    csrc = extension._csrc_dir()
    if csrc is None:
        raise RuntimeError(f"no C++ sources in {[str(c) for c in extension._CSRC_CANDIDATES]}")
    config = extension._build_config(csrc)
    root = config.hip_cpu_root(csrc)
    if root is None:
        raise RuntimeError(f"the HIP CPU Runtime was not found: set ${config.HIP_CPU_ROOT_VARIABLE} to its folder "
                           f"(holding include/hip/hip_runtime.h) or place it in ../shared/third_party/hip-cpu beside "
                           f"the checkout ({csrc.parent.parent / 'shared' / 'third_party' / 'hip-cpu'})")
    from torch.utils import cpp_extension

    logger.warning("crepa_kernels: building the emulated CUDA kernels against %s (first use: about a minute, then "
                   "cached)", root)
    return cpp_extension.load(
        name="crepa_kernels_jit_cuda_emulated",
        sources=config.emulated_sources(csrc),
        extra_cflags=config.EMULATED_CXX_FLAGS,
        extra_include_paths=[str(csrc), str(root / "include")],
        with_cuda=False,
        verbose=False,
    )


def _load():
    """The emulated extension, loaded once; on failure None, with the reason in _load_error."""
    global _module, _load_error
    with _lock:
        if _module is not None or _load_error is not None:
            return _module
        try:
            module = _build()
            for arch, optin in gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN.items():
                _devices[arch] = module.add_device(optin, gpu_limits.RESERVED_SHARED_BYTES_IN_CUBIN[arch])
            module.set_current_device(_devices[current_arch()])
            _register_python_parts()
            _module = module
        except Exception as error:  # a build failure is a reason, not a crash
            _load_error = f"the emulated CUDA extension failed to build or load: {type(error).__name__}: {error}"
        return _module


def require():
    """The loaded emulated extension module (test switches, runtime counts); raises with the reason it cannot load."""
    module = _load()
    if module is None:
        raise RuntimeError(_load_error)
    return module


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
    return require().dynamic_shared_limit(_devices[_check_arch(arch, "arch")], extension._accumulation_bytes(dtype))


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the emulated CUDA kernels run on CPU tensors, not {device.type}"
    if _load() is None:
        return _load_error
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
    reason = extension.cuda_shape_unsupported_reason(proj.shape, options, dtype,
                                                     dynamic_shared_limit(current_arch(), dtype))
    return None if reason is None else f"{reason} (emulating {current_arch()})"


BACKWARD_READS_STATISTICS = True


def _op_call(eager_op, traced_op, options: LossOptions):
    tau, eps = options.tau, options.eps
    if torch.compiler.is_compiling():
        eager_op = traced_op
        tau, eps = (torch.ones((), dtype=torch.float64) * value for value in (tau, eps))  # stays symbolic
    return eager_op, (options.neighbors, options.neighbor_mode == "cumulative", tau, options.normalize_weights, eps)


def forward(proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, options: LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [B, F], the per-token statistics the backward reads)."""
    if not torch.compiler.is_compiling():  # traced calls select it inside the traced op, at run time
        _select_device()
    op, arguments = _op_call(torch.ops.crepa_kernels_emulated.align_forward, align_forward_traced, options)
    return op(proj, target, *arguments)


def backward(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
             saved: tuple, options: LossOptions,
             needs_proj_grad: bool, needs_target_grad: bool):
    (stats,) = saved
    if not torch.compiler.is_compiling():
        _select_device()
    op, arguments = _op_call(torch.ops.crepa_kernels_emulated.align_backward, align_backward_traced, options)
    grad_proj, grad_target = op(grad_loss, proj, target, stats, *arguments, needs_proj_grad, needs_target_grad)
    return grad_proj if needs_proj_grad else None, grad_target if needs_target_grad else None


# As extension.py's: under torch.compile, tau and eps reach the op as 0-d float64 CPU tensors. These ops also select
# the emulated architecture, so that it is read at run time, not when the graph is traced.
@torch.library.custom_op("crepa_kernels_emulated::align_forward_traced", mutates_args=())
def align_forward_traced(proj: torch.Tensor, target: torch.Tensor, neighbors: int, cumulative: bool,
                         tau: torch.Tensor, normalize_weights: bool, eps: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    _select_device()
    return torch.ops.crepa_kernels_emulated.align_forward(proj, target, neighbors, cumulative, tau.item(),
                                                          normalize_weights, eps.item())


@torch.library.custom_op("crepa_kernels_emulated::align_backward_traced", mutates_args=())
def align_backward_traced(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, stats: torch.Tensor,
                          neighbors: int, cumulative: bool, tau: torch.Tensor, normalize_weights: bool,
                          eps: torch.Tensor, needs_proj_grad: bool, needs_target_grad: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    _select_device()
    return torch.ops.crepa_kernels_emulated.align_backward(grad_loss, proj, target, stats, neighbors, cumulative,
                                                           tau.item(), normalize_weights, eps.item(), needs_proj_grad,
                                                           needs_target_grad)


align_forward_traced.register_fake(extension._align_forward_fake)
align_backward_traced.register_fake(extension._align_backward_fake)


def _register_python_parts() -> None:
    torch.library.register_fake("crepa_kernels_emulated::align_forward", extension._align_forward_fake)
    torch.library.register_fake("crepa_kernels_emulated::align_backward", extension._align_backward_fake)
