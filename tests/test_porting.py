"""docs/porting.md, tested: each trainer's formula as the guide states it, restated here in our own code (from
reading those projects' public source), against crepa_kernels with the guide's mapping. float64, random inputs.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from crepa_kernels import CrossFrameAlignLoss, cross_frame_align_loss
from crepa_kernels.training.token_grid import pool_frames, resize_frames
from harness import random_pair

# --------------------------------------------------------------------------------------------------------------
# SimpleTuner's CrepaRegularizer / takenoko's CrepaHelper, restated: unit vectors, S[b, f] = mean_n cos(p_f, y_f)
# plus, for d = min(distance, F - 1) > 0, w(o) * mean_n cos(p_f, y_{f +- o}) for o = d (adjacent) or o = 1..d
# (cumulative), w(o) = exp(-o / max(tau, 1e-8)); optionally S[b, f] / (1 + the weights frame f received)
# (SimpleTuner's crepa_normalize_neighbour_sum); per video sum_f S, / F when normalize_by_frames; loss = -mean_b.


def trainer_crepa(proj, target, distance, tau, cumulative, normalize_by_frames, normalize_neighbour_sum=False):
    p, y = F.normalize(proj, dim=-1), F.normalize(target, dim=-1)
    num_frames = p.shape[1]

    def sim(a, b):
        return (a * b).sum(-1).mean(-1)

    total = sim(p, y)
    weight_sum = torch.ones_like(total)
    d = min(distance, num_frames - 1)
    tau = max(tau, 1e-8)
    for o in (range(1, d + 1) if cumulative else [d]) if d > 0 else []:
        w = math.exp(-o / tau)
        total = total + F.pad(w * sim(p[:, :-o], y[:, o:]), (0, o))  # frame f with frame f + o
        total = total + F.pad(w * sim(p[:, o:], y[:, :-o]), (o, 0))  # frame f with frame f - o
        weight_sum = weight_sum + F.pad(torch.full_like(total[:, o:], w), (0, o)) + F.pad(
            torch.full_like(total[:, o:], w), (o, 0))
    if normalize_neighbour_sum:
        total = total / weight_sum
    per_video = total.sum(dim=1)
    if normalize_by_frames:
        per_video = per_video / num_frames
    return -per_video.mean()


def simpletuner_mapping(distance, tau, cumulative, normalize_by_frames, normalize_neighbour_sum=False):
    """The guide's table: SimpleTuner option -> cross_frame_align_loss argument."""
    return dict(neighbors=distance, tau=tau, neighbor_mode="cumulative" if cumulative else "adjacent",
                normalize_weights=normalize_neighbour_sum, reduction="mean" if normalize_by_frames else "frame_sum",
                clamp_neighbors=True)


def _loss_and_grads(fn, proj, target):
    p, y = proj.detach().requires_grad_(True), target.detach().requires_grad_(True)
    loss = fn(p, y)
    return (loss, *torch.autograd.grad(loss, (p, y)))


def _assert_same(ours, theirs, rtol=1e-12):
    for name, a, b in zip(("loss", "grad proj", "grad target"), ours, theirs):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=name)


SIMPLETUNER_CASES = [
    (frames, distance, cumulative, normalize_by_frames, normalize_sum)
    for frames, distance, cumulative, normalize_by_frames, normalize_sum in itertools.product(
        [1, 2, 3, 5], [0, 1, 2, 4, 7], [False, True], [True, False], [False, True])
    if not (normalize_by_frames and normalize_sum and frames == 3)  # keeps the grid short; both flags seen elsewhere
]


