"""The sharding plan of the sequence-parallel loss (pure Python), and its argument checks on a one-process group."""
from __future__ import annotations

import itertools
import socket

import pytest
import torch
import torch.distributed as dist

from crepa_kernels import LossOptions, cross_frame_align_loss
from crepa_kernels.distributed import sequence_parallel_align_loss
from crepa_kernels.distributed.layout import (
    SequenceLayout,
    halo_exchange,
    halo_ranges,
    plan_rank,
    split_into_pieces,
)
from harness import assert_close_and_finite, random_grad_output, random_pair

OPTIONS = [
    LossOptions(neighbors=0),
    LossOptions(neighbors=1),
    LossOptions(neighbors=2, normalize_weights=True),
    LossOptions(neighbors=3, neighbor_mode="cumulative", normalize_weights=True, tau=0.4),
    LossOptions(neighbors=9, neighbor_mode="cumulative"),
]
LAYOUTS = [
    SequenceLayout(5, 7, (18, 18)),  # mid-frame cut, padded
    SequenceLayout(6, 2, (3, 3, 3, 3)),  # shards shorter than a frame pair: halos from two ranks away
    SequenceLayout(7, 3, (0, 5, 11, 2, 6)),  # uneven, an empty rank, padding
    SequenceLayout(2, 5, (3, 3, 3, 3)),  # F < world size; the last rank is all padding
    SequenceLayout(4, 4, (8, 8)),  # frame-aligned shards
]


def test_pieces_cover_the_shard_in_order():
    for start, end, n in itertools.product(range(0, 13), range(0, 26), (1, 4, 5)):
        pieces = split_into_pieces(start, end, n)
        tokens = [f * n + t for p in pieces for f in range(p.first_frame, p.end_frame)
                  for t in range(p.first_token, p.end_token)]
        assert tokens == list(range(start, end))
        assert [p.local_start for p in pieces] == [sum(q.num_frames * q.tokens for q in pieces[:i])
                                                   for i in range(len(pieces))]
        assert len(pieces) <= 3
        assert all(p.num_frames == 1 or (p.first_token, p.end_token) == (0, n) for p in pieces)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("options", OPTIONS)
