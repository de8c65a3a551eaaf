"""Property-based tests (Hypothesis): shapes, options and parameters drawn from their whole valid ranges, against
the naive float64 loops of tests/naive.py and hand-written reductions.

Ranges the example-based tests do not reach: tau up to 100 (a neighbour 30 frames away then weighs e^-0.3, not
e^-30, so a wrong far term shows), d up to and past F, eps near the token norms (half of them clamped), frame masks
with empty frames and fully masked videos, uneven shard layouts with empty ranks and padding.

Reproducible: the "crepa" profile is derandomized (the examples follow from each test's name and code), keeps no
example database, and prints the failing example (and its reproduce blob) when a property fails.
"""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from crepa_kernels import LossOptions, cross_frame_align_loss  # noqa: E402
from crepa_kernels.distributed.layout import SequenceLayout  # noqa: E402
from crepa_kernels.distributed.sharded_training import context_parallel_shard_sizes  # noqa: E402
from crepa_kernels.training import CrepaRegularizer, LambdaSchedule  # noqa: E402
from crepa_kernels.training.weighting import reduce_weighted  # noqa: E402
from naive import _clamped_cosine, _neighbour_frames, naive_loss  # noqa: E402

settings.register_profile("crepa", derandomize=True, database=None, deadline=None, max_examples=40,
                          print_blob=True)
settings.load_profile("crepa")


@st.composite
def loss_calls(draw, max_frames=9):
    """(proj, target, options as keyword arguments): fp64 inputs whose token norms spread around eps."""
    batch, frames = draw(st.integers(1, 2)), draw(st.integers(1, max_frames))
    tokens, dim = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    proj = torch.randn(batch, frames, tokens, dim, generator=generator, dtype=torch.float64)
    target = 0.6 * proj + torch.randn(batch, frames, tokens, dim, generator=generator, dtype=torch.float64)
    # eps: negligible, or inside the spread of the norms (some clamped, some not)
    norms = torch.cat([proj.norm(dim=-1).flatten(), target.norm(dim=-1).flatten()])
    eps = draw(st.sampled_from([1e-12, float(norms.median()), float(norms.min()) * 1.5, float(norms.max()) * 0.7]))
    options = dict(
        tau=draw(st.floats(0.05, 100.0) | st.floats(20.0, 100.0)),  # often large: far neighbours count
        neighbors=draw(st.integers(0, frames + 2) | st.integers(max(0, frames - 3), frames + 2)),  # up to, past F
        neighbor_mode=draw(st.sampled_from(["adjacent", "cumulative"])),
        normalize_weights=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "frame_sum", "none"])),
        eps=eps,
        clamp_neighbors=draw(st.booleans()),
    )
    return proj, target, options


def _naive_options(options: dict, frames: int) -> dict:
    naive = {k: v for k, v in options.items() if k != "clamp_neighbors"}
    if options["clamp_neighbors"]:
        naive["neighbors"] = min(naive["neighbors"], frames - 1)
    return naive


@given(loss_calls(), st.floats(-2.0, 3.0))
def test_loss_and_gradients_equal_the_naive_loops(call, grad_scale):
    proj, target, options = call
    proj, target = proj.requires_grad_(True), target.requires_grad_(True)
    loss = cross_frame_align_loss(proj, target, backend="reference", **options)
    expected = naive_loss(proj, target, **_naive_options(options, proj.shape[1]))
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    grad_output = torch.full_like(loss, grad_scale) + torch.linspace(0, 1, loss.numel(), dtype=loss.dtype).view(
        loss.shape)
    got = torch.autograd.grad(loss, [proj, target], grad_output)
    want = torch.autograd.grad(expected, [proj, target], grad_output)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


def _cpu_backend_reason():
    from crepa_kernels import available_backends

    reason = available_backends("cpu").get("cpu")
    return None if reason is True else reason