@pytest.mark.parametrize("frames,distance,cumulative,normalize_by_frames,normalize_sum", SIMPLETUNER_CASES)
def test_simpletuner_and_takenoko_mapping_with_the_clamp(frames, distance, cumulative, normalize_by_frames,
                                                         normalize_sum):
    """takenoko has no neighbour-sum normalisation: its cases are the normalize_sum=False half of this grid."""
    proj, target = random_pair((2, frames, 3, 6), torch.float64, seed=frames * 10 + distance)
    tau = 0.6
    theirs = _loss_and_grads(lambda p, y: trainer_crepa(p, y, distance, tau, cumulative, normalize_by_frames,
                                                        normalize_sum), proj, target)
    options = simpletuner_mapping(distance, tau, cumulative, normalize_by_frames, normalize_sum)
    for backend in ("reference", "cpu"):
        _assert_same(_loss_and_grads(lambda p, y: cross_frame_align_loss(p, y, backend=backend, **options),
                                     proj, target), theirs)
    # the module with the same options, on clips of a different length per call
    module = CrossFrameAlignLoss(**options)
    _assert_same(_loss_and_grads(module, proj, target), theirs)


def test_without_the_clamp_short_clips_differ():
    """Why the switch exists: with d >= F the trainers still align frames at distance F - 1, the specification
    drops them. F = 2, d = 2: every frame has its one neighbour in SimpleTuner, none by default here."""
    proj, target = random_pair((2, 2, 3, 6), torch.float64, seed=3)
    theirs = trainer_crepa(proj, target, 2, 1.0, False, True)
    clamped = cross_frame_align_loss(proj, target, neighbors=2, clamp_neighbors=True)
    default = cross_frame_align_loss(proj, target, neighbors=2)
    torch.testing.assert_close(clamped, theirs, rtol=1e-12, atol=0)
    assert (default - theirs).abs() > 1e-3 * theirs.abs()
    torch.testing.assert_close(default, cross_frame_align_loss(proj, target, neighbors=0), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------------------------
# musubi-tuner's CREPA (LTX-2 branch and minimax-h3), restated: sim[b, f, k] = cos of the token-pooled frames
# (backbone mode) or mean_n of per-token cosines (dino mode); loss_b = -sum_f [sim_ff + sum_{delta=1..K} w(delta)
# (sim_{f,f-delta} + sim_{f,f+delta}) over the neighbours that exist]; loss = mean_b loss_b / c with
# c = max(number of terms / F, 1). normalize=False skips the unit-normalisation (raw dot products).


def musubi_crepa(proj, target, num_neighbors, tau, normalize=True):
    if normalize:
        proj, target = F.normalize(proj, dim=-1), F.normalize(target, dim=-1)
    sim = torch.einsum("bfnd,bknd->bfkn", proj, target).mean(-1)  # [B, F, F]
    frames = sim.shape[1]
    loss = torch.zeros(sim.shape[0], dtype=sim.dtype)
    terms = frames
    for f in range(frames):
        loss = loss - sim[:, f, f]
        for delta in range(1, num_neighbors + 1):
            for k in (f - delta, f + delta):
                if 0 <= k < frames:
                    loss = loss - math.exp(-delta / max(tau, 1e-8)) * sim[:, f, k]
                    terms += 1
    return loss.mean() / max(terms / frames, 1.0)


def musubi_divisor(frames, neighbors):
    """The guide's c = max((F + 2 sum_{delta=1}^{min(K, F-1)} (F - delta)) / F, 1)."""
    return max((frames + 2 * sum(frames - delta for delta in range(1, min(neighbors, frames - 1) + 1))) / frames, 1)


@pytest.mark.parametrize("frames,neighbors", [(1, 2), (2, 1), (2, 3), (5, 2), (6, 1), (4, 9)])
@pytest.mark.parametrize("mode", ["dino", "backbone"])
def test_musubi_tuner_mapping(frames, neighbors, mode):
    proj, target = random_pair((3, frames, 4, 5), torch.float64, seed=frames + neighbors)
    pool = (lambda x: x.mean(dim=2, keepdim=True)) if mode == "backbone" else (lambda x: x)  # backbone: N = 1
    theirs = _loss_and_grads(lambda p, y: musubi_crepa(pool(p), pool(y), neighbors, 0.8), proj, target)
    c = musubi_divisor(frames, neighbors)
    ours = _loss_and_grads(lambda p, y: cross_frame_align_loss(pool(p), pool(y), neighbors=neighbors, tau=0.8,
                                                               neighbor_mode="cumulative", reduction="frame_sum") / c,
                           proj, target)
    _assert_same(ours, theirs)


def test_musubi_tuner_normalize_false_is_not_expressible_unless_features_are_unit():
    """Raw dot products depend on the norms, which the cosine ignores: no option reproduces them. On features that
    are already unit vectors the two coincide."""
    proj, target = random_pair((2, 4, 3, 5), torch.float64, seed=8)
    ours = cross_frame_align_loss(proj, target, neighbors=1, neighbor_mode="cumulative", reduction="frame_sum")
    c = musubi_divisor(4, 1)
    assert (musubi_crepa(proj, target, 1, 1.0, normalize=False) - ours / c).abs() > 1e-3
    unit_p, unit_y = F.normalize(proj, dim=-1), F.normalize(target, dim=-1)
    torch.testing.assert_close(musubi_crepa(unit_p, unit_y, 1, 1.0, normalize=False), ours / c, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------------------------
# REPA's projection loss, restated: per sample, mean over its tokens of -cos(z, z~), summed over the batch and
# divided by the batch size. VideoREPA's REPA baseline applies the same per-token cosine to the spatio-temporal
# tokens [B, F*N, D] of a video DiT.


def repa_projection_loss(z, z_tilde):
    total = 0.0
    for z_j, z_tilde_j in zip(z, z_tilde):
        total = total + (-(F.normalize(z_j, dim=-1) * F.normalize(z_tilde_j, dim=-1)).sum(-1)).mean()
    return total / z.shape[0]


def test_repa_images():
    proj, target = random_pair((3, 7, 5), torch.float64, seed=9)  # [B, N, D] image tokens
    theirs = _loss_and_grads(repa_projection_loss, proj, target)
    ours = _loss_and_grads(lambda p, y: cross_frame_align_loss(p, y, num_frames=1, neighbors=0), proj, target)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("layout", ["frames_as_images", "one_sequence"])
def test_repa_and_videorepa_on_video_tokens(layout):
    proj, target = random_pair((2, 4 * 6, 5), torch.float64, seed=10)  # [B, F*N, D], F = 4, N = 6, frame-major
    if layout == "frames_as_images":  # REPA applied to each frame as an image: [B*F, N, D]
        theirs = _loss_and_grads(lambda p, y: repa_projection_loss(p.reshape(8, 6, 5), y.reshape(8, 6, 5)),
                                 proj, target)
    else:  # VideoREPA's REPA loss over the whole token sequence
        theirs = _loss_and_grads(repa_projection_loss, proj, target)
    ours = _loss_and_grads(lambda p, y: cross_frame_align_loss(p, y, num_frames=4, neighbors=0, reduction="mean"),
                           proj, target)
    _assert_same(ours, theirs)


def test_repa_several_encoders_is_the_mean_of_one_call_each():
    """REPA with several encoders: its projection loss summed over the encoders, divided by their count."""
    torch.manual_seed(11)
    pairs = [random_pair((3, 7, dim), torch.float64, seed=12 + i) for i, dim in enumerate((5, 9))]
    theirs = sum(repa_projection_loss(z, z_tilde) for z, z_tilde in pairs) / len(pairs)
    ours = sum(cross_frame_align_loss(z, z_tilde, num_frames=1, neighbors=0) for z, z_tilde in pairs) / len(pairs)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=0)


def test_videorepa_dinov2_pooling_is_pool_frames():
    """VideoREPA's DINOv2 targets: the first frame alone, then the mean of each following group of 4 frames."""
    features = torch.randn(2, 1 + 4 * 3, 6, 5, dtype=torch.float64)
    theirs = torch.stack([features[:, 0]] + [features[:, 1 + 4 * g:5 + 4 * g].mean(1) for g in range(3)], 1)
    torch.testing.assert_close(pool_frames(features, 4, mode="mean"), theirs, rtol=1e-15, atol=1e-15)


# --------------------------------------------------------------------------------------------------------------
# Layouts.


def test_layout_channels_first_video_as_a_permuted_view():
    """[B, C, F, H, W] (a VAE-style tensor of features): permute to [B, F, H, W, C] and merge H, W; a view, no copy,
    and the gradient comes back in the original layout."""
    features = torch.randn(2, 5, 3, 4, 2, dtype=torch.float64, requires_grad=True)  # B, C, F, H, W
    target = torch.randn(2, 3, 8, 5, dtype=torch.float64)
    view = features.permute(0, 2, 3, 4, 1).flatten(2, 3)  # [B, F, H*W, C]
    assert view.data_ptr() == features.data_ptr()
    loss = cross_frame_align_loss(view, target, neighbors=1)
    expected = trainer_crepa(features.detach().permute(0, 2, 3, 4, 1).reshape(2, 3, 8, 5), target, 1, 1.0,
                             False, True)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    assert features.grad.shape == features.shape and torch.isfinite(features.grad).all()


def test_layout_channels_last_video_by_reshape():
    proj = torch.randn(2, 3, 4, 2, 5, dtype=torch.float64)  # [B, F, H, W, C]
    target = torch.randn(2, 3 * 4 * 2, 5, dtype=torch.float64)  # [B, F*H*W, C]
    loss = cross_frame_align_loss(proj.reshape(2, 3, 8, 5), target, num_frames=3, neighbors=2,
                                  neighbor_mode="cumulative")
    expected = trainer_crepa(proj.reshape(2, 3, 8, 5), target.reshape(2, 3, 8, 5), 2, 1.0, True, True)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing before the loss, and the crepa_kernels.training function that reproduces it.


@pytest.mark.parametrize("ratio,latent_frames", [(4, 2), (4, 13), (8, 5), (2, 7)])
def test_linspace_frame_pick_is_subsample(ratio, latent_frames):
    """SimpleTuner (and musubi-tuner's dino mode) pick encoder frames with linspace(0, T_pix - 1, T).long(); for a
    causal VAE's T_pix = 1 + r (T - 1) that is pool_frames(..., mode="subsample")."""
    pixel_frames = 1 + ratio * (latent_frames - 1)
    features = torch.randn(2, pixel_frames, 3, 4, dtype=torch.float64)
    picked = features.index_select(1, torch.linspace(0, pixel_frames - 1, latent_frames).long())
    torch.testing.assert_close(pool_frames(features, ratio, mode="subsample"), picked, rtol=0, atol=0)


def test_bilinear_token_resize_is_resize_frames_without_antialias():
    """SimpleTuner resizes square token grids with F.interpolate(bilinear, align_corners=False) to the smaller grid;
    when the encoder's grid is the larger one that is resize_frames(features, grid, antialias=False)."""
    batch, frames, side, small, dim = 2, 3, 6, 4, 5
    features = torch.randn(batch, frames, side * side, dim, dtype=torch.float64)  # [B, F, N_enc, D]
    maps = features.reshape(batch * frames, side, side, dim).permute(0, 3, 1, 2)
    theirs = F.interpolate(maps, size=(small, small), mode="bilinear", align_corners=False)
    theirs = theirs.permute(0, 2, 3, 1).reshape(batch, frames, small * small, dim)
    ours = resize_frames(features.reshape(batch, frames, side, side, dim), (small, small), antialias=False)
    torch.testing.assert_close(ours.flatten(2, 3), theirs, rtol=1e-12, atol=1e-14)
