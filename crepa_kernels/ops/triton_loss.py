"""Triton backend: a neighbour-table kernel, one fused forward kernel and one fused backward kernel per call,
registered as torch.library triton ops (crepa_kernels::triton_forward / triton_backward) so that
``torch.compile(fullgraph=True)`` sees the kernels; under the Triton interpreter they are opaque custom ops instead
(see _define_op).

Design (docs/triton.md has the long version and the byte counts):

* A one-program kernel writes the neighbour table [2, F]: the weight of each frame distance (1 at 0,
  exp(-delta / tau) at the neighbour distances, else 0) and Z_f of each frame, in fp64 maths rounded once.
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
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

from .. import gpu_limits
from ..spec import LossOptions, compute_dtype

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as error:  # pragma: no cover - exercised only without triton
    triton = None
    _IMPORT_ERROR = f"{type(error).__name__}: {error}"

# The interpreter is chosen when @triton.jit runs, i.e. when this module is imported.
INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)

# The interpreter multiplies bf16 tl.dot operands as raw uint16 bit patterns (triton-lang/triton#11584, "not
# supported yet"), so under it bf16 tiles are upcast to fp32 before tl.dot. Read at launch time so that the tests
# can patch the interpreter and exercise the bf16 tensor-core paths too.
BF16_DOT = not INTERPRETED

# One window covers up to this many frames; longer videos are tiled (see module docstring).
MAX_SINGLE_WINDOW_FRAMES = 32
# Smallest window, and smallest BLOCK_D: tl.dot needs every non-batch dimension >= 16.
MIN_DOT_DIM = 16
# CUDA's launch limits (gridDim.x < 2^31, gridDim.y and gridDim.z <= 65,535) as globals of this module: tests lower
# MAX_GRID_X to exercise the second axis.
MAX_GRID_X = gpu_limits.MAX_GRID_X
MAX_GRID_YZ = gpu_limits.MAX_GRID_YZ


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


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# bf16 tl.dot needs sm_80; tools/compile_triton.py checks sm_80 to sm_90 ahead of time
MIN_CAPABILITY = (8, 0)
# Below this the shifted tiling's kernels take their own launch configuration (launch_config)
SHIFTED_PIPELINED_CAPABILITY = (9, 0)


@functools.lru_cache(maxsize=None)
def _cached_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability launch_config targets: a host query cached per CUDA device (no synchronisation);
    None for CPU (the interpreter) and meta tensors, which take sm_90's configuration. A device without an index
    means the current device, which can change: not cached."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device) if device.index is None else _cached_capability(device)


def call_unsupported_reason(proj, target, options: LossOptions) -> str | None:
    """None if this call can run here (see crepa_kernels.backends); shape limits only when proj.shape is known."""
    for name, x in (("proj", proj), ("target", target)):
        if x.dtype not in SUPPORTED_DTYPES:
            return f"the Triton kernels take {', '.join(map(str, SUPPORTED_DTYPES))}; {name} is {x.dtype}"
    capability = device_capability(proj.device)
    if capability is not None and capability < MIN_CAPABILITY:
        return (f"the Triton kernels need compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                f"(bf16 tl.dot; checked ahead of time for sm_80 to sm_90), {proj.device} has "
                f"{capability[0]}.{capability[1]}")
    if proj.shape is None:
        return None
    batch, num_frames, num_tokens, dim = proj.shape
    try:
        tiling = frame_tiling(num_frames, max_offset(options, num_frames), max_window(proj.dtype, target.dtype))
        for kernel in ("forward", "backward"):
            config = launch_config(kernel, dim, tiling, dot_dtype(kernel, proj.dtype, target.dtype), capability)
            plan_grid(batch * triton.cdiv(num_tokens, config.block_n) * tiling.num_tiles)
    except ValueError as error:
        return str(error)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration


@dataclass(frozen=True)
class FrameTiling:
    """How the F frames are cut among programs. A program writes ``rows_per_tile`` frames; it reads a row window of
    FRAMES frames starting ``halo`` frames before them, and pairs it with the column windows shifted by
    -shifts..shifts whole windows (shifts = 0: the row window is its own column window)."""
    frames: int  # FRAMES: the window size (constexpr)
    rows_per_tile: int  # frames each program writes
    halo: int  # extra frames read on each side of the written rows
    num_tiles: int
    shifts: int = 0

    @property
    def shifted(self) -> bool:
        return self.shifts > 0


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def max_offset(options: LossOptions, num_frames: int) -> int:
    offsets = options.offsets(num_frames)
    return max(offsets) if offsets else 0


def max_window(proj_dtype: torch.dtype, target_dtype: torch.dtype) -> int:
    """32 frames; 16 for fp64 (gradcheck, not speed), whose 32-frame windows spilled on sm_86 and sm_90."""
    return 16 if torch.float64 in (proj_dtype, target_dtype) else MAX_SINGLE_WINDOW_FRAMES


def frame_tiling(num_frames: int, halo: int, window: int = MAX_SINGLE_WINDOW_FRAMES) -> FrameTiling:
    """The tiling of F frames whose neighbours lie up to ``halo`` frames away; windows never exceed 32 frames.

    * F <= ``window`` (32; 16 for fp64): one window holds every frame (16 or 32 frames: tl.dot needs >= 16); each
      element is read once.
    * Longer videos, halo mode: ``window``-frame windows that write their window - 2 halo middle frames and read
      `halo` more on each side, so every pair of a written frame lies inside the window.
    * Longer videos, shifted mode: 16-frame windows that write all their frames and visit the column windows
      -s..s (s = ceil(halo / 16)) whole windows away, one after the other, so distant neighbours cost further
      tiles instead of a wider window (a 64- or 128-frame window spilled and outgrew the shared memory of
      sm_86/sm_89; 32-frame windows in this mode spilled on sm_86 to sm_90). Without neighbours (halo 0), 16-frame
      windows that read every frame once.
    The mode that reads fewer frames per written frame wins, window / (window - 2 halo) against 2 s + 1: halo mode
    up to halo = 10 on 32-frame windows (d = 1 reads 1.07x the input), 5 on 16-frame ones. The choice depends on
    the halo only, not on F: under torch.compile (F symbolic) the only guards are F <= window, F <= 16 and their
    negations, so clips of any other length in the same regime reuse the graph.
    """
    if num_frames <= window:
        return FrameTiling(_frames_for(num_frames), num_frames, 0, 1)
    shifts = triton.cdiv(halo, MIN_DOT_DIM)
    rows = window - 2 * halo
    if shifts > 0 and rows >= 1 and window <= (2 * shifts + 1) * rows:
        return FrameTiling(window, rows, halo, triton.cdiv(num_frames, rows))
    return FrameTiling(MIN_DOT_DIM, MIN_DOT_DIM, 0, triton.cdiv(num_frames, MIN_DOT_DIM), shifts)


def _frames_for(num_frames: int) -> int:
    """The power of two >= max(16, F) (tl.dot's smallest dimension) by comparisons: on a symbolic F they are range
    guards, where triton.next_power_of_2's bit twiddling guards on an expression only this F satisfies."""
    frames = MIN_DOT_DIM
    while frames < num_frames:
        frames *= 2
    return frames


def _block_for(size: int, block: int) -> int:
    """min(block, next_power_of_2(size)), at least 16 (tl.dot), with range guards only (see _frames_for)."""
    while block > MIN_DOT_DIM and 2 * size <= block:
        block //= 2
    return block


def launch_config(kernel: str, dim: int, tiling: FrameTiling, dtype: torch.dtype,
                  capability: tuple[int, int] | None = None) -> LaunchConfig:
    """Tile sizes for ``kernel`` ("forward" or "backward") from D, the frame tiling, the tl.dot dtype and the target
    compute capability (device_capability; None: sm_90's configuration, as on the interpreter).

    * A program's tile is BLOCK_N x FRAMES x BLOCK_D per input: ~2-4K elements per tile with 4 warps keeps each
      input tile at <= 32 registers per thread; BLOCK_D = 64 bf16 = 128 bytes keeps each row load on a full line.
    * The forward also holds G, BLOCK_N * FRAMES^2 accumulators in the mma layout: BLOCK_N = 4 at FRAMES = 16,
      one token column per program at FRAMES = 32 (BLOCK_N = 2 spilled on sm_90).
    * The backward holds A (BLOCK_N * FRAMES^2, as bf16 hi/lo dot operands) and two output tiles, so it takes
      half the forward's BLOCK_D and can afford BLOCK_N = 2 at FRAMES = 32. In shifted mode it also builds each
      column window's A inside the D loop: one token column per program.
    * fp32 inputs run tl.dot on FMA units (input_precision="ieee"), whose operand layouts cost more registers:
      the forward's BLOCK_D drops to 16 (32 spilled on sm_80 and sm_90), the backward's too. fp64 (gradcheck,
      not speed) also halves the forward's BLOCK_N at FRAMES = 16 (4 spilled on sm_90).
    * BLOCK_D never exceeds next_power_of_2(D) (D = 1 or 5 must not load 64 masked lanes per frame) and never
      drops below 16 (tl.dot).
    * num_stages = 2: the D loop is a plain streaming loop; one tile in flight hides the latency, more stages
      only cost shared memory (each stage holds both input tiles).
    * Shifted mode below sm_90: 2 warps and 1 stage for both kernels (below). The capability changes only
      num_warps and num_stages, never BLOCK_N or BLOCK_D, so buffers and grids do not depend on it.
    tools/compile_triton.py checks every configuration this returns: no spills or stack, shared memory within each
    architecture's per-block limit.
    """
    frames = tiling.frames
    wide = dtype in (torch.float32, torch.float64)
    if kernel == "forward":
        # shifted mode carries its sums across the column windows: one token per program (2 and 4 spilled)
        block_n = 1 if tiling.shifted or frames > 16 else (4 if dtype == torch.float32 else 2)
        block_d = 16 if wide else (32 if tiling.shifted else 64)  # 64 spilled in shifted mode (sm_90)
        # G and both operand tiles in mma layouts: 4 warps spilled for 16-bit (sm_90) and fp64 at 32 frames
        num_warps = 8 if not wide or (dtype == torch.float64 and frames > 16) else 4
    else:
        block_n = 1 if tiling.shifted else max(1, (32 if wide else 64) // frames)
        block_d = 16 if wide or tiling.shifted else 32
        # shifted mode rebuilds A per column window inside the D loop; with 4 warps ptxas spilled at 80 registers
        num_warps = 2 if tiling.shifted else 4
    block_d = _block_for(dim, block_d)
    num_stages = 2
    if tiling.shifted and capability is not None and capability < SHIFTED_PIPELINED_CAPABILITY:
        # sm_80-sm_89's ptxas spilled 8-16 bytes with the prefetch stage; of the clean configs, 2 warps issue the
        # fewest instructions (4 and 8 warps repeat the small 16 x 16 dots and A per warp): same bytes read
        num_warps, num_stages = 2, 1
    return LaunchConfig(block_n=block_n, block_d=block_d, num_warps=num_warps, num_stages=num_stages)


def dot_dtype(kernel: str, proj_dtype: torch.dtype, target_dtype: torch.dtype) -> torch.dtype:
    """The dtype tl.dot runs in, which sets the register budget: the inputs' own 16-bit dtype when both share it
    (the backward: bf16 only, as hi/lo), else the compute dtype (fp32, fp64 if an input is fp64)."""
    if proj_dtype == target_dtype:
        if proj_dtype == torch.bfloat16 and BF16_DOT:
            return proj_dtype
        if proj_dtype == torch.float16 and kernel == "forward":
            return proj_dtype
    return torch.float64 if torch.float64 in (proj_dtype, target_dtype) else torch.float32


def band_slots(options: LossOptions, num_frames: int) -> tuple[int, int, int]:
    """(first offset, offset step, slot count) of the saved cosine band: slot s holds cos(p_f, y_{f + first + s*step})."""
    offsets = options.offsets(num_frames)
    if not offsets:
        return 0, 1, 1
    if options.neighbor_mode == "adjacent":
        return -options.neighbors, options.neighbors, 3
    return offsets[0], 1, 2 * offsets[-1] + 1


# ----------------------------------------------------------------------------------------------------------------
# Kernels
#
# Maths that reaches the result is IEEE-rounded on hardware as under the interpreter: tl.sqrt_rn and tl.div_rn
# (tl.sqrt and "/" compile to sqrt.approx.ftz.f32 and div.full.f32), and the weights exp(-delta / tau) come from
# a fp64 exp in _neighbour_table_kernel (libdevice: an FMA polynomial; tl.exp in fp32 is ex2.approx).

# scalar arguments that only steer loops and masks: specialising on their value (== 1, divisible by 16) would
# compile a kernel per neighbour range and token count for nothing
# the stats and table rows are views at offsets B*F*N and F: their 16-byte alignment would follow the shape
_ANY_ALIGNMENT = ["p_norm_ptr", "y_norm_ptr", "weight_ptr", "z_ptr"]
_RUNTIME_ONLY = ["num_batches", "num_frames", "num_tokens", "rows_per_tile", "halo", "shifts", "num_tiles",
                 "num_token_blocks", "near", "far", "slot_first", "slot_step", "num_slots"]

if triton is not None:

    @triton.jit
    def _to_element(x, ptr):
        """x in ptr's element type; 16-bit outputs round through fp32 (the interpreter's direct fp64 -> bf16
        cast is wrong; fp64 -> fp32 -> bf16 double rounding differs from direct rounding by <= 1 ulp, rarely)."""
        if ptr.dtype.element_ty.primitive_bitwidth == 16:
            x = x.to(tl.float32)
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def _div(x, y, COMPUTE: tl.constexpr):
        """x / y rounded to nearest: tl.div_rn takes fp32 only, and fp64 "/" is div.rn.f64 already."""
        if COMPUTE == tl.float64:
            return x / y
        else:
            return tl.div_rn(x, y)

    # Tiny eps (see csrc/crepa_math.h): below eps = sqrt(smallest normal) a product of two clamped norms underflows.
    # The cosine's denominator is then held at the smallest normal: the product of two norms of live vectors (norms
    # >= sqrt(smallest normal), whose squares the kernels resolve) never lies below it, so only a pair with a zero
    # vector meets the floor, and its dot product is 0: 0, not 0 / 0. A is held within the finite range: alpha / eps^2
    # of a pair of zero vectors would be inf, and inf times a zero vector NaN; any finite A gives them 0.
    @triton.jit
    def _smallest_normal(COMPUTE: tl.constexpr):
        if COMPUTE == tl.float64:
            return 2.2250738585072014e-308
        else:
            return 1.1754943508222875e-38

    @triton.jit
    def _largest_finite(COMPUTE: tl.constexpr):
        if COMPUTE == tl.float64:
            return 1.7976931348623157e308
        else:
            return 3.4028234663852886e38

    @triton.jit
    def _sqrt(x, COMPUTE: tl.constexpr):
        if COMPUTE == tl.float64:
            return tl.sqrt(x)
        else:
            return tl.sqrt_rn(x)

    @triton.jit
    def _work_item(num_batches, num_token_blocks, num_tiles):
        """(batch, token block, frame tile) of this program. The grid is one flat list of work items laid over
        axes 0 and 1 (plan_grid), token blocks fastest: gridDim.y/z stop at 65,535, gridDim.x at 2^31 - 1. Items
        past the end (the last row of axis 1) get batch >= num_batches and are masked off by the caller."""
        item = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
        token_block = item % num_token_blocks
        rest = item // num_token_blocks
        return rest // num_tiles, token_block, rest % num_tiles

    @triton.jit(do_not_specialize=["num_frames", "near", "far", "z_far"],
                do_not_specialize_on_alignment=_ANY_ALIGNMENT)
    def _neighbour_table_kernel(weight_ptr, z_ptr, num_frames, near, far, z_far, tau_ptr, BLOCK: tl.constexpr):
        """weight[delta] = C's numerator for frames delta apart (1 at 0, exp(-delta / tau) at neighbour distances
        near..far, else 0) and z[f] = Z_f (1 + the weights of f's neighbours inside [0, F) at distances
        near..z_far; z_far = near - 1 without normalize_weights), for delta, f < F. One program, fp64 maths (tau is
        read from the device: see scalar_tensor)."""
        inv_tau = 1.0 / tl.load(tau_ptr)
        for start in range(0, num_frames, BLOCK):
            i = start + tl.arange(0, BLOCK)
            ok = i < num_frames
            exact = tl.exp(-(i.to(tl.float64) * inv_tau))
            weight = tl.where(i == 0, 1.0, tl.where((i >= near) & (i <= far), exact, 0.0))
            z = tl.full((BLOCK,), 1.0, tl.float64)
            for distance in range(near, z_far + 1):
                w = tl.exp(-(distance * inv_tau))
                z += tl.where(i - distance >= 0, w, 0.0) + tl.where(i + distance < num_frames, w, 0.0)
            tl.store(weight_ptr + i, weight.to(weight_ptr.dtype.element_ty), mask=ok)
            tl.store(z_ptr + i, z.to(z_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _pair_weights(rows, cols, weight_ptr, num_frames, near, far):
        """(w[f, k], is_term[f, k]) for row frames f and column frames k ([FRAMES] each): is_term marks the pairs
        that enter L[f] (k = f or a neighbour, both inside [0, F)); w is the table's weight there, 0 elsewhere."""
        delta = cols[None, :] - rows[:, None]
        distance = tl.abs(delta)
        inside = ((rows >= 0) & (rows < num_frames))[:, None] & ((cols >= 0) & (cols < num_frames))[None, :]
        is_term = ((delta == 0) | ((distance >= near) & (distance <= far))) & inside
        return tl.load(weight_ptr + distance, mask=is_term, other=0.0), is_term

    @triton.jit
    def _window_pairs(first_col, shift, num_frames, near, far, FRAMES: tl.constexpr):
        """Whether the column window starting at first_col, ``shift`` windows from the rows, holds frames of the
        video and a pair of some L[f]: its frame distances run over |shift| FRAMES -+ (FRAMES - 1). Only the
        windows between the offsets of a large adjacent d hold none."""
        nearest = tl.abs(shift) * FRAMES - FRAMES + 1
        farthest = tl.abs(shift) * FRAMES + FRAMES - 1
        inside = (first_col + FRAMES > 0) & (first_col < num_frames)
        return inside & ((shift == 0) | ((near <= farthest) & (far >= nearest)))

    @triton.jit
    def _row_scale(grad_loss_ptr, z_ptr, batch, frames, frame_ok, num_frames, num_tokens, COMPUTE: tl.constexpr):
        """-grad_L[f] / (Z_f N) for the frames f: alpha[f, k] = this times w(|k - f|)."""
        grad_loss = tl.load(grad_loss_ptr + batch * num_frames + frames, mask=frame_ok, other=0.0).to(COMPUTE)
        z = tl.load(z_ptr + frames, mask=frame_ok, other=1.0)
        return _div(_div(-grad_loss, z, COMPUTE), tl.cast(num_tokens, COMPUTE), COMPUTE)

    @triton.jit
    def _a_matrix(rows, cols, weight_ptr, row_scale, inv_p, inv_y, num_frames, near, far, COMPUTE: tl.constexpr):
        """A[n, f, k] = alpha[f, k] / (|p_f| |y_k|) (clamped norms) for row frames f and column frames k, held
        within the finite range (tiny eps, above)."""
        w, _ = _pair_weights(rows, cols, weight_ptr, num_frames, near, far)
        a = (row_scale[:, None] * w)[None, :, :] * inv_p[:, :, None] * inv_y[:, None, :]
        return tl.minimum(tl.maximum(a, -_largest_finite(COMPUTE)), _largest_finite(COMPUTE))

    @triton.jit
    def _dot_split(a_hi, a_lo, x):
        return tl.dot(a_hi, x, tl.dot(a_lo, x, out_dtype=tl.float32), out_dtype=tl.float32)

    @triton.jit
    def _dot_a(a, x, SPLIT_BF16_DOT: tl.constexpr, COMPUTE: tl.constexpr):
        """a @ x with a in COMPUTE: for bf16 x as hi + lo bf16 halves of a on tensor cores, else in COMPUTE."""
        if SPLIT_BF16_DOT:
            a_hi = a.to(tl.bfloat16)
            return _dot_split(a_hi, (a - a_hi.to(tl.float32)).to(tl.bfloat16), x)
        else:
            return tl.dot(a, x.to(COMPUTE), input_precision="ieee", out_dtype=COMPUTE)

    @triton.jit
    def _stats(norm_ptr, batch, frames, tokens, ok, num_frames, num_tokens):
        return tl.load(norm_ptr + batch * num_frames * num_tokens + frames[None, :] * num_tokens + tokens[:, None],
                       mask=ok, other=1.0)

    @triton.jit
    def _forward_window(
        weighted, shift, rows, window, row_ok, tokens, token_ok, out_ok, p_row, band_row, z, batch, target_ptr,
        sy_b, sy_f, sy_n, sy_d, sp_d, p_norm_ptr, y_norm_ptr, weight_ptr, first_frame, shifts,
        num_frames, num_tokens, dim, near, far, eps, slot_first, slot_step, num_slots,
        NATIVE_DOT: tl.constexpr, SHIFTED: tl.constexpr, COMPUTE: tl.constexpr, FRAMES: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """The forward's work on the column window ``shift`` windows from the row window: G over D, the cosines,
        the weighted sum of the rows' terms it holds (returned, added to ``weighted``), the band slots it owns
        and, for shift 0, the norms."""
        cols = rows + shift * FRAMES  # the column window: target frames k
        col_ok = (cols >= 0) & (cols < num_frames)
        y_row = target_ptr + batch * sy_b + tokens[:, None, None] * sy_n + cols[None, :, None] * sy_f
        p_ok = token_ok[:, None, None] & row_ok[None, :, None]
        y_ok = token_ok[:, None, None] & col_ok[None, :, None]
        dims = tl.arange(0, BLOCK_D).to(tl.int64)
        # G[n, f, k] = p_f . y_k over D, with the squared norms
        gram = tl.zeros((BLOCK_N, FRAMES, FRAMES), COMPUTE)
        p_squares = tl.zeros((BLOCK_N, FRAMES), COMPUTE)
        y_squares = tl.zeros((BLOCK_N, FRAMES), COMPUTE)
        if not SHIFTED or _window_pairs(first_frame + shift * FRAMES, shift, num_frames, near, far, FRAMES):
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + dims
                d_ok = (d < dim)[None, None, :]
                p = tl.load(p_row + d[None, None, :] * sp_d, mask=p_ok & d_ok, other=0.0)
                y = tl.load(y_row + d[None, None, :] * sy_d, mask=y_ok & d_ok, other=0.0)
                p_wide = p.to(COMPUTE)
                y_wide = y.to(COMPUTE)
                p_squares += tl.sum(p_wide * p_wide, axis=2)
                y_squares += tl.sum(y_wide * y_wide, axis=2)
                if NATIVE_DOT:
                    gram = tl.dot(p, tl.trans(y, (0, 2, 1)), gram, out_dtype=COMPUTE)
                else:
                    gram = tl.dot(p_wide, tl.trans(y_wide, (0, 2, 1)), gram, input_precision="ieee",
                                  out_dtype=COMPUTE)
        w, is_term = _pair_weights(rows, cols, weight_ptr, num_frames, near, far)
        p_norm = tl.maximum(_sqrt(p_squares, COMPUTE), eps)
        y_norm = tl.maximum(_sqrt(y_squares, COMPUTE), eps)
        # [BLOCK_N, f, k]; the floor: tiny eps, above
        cosine = _div(gram, tl.maximum(p_norm[:, :, None] * y_norm[:, None, :], _smallest_normal(COMPUTE)), COMPUTE)
        coefficient = _div(w, z[:, None], COMPUTE)
        # select, not multiply by a zero coefficient: a NaN cosine of an unrelated frame pair must not leak in
        weighted += tl.sum(tl.where(is_term[None, :, :], cosine * coefficient[None, :, :], 0.0), axis=2)

        # the diagonal window's column frames are the rows: their norms are written from it
        stat = batch * num_frames * num_tokens + rows[None, :] * num_tokens + tokens[:, None]
        tl.store(p_norm_ptr + stat, p_norm, mask=out_ok & (shift == 0))
        tl.store(y_norm_ptr + stat, y_norm, mask=out_ok & (shift == 0))
        delta = cols[None, :] - rows[:, None]
        for slot in range(num_slots):
            offset = slot_first + slot * slot_step
            band = tl.sum(tl.where((delta == offset)[None, :, :], cosine, 0.0), axis=2)
            if SHIFTED:
                # cos(p_f, y_{f + offset}) is written by the window holding frame f + offset (clamped to the
                # visited ones, for frames outside the video: their cosine is 0 in every window)
                owner = (window + offset + (shifts + 1) * FRAMES) // FRAMES - (shifts + 1)
                owner = tl.minimum(tl.maximum(owner, -shifts), shifts)
                tl.store(band_row + slot * num_tokens, band, mask=out_ok & (owner == shift)[None, :])
            else:
                tl.store(band_row + slot * num_tokens, band, mask=out_ok)
        return weighted

    @triton.jit(do_not_specialize=_RUNTIME_ONLY, do_not_specialize_on_alignment=_ANY_ALIGNMENT)
    def _crepa_forward_kernel(
        proj_ptr, target_ptr, p_norm_ptr, y_norm_ptr, band_ptr, partial_ptr, weight_ptr, z_ptr,
        num_batches, num_frames, num_tokens, dim,
        sp_b, sp_f, sp_n, sp_d, sy_b, sy_f, sy_n, sy_d,
        rows_per_tile, halo, shifts, num_tiles, num_token_blocks,
        near, far, eps_ptr,
        slot_first, slot_step, num_slots,
        FP64: tl.constexpr, NATIVE_DOT: tl.constexpr, SHIFTED: tl.constexpr,
        FRAMES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        COMPUTE: tl.constexpr = tl.float64 if FP64 else tl.float32
        eps = tl.load(eps_ptr).to(COMPUTE)  # fp64 on the device (scalar_tensor)
        batch, token_block, tile = _work_item(num_batches, num_token_blocks, num_tiles)
        first_row = tile * rows_per_tile
        window = tl.arange(0, FRAMES).to(tl.int64)
        rows = first_row - halo + window  # the row window: proj frames f
        tokens = token_block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = (rows >= 0) & (rows < num_frames)
        token_ok = (tokens < num_tokens) & (batch < num_batches)
        p_row = proj_ptr + batch * sp_b + tokens[:, None, None] * sp_n + rows[None, :, None] * sp_f
        # this program writes only its own rows; the halo rows belong to the neighbouring tiles
        writes = row_ok & (rows >= first_row) & (rows < first_row + rows_per_tile)
        out_ok = token_ok[:, None] & writes[None, :]
        z = tl.load(z_ptr + rows, mask=row_ok, other=1.0)
        band_row = band_ptr + batch * num_frames * num_slots * num_tokens + rows[None, :] * num_slots * num_tokens \
            + tokens[:, None]

        weighted = tl.zeros((BLOCK_N, FRAMES), COMPUTE)
        if SHIFTED:
            for shift in range(-shifts, shifts + 1):
                weighted = _forward_window(weighted, shift, rows, window, row_ok, tokens, token_ok, out_ok, p_row, band_row, z, batch, target_ptr,
                                           sy_b, sy_f, sy_n, sy_d, sp_d, p_norm_ptr, y_norm_ptr, weight_ptr,
                                           first_row - halo, shifts, num_frames, num_tokens, dim, near, far, eps,
                                           slot_first, slot_step, num_slots, NATIVE_DOT, True, COMPUTE,
                                           FRAMES, BLOCK_N, BLOCK_D)
        else:  # one window, its own column window (a runtime loop of one window spilled on sm_90)
            weighted = _forward_window(weighted, 0, rows, window, row_ok, tokens, token_ok, out_ok, p_row, band_row, z, batch, target_ptr,
                                           sy_b, sy_f, sy_n, sy_d, sp_d, p_norm_ptr, y_norm_ptr, weight_ptr,
                                           first_row - halo, shifts, num_frames, num_tokens, dim, near, far, eps,
                                           slot_first, slot_step, num_slots, NATIVE_DOT, False, COMPUTE,
                                       FRAMES, BLOCK_N, BLOCK_D)
        partial = tl.sum(tl.where(out_ok, weighted, 0.0), axis=0)
        tl.store(partial_ptr + (batch * num_frames + rows) * num_token_blocks + token_block, partial,
                 mask=writes & (batch < num_batches))

    @triton.jit(do_not_specialize=_RUNTIME_ONLY, do_not_specialize_on_alignment=_ANY_ALIGNMENT)
    def _crepa_backward_kernel(
        proj_ptr, target_ptr, p_norm_ptr, y_norm_ptr, band_ptr, grad_loss_ptr, grad_proj_ptr, grad_target_ptr,
        weight_ptr, z_ptr,
        num_batches, num_frames, num_tokens, dim,
        sp_b, sp_f, sp_n, sp_d, sy_b, sy_f, sy_n, sy_d,
        gp_b, gp_f, gp_n, gp_d, gy_b, gy_f, gy_n, gy_d,
        rows_per_tile, halo, shifts, num_tiles, num_token_blocks,
        near, far, eps_ptr,
        slot_first, slot_step, num_slots,
        FP64: tl.constexpr, SPLIT_BF16_DOT: tl.constexpr, SHIFTED: tl.constexpr, PROJ_GRAD: tl.constexpr,
        TARGET_GRAD: tl.constexpr, FRAMES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        COMPUTE: tl.constexpr = tl.float64 if FP64 else tl.float32
        eps = tl.load(eps_ptr).to(COMPUTE)  # fp64 on the device (scalar_tensor)
        batch, token_block, tile = _work_item(num_batches, num_token_blocks, num_tiles)
        first_row = tile * rows_per_tile
        rows = first_row - halo + tl.arange(0, FRAMES).to(tl.int64)
        tokens = token_block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = (rows >= 0) & (rows < num_frames)
        batch_ok = batch < num_batches
        token_ok = (tokens < num_tokens) & batch_ok
        dims = tl.arange(0, BLOCK_D).to(tl.int64)
        stat_ok = token_ok[:, None] & row_ok[None, :]

        p_norm = _stats(p_norm_ptr, batch, rows, tokens, stat_ok, num_frames, num_tokens)
        y_norm = _stats(y_norm_ptr, batch, rows, tokens, stat_ok, num_frames, num_tokens)
        row_scale = _row_scale(grad_loss_ptr, z_ptr, batch, rows, row_ok & batch_ok, num_frames, num_tokens, COMPUTE)

        # s_p[f] = sum_k alpha[f, k] cos[f, k] and s_y[k] = sum_f alpha[f, k] cos[f, k], from the saved band
        band_column = band_ptr + batch * num_frames * num_slots * num_tokens + tokens[:, None]
        s_p = tl.zeros((BLOCK_N, FRAMES), COMPUTE)
        s_y = tl.zeros((BLOCK_N, FRAMES), COMPUTE)
        for slot in range(num_slots):
            offset = slot_first + slot * slot_step
            w = tl.load(weight_ptr + tl.abs(offset))
            as_row = tl.load(band_column + rows[None, :] * num_slots * num_tokens + slot * num_tokens, mask=stat_ok,
                             other=0.0)  # cos(p_f, y_{f + offset}) for f = rows
            k_ok = (rows + offset >= 0) & (rows + offset < num_frames)
            s_p += tl.where(k_ok[None, :], as_row * (row_scale * w)[None, :], 0.0)
            sources = rows - offset  # cos(p_{k - offset}, y_k) for k = rows
            source_ok = (sources >= 0) & (sources < num_frames)
            as_column = tl.load(band_column + sources[None, :] * num_slots * num_tokens + slot * num_tokens,
                                mask=token_ok[:, None] & source_ok[None, :], other=0.0)
            source_scale = _row_scale(grad_loss_ptr, z_ptr, batch, sources, source_ok & batch_ok, num_frames,
                                      num_tokens, COMPUTE)
            s_y += tl.where(source_ok[None, :], as_column * (source_scale * w)[None, :], 0.0)
        p_scale = tl.where(p_norm > eps, _div(s_p, p_norm * p_norm, COMPUTE), 0.0)
        y_scale = tl.where(y_norm > eps, _div(s_y, y_norm * y_norm, COMPUTE), 0.0)
        one = tl.full((BLOCK_N, FRAMES), 1.0, COMPUTE)
        inv_p = _div(one, p_norm, COMPUTE)
        inv_y = _div(one, y_norm, COMPUTE)
        if not SHIFTED:  # the window is its own column window: A once for the whole D sweep
            a = _a_matrix(rows, rows, weight_ptr, row_scale, inv_p, inv_y, num_frames, near, far, COMPUTE)
            a_t = tl.trans(a, (0, 2, 1))
            if SPLIT_BF16_DOT:
                a_hi = a.to(tl.bfloat16)
                a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
                a_t_hi = tl.trans(a_hi, (0, 2, 1))
                a_t_lo = tl.trans(a_lo, (0, 2, 1))

        p_row = proj_ptr + batch * sp_b + tokens[:, None, None] * sp_n + rows[None, :, None] * sp_f
        y_row = target_ptr + batch * sy_b + tokens[:, None, None] * sy_n + rows[None, :, None] * sy_f
        gp_row = grad_proj_ptr + batch * gp_b + tokens[:, None, None] * gp_n + rows[None, :, None] * gp_f
        gy_row = grad_target_ptr + batch * gy_b + tokens[:, None, None] * gy_n + rows[None, :, None] * gy_f
        row_load_ok = token_ok[:, None, None] & row_ok[None, :, None]
        writes = row_ok & (rows >= first_row) & (rows < first_row + rows_per_tile)
        write_ok = token_ok[:, None, None] & writes[None, :, None]
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + dims
            d_ok = (d < dim)[None, None, :]
            p = tl.load(p_row + d[None, None, :] * sp_d, mask=row_load_ok & d_ok, other=0.0)
            y = tl.load(y_row + d[None, None, :] * sy_d, mask=row_load_ok & d_ok, other=0.0)
            p_wide = p.to(COMPUTE)
            y_wide = y.to(COMPUTE)
            if SHIFTED:
                # grad_P[f] gathers A[f, k] y_k from every column window, grad_Y[k] gathers A[f, k] p_f from
                # every row window; A is rebuilt per window from the saved norms (a few loads, no division)
                grad_p = -(p_scale[:, :, None] * p_wide)
                grad_y = -(y_scale[:, :, None] * y_wide)
                for shift in range(-shifts, shifts + 1):
                    cols = rows + shift * FRAMES
                    col_ok = (cols >= 0) & (cols < num_frames)
                    col_stat_ok = token_ok[:, None] & col_ok[None, :]
                    col_load_ok = token_ok[:, None, None] & col_ok[None, :, None] & d_ok
                    if PROJ_GRAD:
                        inv_y_cols = _div(one, _stats(y_norm_ptr, batch, cols, tokens, col_stat_ok, num_frames,
                                                      num_tokens), COMPUTE)
                        a = _a_matrix(rows, cols, weight_ptr, row_scale, inv_p, inv_y_cols, num_frames, near, far,
                                      COMPUTE)
                        y_cols = tl.load(target_ptr + batch * sy_b + tokens[:, None, None] * sy_n
                                         + cols[None, :, None] * sy_f + d[None, None, :] * sy_d, mask=col_load_ok,
                                         other=0.0)
                        grad_p += _dot_a(a, y_cols, SPLIT_BF16_DOT, COMPUTE)
                    if TARGET_GRAD:
                        inv_p_cols = _div(one, _stats(p_norm_ptr, batch, cols, tokens, col_stat_ok, num_frames,
                                                      num_tokens), COMPUTE)
                        col_scale = _row_scale(grad_loss_ptr, z_ptr, batch, cols, col_ok & batch_ok, num_frames,
                                               num_tokens, COMPUTE)
                        a_back = _a_matrix(cols, rows, weight_ptr, col_scale, inv_p_cols, inv_y, num_frames, near,
                                           far, COMPUTE)
                        p_cols = tl.load(proj_ptr + batch * sp_b + tokens[:, None, None] * sp_n
                                         + cols[None, :, None] * sp_f + d[None, None, :] * sp_d, mask=col_load_ok,
                                         other=0.0)
                        grad_y += _dot_a(tl.trans(a_back, (0, 2, 1)), p_cols, SPLIT_BF16_DOT, COMPUTE)
            else:
                if SPLIT_BF16_DOT:
                    grad_p = _dot_split(a_hi, a_lo, y)
                else:
                    grad_p = tl.dot(a, y_wide, input_precision="ieee", out_dtype=COMPUTE)
                grad_p -= p_scale[:, :, None] * p_wide
                if TARGET_GRAD:
                    if SPLIT_BF16_DOT:
                        grad_y = _dot_split(a_t_hi, a_t_lo, p)
                    else:
                        grad_y = tl.dot(a_t, p_wide, input_precision="ieee", out_dtype=COMPUTE)
                    grad_y -= y_scale[:, :, None] * y_wide
            if PROJ_GRAD:
                tl.store(gp_row + d[None, None, :] * gp_d, _to_element(grad_p, grad_proj_ptr), mask=write_ok & d_ok)
            if TARGET_GRAD:
                tl.store(gy_row + d[None, None, :] * gy_d, _to_element(grad_y, grad_target_ptr),
                         mask=write_ok & d_ok)


# ----------------------------------------------------------------------------------------------------------------
# Host launchers (outputs preallocated by the caller: the tests poison them)


@dataclass(frozen=True)
class _Plan:
    tiling: FrameTiling
    near: int  # neighbours are the frames at distance near..far
    far: int
    z_far: int  # Z_f sums the distances near..z_far (near - 1: empty, no normalisation)
    slot_first: int
    slot_step: int
    num_slots: int


def _distances(options: LossOptions, num_frames: int) -> tuple[int, int, int]:
    """(near, far, z_far) of _Plan: all the neighbour table needs (not the tiling, whose guards on a symbolic F
    depend on the dtype's window)."""
    positive = [offset for offset in options.offsets(num_frames) if offset > 0]
    near, far = (positive[0], positive[-1]) if positive else (1, 0)
    return near, far, far if options.normalize_weights else near - 1


def _plan(options: LossOptions, num_frames: int, window: int) -> _Plan:
    slot_first, slot_step, num_slots = band_slots(options, num_frames)
    return _Plan(frame_tiling(num_frames, max_offset(options, num_frames), window),
                 *_distances(options, num_frames), slot_first, slot_step, num_slots)


def scalar_tensor(value: float, like: torch.Tensor) -> torch.Tensor:
    """tau or eps as a 0-d fp64 tensor on ``like``'s device, which the kernels load: a Python float kernel argument
    would reach them as fp32 and, under torch.compile, pin a varying tau or eps to its value (one graph per value).
    A fill on the device: no host sync."""
    return torch.full((), value, dtype=torch.float64, device=like.device)


def device_scalars(options: LossOptions, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, eps) as the ops take them: 0-d fp64 tensors on ``like``'s device. Under torch.compile as ones * value,
    which keeps a varying value symbolic; a torch.full of it, or a float op argument, is specialised by Dynamo
    (tensorify_python_scalars: a guard tau == 0.5, one graph per value)."""
    if torch.compiler.is_compiling():
        one = torch.ones((), dtype=torch.float64, device=like.device)
        return one * options.tau, one * options.eps
    return scalar_tensor(options.tau, like), scalar_tensor(options.eps, like)


def _check_scalar(name: str, value: torch.Tensor, proj: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float64 or value.dim() != 0 \
            or value.device != proj.device:
        given = f"{value.dtype} {tuple(value.shape)} on {value.device}" if isinstance(value, torch.Tensor) else \
            type(value).__name__
        raise ValueError(f"{name}: expected a 0-d float64 tensor on {proj.device} (device_scalars), got {given}")


def _interpreting_fake(tensor: torch.Tensor) -> bool:
    """The fake implementation is the op body run on FakeTensors. On GPUs wrap_triton turns the launch into a
    traceable no-op; under the interpreter it hands back the raw kernel, which must not be launched on them."""
    return INTERPRETED and torch._subclasses.fake_tensor.is_fake(tensor)


def _device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _forward_setup(proj, target, options: LossOptions, capability=None) -> tuple[_Plan, LaunchConfig, torch.dtype]:
    plan = _plan(options, proj.shape[1], max_window(proj.dtype, target.dtype))
    dtype = dot_dtype("forward", proj.dtype, target.dtype)
    return plan, launch_config("forward", proj.shape[3], plan.tiling, dtype, capability), dtype


def stats_shapes(proj: torch.Tensor, target: torch.Tensor, options: LossOptions) -> dict[str, tuple[int, ...]]:
    """Shapes of the buffers forward_into writes: norms [2, B, F, N], band [B, F, slots, N], partial [B, F, blocks],
    and the neighbour table [2, F] (weights by distance, Z by frame) both kernels read."""
    batch, num_frames, num_tokens, _ = proj.shape
    plan, config, _ = _forward_setup(proj, target, options)
    return {
        "norms": (2, batch, num_frames, num_tokens),
        "band": (batch, num_frames, plan.num_slots, num_tokens),
        "partial": (batch, num_frames, triton.cdiv(num_tokens, config.block_n)),
        "table": (2, num_frames),
    }


def plan_grid(work_items: int) -> tuple[int, int, int]:
    """The launch grid for a flat list of work items (see _work_item): axis 0 up to MAX_GRID_X, the rest on axis 1.

    CUDA allows gridDim.x < 2^31 and gridDim.y, z <= 65,535; a [B, token blocks, frame tiles] grid passed 65,535
    on axis 1 from N = 65,536 tokens on. Axis 1 is needed only past 2^31 - 1 work items.
    """
    if work_items <= MAX_GRID_X:  # a range guard under torch.compile (min() and cdiv(n, n) would add more)
        return work_items, 1, 1
    y = triton.cdiv(work_items, MAX_GRID_X)
    if y > MAX_GRID_YZ:
        raise ValueError(f"triton backend: {work_items} programs exceed the CUDA grid ({MAX_GRID_X} x {MAX_GRID_YZ})")
    return MAX_GRID_X, y, 1


@dataclass(frozen=True)
class Launch:
    """One kernel launch: kernel, grid, positional arguments and constexpr/launch keywords. The dispatcher and
    tools/compile_triton.py both build it here, so the ahead-of-time check compiles what would run."""
    kernel: object
    grid: tuple[int, int, int]
    args: tuple
    kwargs: dict


# the neighbour table kernel's block of frames (it loops over longer videos)
TABLE_BLOCK = 64


def table_launch(options: LossOptions, num_frames: int, table, tau=None) -> Launch:
    """tau: a 0-d fp64 tensor (device_scalars), else options.tau's."""
    tau = scalar_tensor(options.tau, table) if tau is None else tau
    args = (table[0], table[1], num_frames, *_distances(options, num_frames), tau)
    return Launch(_neighbour_table_kernel, (1, 1, 1), args, dict(BLOCK=TABLE_BLOCK, num_warps=2, num_stages=1))


def forward_launch(proj, target, options: LossOptions, norms, band, partial, table, capability=None,
                   eps=None) -> Launch:
    """capability: the GPU to launch on (tools/compile_triton.py), else proj's device's (device_capability); eps:
    a 0-d fp64 tensor (device_scalars), else options.eps's."""
    batch, num_frames, num_tokens, dim = proj.shape
    plan, config, dtype = _forward_setup(proj, target, options, capability or device_capability(proj.device))
    tiling = plan.tiling
    token_blocks = triton.cdiv(num_tokens, config.block_n)
    args = (
        proj, target, norms[0], norms[1], band, partial, table[0], table[1],
        batch, num_frames, num_tokens, dim,
        *proj.stride(), *target.stride(),
        tiling.rows_per_tile, tiling.halo, tiling.shifts, tiling.num_tiles, token_blocks,
        plan.near, plan.far, scalar_tensor(options.eps, proj) if eps is None else eps,
        plan.slot_first, plan.slot_step, plan.num_slots,
    )
    kwargs = dict(
        FP64=norms.dtype == torch.float64, NATIVE_DOT=torch.finfo(dtype).bits == 16, SHIFTED=tiling.shifted,
        FRAMES=tiling.frames, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return Launch(_crepa_forward_kernel, plan_grid(batch * token_blocks * tiling.num_tiles), args, kwargs)


def backward_launches(grad_loss, proj, target, norms, band, options: LossOptions, grad_proj, grad_target,
                      table, capability=None, eps=None) -> list[Launch]:
    """The backward: one launch, or in shifted mode one per gradient (each rebuilds its own A per column window;
    both in one program spilled on sm_86/sm_90). grad_target=None: no target gradient. capability, eps: as in
    forward_launch."""
    batch, num_frames, num_tokens, dim = proj.shape
    plan = _plan(options, num_frames, max_window(proj.dtype, target.dtype))
    tiling = plan.tiling
    dtype = dot_dtype("backward", proj.dtype, target.dtype)
    config = launch_config("backward", dim, tiling, dtype, capability or device_capability(proj.device))
    token_blocks = triton.cdiv(num_tokens, config.block_n)
    target_grad = grad_target is not None
    grad_target = grad_target if target_grad else grad_proj  # never written: TARGET_GRAD is False
    args = (
        proj, target, norms[0], norms[1], band, grad_loss, grad_proj, grad_target, table[0], table[1],
        batch, num_frames, num_tokens, dim,
        *proj.stride(), *target.stride(), *grad_proj.stride(), *grad_target.stride(),
        tiling.rows_per_tile, tiling.halo, tiling.shifts, tiling.num_tiles, token_blocks,
        plan.near, plan.far, scalar_tensor(options.eps, proj) if eps is None else eps,
        plan.slot_first, plan.slot_step, plan.num_slots,
    )
    kwargs = dict(
        FP64=norms.dtype == torch.float64, SPLIT_BF16_DOT=dtype == torch.bfloat16, SHIFTED=tiling.shifted,
        FRAMES=tiling.frames, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    grid = plan_grid(batch * token_blocks * tiling.num_tiles)
    if not tiling.shifted:
        gradients = [(True, target_grad)]
    else:
        gradients = [(True, False)] + ([(False, True)] if target_grad else [])
    return [Launch(_crepa_backward_kernel, grid, args, dict(kwargs, PROJ_GRAD=proj_grad, TARGET_GRAD=target))
            for proj_grad, target in gradients]


def _run(launch: Launch, device_of: torch.Tensor) -> None:
    with _device_guard(device_of):
        torch.library.wrap_triton(launch.kernel)[launch.grid](*launch.args, **launch.kwargs)


def neighbour_table(proj: torch.Tensor, options: LossOptions, dtype: torch.dtype, tau=None) -> torch.Tensor:
    """[2, F]: the weights by frame distance and Z by frame, computed on the device (one small launch). tau: as in
    table_launch."""
    table = proj.new_empty((2, proj.shape[1]), dtype=dtype)
    if not _interpreting_fake(proj):
        _run(table_launch(options, proj.shape[1], table, tau), proj)
    return table


def _contiguous_strides(shape: tuple) -> tuple:
    """Row-major strides of ``shape``. Compared with a buffer's, not is_contiguous(): that would guard on whether a
    symbolic size (the token blocks) is 1, where any stride is contiguous (a recompile between N <= 4 and N > 4)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step = step * size
    return tuple(reversed(strides))


def forward_into(proj, target, options: LossOptions, norms, band, partial, tau=None, eps=None) -> None:
    """Launches the forward kernel, writing every element of norms, band and partial (shapes: stats_shapes). tau,
    eps: 0-d fp64 tensors (device_scalars), else the options'."""
    shapes = stats_shapes(proj, target, options)
    for name, buffer in (("norms", norms), ("band", band), ("partial", partial)):
        if tuple(buffer.shape) != shapes[name] or buffer.stride() != _contiguous_strides(shapes[name]):
            raise ValueError(f"forward_into: {name} must be a contiguous {shapes[name]} tensor, got "
                             f"{tuple(buffer.shape)} with strides {buffer.stride()}")
    table = neighbour_table(proj, options, norms.dtype, tau)
    if _interpreting_fake(proj):
        return
    _run(forward_launch(proj, target, options, norms, band, partial, table, eps=eps), proj)


def backward_into(grad_loss, proj, target, norms, band, options: LossOptions, grad_proj, grad_target, tau=None,
                  eps=None) -> None:
    """Launches the backward kernel; grad_target=None skips the target gradient (a constexpr branch). tau, eps: as
    in forward_into."""
    table = neighbour_table(proj, options, norms.dtype, tau)
    if _interpreting_fake(proj):
        return
    for launch in backward_launches(grad_loss, proj, target, norms, band, options, grad_proj, grad_target, table,
                                    eps=eps):
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


def _options(proj: torch.Tensor, tau: torch.Tensor, neighbors: int, neighbor_mode: str, normalize_weights: bool,
             eps: torch.Tensor) -> LossOptions:
    """The neighbour structure of an op call, after checking its tau and eps tensors. Those reach the launches as
    they are; the options keep LossOptions' default tau and eps, which the ops never read."""
    _check_scalar("tau", tau, proj)
    _check_scalar("eps", eps, proj)
    return LossOptions(neighbors=neighbors, neighbor_mode=neighbor_mode, normalize_weights=normalize_weights)


@_define_op("crepa_kernels::triton_forward")
def triton_forward(proj: torch.Tensor, target: torch.Tensor, tau: torch.Tensor, neighbors: int, neighbor_mode: str,
                   normalize_weights: bool, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (per-frame loss [B, F], clamped norms [2, B, F, N], cosine band [B, F, slots, N]); tau and eps: 0-d fp64
    tensors on proj's device (device_scalars)."""
    options = _options(proj, tau, neighbors, neighbor_mode, normalize_weights, eps)
    dtype = compute_dtype(proj, target)
    shapes = stats_shapes(proj, target, options)
    norms = proj.new_empty(shapes["norms"], dtype=dtype)
    band = proj.new_empty(shapes["band"], dtype=dtype)
    partial = proj.new_empty(shapes["partial"], dtype=dtype)
    forward_into(proj, target, options, norms, band, partial, tau, eps)
    # second stage of the token reduction: a fixed-order sum over token blocks
    loss = partial.sum(dim=-1) * (-1.0 / proj.shape[2])
    return loss, norms, band


@_define_op("crepa_kernels::triton_backward")
def triton_backward(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, norms: torch.Tensor,
                    band: torch.Tensor, tau: torch.Tensor, neighbors: int, neighbor_mode: str,
                    normalize_weights: bool, eps: torch.Tensor, target_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_proj, grad_target); grad_target is an empty tensor when target_grad is False. tau, eps: as in
    triton_forward."""
    options = _options(proj, tau, neighbors, neighbor_mode, normalize_weights, eps)
    grad_loss = grad_loss.to(norms.dtype).contiguous()
    grad_proj = torch.empty(proj.shape, dtype=proj.dtype, device=proj.device)
    grad_target = torch.empty(target.shape if target_grad else (0,), dtype=target.dtype, device=target.device)
    backward_into(grad_loss, proj, target, norms, band, options, grad_proj, grad_target if target_grad else None,
                  tau, eps)
    return grad_proj, grad_target


def _op_options(options: LossOptions, like: torch.Tensor) -> tuple:
    tau, eps = device_scalars(options, like)
    return tau, options.neighbors, options.neighbor_mode, options.normalize_weights, eps


BACKWARD_READS_STATISTICS = True


def forward(proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor, options: LossOptions):
    """(L [B, F], clamped norms, cosine band): the loss and the per-token statistics the backward reads."""
    return triton_forward(proj, target, *_op_options(options, proj))


def backward(grad_loss: torch.Tensor, proj: torch.Tensor, target: torch.Tensor, coefficients: torch.Tensor,
             saved: tuple, options: LossOptions,
             needs_proj_grad: bool, needs_target_grad: bool):
    """grad_loss [B, F] -> (dL/dproj or None, dL/dtarget or None). The kernel always writes grad_proj; the
    target gradient is a constexpr branch, computed only when asked for."""
    norms, band = saved
    grad_proj, grad_target = triton_backward(grad_loss, proj, target, norms, band, *_op_options(options, proj),
                                             needs_target_grad)
    return grad_proj if needs_proj_grad else None, grad_target if needs_target_grad else None

