"""crepa_kernels.training around the loss: sample weights and frame masks, several layers and teachers, projector
kinds, saving the projectors, projector checkpointing and its memory, no compute once lambda is 0, and the trainer
examples/train_dit.py in lockstep with all of them."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import crepa_kernels.training.regularizer as regularizer_module
from crepa_kernels import available_backends
from crepa_kernels.training import (
    CrepaRegularizer,
    CrepaTransformer,
    LambdaSchedule,
    SavedTensorMeter,
    build_projector,
    cosine_timestep_weight,
    hard_timestep_weight,
    load_crepa_state,
    projector_activation_bytes,
    reduce_weighted,
    reset_peak_rss,
    save_crepa_state,
    sigmoid_timestep_weight,
    snr_timestep_weight,
    timestep_weight,
)
from naive import naive_loss

diffusers = pytest.importorskip("diffusers")
from test_training import _checkpointing, _wan, trainer  # noqa: E402  (after the diffusers skip)

B, F, N, H = 3, 5, 6, 10  # odd sizes


def _inputs(dims=(7,), layers=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(B, F * N, H, generator=generator, dtype=torch.float64, requires_grad=True)
              for _ in range(layers)]
    targets = [torch.randn(B, F, N, d, generator=generator, dtype=torch.float64) for d in dims]
    return hidden, targets


def _mask_and_weights():
    mask = torch.tensor([[False, True, True, True, True],
                         [True, True, False, True, False],
                         [False, False, True, True, True]])
    weights = torch.tensor([0.3, 1.7, 0.9], dtype=torch.float64)
    return mask, weights


# ----------------------------------------------------------------------------------------------- weights and masks


@pytest.mark.parametrize("reduction", ["mean", "frame_sum", "none"])
def test_weighted_masked_reduction_by_hand(reduction):
    generator = torch.Generator().manual_seed(1)
    per_frame = torch.randn(B, F, generator=generator, dtype=torch.float64)
    mask, weights = _mask_and_weights()
    result = reduce_weighted(per_frame, reduction, weights, mask)
    total, included, videos = 0.0, 0, 0
    for b in range(B):
        videos += any(mask[b].tolist())
        for f in range(F):
            if mask[b, f]:
                total += weights[b].item() * per_frame[b, f].item()
                included += 1
    if reduction == "mean":
        assert included == 10 and result.item() == pytest.approx(total / included, rel=1e-14)
    elif reduction == "frame_sum":
        assert videos == 3 and result.item() == pytest.approx(total / videos, rel=1e-14)
    else:
        for b, f in itertools.product(range(B), range(F)):
            expected = weights[b].item() * per_frame[b, f].item() if mask[b, f] else 0.0
            assert result[b, f].item() == pytest.approx(expected, rel=1e-14, abs=0)
    # only weights, only a mask
    torch.testing.assert_close(reduce_weighted(per_frame, "mean", weights),
                               (per_frame * weights[:, None]).mean(), rtol=1e-14, atol=0)
    masked = reduce_weighted(per_frame, "mean", frame_mask=mask)
    assert masked.item() == pytest.approx(per_frame[mask].mean().item(), rel=1e-14)
    # nothing included: 0, not NaN
    nothing = torch.zeros(B, F, dtype=torch.bool)
    assert reduce_weighted(per_frame, "mean", weights, nothing).item() == 0.0
    assert reduce_weighted(per_frame, "frame_sum", weights, nothing).item() == 0.0


def test_weights_and_masks_are_checked():
    per_frame = torch.randn(B, F)
    with pytest.raises(ValueError, match=r"sample_weight: expected shape \[3\]"):
        reduce_weighted(per_frame, "mean", torch.ones(4))
    with pytest.raises(TypeError, match="sample_weight"):
        reduce_weighted(per_frame, "mean", torch.ones(B, dtype=torch.long))
    with pytest.raises(ValueError, match=r"frame_mask: expected shape \[3, 5\]"):
        reduce_weighted(per_frame, "mean", frame_mask=torch.ones(B, F + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="frame_mask: expected a bool"):
        reduce_weighted(per_frame, "mean", frame_mask=torch.ones(B, F))
    with pytest.raises(ValueError, match="kind"):
        timestep_weight("exponential", torch.rand(3))
    # another device than the loss's (meta stands in for a GPU here): named, not a failure inside the reduction
    with pytest.raises(ValueError, match="sample_weight: expected a tensor on cpu"):
        reduce_weighted(per_frame, "mean", torch.ones(B, device="meta"))
    with pytest.raises(ValueError, match="frame_mask: expected a tensor on cpu"):
        CrepaRegularizer(H, 7, projector_width=12)(torch.randn(B, F * N, H), torch.randn(B, F, N, 7),
                                                   frame_mask=torch.ones(B, F, dtype=torch.bool, device="meta"))


def test_timestep_weight_shapes():
    t = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.97, 1.0], dtype=torch.float64)
    assert hard_timestep_weight(t, 0.5).tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert sigmoid_timestep_weight(t, center=0.5, sharpness=8.0)[3].item() == 0.5
    torch.testing.assert_close(sigmoid_timestep_weight(t, sharpness=8.0), 1 / (1 + torch.exp(-8.0 * (0.5 - t))))
    torch.testing.assert_close(cosine_timestep_weight(t), (1 + torch.cos(math.pi * t)) / 2)
    snr = snr_timestep_weight(t)
    ratio = ((1 - t[1:-1]) / t[1:-1]) ** 2
    torch.testing.assert_close(snr[1:-1], ratio / (1 + ratio))
    assert snr[0].item() == 1.0 and snr[-1].item() == 0.0 and snr[3].item() == 0.5
    for kind in ("hard", "sigmoid", "cosine", "snr"):
        w = timestep_weight(kind, t)
        assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
        assert (w[1:] <= w[:-1]).all(), f"{kind}: the noisier the input, the smaller the weight"


@pytest.mark.parametrize("options", [dict(neighbors=1, tau=0.7), dict(neighbors=2, neighbor_mode="cumulative",
                                                                      normalize_weights=True, reduction="frame_sum")])
def test_regularizer_with_weights_and_mask_against_naive_loss(options):
    torch.manual_seed(2)
    regularizer = CrepaRegularizer(H, 7, loss_weight=0.4, projector_width=12, backend="reference",
                                   **options).double()
    (hidden,), (target,) = _inputs()
    mask, weights = _mask_and_weights()
    out = regularizer(hidden, target, sample_weight=weights, frame_mask=mask)
    proj = regularizer.projector(hidden).unflatten(1, (F, N))
    per_frame = naive_loss(proj, target, **{**options, "reduction": "none"})
    kept = weights[:, None] * mask * per_frame
    expected = kept.sum() / (mask.sum() if options.get("reduction", "mean") == "mean" else B)
    torch.testing.assert_close(out.align_loss, expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.loss, 0.4 * expected, rtol=1e-12, atol=1e-14)
    assert out.included_frames.item() == mask.sum().item()
    # the figures are over the included frames
    cos = torch.nn.functional.cosine_similarity(proj, target, dim=-1).mean(-1)  # [B, F]
    torch.testing.assert_close(out.self_similarity, cos[mask].mean(), rtol=1e-12, atol=1e-14)


def test_masked_frame_gets_no_gradient_but_stays_a_neighbour_target():
    torch.manual_seed(3)
    regularizer = CrepaRegularizer(H, 7, projector_width=12, neighbors=1, backend="reference").double()
    (hidden,), (target,) = _inputs()
    mask = torch.ones(B, F, dtype=torch.bool)
    mask[:, 0] = False  # e.g. an image-to-video conditioning frame
    out = regularizer(hidden, target, frame_mask=mask)
    out.loss.backward()
    grad = hidden.grad.unflatten(1, (F, N))
    assert grad[:, 0].abs().max() == 0  # frame 0's states are not pulled anywhere
    assert (grad[:, 1:].abs().amax(dim=(2, 3)) > 0).all()
    # frame 0's targets are still the neighbour targets of frame 1: changing them changes the loss
    moved = target.clone()
    moved[:, 0] += 1.0
    assert not torch.isclose(regularizer(hidden, moved, frame_mask=mask).align_loss, out.align_loss)
    # ... and by exactly what frame 1's neighbour term says: the loss is the per-frame loss with row 0 dropped
    proj = regularizer.projector(hidden).unflatten(1, (F, N))
    for y in (target, moved):
        per_frame = naive_loss(proj, y, neighbors=1, reduction="none")
        torch.testing.assert_close(regularizer(hidden, y, frame_mask=mask).align_loss,
                                   per_frame[:, 1:].mean().detach(), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------- layers and teachers


@pytest.mark.parametrize("share", [False, True])
def test_several_layers_and_teachers_are_the_weighted_mean_of_single_ones(share):
    torch.manual_seed(4)
    dims, layer_weights, teacher_weights = (7, 5), (1.0, 3.0), (2.0, 0.5)
    multi = CrepaRegularizer(H, dims, loss_weight=0.3, num_layers=2, share_projector=share, projector_width=12,
                             layer_weights=layer_weights, teacher_weights=teacher_weights, neighbors=2,
                             neighbor_mode="cumulative", backend="reference").double()
    assert len(multi.projectors) == (2 if share else 4)
    hidden, targets = _inputs(dims, layers=2)
    mask, weights = _mask_and_weights()
    out = multi(hidden, targets, sample_weight=weights, frame_mask=mask)

    expected_loss, total, expected_grads = 0.0, 0.0, None
    for l, t in itertools.product(range(2), range(2)):
        single = CrepaRegularizer(H, dims[t], loss_weight=0.3, projector_width=12, neighbors=2,
                                  neighbor_mode="cumulative", backend="reference").double()
        single.projector.load_state_dict(multi.projector_for(l, t).state_dict())
        one = single(hidden[l], targets[t], sample_weight=weights, frame_mask=mask)
        name = f"layer{l}/teacher{t}"
        torch.testing.assert_close(out.terms[name], one.align_loss, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(out.logs[f"align_loss/{name}"], one.align_loss, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(out.logs[f"self_similarity/{name}"], one.self_similarity, rtol=1e-13, atol=1e-15)
        w = layer_weights[l] * teacher_weights[t]
        expected_loss, total = expected_loss + w * one.loss, total + w
    expected_loss = expected_loss / total
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-13, atol=1e-15)
    # gradients of the combined loss are the weighted sum of the single ones' (by linearity, through autograd)
    grads = torch.autograd.grad(out.loss, hidden)
    expected = torch.autograd.grad(expected_loss, hidden)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)
    assert set(out.terms) == {f"layer{l}/teacher{t}" for l in range(2) for t in range(2)}


def test_layer_and_teacher_arguments_are_checked():
    multi = CrepaRegularizer(H, (7, 5), num_layers=2, projector_width=12, backend="reference").double()
    hidden, targets = _inputs((7, 5), layers=2)
    with pytest.raises(ValueError, match="hidden_states: this regulariser has 2 captured layers, got 1"):
        multi(hidden[0], targets)
    with pytest.raises(ValueError, match="targets: this regulariser has 2 teachers"):
        multi(hidden, targets[0])
    with pytest.raises(ValueError, match=r"targets\[1\]: expected \[B, F, N, 5\]"):
        multi(hidden, [targets[0], targets[0]])
    with pytest.raises(ValueError, match="layer_weights"):
        CrepaRegularizer(H, 7, num_layers=2, layer_weights=[1.0])
    with pytest.raises(ValueError, match="teacher_names"):
        CrepaRegularizer(H, (7, 5), teacher_names=["dino", "dino"])
    with pytest.raises(RuntimeError, match="4 projectors"):
        multi.projector
    model, _, _ = _wan()
    with pytest.raises(ValueError, match="block_index"):
        CrepaTransformer(model, multi, 0)


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant", "non_reentrant_full_recompute"])
def test_two_captured_layers_stay_correct_under_gradient_checkpointing(mode):
    def grads(checkpointing):
        torch.manual_seed(5)
        model, run, tokens = _wan()
        if checkpointing:
            model.enable_gradient_checkpointing(_checkpointing(mode))
        regularizer = CrepaRegularizer(32, (12, 9), num_layers=2, projector_width=16, backend="reference")
        wrapped = CrepaTransformer(model, regularizer, [0, 1])
        generator = torch.Generator().manual_seed(6)
        targets = [torch.randn(2, 3, tokens // 3, d, generator=generator) for d in (12, 9)]
        x, t, text = (torch.randn(2, 4, 3, 6, 10, generator=generator), torch.tensor([100.0, 700.0]),
                      torch.randn(2, 7, 32, generator=generator))
        _, alignment = wrapped(x, t, text, targets=targets, return_dict=False)
        alignment.loss.backward()
        wrapped.remove_hooks()
        return {n: p.grad for n, p in wrapped.named_parameters()}

    expected, got = grads(False), grads(True)
    reached = [n for n, g in expected.items() if n.startswith("transformer.blocks.1") and g is not None and g.any()]
    assert reached, "the second layer's alignment reached no parameter of block 1"
    for name, grad in expected.items():
        if grad is None or not grad.any():
            assert got[name] is None or not got[name].any(), name
        else:
            torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-8, msg=name)


# ----------------------------------------------------------------------------------------------- lambda = 0


def test_no_capture_and_no_loss_compute_once_lambda_is_zero(monkeypatch):
    calls = []
    real_loss = regularizer_module.per_frame_loss_on

    def counting_loss(backend, proj, target, options):
        calls.append(options.neighbors)
        return real_loss(backend, proj, target, options)

    monkeypatch.setattr(regularizer_module, "per_frame_loss_on", counting_loss)
    torch.manual_seed(7)
    model, _, tokens = _wan()
    schedule = LambdaSchedule(0.5, cutoff_step=1)
    regularizer = CrepaRegularizer(32, 12, loss_weight=schedule, projector_width=16, backend="reference")
    wrapped = CrepaTransformer(model, regularizer, 0)
    projector_calls = []
    regularizer.projector.register_forward_hook(lambda *args: projector_calls.append(1))
    recorded = []
    # runs before the capture's own hook: was the capture armed when block 0 returned?
    wrapped.capture.blocks[0].register_forward_hook(lambda *args: recorded.append(wrapped.capture._armed[0]),
                                                    prepend=True)
    targets = torch.randn(2, 3, tokens // 3, 12)
    x, t, text = torch.randn(2, 4, 3, 6, 10), torch.tensor([100.0, 700.0]), torch.randn(2, 7, 32)

    _, alignment = wrapped(x, t, text, targets=targets, return_dict=False)
    assert alignment.computed and calls == [1, 0] and projector_calls == [1]  # loss + the figures' self term
    regularizer.end_step(alignment)
    calls.clear(), projector_calls.clear()

    output, alignment = wrapped(x, t, text, targets=targets, return_dict=False)
    assert not regularizer.active and not alignment.computed
    assert calls == [] and projector_calls == []  # no kernel call, no projection
    assert wrapped.capture._states == [None] and recorded == [True, False]  # the block ran unarmed: nothing kept
    assert alignment.weight == 0.0 and alignment.logs["lambda"] == 0.0 and alignment.logs["schedule_step"] == 1.0
    # the loss is an exact zero that still reaches every projector parameter (so DDP sees them used)
    assert alignment.loss.item() == 0.0
    (output[0].square().mean() + alignment.loss).backward()
    assert all(p.grad is not None and not p.grad.any() for p in regularizer.projectors.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())
    # a direct call of the regulariser computes nothing either
    assert not regularizer(torch.randn(2, tokens, 32), targets).computed and calls == []


def test_end_step_with_gradient_accumulation_sees_every_micro_batch():
    # the EMA (decay 0: the step's similarity itself) is over all frames of all micro-batches, not the last one's
    schedule = LambdaSchedule(0.5, similarity_threshold=2.0, similarity_ema_decay=0.0)
    regularizer = CrepaRegularizer(H, 7, loss_weight=schedule, projector_width=12, backend="reference").double()
    (hidden,), (target,) = _inputs()
    mask, _ = _mask_and_weights()
    nothing = torch.zeros(B, F, dtype=torch.bool)
    micro = [regularizer(hidden[:2], target[:2], frame_mask=mask[:2]),
             regularizer(hidden[2:], target[2:], frame_mask=mask[2:]),
             regularizer(hidden[2:], target[2:], frame_mask=nothing[2:])]  # no frame: a NaN similarity, no weight
    assert [m.included_frames.item() for m in micro] == [7, 3, 0] and math.isnan(micro[2].self_similarity)
    regularizer.end_step(micro)
    whole = regularizer(hidden, target, frame_mask=mask)  # the same frames in one batch
    torch.testing.assert_close(torch.tensor(schedule.similarity_ema, dtype=torch.float64), whole.self_similarity,
                               rtol=1e-12, atol=0)
    one = LambdaSchedule(0.5, similarity_threshold=2.0, similarity_ema_decay=0.0)
    CrepaRegularizer(H, 7, loss_weight=one, projector_width=12).end_step(micro[0])  # a single alignment as before
    assert one.similarity_ema == pytest.approx(micro[0].self_similarity.item(), rel=1e-15)


# ----------------------------------------------------------------------------------------------- projectors


def test_linear_projector_is_layernorm_then_linear():
    projector = build_projector(24, 10, kind="linear")
    assert [type(layer).__name__ for layer in projector] == ["LayerNorm", "Linear"]
    assert projector[0].normalized_shape == (24,) and (projector[1].in_features, projector[1].out_features) == (24, 10)
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    projector = projector.double()
    expected = torch.nn.functional.layer_norm(x, (24,), projector[0].weight, projector[0].bias) \
        @ projector[1].weight.T + projector[1].bias
    torch.testing.assert_close(projector(x), expected)
    with pytest.raises(ValueError, match="kind"):
        build_projector(24, 10, kind="transformer")


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_checkpointed_projector_same_results_and_frees_what_the_formula_says(kind):
    torch.manual_seed(8)
    regularizer = CrepaRegularizer(H, 7, projector=kind, projector_width=12, projector_depth=4,
                                   backend="reference").double()
    (hidden,), (target,) = _inputs()
    states = hidden * 1.0  # held by the graph in both runs, like a DiT's block output
    results = {}
    for recompute in (False, True):
        regularizer.checkpoint_projector = recompute
        with SavedTensorMeter(exclude=regularizer.parameters()) as meter:
            out = regularizer(states, target)
        grads = torch.autograd.grad(out.loss, [hidden, *regularizer.parameters()], retain_graph=True)
        results[recompute] = (out.loss.detach(), grads, meter.bytes)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    for with_checkpoint, without in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(with_checkpoint, without, rtol=1e-13, atol=1e-15)
    freed = results[False][2] - results[True][2]
    assert freed == projector_activation_bytes(B * F * N, H, kind=kind, width=12, depth=4, element_size=8) > 0


# ----------------------------------------------------------------------------------------------- saving


@pytest.mark.skipif(not reset_peak_rss(), reason="no writable /proc/self/clear_refs (not Linux)")
def test_reset_peak_rss_lets_a_later_peak_be_read_on_its_own():
    def peak_kib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    high = peak_kib()
    del block
    assert reset_peak_rss()
    assert peak_kib() < high - 32 * 1024  # the freed block no longer counts in the peak


def test_projectors_and_schedule_save_and_load_round_trip(tmp_path):
    torch.manual_seed(9)

    def make():
        schedule = LambdaSchedule(0.6, shape="cosine", warmup_steps=1, decay_steps=10, similarity_threshold=0.9)
        return CrepaRegularizer(H, (7, 5), loss_weight=schedule, num_layers=2, projector="linear",
                                backend="reference")

    saved = make()
    hidden, targets = _inputs((7, 5), layers=2)
    hidden = [h.float().detach() for h in hidden]
    targets = [y.float() for y in targets]
    for _ in range(3):
        saved.end_step(saved(hidden, targets))
    path = tmp_path / "crepa.safetensors"
    save_crepa_state(path, saved)

    loaded = make()
    assert not torch.equal(loaded.projectors[0][1].weight, saved.projectors[0][1].weight)
    load_crepa_state(path, loaded)
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.schedule.state_dict() == saved.schedule.state_dict()
    assert loaded.schedule.similarity_ema is not None and loaded.loss_weight == saved.loss_weight
    torch.testing.assert_close(loaded(hidden, targets).loss, saved(hidden, targets).loss, rtol=0, atol=0)


def test_loading_into_the_wrong_shape_fails_clearly(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "crepa.safetensors"
    save_crepa_state(path, CrepaRegularizer(H, 7, projector_width=12))
    wider = CrepaRegularizer(H, 7, projector_width=16)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(ValueError, match=r"projectors\.0\.0\.bias has shape \(12,\) in the file, "
                                         r"this regulariser's is \(16,\)"):
        load_crepa_state(path, wider)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())  # nothing changed
    with pytest.raises(ValueError, match="missing .*unexpected"):
        load_crepa_state(path, CrepaRegularizer(H, 7, projector="linear"))
    with pytest.raises(ValueError, match="missing"):
        load_crepa_state(path, CrepaRegularizer(H, 7, projector_width=12, num_layers=2))

    # a file whose schedule state is not valid changes nothing either, the projectors included
    tensors = {name: torch.randn(value.shape) for name, value in wider.state_dict().items()}
    bad = tmp_path / "bad_schedule.safetensors"
    for schedule in ('{"steps_done": -1, "similarity_ema": null, "threshold_step": null}', "{not json"):
        save_file(tensors, str(bad), metadata={"format": "crepa_kernels.training.state/1", "schedule": schedule})
        with pytest.raises(ValueError, match="schedule state in the file's metadata is not valid"):
            load_crepa_state(bad, wider)
        assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())
    other = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a CREPA regulariser state"):
        load_crepa_state(other, wider)


# ----------------------------------------------------------------------------------------------- the trainer

FEATURES = dataclasses.replace(
    trainer.TrainConfig(steps=5, global_batch=2, pixel_frames=9, height=32, width=48, projector_width=32),
    align_blocks="0,1", condition_frames=1, schedule="cosine", warmup_steps=2, decay_steps=4, final_weight=0.1,
    cutoff_step=4, sample_weighting="sigmoid", neighbors=2, neighbor_mode="cumulative",
)


def test_trainer_lockstep_with_schedule_frame_mask_and_two_layers():
    reason = available_backends("cpu")["cpu"]
    backend = "cpu" if reason is True else "reference"
    reference = trainer.train(FEATURES, "reference")
    fused = trainer.train(FEATURES, backend)
    report = trainer.compare(reference, fused, trainer.TOLERANCES[torch.float32])
    assert all(entry["ok"] for entry in report.values()), report
    schedule = trainer.build_schedule(FEATURES)
    assert [r["lambda"] for r in fused.records] == [schedule.value_at(s) for s in range(5)]
    # the warm-up starts at 0, as upstream: step 0 computes nothing
    assert [r["lambda"] for r in fused.records][:3] == [0.0, 0.25, 0.5] and fused.records[4]["lambda"] == 0.0
    assert fused.records[0]["align_loss"] is None
    for record in fused.records[1:4]:
        assert all(math.isfinite(record[k]) for k in ("align_loss", "align_loss/block0/teacher0",
                                                       "align_loss/block1/teacher0", "self_similarity"))
    assert fused.records[4]["align_loss"] is None and fused.records[4]["projector_grad_norm"] == 0.0
    assert any(name.startswith("regularizer.projectors.1.") for name in fused.params)
    # the step without alignment holds less for backward: no projector activations, no captured-state copies
    assert fused.records[4]["saved_mib"] < fused.records[3]["saved_mib"]



@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # diffusers RMSNorm under autocast
def test_trainer_lockstep_with_all_features_under_bf16_autocast_and_projector_checkpointing():
    reason = available_backends("cpu")["cpu"]
    backend = "cpu" if reason is True else "reference"
    config = dataclasses.replace(FEATURES, precision="bf16", checkpoint_projector=True, projector="linear",
                                 share_projector=True)
    reference, fused = trainer.train(config, "reference"), trainer.train(config, backend)
    report = trainer.compare(reference, fused, trainer.TOLERANCES[torch.bfloat16])
    assert all(entry["ok"] for entry in report.values()), report
    assert fused.records[4]["align_loss"] is None and math.isfinite(fused.records[3]["align_loss"])
    assert not any(name.startswith("regularizer.projectors.1.") for name in fused.params)  # one shared projector

def test_trainer_computes_no_targets_once_lambda_is_zero(monkeypatch):
    # the encoder forward (or the cache read) is alignment work too: none of it once the schedule has cut lambda off
    calls = []
    real_source = trainer.target_source

    def counting_source(*args):
        source = real_source(*args)

        def targets_of(video, grid, ids):
            calls.append(len(ids))
            return source(video, grid, ids)

        targets_of.feature_dim = source.feature_dim
        return targets_of

    monkeypatch.setattr(trainer, "target_source", counting_source)
    config = dataclasses.replace(FEATURES, steps=3, cutoff_step=1, warmup_steps=0)
    run = trainer.train(config, "reference")
    assert calls == [config.global_batch]  # step 0 only
    assert [r["lambda"] for r in run.records][1:] == [0.0, 0.0] and run.records[0]["align_loss"] is not None
    model = trainer.build_model(config, "reference", torch.device("cpu"), config.encoder_dim)
    with pytest.raises(ValueError, match="targets: lambda > 0"):
        model(torch.randn(2, 4, 3, 4, 6), torch.tensor([1.0, 2.0]), torch.randn(2, 7, 32), targets=None,
              return_dict=False)
    model.remove_hooks()


def test_trainer_measures_what_projector_checkpointing_frees():
    config = dataclasses.replace(FEATURES, steps=1, sample_weighting="none", condition_frames=0, warmup_steps=0)
    plain = trainer.train(config, "reference")
    recomputed = trainer.train(dataclasses.replace(config, checkpoint_projector=True), "reference")
    report = trainer.compare(plain, recomputed, trainer.TOLERANCES[torch.float32])
    assert all(entry["ok"] for entry in report.values()), report
    tokens = config.global_batch * 3 * 6  # per video 3 latent frames of 4x6 latents in 2x2 patches
    freed = (plain.records[0]["saved_mib"] - recomputed.records[0]["saved_mib"]) * 2**20
    assert freed == 2 * projector_activation_bytes(tokens, 32, width=32)  # two layers, fp32


def test_trainer_command_line_saves_a_loadable_state(tmp_path):
    path = tmp_path / "crepa.safetensors"
    flags = ["--no-lockstep", "--backend", "reference", "--device", "cpu", "--steps", "3", "--global-batch", "2",
             "--pixel-frames", "9", "--height", "32", "--width", "48", "--projector-width", "32",
             "--align-blocks", "0,1", "--projector", "linear", "--similarity-threshold", "-1.0",
             "--similarity-ema-decay", "0.5", "--save-crepa-state", str(path)]
    assert trainer.main(flags) == 0
    config = dataclasses.replace(trainer.TrainConfig(steps=3, projector_width=32, projector="linear",
                                                     align_blocks="0,1", similarity_threshold=-1.0))
    model = trainer.build_model(config, "reference", torch.device("cpu"), config.encoder_dim)
    load_crepa_state(path, model.regularizer)
    # any similarity passes -1: the EMA cut lambda off after the first step, and the state says so
    assert model.regularizer.schedule.state_dict()["threshold_step"] == 0
    assert model.regularizer.schedule.steps_done == 3 and not model.regularizer.active
    model.remove_hooks()



@pytest.mark.parametrize("options", [dict(neighbors=1, tau=0.7), dict(neighbors=2, neighbor_mode="cumulative",
                                                                      normalize_weights=True)], ids=str)
def test_masked_neighbor_similarity_is_over_the_included_frames(options):
    """The neighbour figure under a frame mask: the w-weighted mean of cos(p_f, y_k) over the pairs of included
    frames f and their neighbours k (issue 16: a figure that counted masked frames survived a mutation run)."""
    torch.manual_seed(4)
    regularizer = CrepaRegularizer(H, 7, projector_width=12, backend="reference", **options).double()
    (hidden,), (target,) = _inputs()
    mask, _ = _mask_and_weights()
    out = regularizer(hidden, target, frame_mask=mask)
    proj = regularizer.projector(hidden).unflatten(1, (F, N))
    cos = torch.nn.functional.cosine_similarity(proj[:, :, None], target[:, None], dim=-1).mean(-1)  # [B, f, k]
    spec = regularizer.options
    pairs = [(f, f + o, spec.weight(o)) for f in range(F) for o in spec.offsets(F) if 0 <= f + o < F]
    total = sum(w * cos[b, f, k] for b in range(B) for f, k, w in pairs if mask[b, f])
    weight = sum(w for b in range(B) for f, k, w in pairs if mask[b, f])
    torch.testing.assert_close(out.neighbor_similarity, (total / weight).detach(), rtol=1e-12, atol=1e-14)


def test_frame_sum_with_a_fully_masked_video():
    """"frame_sum" divides by the videos that have an included frame: a fully masked video adds nothing to the
    numerator and must not add to the denominator either (issue 16's mutation run)."""
    per_frame = torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    mask = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4])
    weights = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    expected = (per_frame * mask * weights[:, None]).sum() / 2
    torch.testing.assert_close(reduce_weighted(per_frame, "frame_sum", weights, mask), expected, rtol=1e-15, atol=0)