@settings(max_examples=15)
@given(loss_calls(max_frames=40), st.floats(-2.0, 3.0))
def test_cpu_backend_equals_the_naive_loops_with_far_neighbours(call, grad_scale):
    """The fused CPU kernel on clips up to 40 frames, d up to F + 2 and tau up to 100: neighbours 30 frames away
    weigh e^-0.3, so a term dropped or misweighted at the far edge of the band shows in float64."""
    reason = _cpu_backend_reason()
    if reason is not None:
        pytest.skip(f"the cpu backend is not available: {reason}")
    proj, target, options = call
    proj, target = proj.requires_grad_(True), target.requires_grad_(True)
    loss = cross_frame_align_loss(proj, target, backend="cpu", **options)
    expected = naive_loss(proj, target, **_naive_options(options, proj.shape[1]))
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    grad_output = torch.full_like(loss, grad_scale) + torch.linspace(0, 1, loss.numel(), dtype=loss.dtype).view(
        loss.shape)
    for g, w in zip(torch.autograd.grad(loss, [proj, target], grad_output),
                    torch.autograd.grad(expected, [proj, target], grad_output)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


@given(loss_calls(max_frames=6))
def test_frame_coefficients_are_the_naive_weights(call):
    """LossOptions.frame_coefficients (what the regulariser's figures and the distributed plan read) against the
    naive neighbour sets and exp(-|k - f| / tau)."""
    proj, _, options = call
    frames = proj.shape[1]
    naive = _naive_options(options, frames)
    lo = LossOptions(**{k: naive[k] for k in ("tau", "neighbors", "neighbor_mode", "normalize_weights")})
    for f, row in enumerate(lo.frame_coefficients(frames)):
        expected = [0.0] * frames
        expected[f] = 1.0
        for k in _neighbour_frames(f, frames, naive["neighbors"], naive["neighbor_mode"]):
            expected[k] = math.exp(-abs(k - f) / naive["tau"])
        z = sum(expected) if naive["normalize_weights"] else 1.0
        assert row == pytest.approx([c / z for c in expected], rel=1e-12, abs=0)


@st.composite
def weights_and_masks(draw, batch, frames):
    mask = draw(st.lists(st.booleans(), min_size=batch * frames, max_size=batch * frames))
    mask = torch.tensor(mask).view(batch, frames)
    if draw(st.booleans()):
        mask[0] = False  # a fully masked video
    weights = torch.tensor(draw(st.lists(st.floats(0.0, 3.0), min_size=batch, max_size=batch)), dtype=torch.float64)
    return (weights if draw(st.booleans()) else None), (mask if draw(st.booleans()) else None)


@given(st.data())
def test_weighted_masked_reduction_by_hand(data):
    batch, frames = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6))
    per_frame = torch.randn(batch, frames, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))),
                            dtype=torch.float64)
    weights, mask = data.draw(weights_and_masks(batch, frames))
    reduction = data.draw(st.sampled_from(["mean", "frame_sum", "none"]))
    got = reduce_weighted(per_frame, reduction, weights, mask)
    terms = [[(1.0 if weights is None else float(weights[b])) * float(per_frame[b, f])
              if mask is None or mask[b, f] else 0.0 for f in range(frames)] for b in range(batch)]
    if reduction == "none":
        assert got.flatten().tolist() == pytest.approx(sum(terms, []), rel=1e-12, abs=1e-15)
        return
    included = batch * frames if mask is None else int(mask.sum())
    videos = batch if mask is None else int(mask.any(dim=1).sum())
    total = sum(map(sum, terms))
    expected = total / max(included, 1) if reduction == "mean" else total / max(videos, 1)
    assert float(got) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@settings(max_examples=25)
