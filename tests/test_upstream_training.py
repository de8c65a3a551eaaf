"""Parity with the upstream trainers around the loss: the lambda schedule, the similarity cutoff, the similarity it
watches, the neighbour clamp, and the skipped non-finite step.

Each upstream behaviour is restated below in our own plain Python / float64 code, from reading the trainers'
public sources (SimpleTuner ``simpletuner/helpers/training/crepa.py`` ``CrepaScheduler`` and ``CrepaRegularizer``;
musubi-tuner ``src/musubi_tuner/crepa.py`` ``CREPAModule``, LTX-2 branch; minimax-h3 ``H3CREPA`` shares its
schedule), and compared with ``crepa_kernels.training`` configured as docs/porting.md says.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from crepa_kernels.training import CrepaRegularizer, LambdaSchedule

# ----------------------------------------------------------------------------------------------- restatements


def simpletuner_weight(step, *, base, shape="constant", warmup=0, decay_steps=0, end=0.0, power=1.0,
                       max_train_steps=0):
    """SimpleTuner's scheduled weight at a global step (before any cutoff): linear warm-up from 0 for every shape;
    the decay runs over crepa_decay_steps counted from step 0 (0: max_train_steps), starting after the warm-up."""
    if warmup > 0 and step < warmup:
        return base * step / warmup
    if shape == "constant":
        return base
    total = (decay_steps if decay_steps > 0 else max_train_steps)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if shape == "linear":
        return base + (end - base) * progress
    if shape == "cosine":
        return end + (base - end) * (1 + math.cos(math.pi * progress)) / 2
    return (base - end) * (1 - progress) ** power + end


def musubi_weight(step, *, base, shape="cosine", warmup=100, max_steps=0, end=0.1):
    """musubi-tuner's (LTX-2, minimax-h3) on_step: "constant" ignores the warm-up; without max_steps the weight
    stays at its base after the warm-up; linear / cosine decay over max_steps counted from step 0."""
    if shape == "constant":
        return base
    if warmup > 0 and step < warmup:
        return base * (step / warmup)
    if max_steps <= 0:
        return base
    progress = min((step - warmup) / max(max_steps - warmup, 1), 1.0)
    if shape == "linear":
        return end + (base - end) * (1 - progress)
    if shape == "cosine":
        return end + (base - end) * 0.5 * (1 + math.cos(math.pi * progress))
    return base


def h3_weight(step, *, weight, shape="constant", warmup=0, max_steps=0):
    """musubi-tuner minimax-h3's H3CREPA: the warm-up applies to every shape; linear / cosine decay to 0 over
    max_steps counted from step 0; without max_steps, the weight after the warm-up."""
    if warmup and step < warmup:
        return weight * step / warmup
    if shape == "constant" or not max_steps:
        return weight
    progress = min(max((step - warmup) / max(max_steps - warmup, 1), 0.0), 1.0)
    if shape == "linear":
        return weight * (1.0 - progress)
    return weight * 0.5 * (1.0 + math.cos(math.pi * progress))


class UpstreamCutoff:
    """The similarity cutoff both trainers run inside their loss call: the call's similarity is folded into the EMA
    first, then the cutoff (step or threshold) decides this same call's weight. ``skips_zero_weight``: musubi-tuner
    returns before computing anything (so before the EMA) when the scheduled weight is 0 or the permanent cutoff
    has triggered; SimpleTuner always computes."""

    def __init__(self, threshold, decay, mode, cutoff_step=0, skips_zero_weight=False):
        self.threshold, self.decay, self.mode, self.cutoff_step = threshold, decay, mode, cutoff_step
        self.skips_zero_weight = skips_zero_weight
        self.ema, self.triggered = None, False

    def weight(self, step, scheduled, similarity):
        if self.skips_zero_weight and (scheduled == 0.0 or (self.triggered and self.mode == "permanent")):
            return 0.0
        self.ema = similarity if self.ema is None else self.decay * self.ema + (1 - self.decay) * similarity
        if self.triggered and self.mode == "permanent":
            return 0.0
        if (self.cutoff_step > 0 and step >= self.cutoff_step) or self.ema >= self.threshold:
            if self.mode == "permanent":
                self.triggered = True
            return 0.0
        if self.mode == "recoverable":
            self.triggered = False
        return scheduled


def simpletuner_total_similarity(proj, target, distance, tau, cumulative, normalize=False):
    """SimpleTuner's per-frame total similarity [B, F] (d clamped to F - 1), divided by the weight the frame
    received under crepa_normalize_neighbour_sum; its loss is -mean_b sum_f total / F."""
    p = torch.nn.functional.normalize(proj, dim=-1)
    y = torch.nn.functional.normalize(target, dim=-1)
    total = (p * y).sum(-1).mean(-1)
    received = torch.ones_like(total)
    frames = total.shape[1]
    d = min(distance, frames - 1)
    for offset in (range(1, d + 1) if cumulative else [d]) if d > 0 else []:
        w = math.exp(-offset / max(tau, 1e-8))
        total[:, :-offset] += w * (p[:, :-offset] * y[:, offset:]).sum(-1).mean(-1)
        total[:, offset:] += w * (p[:, offset:] * y[:, :-offset]).sum(-1).mean(-1)
        received[:, :-offset] += w
        received[:, offset:] += w
    return total / received if normalize else total


def musubi_alignment_score(proj, target, neighbors, tau):
    """musubi-tuner's alignment score: per frame, the weighted sum of its self and neighbour cosines (tokens
    averaged) over the weights that frame received, averaged over videos and frames."""
    p = torch.nn.functional.normalize(proj, dim=-1)
    y = torch.nn.functional.normalize(target, dim=-1)
    sim = torch.einsum("btnd,bsnd->btsn", p, y).mean(-1)
    frames = sim.shape[1]
    scores = []
    for f in range(frames):
        value, weight = sim[:, f, f].clone(), 1.0
        for delta in range(1, neighbors + 1):
            w = math.exp(-delta / max(tau, 1e-8))
            for k in (f - delta, f + delta):
                if 0 <= k < frames:
                    value += w * sim[:, f, k]
                    weight += w
        scores.append(value / weight)
    return torch.stack(scores, 1).mean()


# ----------------------------------------------------------------------------------------------- the schedule

STEPS = 40


@pytest.mark.parametrize("shape", ["constant", "linear", "cosine", "polynomial"])
@pytest.mark.parametrize("warmup, decay_steps", [(0, 0), (5, 0), (5, 20), (7, 4), (3, 1)])
def test_simpletuner_schedule_at_every_step(shape, warmup, decay_steps):
    """crepa_decay_steps D (0: max_train_steps) counts from step 0: ours is decay_steps = max(D - warm-up, 1)."""
    base, end, power, max_train_steps = 0.7, 0.05, 2.5, 30
    total = decay_steps if decay_steps > 0 else max_train_steps
    ours = LambdaSchedule(base, shape=shape, warmup_steps=warmup, final_weight=end, power=power,
                          decay_steps=None if shape == "constant" else max(total - warmup, 1))
    for step in range(STEPS):
        expected = simpletuner_weight(step, base=base, shape=shape, warmup=warmup, decay_steps=decay_steps, end=end,
                                      power=power, max_train_steps=max_train_steps)
        assert ours.value() == pytest.approx(expected, rel=1e-14, abs=1e-15), (step, ours.value(), expected)
        ours.step()


@pytest.mark.parametrize("shape", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup, max_steps", [(0, 0), (100, 0), (10, 25), (6, 3)])
def test_musubi_schedule_at_every_step(shape, warmup, max_steps):
    """Their "constant" ignores warmup_steps (ours: warmup_steps=0); without max_steps a decaying shape stays at
    its base after the warm-up (ours: "constant" with the warm-up)."""
    base, end = 0.5, 0.1
    decays = shape != "constant" and max_steps > 0
    ours = LambdaSchedule(base, shape=shape if decays else "constant",
                          warmup_steps=0 if shape == "constant" else warmup, final_weight=end,
                          decay_steps=max(max_steps - warmup, 1) if decays else None)
    for step in range(STEPS * 3):
        expected = musubi_weight(step, base=base, shape=shape, warmup=warmup, max_steps=max_steps, end=end)
        assert ours.value() == pytest.approx(expected, rel=1e-14, abs=1e-15), (step, ours.value(), expected)
        ours.step()


@pytest.mark.parametrize("shape", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup, max_steps", [(0, 0), (4, 0), (4, 20), (5, 5)])
def test_h3_schedule_at_every_step(shape, warmup, max_steps):
    """H3CREPA's decay ends at 0 (final_weight=0) and its warm-up applies to "constant" too."""
    decays = shape != "constant" and max_steps > 0
    ours = LambdaSchedule(0.05, shape=shape if decays else "constant", warmup_steps=warmup,
                          decay_steps=max(max_steps - warmup, 1) if decays else None)
    for step in range(STEPS):
        expected = h3_weight(step, weight=0.05, shape=shape, warmup=warmup, max_steps=max_steps)
        assert ours.value() == pytest.approx(expected, rel=1e-14, abs=1e-16), (step, ours.value(), expected)
        ours.step()


