"""Triton backend: one fused forward kernel and one fused backward kernel per call, registered as torch.library
triton ops (crepa_kernels::triton_forward / triton_backward) so that
``torch.compile(fullgraph=True)`` sees the kernels; under the Triton interpreter they are opaque custom ops instead
(see _define_op).

Design (docs/triton.md has the long version and the byte counts):

* Both kernels read the call's coefficient table C [F, W] (spec.coefficient_table, in the compute dtype): frame
  pair (f, k) counts C[f, slot of k - f] in L[f]. No kernel computes a weight or Z_f.
* A program owns BLOCK_N token columns (b, n) and a row window of FRAMES frames (16 or 32, so that tl.dot
  accepts it). It sweeps D in BLOCK_D chunks; each chunk of proj and target is loaded once as a
  [BLOCK_N, FRAMES, BLOCK_D] tile.
* Forward: per token, the frame Gram matrix G[f, k] = p_f . y_k is accumulated with a batched tl.dot over the
  chunk, and the squared norms with a sum of squares. Every (f, k) pair of any neighbour mode and any d is in
  G, so the kernel has a single code path; the coefficients C[f, k] are applied once after the sweep. The
  per-token cosines of the band |k - f| in the option's offsets are saved (a few floats per token and frame)
  with the clamped norms; the per-(b, f) token sum is written as partial sums [B, F, token blocks] and reduced
  by torch.sum in a fixed order. No atomics anywhere.
* Backward: with alpha[f, k] = -grad_L[f] C[f, k] / N and A = alpha / (|p_f| |y_k|) (clamped norms), per token
      grad_P = A Y - diag(s_p / |p|^2) P,        s_p[f] = sum_k alpha[f, k] cos[f, k]
      grad_Y = A^T P - diag(s_y / |y|^2) Y,      s_y[k] = sum_f alpha[f, k] cos[f, k]
  (the diagonal terms vanish where a norm is clamped). s_p and s_y come from the saved band, so one sweep over
  D suffices: read P and Y once, write the gradients once. grad_Y gathers from every frame that sees frame k
  (the A^T product), so there are no atomics.
* Frame tiling (frame_tiling): F <= 32 fits one window: every element is read exactly once. Longer videos are cut
  into 32-frame windows with `halo` = max |offset| extra frames read on each side (reads grow by
  32 / (32 - 2 halo), 1.07x for d = 1), or, for distant neighbours, into 16-frame windows paired with column
  windows whole windows away, visited one after the other. No window exceeds 32 frames, whatever d.
* The launch grid is one flat list of (batch, token block, frame tile) work items over axes 0 and 1, so no axis
  passes CUDA's limits for any N.

Precision: 16-bit inputs of one dtype enter the forward tl.dot as they are (their products are exact in the
fp32 accumulator). Other inputs are upcast to the compute dtype (fp32, or fp64 if an input is fp64) and use
input_precision="ieee" (never tf32). In the backward, A is fp32; for bf16 inputs it is split as A = hi + lo
(two bf16 matrices, ~16 mantissa bits, rel. error ~1e-5, far below the bf16 rounding of the gradient itself)
so the products stay on tensor cores; fp16 inputs use the fp32 path because A (~1e-6 for N ~ 1e3) is below
fp16's normal range.

Runs on CUDA, and on CPU tensors under the Triton interpreter when TRITON_INTERPRET=1 was set before this module
was imported.

Modules: triton_plan (tiling, tile sizes, grid: importable without triton), triton_kernels (the @triton.jit
kernels), this one (availability, the launches, the torch.library ops and the backend protocol).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..spec import LossOptions, band_offsets, compute_dtype
from . import triton_plan as plan

try:
    import triton

    from . import triton_kernels as kernels

    _IMPORT_ERROR = None
except Exception as error:  # pragma: no cover - exercised only without triton
    triton = None
    kernels = None
    _IMPORT_ERROR = f"{type(error).__name__}: {error}"

# The interpreter is chosen when @triton.jit runs, i.e. when triton_kernels is imported.
INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)

# The interpreter multiplies bf16 tl.dot operands as raw uint16 bit patterns (triton-lang/triton#11584, "not
# supported yet"), so under it bf16 tiles are upcast to fp32 before tl.dot. Read at launch time so that the tests
# can patch the interpreter and exercise the bf16 tensor-core paths too.
BF16_DOT = not INTERPRETED

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def unavailable_reason(device: torch.device) -> str | None:
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if INTERPRETED:
            return None
        return (
            "the Triton backend runs on CPU tensors only under the Triton interpreter; set TRITON_INTERPRET=1 "
            "before crepa_kernels.ops.triton_loss (and triton) are imported"
        )
    return f"the Triton backend supports CUDA devices (and CPU under TRITON_INTERPRET=1), not {device.type}"


def call_unsupported_reason(proj, target, options: LossOptions) -> str | None:
    """None if this call can run here (see crepa_kernels.backends); shape limits only when proj.shape is known."""
    for name, x in (("proj", proj), ("target", target)):
        if x.dtype not in SUPPORTED_DTYPES:
            return f"the Triton kernels take {', '.join(map(str, SUPPORTED_DTYPES))}; {name} is {x.dtype}"
    capability = plan.device_capability(proj.device)
    if capability is not None and capability < plan.MIN_CAPABILITY:
        return (f"the Triton kernels need compute capability >= {plan.MIN_CAPABILITY[0]}.{plan.MIN_CAPABILITY[1]} "
                f"(bf16 tl.dot; checked ahead of time for sm_80 to sm_121), {proj.device} has "
                f"{capability[0]}.{capability[1]}")
    if proj.shape is None:
        return None
    try:
        for kernel in ("forward", "backward"):
            _kernel_plan(kernel, proj, target, band_offsets(options, proj.shape[1]), capability)
    except ValueError as error:
        return str(error)
    return None


def _kernel_plan(kernel: str, proj, target, slot_offsets, capability=None) -> plan.KernelPlan:
    return plan.plan_kernel(kernel, tuple(proj.shape), proj.dtype, target.dtype, tuple(slot_offsets), BF16_DOT,
                            capability)


# ----------------------------------------------------------------------------------------------------------------
# Launches (outputs preallocated by the caller: the tests poison them)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: kernel, grid, positional arguments and constexpr/launch keywords. The dispatcher and
    tools/compile_triton.py both build it here, so the ahead-of-time check compiles what would run."""
    kernel: object
    grid: tuple[int, int, int]
    args: tuple
    kwargs: dict