@given(loss_calls(max_frames=6), st.data())
def test_regularizer_loss_and_figures_against_naive_cosines(call, data):
    """CrepaRegularizer on identity-like projected states: its loss, self similarity and neighbour similarity
    (the weighted mean of cos(p_f, y_k) over the included frames' neighbour pairs) from the naive cosines."""
    proj, target, options = call
    batch, frames, tokens, dim = proj.shape
    options = _naive_options(options, frames)
    weights, mask = data.draw(weights_and_masks(batch, frames))
    regularizer = CrepaRegularizer(dim, dim, loss_weight=0.7, projector="linear", backend="reference",
                                   **options).double()
    with torch.no_grad():  # the projector: LayerNorm (identity affine) + Linear, set to x -> x W + b
        regularizer.projector[1].weight.copy_(torch.eye(dim, dtype=torch.float64) * 1.3)
        regularizer.projector[1].bias.fill_(0.05)
    hidden = proj.flatten(1, 2)
    alignment = regularizer(hidden, target, sample_weight=weights, frame_mask=mask)
    p = regularizer.projector(hidden).unflatten(1, (frames, tokens)).detach()

    per_frame = naive_loss(p, target, **{**options, "reduction": "none"})
    expected_loss = reduce_weighted(per_frame, options["reduction"], weights, mask)
    torch.testing.assert_close(alignment.loss, 0.7 * expected_loss, rtol=1e-9, atol=1e-12)

    included = torch.ones(batch, frames, dtype=torch.bool) if mask is None else mask
    cos = [[[float(_clamped_cosine(p[b, f], target[b, k], options["eps"]).mean()) for k in range(frames)]
            for f in range(frames)] for b in range(batch)]
    pairs = [(b, f) for b in range(batch) for f in range(frames) if included[b, f]]
    if not pairs:
        return  # nothing included: the figures are 0 / 0
    expected_self = sum(cos[b][f][f] for b, f in pairs) / len(pairs)
    assert float(alignment.self_similarity) == pytest.approx(expected_self, rel=1e-9, abs=1e-12)
    weighted, total, smallest = 0.0, 0.0, 1.0
    for b, f in pairs:
        for k in _neighbour_frames(f, frames, options["neighbors"], options["neighbor_mode"]):
            w = math.exp(-abs(k - f) / options["tau"])
            weighted, total, smallest = weighted + w * cos[b][f][k], total + w, min(smallest, w)
    if not any(_neighbour_frames(f, frames, options["neighbors"], options["neighbor_mode"]) for f in range(frames)):
        assert alignment.neighbor_similarity is None
    elif total > 0:
        # the regulariser derives the neighbour terms as -L Z_f - S: a difference of O(1) numbers, so their
        # absolute error is that of L, relative to the smallest weight w once divided by it
        assert float(alignment.neighbor_similarity) == pytest.approx(weighted / total, rel=1e-8,
                                                                     abs=1e-13 / smallest)


@given(st.integers(1, 10_000), st.integers(1, 64))
def test_context_parallel_shard_sizes_are_tensor_splits(seq_len, world):
    x = torch.empty(1, seq_len)
    assert context_parallel_shard_sizes(seq_len, world) == [t.shape[1] for t in x.tensor_split(world, dim=1)]


@st.composite
def uneven_layouts(draw):
    frames, tokens, world = draw(st.integers(1, 8)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    total = frames * tokens
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=world - 1, max_size=world - 1)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    sizes[-1] += draw(st.integers(0, 3))  # padding on the last shard
    return SequenceLayout(frames, tokens, tuple(sizes))


@st.composite
def plan_options(draw):
    return LossOptions(tau=draw(st.floats(0.05, 100.0)), neighbors=draw(st.integers(0, 9)),
                       neighbor_mode=draw(st.sampled_from(["adjacent", "cumulative"])),
                       normalize_weights=draw(st.booleans()))


@settings(max_examples=60)
@given(uneven_layouts(), plan_options())
def test_sequence_parallel_plan_on_uneven_layouts(layout, options):
    """The plan's exactness checks of tests/test_distributed_plan.py on drawn layouts: empty ranks, frames cut
    anywhere, padding, shards shorter than the offsets."""
    import test_distributed_plan as plan

    plan.test_plan_weights_every_token_pair_once(layout, options)
    plan.test_halo_is_exactly_the_neighbour_rows_held_elsewhere(layout, options)


SHAPES = ["constant", "linear", "cosine", "polynomial"]