def test_cutoff_step_zero_is_none_upstream():
    """Upstream crepa_cutoff_step = 0 means no cutoff; ours: cutoff_step=None (0 would cut off at once)."""
    for step in range(5):
        assert simpletuner_weight(step, base=0.5) == LambdaSchedule(0.5, cutoff_step=None).value_at(step)
    assert LambdaSchedule(0.5, cutoff_step=3).value_at(3) == 0.0 and LambdaSchedule(0.5, cutoff_step=3).value_at(2)


# A similarity trace that rises past the threshold, falls back below it, then rises again.
TRACE = [0.3, 0.5, 0.7, 0.8, 0.9, 0.9, 0.4, 0.2, 0.1, 0.1, 0.8, 0.95, 0.95, 0.95, 0.2, 0.1, 0.1, 0.1]


def _ours_same_step(schedule, trace):
    """Our regulariser's order of calls with cutoff_timing="same_step": observe in the forward, read lambda,
    step after the optimizer."""
    weights = []
    for similarity in trace:
        if schedule.needs_similarity:
            schedule.observe(similarity)
        weights.append(schedule.value())
        schedule.step()
    return weights


@pytest.mark.parametrize("mode", ["permanent", "recoverable"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_simpletuner_cutoff_step_for_a_trace(mode, warmup):
    threshold, decay, cutoff_step = 0.6, 0.5, 16
    upstream = UpstreamCutoff(threshold, decay, mode, cutoff_step=cutoff_step)
    expected = [upstream.weight(step, simpletuner_weight(step, base=0.5, warmup=warmup), s)
                for step, s in enumerate(TRACE)]
    ours = LambdaSchedule(0.5, warmup_steps=warmup, cutoff_step=cutoff_step, similarity_threshold=threshold,
                          similarity_ema_decay=decay, threshold_mode=mode, cutoff_timing="same_step",
                          similarity_every_step=True)
    assert _ours_same_step(ours, TRACE) == pytest.approx(expected, rel=1e-15, abs=0)
    zeros = [step for step, w in enumerate(expected) if w == 0.0 and step >= warmup]
    if mode == "permanent":  # once cut, for good
        assert zeros == list(range(zeros[0], len(TRACE)))
    else:  # cut while the EMA is over the threshold, back when it falls, cut again, then the step cutoff
        assert expected[zeros[0] - 1] > 0 and any(expected[s] > 0 for s in range(zeros[0], cutoff_step))
    # past a final cutoff (permanent, or cutoff_step) SimpleTuner still updates an EMA that decides nothing; ours
    # computes nothing then, so only the weights are compared


@pytest.mark.parametrize("mode", ["permanent", "recoverable"])
def test_musubi_cutoff_step_for_a_trace_skips_zero_weight_steps(mode):
    """musubi-tuner computes nothing where the scheduled weight is 0 (warm-up's step 0): that similarity never
    reaches its EMA. Ours: similarity_every_step=False (the default). SimpleTuner's EMA differs there."""
    threshold, decay, warmup = 0.6, 0.5, 2
    upstream = UpstreamCutoff(threshold, decay, mode, skips_zero_weight=True)
    trace = [0.99] + TRACE  # a high first similarity: counted by SimpleTuner, not by musubi-tuner
    expected = [upstream.weight(step, musubi_weight(step, base=0.5, shape="linear", warmup=warmup, max_steps=50),
                                s) for step, s in enumerate(trace)]
    ours = LambdaSchedule(0.5, shape="linear", warmup_steps=warmup, decay_steps=48, final_weight=0.1,
                          similarity_threshold=threshold, similarity_ema_decay=decay, threshold_mode=mode,
                          cutoff_timing="same_step")
    assert _ours_same_step(ours, trace) == pytest.approx(expected, rel=1e-14, abs=0)
    every = LambdaSchedule(0.5, shape="linear", warmup_steps=warmup, decay_steps=48, final_weight=0.1,
                           similarity_threshold=threshold, similarity_ema_decay=decay, threshold_mode=mode,
                           cutoff_timing="same_step", similarity_every_step=True)
    assert _ours_same_step(every, trace) != pytest.approx(expected, rel=1e-14, abs=0)


@pytest.mark.parametrize("mode", ["permanent", "recoverable"])
def test_next_step_timing_is_upstream_one_step_later(mode):
    """Our default folds a step's similarity in after its optimizer step: each cutoff decision lands one step later
    than upstream's."""
    threshold, decay = 0.6, 0.5
    upstream = UpstreamCutoff(threshold, decay, mode)
    decisions = [upstream.weight(step, 0.5, s) for step, s in enumerate(TRACE)]
    ours = LambdaSchedule(0.5, similarity_threshold=threshold, similarity_ema_decay=decay, threshold_mode=mode)
    weights = []
    for similarity in TRACE:
        weights.append(ours.value())
        ours.step(similarity if ours.needs_similarity else None)
    assert weights == [0.5] + decisions[:-1]


def test_recoverable_state_resumes_exactly():
    make = lambda: LambdaSchedule(0.5, similarity_threshold=0.6, similarity_ema_decay=0.5,  # noqa: E731
                                  threshold_mode="recoverable")
    straight = make()
    for similarity in TRACE[:5]:
        straight.step(similarity)
    assert straight.cut_off and straight.state_dict()["over_threshold"]
    resumed = make()
    resumed.load_state_dict(straight.state_dict())
    for similarity in TRACE[5:]:
        assert resumed.value() == straight.value()
        straight.step(similarity)
        resumed.step(similarity)
    assert resumed.state_dict() == straight.state_dict() and not resumed.cut_off
    # a state saved before the recoverable mode existed loads (over_threshold from threshold_step)
    old = {"steps_done": 4, "similarity_ema": 0.7, "threshold_step": 2}
    permanent = LambdaSchedule(0.5, similarity_threshold=0.6)
    permanent.load_state_dict(old)
    assert permanent.cut_off and permanent.over_threshold
    with pytest.raises(ValueError, match="over_threshold"):
        permanent.load_state_dict({**old, "threshold_step": None, "over_threshold": True})


def test_schedule_bad_arguments():
    with pytest.raises(ValueError, match="threshold_mode"):
        LambdaSchedule(threshold_mode="temporary")
    with pytest.raises(ValueError, match="cutoff_timing"):
        LambdaSchedule(cutoff_timing="now")
    with pytest.raises(TypeError, match="warmup_from_zero"):
        LambdaSchedule(warmup_from_zero=1)
    with pytest.raises(RuntimeError, match="same_step"):
        LambdaSchedule(similarity_threshold=0.5).observe(0.3)


# ----------------------------------------------------------------------------------------------- the regulariser


def _regularizer(**options) -> CrepaRegularizer:
    torch.manual_seed(0)
    return CrepaRegularizer(6, 5, projector="linear", backend="reference", **options).double()


def _inputs(batch=2, frames=3, tokens=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, frames * tokens, 6, generator=generator, dtype=torch.float64)
    target = torch.randn(batch, frames, tokens, 5, generator=generator, dtype=torch.float64)
    return hidden, target


@pytest.mark.parametrize("frames, distance", [(2, 2), (3, 4), (1, 3), (5, 2)])
@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_clamp_neighbors_matches_simpletuner(frames, distance, cumulative, normalize):
    hidden, target = _inputs(frames=frames)
    options = dict(neighbors=distance, neighbor_mode="cumulative" if cumulative else "adjacent",
                   normalize_weights=normalize, tau=0.7, loss_weight=0.5)
    out = _regularizer(clamp_neighbors=True, similarity_signal="total", **options)(hidden, target)
    total = simpletuner_total_similarity(out.projected, target, distance, 0.7, cumulative, normalize)
    expected = -(total.sum(1) / frames).mean()
    torch.testing.assert_close(out.align_loss, expected.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(out.loss, 0.5 * expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(out.cutoff_similarity, total.mean().detach(), rtol=1e-13, atol=0)  # crepa_similarity
    unclamped = _regularizer(**options)(hidden, target)
    # the specification drops an adjacent pair past the clip (its cumulative mode clamps already)
    assert (unclamped.align_loss == out.align_loss) == (distance < frames or frames == 1 or cumulative)


def test_musubi_alignment_score_is_the_normalized_signal():
    hidden, target = _inputs(frames=5)
    out = _regularizer(neighbors=2, neighbor_mode="cumulative", tau=0.8,
                       similarity_signal="normalized")(hidden, target)
    expected = musubi_alignment_score(out.projected, target, 2, 0.8)
    torch.testing.assert_close(out.cutoff_similarity, expected.detach(), rtol=1e-13, atol=0)
    self_only = _regularizer(neighbors=2, neighbor_mode="cumulative", tau=0.8)(hidden, target)
    assert self_only.cutoff_similarity == self_only.self_similarity != out.cutoff_similarity


def test_skipped_non_finite_step():
    """musubi-tuner (LTX-2, minimax-h3): a non-finite alignment loss is dropped for that step and counted."""
    hidden, target = _inputs()
    hidden[1, 3, 2] = math.nan
    regularizer = _regularizer(skip_nonfinite=True)
    out = regularizer(hidden, target)
    assert out.nonfinite and regularizer.nonfinite_steps == 1 and out.logs["nonfinite_steps"] == 1.0
    assert out.loss.item() == 0.0 and out.weight == 0.0
    out.loss.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in regularizer.parameters())
    finite = regularizer(*_inputs())
    assert not finite.nonfinite and math.isfinite(finite.loss.item()) and regularizer.nonfinite_steps == 1
    plain = _regularizer()(hidden, target)
    assert math.isnan(plain.loss.item())  # the default keeps it (NaN shows)


def test_skipped_non_finite_step_adds_nothing_to_the_cutoff_ema():
    hidden, target = _inputs()
    bad = hidden.clone()
    bad[0, 0, 0] = math.inf
    schedule = LambdaSchedule(0.5, similarity_threshold=2.0, similarity_ema_decay=0.5)
    regularizer = _regularizer(skip_nonfinite=True, loss_weight=schedule)
    good = regularizer(hidden, target)
    regularizer.end_step(good)
    ema = schedule.similarity_ema
    regularizer.end_step(regularizer(bad, target))
    assert schedule.similarity_ema == ema and schedule.steps_done == 2


def test_recoverable_cutoff_keeps_computing_without_gradient():
    """While a recoverable cutoff holds lambda at 0 the similarity is still computed (no graph), so the EMA can
    come back under the threshold; a permanent cutoff computes nothing."""
    hidden, target = _inputs()
    for mode in ("recoverable", "permanent"):
        schedule = LambdaSchedule(0.5, similarity_threshold=-1.0, threshold_mode=mode)  # cut after the first step
        regularizer = _regularizer(loss_weight=schedule)
        regularizer.end_step(regularizer(hidden, target))
        assert schedule.cut_off and schedule.value() == 0.0
        out = regularizer(hidden.requires_grad_(), target)
        assert regularizer.active == (mode == "recoverable") and out.computed == (mode == "recoverable")
        assert out.weight == 0.0 and out.loss.item() == 0.0
        if mode == "recoverable":
            assert not out.projected.requires_grad and math.isfinite(out.cutoff_similarity.item())


def test_same_step_cutoff_in_the_regulariser_and_update_cutoff_false():
    hidden, target = _inputs()
    probe = _regularizer()(hidden, target).cutoff_similarity.item()
    schedule = LambdaSchedule(0.5, similarity_threshold=probe - 1e-9, cutoff_timing="same_step")
    regularizer = _regularizer(loss_weight=schedule)
    validation = regularizer(hidden, target, update_cutoff=False)  # a validation pass: the EMA stays unset
    assert schedule.similarity_ema is None and validation.weight == 0.5 and not validation.observed
    out = regularizer(hidden, target)  # crosses the threshold: this very forward gets lambda 0
    assert out.observed and out.weight == 0.0 and out.loss.item() == 0.0
    assert schedule.similarity_ema == pytest.approx(probe, rel=1e-15) and schedule.threshold_step == 0
    regularizer.end_step(out)  # the similarity is in the EMA already: not folded in twice
    assert schedule.similarity_ema == pytest.approx(probe, rel=1e-15) and schedule.steps_done == 1


def test_regularizer_bad_arguments():
    with pytest.raises(TypeError, match="clamp_neighbors"):
        CrepaRegularizer(6, 5, clamp_neighbors="yes")
    with pytest.raises(ValueError, match="similarity_signal"):
        CrepaRegularizer(6, 5, similarity_signal="mean")
    with pytest.raises(TypeError, match="skip_nonfinite"):
        CrepaRegularizer(6, 5, skip_nonfinite=None)


def test_nothing_is_watched_past_the_step_cutoff():
    """Past cutoff_step lambda is 0 for good: even a recoverable cutoff stops computing the similarity."""
    hidden, target = _inputs()
    schedule = LambdaSchedule(0.5, cutoff_step=2, similarity_threshold=0.99, threshold_mode="recoverable",
                              similarity_every_step=True)
    regularizer = _regularizer(loss_weight=schedule)
    for _ in range(2):
        assert regularizer.active
        regularizer.end_step(regularizer(hidden, target))
    assert not schedule.needs_similarity and not regularizer.active
    assert not regularizer(hidden, target).computed


# ----------------------------------------------------------------------------------------------- grids


def linear_resample(x, count):
    """1-D linear interpolation with half-token centres (F.interpolate(mode="linear", align_corners=False)),
    written out: output token j samples position (j + 0.5) N / count - 0.5, clamped at 0, between its two
    neighbouring input tokens (the last one repeated past the end). x: [..., N, D]."""
    tokens = x.shape[-2]
    rows = []
    for j in range(count):
        source = max((j + 0.5) * tokens / count - 0.5, 0.0)
        low = int(math.floor(source))
        high = min(low + 1, tokens - 1)
        w = source - low
        rows.append((1 - w) * x[..., low, :] + w * x[..., high, :])
    return torch.stack(rows, -2)


def upstream_frame_pick(x, count):
    """SimpleTuner's / musubi-tuner's frame pick: x[:, linspace(0, F - 1, count).long()]."""
    return x.index_select(1, torch.linspace(0, x.shape[1] - 1, count).long())


@pytest.mark.parametrize("tokens, count", [(6, 4), (4, 6), (7, 3), (5, 5), (1, 3), (9, 1)])
def test_resample_tokens_is_upstream_linear_interpolation(tokens, count):
    from crepa_kernels.training.token_grid import resample_tokens

    x = torch.randn(2, 3, tokens, 5, dtype=torch.float64)
    torch.testing.assert_close(resample_tokens(x, count), linear_resample(x, count), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("frames, count", [(9, 3), (10, 4), (7, 7), (13, 5), (5, 1), (6, 5)])
def test_pick_frames_any_counts(frames, count):
    from crepa_kernels.training.token_grid import pick_frames

    x = torch.randn(2, frames, 3, 4, dtype=torch.float64)
    assert torch.equal(pick_frames(x, count), upstream_frame_pick(x, count))
    with pytest.raises(ValueError, match="count"):
        pick_frames(x, frames + 1)


def musubi_loss(proj, target, neighbors, tau):
    """musubi-tuner's loss on [B, T, N, D]: -sum_f [self + sum_delta w (both neighbours)] averaged over videos,
    over the mean number of terms per frame."""
    p = torch.nn.functional.normalize(proj, dim=-1)
    y = torch.nn.functional.normalize(target, dim=-1)
    sim = torch.einsum("btnd,bsnd->btsn", p, y).mean(-1)
    frames = sim.shape[1]
    loss, terms = torch.zeros(sim.shape[0], dtype=sim.dtype), frames
    for f in range(frames):
        loss = loss - sim[:, f, f]
        for delta in range(1, neighbors + 1):
            for k in (f - delta, f + delta):
                if 0 <= k < frames:
                    loss = loss - math.exp(-delta / tau) * sim[:, f, k]
                    terms += 1
    return loss.mean() / max(terms / frames, 1.0)


@pytest.mark.parametrize("latent_frames, pixel_frames, tokens, patches", [(3, 9, 6, 4), (4, 10, 5, 8), (2, 2, 4, 4)])
def test_musubi_dino_mode_grids(latent_frames, pixel_frames, tokens, patches):
    """musubi-tuner's dino mode: the encoder's frames picked to the DiT's, the projected DiT tokens resampled 1-D
    to the encoder's patch count, then its loss. Ours: frame_align="pick", token_align="linear"."""
    neighbors, tau = 2, 0.9
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, latent_frames * tokens, 6, generator=generator, dtype=torch.float64)
    features = torch.randn(2, pixel_frames, patches, 5, generator=generator, dtype=torch.float64)
    terms = latent_frames + 2 * sum(latent_frames - d for d in range(1, min(neighbors, latent_frames - 1) + 1))
    regularizer = _regularizer(neighbors=neighbors, neighbor_mode="cumulative", tau=tau, reduction="frame_sum",
                               frame_align="pick", token_align="linear",
                               loss_weight=1.0 / max(terms / latent_frames, 1.0))  # their divisor, as lambda
    projected = regularizer.projector(hidden).reshape(2, latent_frames, tokens, 5)
    expected = musubi_loss(linear_resample(projected, patches), upstream_frame_pick(features, latent_frames),
                           neighbors, tau)
    out = regularizer(hidden, features, hidden_frames=latent_frames)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dit_frames, target_frames, dit_tokens, target_tokens",
                         [(5, 3, 9, 16), (3, 5, 16, 9), (4, 4, 6, 10), (6, 2, 7, 7)])
def test_simpletuner_grids(dit_frames, target_frames, dit_tokens, target_tokens):
    """SimpleTuner: the side with more frames is picked down to the other (the DiT's too), then both sides' tokens
    go to the smaller count, bilinearly when both counts are squares, else 1-D. Ours: frame_align="pick",
    token_align="to_smaller"."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, dit_frames, dit_tokens, 6, generator=generator, dtype=torch.float64)
    features = torch.randn(2, target_frames, target_tokens, 5, generator=generator, dtype=torch.float64)
    regularizer = _regularizer(neighbors=2, clamp_neighbors=True, frame_align="pick", token_align="to_smaller")
    projected = regularizer.projector(hidden)
    frames = min(dit_frames, target_frames)
    projected, features_picked = upstream_frame_pick(projected, frames), upstream_frame_pick(features, frames)
    count = min(dit_tokens, target_tokens)

    def simpletuner_tokens(x):
        if x.shape[2] == count:
            return x
        side, new = math.isqrt(x.shape[2]), math.isqrt(count)
        if side * side == x.shape[2] and new * new == count:
            maps = x.reshape(-1, side, side, x.shape[-1]).permute(0, 3, 1, 2)
            maps = torch.nn.functional.interpolate(maps, size=(new, new), mode="bilinear", align_corners=False)
            return maps.permute(0, 2, 3, 1).reshape(*x.shape[:2], count, x.shape[-1])
        return linear_resample(x, count)

    total = simpletuner_total_similarity(simpletuner_tokens(projected), simpletuner_tokens(features_picked), 2,
                                         1.0, cumulative=False)
    out = regularizer(hidden, features)
    torch.testing.assert_close(out.align_loss, -(total.sum(1) / frames).mean().detach(), rtol=1e-12, atol=0)
    assert out.included_frames.item() == 2 * frames
    out.loss.backward()  # the gradient reaches the projector through the resampling
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in regularizer.parameters())


def test_grid_options_bad_arguments():
    with pytest.raises(ValueError, match="frame_align"):
        CrepaRegularizer(6, 5, frame_align="linspace")
    with pytest.raises(ValueError, match="token_align"):
        CrepaRegularizer(6, 5, token_align="bilinear")
    hidden, target = _inputs(frames=3, tokens=4)
    with pytest.raises(ValueError, match="hidden_frames"):
        _regularizer(frame_align="pick")(hidden, target, hidden_frames=5)
    with pytest.raises(ValueError, match="hidden_states"):  # exact grids (the default) still demand the same grid
        _regularizer()(hidden[:, :9], target)


def test_same_step_recoverable_cutoff_lifting_on_a_forward_keeps_its_graph():
    """Cut off by the previous forward, lifted by this one's similarity: this forward's loss has its gradient, as
    upstream (which always computes with the graph) has."""
    hidden, target = _inputs()
    probe = _regularizer()(hidden, target).cutoff_similarity.item()
    schedule = LambdaSchedule(0.5, similarity_threshold=probe + 0.015, similarity_ema_decay=0.5,
                              threshold_mode="recoverable", cutoff_timing="same_step")
    regularizer = _regularizer(loss_weight=schedule)
    schedule.similarity_ema, schedule.over_threshold, schedule.threshold_step = probe + 0.02, True, 0
    assert schedule.value() == 0.0  # cut off now; this forward brings the EMA down to probe + 0.01
    out = regularizer(hidden.requires_grad_(), target)
    assert out.weight == 0.5 and out.loss.grad_fn is not None
    out.loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- self targets


def test_ema_teacher_update_restated():
    """theta_teacher <- m theta_teacher + (1 - m) theta_student after each step, buffers copied; a frozen copy
    without the original's hooks."""
    from crepa_kernels.training.teacher import EmaTeacher

    torch.manual_seed(5)
    student = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)).double()
    fired = []
    student[0].register_forward_hook(lambda *_: fired.append(1))
    momentum = 0.9
    teacher = EmaTeacher(student, momentum)
    expected = {name: p.detach().clone() for name, p in student.named_parameters()}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.3)
    for _ in range(4):
        optimizer.zero_grad()
        student(torch.randn(5, 4, dtype=torch.float64)).square().sum().backward()
        optimizer.step()
        teacher.update(student)
        for name, p in student.named_parameters():
            expected[name] = momentum * expected[name] + (1 - momentum) * p.detach()
    for name, p in teacher.module.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-14, atol=1e-15)
        assert not p.requires_grad
    torch.testing.assert_close(teacher.module[1].running_mean, student[1].running_mean, rtol=0, atol=0)
    assert teacher.updates == 4 and not teacher.module.training
    fired.clear()
    teacher(torch.randn(5, 4, dtype=torch.float64))
    assert not fired  # the student's hooks (its captures) were not copied
    with pytest.raises(ValueError, match="momentum"):
        EmaTeacher(student, 1.5)