def scalar_tensor(value: float, like: torch.Tensor) -> torch.Tensor:
    """eps as a 0-d fp64 tensor on ``like``'s device, which the kernels load: a Python float kernel argument would
    reach them as fp32 and, under torch.compile, pin a varying eps to its value (one graph per value). A fill on
    the device: no host sync."""
    return torch.full((), value, dtype=torch.float64, device=like.device)


def eps_tensor(options: LossOptions, like: torch.Tensor) -> torch.Tensor:
    """eps as the ops take it: a 0-d fp64 tensor on ``like``'s device. Under torch.compile as ones * eps, which keeps
    a varying eps symbolic; a torch.full of it, or a float op argument, is specialised by Dynamo
    (tensorify_python_scalars: a guard eps == 1e-12, one graph per value)."""
    if torch.compiler.is_compiling():
        return torch.ones((), dtype=torch.float64, device=like.device) * options.eps
    return scalar_tensor(options.eps, like)


def _check_eps(eps: torch.Tensor, proj: torch.Tensor) -> None:
    if not isinstance(eps, torch.Tensor) or eps.dtype != torch.float64 or eps.dim() != 0 \
            or eps.device != proj.device:
        given = f"{eps.dtype} {tuple(eps.shape)} on {eps.device}" if isinstance(eps, torch.Tensor) else \
            type(eps).__name__
        raise ValueError(f"eps: expected a 0-d float64 tensor on {proj.device} (eps_tensor), got {given}")


def _contiguous_strides(shape: tuple) -> tuple:
    """Row-major strides of ``shape``. Compared with a buffer's, not is_contiguous(): that would guard on whether a
    symbolic size (the token blocks) is 1, where any stride is contiguous (a recompile between N <= 4 and N > 4)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step = step * size
    return tuple(reversed(strides))


def _check_coefficients(coefficients, proj: torch.Tensor, target: torch.Tensor, slot_offsets) -> None:
    """The table the kernels index as C[f * W + slot]: [F, W] row-major, W = len(slot_offsets), in the compute
    dtype, on the inputs' device (spec.coefficient_table)."""
    shape = (proj.shape[1], len(slot_offsets))
    dtype = compute_dtype(proj, target)
    if not isinstance(coefficients, torch.Tensor):
        raise TypeError(f"coefficients: expected a tensor (spec.coefficient_table), got {type(coefficients).__name__}")
    if coefficients.dim() != 2 or tuple(coefficients.shape) != shape or coefficients.dtype != dtype \
            or coefficients.device != proj.device or coefficients.stride() != _contiguous_strides(shape):
        raise ValueError(f"coefficients: expected a contiguous {shape} {dtype} tensor on {proj.device} "
                         f"(spec.coefficient_table for slot offsets {tuple(slot_offsets)}), got "
                         f"{tuple(coefficients.shape)} {coefficients.dtype} on {coefficients.device} with strides "
                         f"{coefficients.stride()}")


