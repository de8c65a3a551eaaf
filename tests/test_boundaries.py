"""Each limit the code compares against, tested at the limit, one step below and one above (docs/testing.md lists
them with their tests): schedule thresholds and cutoffs, d against F, eps against the norm, input-size rounding,
block indices, projector weights, context-parallel shard sizes, the grid axes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from crepa_kernels import cross_frame_align_loss
from crepa_kernels.distributed.sharded_training import context_parallel_shard_sizes
from crepa_kernels.training import CrepaRegularizer, HiddenStateCapture, LambdaSchedule
from harness import random_pair
from naive import naive_loss


# --- the lambda schedule ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("similarity,cut", [(math.nextafter(0.5, 0.0), False), (0.5, True),
                                            (math.nextafter(0.5, 1.0), True)])
def test_schedule_cuts_off_when_the_ema_reaches_the_threshold_exactly(similarity, cut):
    schedule = LambdaSchedule(0.5, similarity_threshold=0.5, similarity_ema_decay=0.0)  # EMA = last similarity
    schedule.step(similarity)
    assert schedule.cut_off == cut and schedule.value() == (0.0 if cut else 0.5)


def test_schedule_warmup_ends_at_full_weight_exactly():
    schedule = LambdaSchedule(0.8, warmup_steps=4)  # weight * s / W: the full weight first at s = W
    assert [schedule.value_at(s) for s in (0, 3, 4, 5)] == [0.0, 0.6000000000000001, 0.8, 0.8]
    decaying = LambdaSchedule(0.8, shape="linear", warmup_steps=4, decay_steps=2, final_weight=0.2)
    assert [decaying.value_at(s) for s in (3, 4, 5, 6, 7)] == pytest.approx([0.6, 0.8, 0.5, 0.2, 0.2], abs=1e-15)
    shifted = LambdaSchedule(0.8, warmup_steps=4, warmup_from_zero=False)  # weight * (s + 1) / W: full at W - 1
    assert [shifted.value_at(s) for s in (2, 3, 4, 5)] == [0.6000000000000001, 0.8, 0.8, 0.8]


def test_schedule_cutoff_step_is_the_first_zero():
    schedule = LambdaSchedule(0.5, cutoff_step=3)
    assert [schedule.value_at(s) for s in (2, 3, 4)] == [0.5, 0.0, 0.0]
    assert LambdaSchedule(0.5, cutoff_step=0).value_at(0) == 0.0


# --- d against F, eps against the norm --------------------------------------------------------------------------
FRAMES = 5


@pytest.mark.parametrize("neighbors", [FRAMES - 2, FRAMES - 1, FRAMES, FRAMES + 1])
@pytest.mark.parametrize("mode", ["adjacent", "cumulative"])
@pytest.mark.parametrize("clamp", [False, True])
def test_d_against_f_at_the_limit(neighbors, mode, clamp):
    """d = F - 1 is the last offset with a pair (frames 0 and F - 1); d >= F has none unless clamped to F - 1.
    tau = 50 so that the far pair weighs about as much as the near ones."""
    proj, target = random_pair((2, FRAMES, 3, 4), torch.float64, seed=5)
    loss = cross_frame_align_loss(proj, target, neighbors=neighbors, neighbor_mode=mode, tau=50.0,
                                  normalize_weights=True, reduction="none", backend="reference",
                                  clamp_neighbors=clamp)
    d = min(neighbors, FRAMES - 1) if clamp else neighbors
    expected = naive_loss(proj, target, neighbors=d, neighbor_mode=mode, tau=50.0, normalize_weights=True,
                          reduction="none")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    if mode == "adjacent" and neighbors >= FRAMES and not clamp:  # no pair left: REPA*
        torch.testing.assert_close(loss, naive_loss(proj, target, neighbors=0, reduction="none"))


@pytest.mark.parametrize("scale", [math.nextafter(1.0, 0.0), 1.0, math.nextafter(1.0, 2.0), 1 - 1e-6, 1 + 1e-6])
def test_eps_against_the_norm_at_the_limit(scale):
    """Every proj token's norm at eps (times ``scale``): the loss and its gradient follow the naive loops on
    both sides of the kink and at it (where the norm counts as clamped)."""
    eps = 0.75
    proj, target = (x.detach() for x in random_pair((1, 3, 4, 5), torch.float64, seed=8))
    proj = (proj / proj.norm(dim=-1, keepdim=True) * eps * scale).requires_grad_(True)
    target.requires_grad_(True)
    loss = cross_frame_align_loss(proj, target, eps=eps, neighbors=1, backend="reference")
    expected = naive_loss(proj, target, eps=eps, neighbors=1)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    for got, want in zip(torch.autograd.grad(loss, [proj, target]), torch.autograd.grad(expected, [proj, target])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


# --- input-size rounding of the encoder adapters ------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
from crepa_kernels.training.encoders import adapter_for, random_encoder  # noqa: E402


@pytest.mark.parametrize("long_side,patches", [(34, 2), (35, 2), (36, 3), (41, 3), (42, 3), (43, 3)])
def test_input_size_rounds_to_the_nearest_patch(long_side, patches):
    """Shorter side 28 (scale 1), patch 14: 34 / 14 = 2.43 -> 2, 36 / 14 = 2.57 -> 3. At exactly 2.5 (35) both
    neighbours are nearest: Python's round takes the even one, as it does at 3 (42) +- 1."""
    adapter = adapter_for(random_encoder("dinov2", seed=0), temporal_ratio=4, resolution=28)
    assert adapter.patch_size == (14, 14)
    assert adapter.input_size(long_side, 28) == (patches * 14, 28)
    assert adapter.input_size(28, long_side) == (28, patches * 14)