@st.composite
def schedules(draw):
    shape = draw(st.sampled_from(SHAPES))
    kwargs = dict(weight=draw(st.floats(0.0, 2.0)), shape=shape, warmup_steps=draw(st.integers(0, 5)),
                  final_weight=draw(st.floats(0.0, 1.0)), power=draw(st.floats(0.25, 4.0)),
                  cutoff_step=draw(st.none() | st.integers(0, 20)), warmup_from_zero=draw(st.booleans()))
    if shape != "constant":
        kwargs["decay_steps"] = draw(st.integers(1, 10))
    return kwargs


@given(schedules())
def test_lambda_schedule_follows_its_formula_at_every_step(kwargs):
    schedule = LambdaSchedule(**kwargs)
    weight, final, warmup = kwargs["weight"], kwargs["final_weight"], kwargs["warmup_steps"]
    for step in range(25):
        if kwargs["cutoff_step"] is not None and step >= kwargs["cutoff_step"]:
            expected = 0.0
        elif step < warmup:  # from 0 at step 0 (the upstream trainers'), or from weight / warmup
            expected = weight * (step if kwargs["warmup_from_zero"] else step + 1) / warmup
        elif kwargs["shape"] == "constant":
            expected = weight
        else:
            p = min(1.0, (step - warmup) / kwargs["decay_steps"])
            fraction = {"linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2,
                        "polynomial": (1 - p) ** kwargs["power"]}[kwargs["shape"]]
            expected = final + (weight - final) * fraction
        assert schedule.value() == pytest.approx(expected, rel=1e-12, abs=1e-15), step
        schedule.step()


# The fused kernels' far edge, with a tau that makes it count: each backend's frame tiling (one window; windows with a
# halo; 16-frame windows paired with whole-window shifts) at the largest offsets it serves. Example-based: the
# Triton interpreter takes seconds per call, too slow for drawn examples.
FAR_CASES = [
    ((1, 18, 2, 3), torch.float64, dict(neighbors=17, neighbor_mode="adjacent")),  # fp64 windows: 16 frames, shifted
    ((1, 18, 2, 3), torch.float64, dict(neighbors=16, neighbor_mode="cumulative", normalize_weights=True)),
    ((2, 19, 1, 4), torch.float64, dict(neighbors=3, neighbor_mode="cumulative")),  # halo tiling
    ((1, 35, 2, 3), torch.float32, dict(neighbors=34, neighbor_mode="adjacent")),  # fp32 windows: 32 frames
    ((1, 35, 1, 3), torch.float32, dict(neighbors=31, neighbor_mode="cumulative", normalize_weights=True)),
]


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("shape,dtype,options", FAR_CASES, ids=lambda v: str(v))
def test_far_neighbours_at_large_tau(backend, shape, dtype, options):
    if backend == "cpu" and _cpu_backend_reason() is not None:
        pytest.skip(f"the cpu backend is not available: {_cpu_backend_reason()}")
    generator = torch.Generator().manual_seed(shape[1] * 7 + options["neighbors"])
    proj = torch.randn(shape, generator=generator, dtype=torch.float64)
    target = 0.5 * proj + torch.randn(shape, generator=generator, dtype=torch.float64)
    proj, target = (x.to(dtype).requires_grad_(True) for x in (proj, target))
    loss = cross_frame_align_loss(proj, target, tau=100.0, reduction="none", backend=backend, **options)
    expected = naive_loss(proj.detach().double().requires_grad_(True), target.detach().double().requires_grad_(True),
                          tau=100.0, reduction="none", **options)
    rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=rtol, atol=atol)
    grad_output = torch.linspace(-0.5, 2.0, loss.numel(), dtype=torch.float64).view(loss.shape)
    got = torch.autograd.grad(loss, [proj, target], grad_output.to(loss.dtype))
    inputs = [proj.detach().double().requires_grad_(True), target.detach().double().requires_grad_(True)]
    want = torch.autograd.grad(naive_loss(*inputs, tau=100.0, reduction="none", **options), inputs, grad_output)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol * float(w.abs().max()))