def test_plan_weights_every_token_pair_once(layout, options):
    """Summed over the fused calls and the terms, each (proj token, target token) pair gets C[f][k] exactly."""
    f_count, n = layout.num_frames, layout.tokens_per_frame
    coefficients = options.frame_coefficients(f_count)
    expected, got = {}, {}
    for rank in range(layout.world_size):
        start, end = layout.shard_range(rank)
        for t in range(start, end):
            f, token = divmod(t, n)
            for k in range(f_count):
                if coefficients[f][k]:
                    expected[(t, k * n + token)] = coefficients[f][k]
        for plan in plan_rank(layout, rank, options):
            piece = plan.piece
            assert plan.fused_everywhere == (not options.normalize_weights)
            for f, exact in zip(range(piece.first_frame, piece.end_frame), plan.exact):
                if exact or plan.fused_everywhere:  # the fused call on the piece: its neighbours inside it
                    for token, k in itertools.product(range(piece.first_token, piece.end_token), range(f_count)):
                        inside = piece.first_frame <= k < piece.end_frame
                        if coefficients[f][k] and inside:
                            got[(f * n + token, k * n + token)] = got.get((f * n + token, k * n + token), 0) + \
                                coefficients[f][k]
                        assert inside or not (exact and coefficients[f][k])
            for term in plan.terms:
                for f, token in itertools.product(range(term.first_frame, term.end_frame),
                                                  range(piece.first_token, piece.end_token)):
                    assert not plan.exact[f - piece.first_frame]
                    if plan.fused_everywhere:  # only the neighbours the fused call cannot see
                        assert not piece.first_frame <= f + term.offset < piece.end_frame
                    key = (f * n + token, (f + term.offset) * n + token)
                    got[key] = got.get(key, 0) + term.coefficient
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-15)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("options", OPTIONS)
def test_halo_is_exactly_the_neighbour_rows_held_elsewhere(layout, options):
    n = layout.tokens_per_frame
    for rank in range(layout.world_size):
        start, end = layout.shard_range(rank)
        needed = {t + o * n for t in range(start, end) for o in options.offsets(layout.num_frames)
                  if 0 <= t // n + o < layout.num_frames} - set(range(start, end))
        assert {t for a, b in halo_ranges(layout, rank, options) for t in range(a, b)} == needed
        exchange = halo_exchange(layout, rank, options)
        received = [t for ranges in exchange.receive for a, b in ranges for t in range(a, b)]
        assert sorted(received) == sorted(needed)  # each needed row arrives once
        for other in range(layout.world_size):
            assert exchange.send[other] == halo_exchange(layout, other, options).receive[rank]


def test_d2_halo_reaches_two_ranks_away():
    layout = SequenceLayout(6, 2, (3, 3, 3, 3))
    exchange = halo_exchange(layout, 3, LossOptions(neighbors=2))
    assert exchange.receive[1] and exchange.receive[0] == ()


# ---- the API on a one-process gloo group ----

def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    proj, target = random_pair((1, 6, 4))
    with pytest.raises(RuntimeError, match="not initialised"):
        sequence_parallel_align_loss(proj, target, num_frames=2)


@pytest.fixture(scope="module")
def one_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("target_sharded", [False, True])
def test_one_rank_equals_the_plain_loss(one_process_group, target_sharded):
    proj, target = random_pair((2, 20, 6), torch.float64, seed=3)
    options = dict(num_frames=4, neighbors=2, neighbor_mode="cumulative", normalize_weights=True, reduction="none")
    expected = cross_frame_align_loss(proj, target, **options)
    grad_output = random_grad_output(expected)
    expected_grads = torch.autograd.grad(expected, [proj, target], grad_output)
    loss = sequence_parallel_align_loss(proj, target, target_sharded=target_sharded, **options)
    grads = torch.autograd.grad(loss, [proj, target], grad_output)
    assert_close_and_finite(loss, expected, "loss")
    for got, want in zip(grads, expected_grads):
        assert_close_and_finite(got, want, "grad")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(num_frames=None), ValueError, "num_frames"),
        (dict(num_frames=0), ValueError, "num_frames"),
        (dict(num_frames=4), ValueError, "does not divide"),
        (dict(proj=torch.randn(2, 3, 5, 4)), ValueError, "proj: expected this rank's shard"),
        (dict(proj=torch.randn(2, 15, 4).int()), TypeError, "proj: expected a floating"),
        (dict(target=torch.randn(2, 15, 5)), ValueError, "proj and target"),
        (dict(target_sharded=1), TypeError, "target_sharded"),
        (dict(target_sharded=True, target=torch.randn(2, 14, 4)), ValueError, "sharded target must be shaped"),
        (dict(shard_sizes=[15, 3]), ValueError, "one size per rank"),
        (dict(shard_sizes=[14]), ValueError, "shard_sizes\\[0\\] is 14"),
        (dict(shard_sizes=(1.5,)), TypeError, "shard_sizes"),
        (dict(seq_len=10), ValueError, "seq_len"),
        (dict(target_sharded=True, seq_len=18), ValueError, "fewer than"),
        (dict(group="world"), TypeError, "group"),
        (dict(neighbors=-1), ValueError, "neighbors"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_bad_arguments_name_the_argument(one_process_group, change, error, match):
    arguments = dict(proj=torch.randn(2, 15, 4), target=torch.randn(2, 15, 4), num_frames=3)
    arguments.update(change)
    with pytest.raises(error, match=match):
        sequence_parallel_align_loss(arguments.pop("proj"), arguments.pop("target"), **arguments)
