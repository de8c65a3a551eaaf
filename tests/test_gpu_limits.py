"""Launch configurations stay within CUDA's limits for any shape whose tensors fit in memory, checked without a GPU:
the Triton launches are planned on meta tensors (no memory, no kernel), exactly as the dispatcher plans them."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from crepa_kernels.gpu_limits import MAX_GRID_X, MAX_GRID_YZ  # noqa: E402
from crepa_kernels.ops import triton_loss, triton_plan  # noqa: E402
from crepa_kernels.spec import LossOptions, band_offsets  # noqa: E402
from harness import assert_backend_matches_reference, random_pair  # noqa: E402

# [B, F, N, D]: realistic shapes and far larger token counts; the old [B, token blocks, tiles] grid failed from
# N = 65,536 (forward, F > 16), 131,071 (backward, 32-frame window) and 262,141 (forward, F <= 16).
HUGE_SHAPES = [(1, 13, 1350, 768), (1, 33, 3600, 1536), (1, 20, 70_000, 64), (1, 13, 300_000, 16),
               (1, 33, 140_000, 64), (2, 61, 1_000_000, 16), (64, 129, 2_000_000, 16), (4, 1, 2**31 - 1, 1)]
DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float64, torch.float64)]
OPTIONS = [LossOptions(neighbors=1), LossOptions(neighbors=9, neighbor_mode="cumulative"), LossOptions(neighbors=57)]


def _meta_launches(shape, proj_dtype, target_dtype, options):
    """The forward launch and the backward launches with and without the target gradient, on meta tensors."""
    proj = torch.empty(shape, dtype=proj_dtype, device="meta")
    target = torch.empty(shape, dtype=target_dtype, device="meta")
    stat_dtype = torch.float64 if torch.float64 in (proj_dtype, target_dtype) else torch.float32
    slot_offsets = band_offsets(options, shape[1])
    shapes = triton_loss.stats_shapes(proj, target, slot_offsets)
    norms, band, partial = (torch.empty(shapes[k], dtype=stat_dtype, device="meta")
                            for k in ("norms", "band", "partial"))
    table = torch.empty((shape[1], len(slot_offsets)), dtype=stat_dtype, device="meta")
    grad_loss = torch.empty(shape[:2], dtype=stat_dtype, device="meta")
    eps = torch.empty((), dtype=torch.float64, device="meta")
    yield triton_loss.forward_launch(proj, target, table, slot_offsets, norms, band, partial, eps)
    for grad_target in (torch.empty_like(target), None):
        yield from triton_loss.backward_launches(grad_loss, proj, target, table, slot_offsets, norms, band,
                                                 torch.empty_like(proj), grad_target, eps)


@pytest.mark.parametrize("shape", HUGE_SHAPES, ids=str)
@pytest.mark.parametrize("proj_dtype,target_dtype", DTYPES, ids=str)
def test_triton_grid_within_cuda_limits(shape, proj_dtype, target_dtype):
    for options in OPTIONS:
        for launch in _meta_launches(shape, proj_dtype, target_dtype, options):
            x, y, z = launch.grid
            assert 1 <= x <= MAX_GRID_X and 1 <= y <= MAX_GRID_YZ and 1 <= z <= MAX_GRID_YZ, (shape, options, launch.grid)
            # the grid covers every work item, and leaves at most one partial row of axis 0 over
            batch, num_frames, num_tokens, _ = shape
            kwargs = launch.kwargs
            tiles = launch.args[launch.kernel.arg_names.index("num_tiles")]
            blocks = launch.args[launch.kernel.arg_names.index("num_token_blocks")]
            assert blocks == -(-num_tokens // kwargs["BLOCK_N"])
            items = batch * blocks * tiles
            assert x * (y - 1) < items <= x * y


def test_plan_grid_uses_axis_one_only_past_axis_zero():
    assert triton_plan.plan_grid(1) == (1, 1, 1)
    assert triton_plan.plan_grid(MAX_GRID_X) == (MAX_GRID_X, 1, 1)
    assert triton_plan.plan_grid(MAX_GRID_X + 1) == (MAX_GRID_X, 2, 1)
    with pytest.raises(ValueError, match="exceed the CUDA grid"):
        triton_plan.plan_grid(MAX_GRID_X * MAX_GRID_YZ + 1)


@pytest.mark.parametrize("max_grid_x", [1, 4, 7])
def test_two_axis_grid_computes_the_same_loss(monkeypatch, max_grid_x):
    """With axis 0 capped at a few programs the work items spill onto axis 1, with a masked tail; under the
    interpreter this runs the same index arithmetic a > 2^31-program launch would."""
    monkeypatch.setattr(triton_plan, "MAX_GRID_X", max_grid_x)
    for shape, options in [((2, 5, 9, 7), dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True)),
                           ((3, 37, 2, 5), dict(neighbors=3, tau=0.4))]:
        proj, target = random_pair(shape, torch.float64)
        assert_backend_matches_reference("triton", proj, target, **options)
        launch = next(_meta_launches(shape, torch.float64, torch.float64, LossOptions(**options)))
        assert launch.grid[0] == max_grid_x and launch.grid[1] > 1