def stats_shapes(proj: torch.Tensor, target: torch.Tensor, slot_offsets) -> dict[str, tuple[int, ...]]:
    """Shapes of the buffers forward_into writes: norms [2, B, F, N], band [B, F, slots, N], partial [B, F, blocks]."""
    return plan.stats_shapes(tuple(proj.shape), _kernel_plan("forward", proj, target, slot_offsets))


def forward_launch(proj, target, coefficients, slot_offsets, norms, band, partial, eps, capability=None) -> Launch:
    """eps: a 0-d fp64 tensor (eps_tensor); capability: the GPU to launch on (tools/compile_triton.py), else proj's
    device's (device_capability)."""
    batch, num_frames, num_tokens, dim = proj.shape
    forward = _kernel_plan("forward", proj, target, slot_offsets, capability or plan.device_capability(proj.device))
    tiling, config, band_layout = forward.tiling, forward.config, forward.band
    args = (
        proj, target, norms[0], norms[1], band, partial, coefficients,
        batch, num_frames, num_tokens, dim,
        *proj.stride(), *target.stride(),
        tiling.rows_per_tile, tiling.halo, tiling.shifts, tiling.num_tiles, forward.token_blocks,
        forward.near, forward.far, eps,
        band_layout.first, band_layout.step, band_layout.slots,
    )
    kwargs = dict(
        FP64=norms.dtype == torch.float64, NATIVE_DOT=torch.finfo(forward.dot_dtype).bits == 16,
        SHIFTED=tiling.shifted, FRAMES=tiling.frames, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return Launch(kernels._crepa_forward_kernel, forward.grid, args, kwargs)


def backward_launches(grad_loss, proj, target, coefficients, slot_offsets, norms, band, grad_proj, grad_target, eps,
                      capability=None) -> list[Launch]:
    """The backward: one launch, or in shifted mode one per gradient (each rebuilds its own A per column window;
    both in one program spilled on sm_86/sm_90). grad_target=None: no target gradient. capability, eps: as in
    forward_launch."""
    batch, num_frames, num_tokens, dim = proj.shape
    backward = _kernel_plan("backward", proj, target, slot_offsets,
                            capability or plan.device_capability(proj.device))
    tiling, config, band_layout = backward.tiling, backward.config, backward.band
    target_grad = grad_target is not None
    grad_target = grad_target if target_grad else grad_proj  # never written: TARGET_GRAD is False
    args = (
        proj, target, norms[0], norms[1], band, grad_loss, grad_proj, grad_target, coefficients,
        batch, num_frames, num_tokens, dim,
        *proj.stride(), *target.stride(), *grad_proj.stride(), *grad_target.stride(),
        tiling.rows_per_tile, tiling.halo, tiling.shifts, tiling.num_tiles, backward.token_blocks,
        backward.near, backward.far, eps,
        band_layout.first, band_layout.step, band_layout.slots,
    )
    kwargs = dict(
        FP64=norms.dtype == torch.float64, SPLIT_BF16_DOT=backward.dot_dtype == torch.bfloat16,
        SHIFTED=tiling.shifted, FRAMES=tiling.frames, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not tiling.shifted:
        gradients = [(True, target_grad)]
    else:
        gradients = [(True, False)] + ([(False, True)] if target_grad else [])
    return [Launch(kernels._crepa_backward_kernel, backward.grid, args,
                   dict(kwargs, PROJ_GRAD=proj_grad, TARGET_GRAD=target)) for proj_grad, target in gradients]


def _interpreting_fake(tensor: torch.Tensor) -> bool:
    """The fake implementation is the op body run on FakeTensors. On GPUs wrap_triton turns the launch into a
    traceable no-op; under the interpreter it hands back the raw kernel, which must not be launched on them."""
    return INTERPRETED and torch._subclasses.fake_tensor.is_fake(tensor)


def _device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _run(launch: Launch, device_of: torch.Tensor) -> None:
    with _device_guard(device_of):
        torch.library.wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.kwargs)


def forward_into(proj, target, coefficients, slot_offsets, norms, band, partial, eps) -> None:
    """Launches the forward kernel, writing every element of norms, band and partial (shapes: stats_shapes). eps:
    a 0-d fp64 tensor (eps_tensor)."""
    _check_coefficients(coefficients, proj, target, slot_offsets)
    shapes = stats_shapes(proj, target, slot_offsets)
    for name, buffer in (("norms", norms), ("band", band), ("partial", partial)):
        if tuple(buffer.shape) != shapes[name] or buffer.stride() != _contiguous_strides(shapes[name]):
            raise ValueError(f"forward_into: {name} must be a contiguous {shapes[name]} tensor, got "
                             f"{tuple(buffer.shape)} with strides {buffer.stride()}")
    if _interpreting_fake(proj):
        return
    _run(forward_launch(proj, target, coefficients, slot_offsets, norms, band, partial, eps), proj)


def backward_into(grad_loss, proj, target, coefficients, slot_offsets, norms, band, grad_proj, grad_target,
                  eps) -> None:
    """Launches the backward kernel; grad_target=None skips the target gradient (a constexpr branch). eps: as in
    forward_into."""
    _check_coefficients(coefficients, proj, target, slot_offsets)
    if _interpreting_fake(proj):
        return
    for launch in backward_launches(grad_loss, proj, target, coefficients, slot_offsets, norms, band, grad_proj,
                                    grad_target, eps):
        _run(launch, proj)


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops; their backward is wired to the forward in crepa_kernels.function only


def _define_op(name: str):
    """triton_op on GPUs, so that torch.compile / Inductor see the kernels through wrap_triton.

    Under the interpreter wrap_triton cannot trace (it hands back the raw kernel, not the HOP), and a triton_op
    traced by torch.compile would lose its kernels; there the op is a plain custom_op, opaque to torch.compile,
    which then calls the eager (interpreted) kernels. Both run the same body as the fake implementation.
    """
    if not INTERPRETED:
        return torch.library.triton_op(name, mutates_args=())

    def define(fn):
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fn)
        return op

    return define


