"""The Triton kernels' launch planning, computed on the host from the sizes alone: the frame tiling, the tile sizes
and warps per GPU generation, the saved band's layout and the grid. The mirror of csrc/crepa_cuda_plan.h.

Importable without triton, so that the planning is tested (and the backend explains a refusal) on any machine.
The neighbour structure arrives as the coefficient table's slot offsets (spec.band_offsets: 0, then the neighbour
offsets in increasing order); the plan never sees a weight.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import gpu_limits

# One window covers up to this many frames; longer videos are tiled (frame_tiling).
MAX_SINGLE_WINDOW_FRAMES = 32
# Smallest window, and smallest BLOCK_D: tl.dot needs every non-batch dimension >= 16.
MIN_DOT_DIM = 16
# CUDA's launch limits (gridDim.x < 2^31, gridDim.y and gridDim.z <= 65,535) as globals of this module: tests lower
# MAX_GRID_X to exercise the second axis.
MAX_GRID_X = gpu_limits.MAX_GRID_X
MAX_GRID_YZ = gpu_limits.MAX_GRID_YZ
# bf16 tl.dot needs sm_80; tools/compile_triton.py checks sm_80 to sm_121 ahead of time
MIN_CAPABILITY = (8, 0)
# Below this the shifted tiling's kernels take their own launch configuration (launch_config)
SHIFTED_PIPELINED_CAPABILITY = (9, 0)
SM_86 = (8, 6)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


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


# ----------------------------------------------------------------------------------------------------------------
# The neighbour structure, read off the table's slot offsets


@dataclass(frozen=True)
class BandLayout:
    """Slots of the saved cosine band [B, F, slots, N], in increasing offset order: slot s holds
    cos(p_f, y_{f + first + s * step}). The coefficient table has the same slots in its own order (0 first, then the
    others increasing), so a band slot s of offset o is table column s + 1 below 0, 0 at 0, s above (kernels)."""
    first: int
    step: int
    slots: int


def band_layout(slot_offsets: tuple[int, ...]) -> BandLayout:
    """The band of the table's slot offsets (0, then increasing): sorted, they are (-d, 0, d) for adjacent
    neighbours, -r..r for cumulative ones, (0) without neighbours; the kernels rely on that symmetry."""
    if not slot_offsets or slot_offsets[0] != 0 or list(slot_offsets[1:]) != sorted(set(slot_offsets[1:])) \
            or 0 in slot_offsets[1:]:
        raise ValueError(f"slot_offsets: expected 0 then distinct non-zero offsets in increasing order "
                         f"(spec.band_offsets), got {tuple(slot_offsets)}")
    ordered = sorted(slot_offsets)
    step = ordered[1] - ordered[0] if len(ordered) > 1 else 1
    if any(b - a != step for a, b in zip(ordered, ordered[1:])) or ordered != [-o for o in reversed(ordered)] \
            or (step != 1 and len(ordered) > 3):
        raise ValueError(f"slot_offsets: the Triton kernels take the slots of adjacent (0, -d, d) or cumulative "
                         f"(0, -r..-1, 1..r) neighbours, got {tuple(slot_offsets)}")
    return BandLayout(ordered[0], step, len(ordered))


def max_offset(slot_offsets: tuple[int, ...]) -> int:
    return max(abs(offset) for offset in slot_offsets)


def neighbour_distances(slot_offsets: tuple[int, ...]) -> tuple[int, int]:
    """(near, far): the neighbours of a frame lie near..far frames away (1, 0: none)."""
    positive = [offset for offset in slot_offsets if offset > 0]
    return (positive[0], positive[-1]) if positive else (1, 0)


# ----------------------------------------------------------------------------------------------------------------
# Frame tiling and tile sizes


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
    shifts = cdiv(halo, MIN_DOT_DIM)
    rows = window - 2 * halo
    if shifts > 0 and rows >= 1 and window <= (2 * shifts + 1) * rows:
        return FrameTiling(window, rows, halo, cdiv(num_frames, rows))
    return FrameTiling(MIN_DOT_DIM, MIN_DOT_DIM, 0, cdiv(num_frames, MIN_DOT_DIM), shifts)


def _frames_for(num_frames: int) -> int:
    """The power of two >= max(16, F) (tl.dot's smallest dimension) by comparisons: on a symbolic F they are range
    guards, where bit twiddling (triton.next_power_of_2) guards on an expression only this F satisfies."""
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
        # fewest instructions (4 and 8 warps repeat the small 16 x 16 dots and A per warp): same bytes read. sm_80's
        # backward with the target gradient spilled 4 bytes at 2 warps (fp32 dots): 4 warps there
        num_warps, num_stages = (4 if kernel == "backward" and capability < SM_86 else 2), 1
    return LaunchConfig(block_n=block_n, block_d=block_d, num_warps=num_warps, num_stages=num_stages)


def dot_dtype(kernel: str, proj_dtype: torch.dtype, target_dtype: torch.dtype, bf16_dot: bool) -> torch.dtype:
    """The dtype tl.dot runs in, which sets the register budget: the inputs' own 16-bit dtype when both share it
    (the backward: bf16 only, as hi/lo, and only where ``bf16_dot``: not under the interpreter), else the compute
    dtype (fp32, fp64 if an input is fp64)."""
    if proj_dtype == target_dtype:
        if proj_dtype == torch.bfloat16 and bf16_dot:
            return proj_dtype
        if proj_dtype == torch.float16 and kernel == "forward":
            return proj_dtype
    return torch.float64 if torch.float64 in (proj_dtype, target_dtype) else torch.float32


def plan_grid(work_items: int) -> tuple[int, int, int]:
    """The launch grid for a flat list of work items (triton_kernels._work_item): axis 0 up to MAX_GRID_X, the rest
    on axis 1.

    CUDA allows gridDim.x < 2^31 and gridDim.y, z <= 65,535; a [B, token blocks, frame tiles] grid passed 65,535
    on axis 1 from N = 65,536 tokens on. Axis 1 is needed only past 2^31 - 1 work items.
    """
    if work_items <= MAX_GRID_X:  # a range guard under torch.compile (min() and cdiv(n, n) would add more)
        return work_items, 1, 1
    y = cdiv(work_items, MAX_GRID_X)
    if y > MAX_GRID_YZ:
        raise ValueError(f"triton backend: {work_items} programs exceed the CUDA grid ({MAX_GRID_X} x {MAX_GRID_YZ})")
    return MAX_GRID_X, y, 1


# ----------------------------------------------------------------------------------------------------------------
# One kernel's plan for one call


@dataclass(frozen=True)
class KernelPlan:
    tiling: FrameTiling
    band: BandLayout
    near: int  # neighbours are the frames at distance near..far
    far: int
    dot_dtype: torch.dtype
    config: LaunchConfig
    token_blocks: int
    grid: tuple[int, int, int]


def plan_kernel(kernel: str, shape, proj_dtype: torch.dtype, target_dtype: torch.dtype,
                slot_offsets: tuple[int, ...], bf16_dot: bool,
                capability: tuple[int, int] | None = None) -> KernelPlan:
    """The plan of ``kernel`` ("forward" or "backward") for inputs of ``shape`` [B, F, N, D] whose coefficient table
    has the columns ``slot_offsets``, on a GPU of ``capability`` (None: sm_90's, as on the interpreter)."""
    batch, num_frames, num_tokens, dim = shape
    tiling = frame_tiling(num_frames, max_offset(slot_offsets), max_window(proj_dtype, target_dtype))
    dtype = dot_dtype(kernel, proj_dtype, target_dtype, bf16_dot)
    config = launch_config(kernel, dim, tiling, dtype, capability)
    token_blocks = cdiv(num_tokens, config.block_n)
    return KernelPlan(tiling, band_layout(slot_offsets), *neighbour_distances(slot_offsets), dtype, config,
                      token_blocks, plan_grid(batch * token_blocks * tiling.num_tiles))


def stats_shapes(shape, forward: KernelPlan) -> dict[str, tuple[int, ...]]:
    """Shapes of the buffers the forward kernel writes for inputs of ``shape`` [B, F, N, D]: clamped norms
    [2, B, F, N], cosine band [B, F, slots, N] and per-token-block partial sums [B, F, token blocks]."""
    batch, num_frames, num_tokens, _ = shape
    return {
        "norms": (2, batch, num_frames, num_tokens),
        "band": (batch, num_frames, forward.band.slots, num_tokens),
        "partial": (batch, num_frames, forward.token_blocks),
    }