def test_input_size_is_never_below_one_patch():
    """resolution 7 < the patch: the shorter side rounds to 0.5 patch -> 0, kept at one patch."""
    adapter = adapter_for(random_encoder("dinov2", seed=0), temporal_ratio=4, resolution=7)
    assert adapter.input_size(100, 50) == (14, 14)
    assert adapter.input_size(50, 300) == (14, 42)


# --- block indices and output index of the capture ----------------------------------------------------------------
class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        y = self.linear(x)
        return y, -y


class _Model(nn.Module):
    def __init__(self, blocks=4):
        super().__init__()
        self.blocks = nn.ModuleList(_Pair() for _ in range(blocks))

    def forward(self, x):
        outputs = []
        for block in self.blocks:
            x = block(x)[0]
            outputs.append(x)
        return outputs


@pytest.mark.parametrize("index,block", [(-4, 0), (-3, 1), (3, 3), (0, 0)])
def test_capture_accepts_every_index_from_minus_len_to_len_minus_one(index, block):
    model = _Model()
    with HiddenStateCapture(model, index) as capture:
        outputs = model(torch.randn(2, 3))
        assert torch.equal(capture.pop(), outputs[block])


@pytest.mark.parametrize("index", [-5, 4])
def test_capture_refuses_an_index_one_past_either_end(index):
    with pytest.raises(IndexError, match="has 4 blocks"):
        HiddenStateCapture(_Model(), index)


@pytest.mark.parametrize("indices", [[1, -3], [-4, 0], [3, -1]])
def test_capture_refuses_a_negative_index_aliasing_a_positive_one(indices):
    with pytest.raises(ValueError, match="same block appears twice"):
        HiddenStateCapture(_Model(), indices)


def test_capture_output_index_takes_that_element_of_a_tuple():
    model = _Model()
    with HiddenStateCapture(model, 2, output_index=1) as capture:
        outputs = model(torch.randn(2, 3))
        assert torch.equal(capture.pop(), -outputs[2])


# --- the regulariser's layer and teacher weights ------------------------------------------------------------------
@pytest.mark.parametrize("weights,valid", [([0.0, 0.0], False), ([0.0, 1e-300], True), ([0.0, 1.0], True),
                                           ([-1e-300, 1.0], False)])
def test_regularizer_layer_weights_need_a_positive_sum(weights, valid):
    if valid:
        assert CrepaRegularizer(4, 3, num_layers=2, layer_weights=weights, projector_width=8).layer_weights == weights
    else:
        with pytest.raises(ValueError, match="layer_weights"):
            CrepaRegularizer(4, 3, num_layers=2, layer_weights=weights, projector_width=8)
    with pytest.raises(ValueError, match="teacher_weights"):
        CrepaRegularizer(4, [3, 2], teacher_weights=[0.0, 0.0], projector_width=8)


# --- context-parallel shard sizes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seq_len", [11, 12, 13])
def test_context_parallel_shard_sizes_around_a_multiple_of_the_world(seq_len):
    assert context_parallel_shard_sizes(seq_len, 4) == [t.shape[1] for t in torch.empty(1, seq_len).tensor_split(4, 1)]
    assert sum(context_parallel_shard_sizes(seq_len, 4)) == seq_len


# --- the Triton launch grid -------------------------------------------------------------------------------------------
def test_triton_grid_at_the_limit_of_both_axes():
    from crepa_kernels.gpu_limits import MAX_GRID_X, MAX_GRID_YZ
    from crepa_kernels.ops import triton_plan

    assert triton_plan.plan_grid(MAX_GRID_X - 1) == (MAX_GRID_X - 1, 1, 1)
    assert triton_plan.plan_grid(MAX_GRID_X * MAX_GRID_YZ) == (MAX_GRID_X, MAX_GRID_YZ, 1)
    with pytest.raises(ValueError, match="exceed the CUDA grid"):
        triton_plan.plan_grid(MAX_GRID_X * MAX_GRID_YZ + 1)