if triton is not None:
    @_define_op("crepa_kernels::triton_forward")
    def triton_forward(proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, slot_offsets: list[int],
                       eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (per-frame loss [B, F], clamped norms [2, B, F, N], cosine band [B, F, slots, N]). coefficients: the
        table [F, W] of spec.coefficient_table, whose columns are the frame offsets slot_offsets
        (spec.band_offsets); eps: a 0-d fp64 tensor on proj's device (eps_tensor)."""
        _check_eps(eps, proj)
        dtype = compute_dtype(proj, target)
        shapes = stats_shapes(proj, target, slot_offsets)
        norms = proj.new_empty(shapes["norms"], dtype=dtype)
        band = proj.new_empty(shapes["band"], dtype=dtype)
        partial = proj.new_empty(shapes["partial"], dtype=dtype)
        forward_into(proj, target, coefficients, slot_offsets, norms, band, partial, eps)
        # second stage of the token reduction: a fixed-order sum over token blocks
        loss = partial.sum(dim=-1) * (-1.0 / proj.shape[2])
        return loss, norms, band

    @_define_op("crepa_kernels::triton_backward")
    def triton_backward(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
                        norms: torch.Tensor, band: torch.Tensor, slot_offsets: list[int], eps: torch.Tensor,
                        target_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (grad_proj, grad_target); grad_target is an empty tensor when target_grad is False. coefficients,
        slot_offsets, eps: as in triton_forward."""
        _check_eps(eps, proj)
        grad_loss = grad_loss.to(norms.dtype).contiguous()
        grad_proj = torch.empty(proj.shape, dtype=proj.dtype, device=proj.device)
        grad_target = torch.empty(target.shape if target_grad else (0,), dtype=target.dtype, device=target.device)
        backward_into(grad_loss, proj, target, coefficients, slot_offsets, norms, band, grad_proj,
                      grad_target if target_grad else None, eps)
        return grad_proj, grad_target


# ----------------------------------------------------------------------------------------------------------------
# The backend protocol (crepa_kernels.function)

BACKWARD_READS_STATISTICS = True


def forward(proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, options: LossOptions):
    """(L [B, F], clamped norms, cosine band): the loss and the per-token statistics the backward reads."""
    return triton_forward(proj, target, coefficients, list(band_offsets(options, proj.shape[1])),
                          eps_tensor(options, proj))


def backward(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
             saved: tuple, options: LossOptions, needs_proj_grad: bool, needs_target_grad: bool):
    """grad_loss [B, F] -> (dL/dproj or None, dL/dtarget or None). The kernel always writes grad_proj; the
    target gradient is a constexpr branch, computed only when asked for."""
    norms, band = saved
    grad_proj, grad_target = triton_backward(grad_loss, proj, target, coefficients, norms, band,
                                             list(band_offsets(options, proj.shape[1])), eps_tensor(options, proj),
                                             needs_target_grad)
    return grad_proj if needs_proj_grad else None, grad_target if needs_target_grad else None