def musubi_backbone_loss(student_states, teacher_states, frames, neighbors, tau, projector):
    """musubi-tuner's backbone mode (LTX-2): project the student block's tokens, average each frame's tokens of
    both sides (the teacher detached), then its loss on the frame vectors [B, T, D]."""
    batch = student_states.shape[0]
    proj = projector(student_states).reshape(batch, frames, -1, student_states.shape[-1]).mean(2)
    teach = teacher_states.detach().reshape(batch, frames, -1, teacher_states.shape[-1]).mean(2)
    return musubi_loss(proj.unsqueeze(2), teach.unsqueeze(2), neighbors, tau)


@pytest.mark.parametrize("frames, neighbors", [(3, 2), (4, 1), (2, 3)])
def test_musubi_backbone_mode(frames, neighbors):
    from crepa_kernels.training.teacher import block_targets

    generator = torch.Generator().manual_seed(6)
    student = torch.randn(2, frames * 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, frames * 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    terms = frames + 2 * sum(frames - d for d in range(1, min(neighbors, frames - 1) + 1))
    torch.manual_seed(0)
    regularizer = CrepaRegularizer(6, 6, projector="linear", backend="reference", neighbors=neighbors,
                                   neighbor_mode="cumulative", tau=0.8, reduction="frame_sum", pool_tokens=True,
                                   loss_weight=1.0 / max(terms / frames, 1.0)).double()
    out = regularizer(student, block_targets(teacher, frames))
    expected = musubi_backbone_loss(student, teacher, frames, neighbors, 0.8, regularizer.projector)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    ours = torch.autograd.grad(out.loss, student)[0]
    theirs = torch.autograd.grad(expected, student)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
    # takenoko does not detach its teacher: the alignment's gradient then reaches the teacher block too
    undetached = regularizer(student, block_targets(teacher, frames, detach=False))
    assert torch.autograd.grad(undetached.loss, teacher)[0].abs().sum() > 0


def test_trainer_lockstep_with_an_ema_teacher_and_backbone_targets():
    """examples/train_dit.py with --target-source ema_teacher (the last block of an EMA copy of the DiT) and
    backbone (the last block of the trained DiT, token-pooled): the fused backend against the reference."""
    import dataclasses

    from test_training import SMALL, trainer
    from crepa_kernels.backends import available_backends

    backend = "cpu" if available_backends("cpu")["cpu"] is True else "reference"
    for changes in (dict(target_source="ema_teacher", teacher_momentum=0.9),
                    dict(target_source="backbone", pool_tokens=True)):
        config = dataclasses.replace(SMALL, **changes)
        reference, fused = trainer.train(config, "reference"), trainer.train(config, backend)
        report = trainer.compare(reference, fused, trainer.TOLERANCES[torch.float32])
        assert all(entry["ok"] for entry in report.values()), (changes, report)
        assert all(math.isfinite(r["align_loss"]) for r in fused.records)
    with pytest.raises(ValueError, match="target_source"):
        trainer.train(dataclasses.replace(SMALL, target_source="dino"), "reference")


def test_simpletuner_pooling_without_spatial_align():
    """crepa_spatial_align=False: when the token counts differ both sides are averaged over tokens (N = 1)."""
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, 3, 5, 6, generator=generator, dtype=torch.float64)
    features = torch.randn(2, 3, 7, 5, generator=generator, dtype=torch.float64)
    regularizer = _regularizer(neighbors=1, pool_tokens=True)
    out = regularizer(hidden, features)
    projected = regularizer.projector(hidden)
    total = simpletuner_total_similarity(projected.mean(2, keepdim=True), features.mean(2, keepdim=True), 1, 1.0,
                                         cumulative=False)
    torch.testing.assert_close(out.align_loss, -(total.sum(1) / 3).mean().detach(), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------- iREPA


def test_spatial_normalize_restated():
    """iREPA's spatial normalisation, written out: per frame and channel over the N tokens,
    (x - gamma * mean) / (sqrt(sum (x - mean)^2 / (N - 1)) + eps)."""
    from crepa_kernels.training.token_grid import spatial_normalize

    x = torch.randn(2, 3, 7, 5, dtype=torch.float64) * 3 + 1
    for gamma in (1.0, 0.6):
        expected = torch.empty_like(x)
        for b, f, d in itertools.product(range(2), range(3), range(5)):
            tokens = x[b, f, :, d].tolist()
            mean = sum(tokens) / 7
            std = math.sqrt(sum((v - mean) ** 2 for v in tokens) / 6)
            expected[b, f, :, d] = torch.tensor([(v - gamma * mean) / (std + 1e-6) for v in tokens],
                                                dtype=torch.float64)
        torch.testing.assert_close(spatial_normalize(x, gamma), expected, rtol=1e-13, atol=1e-13)
    z = spatial_normalize(x)
    torch.testing.assert_close(z.mean(2), torch.zeros(2, 3, 5, dtype=torch.float64), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="2 tokens"):
        spatial_normalize(x[:, :, :1])


def test_conv_projector_is_a_3x3_convolution_over_each_frame_grid():
    """Each projected token is the bias plus the sum, over the 3 x 3 neighbourhood of its frame's token grid (zero
    outside it), of the kernel tap times that token."""
    from crepa_kernels.training.projector import build_projector

    height, width, hidden, out_dim, frames = 3, 4, 5, 2, 2
    torch.manual_seed(2)
    projector = build_projector(hidden, out_dim, kind="conv", grid=(height, width)).double()
    x = torch.randn(2, frames * height * width, hidden, dtype=torch.float64)  # frame-major, x fastest
    weight, bias = projector.conv.weight, projector.conv.bias  # [out, hidden, 3, 3]
    grid = x.reshape(2, frames, height, width, hidden)
    expected = torch.zeros(2, frames, height, width, out_dim, dtype=torch.float64)
    for i, j in itertools.product(range(height), range(width)):
        value = bias.expand(2, frames, out_dim).clone()
        for di, dj in itertools.product((-1, 0, 1), (-1, 0, 1)):
            if 0 <= i + di < height and 0 <= j + dj < width:
                value = value + grid[:, :, i + di, j + dj] @ weight[:, :, di + 1, dj + 1].T
        expected[:, :, i, j] = value
    torch.testing.assert_close(projector(x), expected.reshape(2, -1, out_dim), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="grid"):
        build_projector(hidden, out_dim, kind="conv")


def test_irepa_regulariser_and_trainer_lockstep():
    """The regulariser with spatially normalised targets and the conv projector equals the loss on those pieces;
    examples/train_dit.py with them runs in lockstep, fused backend against the reference."""
    import dataclasses

    from test_training import SMALL, trainer
    from crepa_kernels import cross_frame_align_loss
    from crepa_kernels.backends import available_backends
    from crepa_kernels.training.token_grid import spatial_normalize

    hidden, target = _inputs(frames=3, tokens=4)
    torch.manual_seed(0)
    regularizer = CrepaRegularizer(6, 5, projector="conv", projector_grid=(2, 2), target_norm="spatial",
                                   spatial_norm_gamma=0.6, backend="reference").double()
    out = regularizer(hidden, target)
    expected = cross_frame_align_loss(regularizer.projector(hidden).unflatten(1, (3, 4)),
                                      spatial_normalize(target, 0.6), backend="reference")
    torch.testing.assert_close(out.align_loss, expected.detach(), rtol=1e-13, atol=0)

    backend = "cpu" if available_backends("cpu")["cpu"] is True else "reference"
    config = dataclasses.replace(SMALL, projector="conv", target_norm="spatial")
    reference, fused = trainer.train(config, "reference"), trainer.train(config, backend)
    report = trainer.compare(reference, fused, trainer.TOLERANCES[torch.float32])
    assert all(entry["ok"] for entry in report.values()), report
    assert any(name.endswith("conv.weight") for name in fused.params)


# ----------------------------------------------------------------------------------------------- self-flow masking


def _simpletuner_self_flow(latents, noise, t, alt_t, patch, draws, ratio):
    """SimpleTuner's crepa_self_flow_mask_ratio restated token by token in float64 (``draws``: its uniform draw per
    token): masked where the draw is below the ratio, the student's token at alt_t there and at t elsewhere, the
    teacher everywhere at min(t, alt_t); timesteps per token, frame-major."""
    b, _, f, h, w = latents.shape
    pt, ph, pw = patch
    student = torch.empty_like(latents)
    token_t = torch.empty(b, (f // pt) * (h // ph) * (w // pw), dtype=torch.float64)
    for i in range(b):
        token = 0
        for a in range(f // pt):
            for y in range(h // ph):
                for x in range(w // pw):
                    sigma = float(alt_t[i]) if float(draws[i, a, y, x]) < ratio else float(t[i])
                    token_t[i, token] = sigma
                    token += 1
                    cell = (i, slice(None), slice(a * pt, (a + 1) * pt), slice(y * ph, (y + 1) * ph),
                            slice(x * pw, (x + 1) * pw))
                    student[cell] = (1 - sigma) * latents[cell] + sigma * noise[cell]
    teacher_t = torch.minimum(t, alt_t)
    teacher = (1 - teacher_t.view(-1, 1, 1, 1, 1)) * latents + teacher_t.view(-1, 1, 1, 1, 1) * noise
    return student, teacher, token_t, teacher_t


def test_self_flow_views_restate_simpletuner():
    """Both views token by token, the mask (one uniform draw per token of the generator's stream, below the
    ratio), the per-token times; ratio 0 is the plain view, ratio 1 every token at alt_t."""
    from crepa_kernels.training.flow import rectified_flow_pair, self_flow_views

    source = torch.Generator().manual_seed(11)
    for patch, shape in (((1, 2, 2), (3, 2, 3, 6, 4)), ((2, 1, 3), (2, 3, 4, 3, 6)), ((1, 1, 1), (1, 1, 1, 1, 1))):
        latents = torch.randn(shape, generator=source, dtype=torch.float64)
        noise = torch.randn(shape, generator=source, dtype=torch.float64)
        t, alt_t = torch.rand(shape[0], generator=source, dtype=torch.float64), torch.rand(
            shape[0], generator=source, dtype=torch.float64)
        grid = (shape[0], shape[2] // patch[0], shape[3] // patch[1], shape[4] // patch[2])
        for ratio in (0.0, 0.1, 0.37, 1.0):
            draws = torch.rand(grid, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            views = self_flow_views(latents, noise, t, alt_t, patch, ratio, torch.Generator().manual_seed(3))
            student, teacher, token_t, teacher_t = _simpletuner_self_flow(latents, noise, t, alt_t, patch, draws,
                                                                          ratio)
            assert torch.equal(views.token_mask, draws < ratio)
            torch.testing.assert_close(views.student_latents, student, rtol=1e-15, atol=1e-15)
            torch.testing.assert_close(views.teacher_latents, teacher, rtol=1e-15, atol=1e-15)
            torch.testing.assert_close(views.token_t, token_t, rtol=0, atol=0)
            torch.testing.assert_close(views.teacher_t, teacher_t, rtol=0, atol=0)
            plain, _ = rectified_flow_pair(latents, noise, t)
            if ratio == 0.0:
                assert not views.token_mask.any()
                torch.testing.assert_close(views.student_latents, plain, rtol=0, atol=0)
            if ratio == 1.0:
                assert views.token_mask.all()
                torch.testing.assert_close(views.student_latents, rectified_flow_pair(latents, noise, alt_t)[0],
                                           rtol=0, atol=0)
    # SimpleTuner's own case (Anima, patch (1, 2, 2), draws [[0.2, 0.7], [0.9, 0.1]] at ratio 0.5, sigmas 0.2 / 0.8)
    draws = torch.tensor([[[[0.2, 0.7], [0.9, 0.1]]]])
    student, teacher, token_t, teacher_t = _simpletuner_self_flow(
        torch.zeros(1, 16, 1, 4, 4, dtype=torch.float64), torch.ones(1, 16, 1, 4, 4, dtype=torch.float64),
        torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.8], dtype=torch.float64), (1, 2, 2), draws, 0.5)
    assert token_t.tolist() == [[0.8, 0.2, 0.2, 0.8]] and teacher_t.tolist() == [0.2]


def test_self_flow_mask_statistics():
    """The fraction of masked tokens of a seeded generator is the ratio (binomial, 6 sigma)."""
    from crepa_kernels.training.flow import self_flow_views

    latents = torch.zeros(8, 2, 6, 16, 16, dtype=torch.float64)
    t = torch.full((8,), 0.3, dtype=torch.float64)
    for ratio in (0.1, 0.5):
        views = self_flow_views(latents, latents, t, t, (1, 2, 2), ratio, torch.Generator().manual_seed(7))
        n = views.token_mask.numel()
        assert n == 8 * 6 * 8 * 8
        assert abs(views.token_mask.double().mean().item() - ratio) < 6 * math.sqrt(ratio * (1 - ratio) / n)


def test_self_flow_views_bad_arguments():
    from crepa_kernels.training.flow import self_flow_views

    x = torch.zeros(2, 3, 2, 4, 4)
    t = torch.rand(2)
    g = torch.Generator().manual_seed(0)
    cases = [
        (dict(latents=torch.zeros(2, 3, 4, 4)), TypeError, "latents"),
        (dict(noise=torch.zeros(2, 3, 2, 4, 2)), ValueError, "noise"),
        (dict(t=torch.rand(3)), ValueError, "t: expected shape"),
        (dict(alt_t=torch.rand(2, 1)), ValueError, "alt_t"),
        (dict(patch_size=(1, 2)), ValueError, "patch_size"),
        (dict(patch_size=(1, 0, 2)), ValueError, "patch_size"),
        (dict(patch_size=(1, 3, 2)), ValueError, "dividing"),
        (dict(mask_ratio=1.5), ValueError, "mask_ratio"),
        (dict(mask_ratio=-0.1), ValueError, "mask_ratio"),
        (dict(mask_ratio=math.nan), ValueError, "mask_ratio"),
        (dict(mask_ratio=True), ValueError, "mask_ratio"),
        (dict(generator=0), TypeError, "generator"),
        (dict(latents=torch.zeros(2, 3, 2, 4, 4, device="meta"), noise=torch.zeros(2, 3, 2, 4, 4, device="meta")),
         ValueError, "generator: expected one on the latents' device"),  # a CPU generator for latents elsewhere
    ]
    for change, error, message in cases:
        arguments = dict(latents=x, noise=x, t=t, alt_t=t, patch_size=(1, 2, 2), mask_ratio=0.1, generator=g)
        arguments.update(change)
        with pytest.raises(error, match=message):
            self_flow_views(**arguments)


def test_trainer_lockstep_with_self_flow_masking(monkeypatch):
    """examples/train_dit.py --target-source ema_teacher --self-flow-mask-ratio: the fused backend against the
    reference. The wiring, read from the DiT's and the teacher's real inputs: the student gets per-token times, the
    teacher one time per sample, the smaller of the student's two, and its input equals the student's exactly on
    the tokens at that time and nowhere else. The option is refused without an EMA teacher."""
    import dataclasses

    from test_training import SMALL, trainer
    from crepa_kernels.backends import available_backends

    seen = {"student": [], "teacher": []}

    class RecordingTeacher(trainer.EmaTeacher):  # the real teacher, its and its student's inputs recorded
        def __init__(self, module, momentum):
            super().__init__(module, momentum)
            module.register_forward_pre_hook(
                lambda _, args, kwargs: seen["student"].append((args[0].detach().clone(), args[1].clone())),
                with_kwargs=True)

        def forward(self, *args, **kwargs):
            seen["teacher"].append((args[0].clone(), args[1].clone()))
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(trainer, "EmaTeacher", RecordingTeacher)
    backend = "cpu" if available_backends("cpu")["cpu"] is True else "reference"
    config = dataclasses.replace(SMALL, target_source="ema_teacher", teacher_momentum=0.9, self_flow_mask_ratio=0.3)
    reference = trainer.train(config, "reference")
    fused = trainer.train(config, backend)
    report = trainer.compare(reference, fused, trainer.TOLERANCES[torch.float32])
    assert all(entry["ok"] for entry in report.values()), report
    assert all(math.isfinite(r["align_loss"]) for r in fused.records)

    assert len(seen["student"]) == len(seen["teacher"]) == 2 * config.steps
    patch = trainer.PATCH_SIZE
    masked = 0
    for (student, student_time), (teacher, teacher_time) in zip(seen["student"], seen["teacher"]):
        b, _, f, h, w = student.shape
        assert student_time.shape == (b, (f // patch[0]) * (h // patch[1]) * (w // patch[2]))
        assert teacher_time.shape == (b,)
        torch.testing.assert_close(teacher_time, student_time.min(1).values, rtol=0, atol=0)
        same_time = (student_time == teacher_time[:, None]).view(b, f // patch[0], h // patch[1], w // patch[2])
        for dim, p in zip((1, 2, 3), patch):
            same_time = same_time.repeat_interleave(p, dim=dim)
        same_time = same_time[:, None].expand_as(student)
        assert torch.equal(teacher[same_time], student[same_time])
        assert (teacher[~same_time] != student[~same_time]).all()
        masked += int((~same_time).any())
    assert masked > 0  # some step had a token at the noisier time
    with pytest.raises(ValueError, match="self-flow-mask-ratio"):
        trainer.train(dataclasses.replace(SMALL, self_flow_mask_ratio=0.3), "reference")
