"""crepa_kernels.training inside real diffusers video transformers, and the lockstep / DDP trainer
examples/train_dit.py on tiny configurations (CPU)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crepa_kernels import available_backends, cross_frame_align_loss
from crepa_kernels.spec import LossOptions
from crepa_kernels.training import (
    CrepaRegularizer,
    CrepaTransformer,
    HiddenStateCapture,
    build_projector,
    dit_token_grid,
    encoder_features_to_tokens,
    find_blocks,
    flow_matching_loss,
    group_frames,
    latent_frame_count,
    pool_frames,
    rectified_flow_pair,
    resize_frames,
)

diffusers = pytest.importorskip("diffusers")

TRAINER_PATH = Path(__file__).resolve().parents[1] / "examples" / "train_dit.py"


def _load_trainer():
    sys.path.insert(0, str(TRAINER_PATH.parent))  # the trainer imports its helpers from next to it
    spec = importlib.util.spec_from_file_location("train_dit", TRAINER_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


trainer = _load_trainer()


# ----------------------------------------------------------------------------------------------- projector


def test_projector_is_repa_mlp():
    projector = build_projector(24, 10, width=40, depth=3)
    kinds = [type(layer).__name__ for layer in projector]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [(layer.in_features, layer.out_features) for layer in projector[::2]] == [(24, 40), (40, 40), (40, 10)]
    assert projector(torch.randn(2, 3, 5, 24)).shape == (2, 3, 5, 10)
    assert len(build_projector(24, 10, depth=1)) == 1
    with pytest.raises(ValueError):
        build_projector(24, 10, depth=0)


# ----------------------------------------------------------------------------------------------- token grid


def test_temporal_pooling_takes_frame_zero_alone_then_groups_of_r():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 9, 3, 4, 5, generator=generator, dtype=torch.float64)  # F_pix = 9, r = 4
    mean = pool_frames(features, 4, "mean")
    subsample = pool_frames(features, 4, "subsample")
    assert mean.shape == subsample.shape == (2, 3, 3, 4, 5)
    groups = [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    for latent, pixels in enumerate(groups):
        expected = sum(features[:, p] for p in pixels) / len(pixels)
        torch.testing.assert_close(mean[:, latent], expected, rtol=1e-14, atol=0)
        assert torch.equal(subsample[:, latent], features[:, pixels[-1]])
    assert not torch.allclose(mean, subsample)
    assert torch.equal(pool_frames(features[:, :1], 4), features[:, :1])  # a single frame is its own latent
    assert torch.equal(pool_frames(features, 1), features)
    assert latent_frame_count(17, 4) == 5 and latent_frame_count(49, 4) == 13 and latent_frame_count(1, 8) == 1
    for bad in (8, 10, 0):
        with pytest.raises(ValueError):
            latent_frame_count(bad, 4)
    with pytest.raises(ValueError):
        pool_frames(features, 4, "median")


@pytest.mark.parametrize("patch", [2, 3])
def test_temporal_patch_groups_latent_frames_in_both_modes(patch):
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 2 * patch, 3, 4, 5, generator=generator, dtype=torch.float64)  # two groups of p_t
    mean = group_frames(latents, patch, "mean")
    subsample = group_frames(latents, patch, "subsample")
    assert mean.shape == subsample.shape == (2, 2, 3, 4, 5)
    for group in range(2):
        members = latents[:, group * patch:(group + 1) * patch]
        torch.testing.assert_close(mean[:, group], members.mean(dim=1), rtol=1e-14, atol=0)
        assert torch.equal(subsample[:, group], members[:, -1])  # the last frame, as pool_frames takes
    # through the whole mapping: 13 pixel frames, r = 4 -> latent frames 0, 4, 8, 12 (subsample) -> p_t = 2
    pixels = torch.randn(1, 13, 4, 4, 6, generator=generator)
    tokens = encoder_features_to_tokens(pixels, (2, 4, 4), temporal_ratio=4, temporal_patch=2,
                                        temporal_mode="subsample")
    assert torch.equal(tokens, pixels[:, [4, 12]].flatten(2, 3))
    assert torch.equal(group_frames(latents, 1, "subsample"), latents)
    with pytest.raises(ValueError):
        group_frames(latents, 2 * patch - 1, "subsample")  # does not divide the 2 * patch latent frames


def _resampling_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Independent 1-D linear resampling with half-pixel centres: a triangle filter as wide as the input pixels
    per output pixel when shrinking (antialiasing), one pixel when growing (plain linear, edges clamped)."""
    scale = size_in / size_out
    support = max(scale, 1.0)
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        centre = (i + 0.5) * scale - 0.5
        for j in range(size_in):
            weights[i, j] = max(0.0, 1.0 - abs(j - centre) / support)
        weights[i] /= weights[i].sum()
    return weights


@pytest.mark.parametrize("source, size", [((3, 5), (4, 7)), ((6, 10), (3, 5)), ((4, 4), (3, 5))])
def test_spatial_mapping_is_bilinear_per_frame_on_non_square_grids(source, size):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, *source, 6, generator=generator, dtype=torch.float64)  # [B, F, h, w, D]
    resized = resize_frames(features, size)
    rows, cols = _resampling_matrix(source[0], size[0]), _resampling_matrix(source[1], size[1])
    expected = np.einsum("yh,xw,bfhwd->bfyxd", rows, cols, features.numpy())
    np.testing.assert_allclose(resized.numpy(), expected, rtol=1e-12, atol=1e-12)

    # interpolating the flattened h*w token sequence in 1-D mixes rows: a different (wrong) answer
    flat = features.flatten(2, 3).permute(0, 1, 3, 2).flatten(0, 1)  # [B*F, D, h*w]
    one_d = F.interpolate(flat, size=size[0] * size[1], mode="linear", align_corners=False)
    one_d = one_d.unflatten(0, (2, 3)).permute(0, 1, 3, 2).unflatten(2, size)
    assert (one_d - resized).abs().max() > 0.1


def test_encoder_features_land_on_the_dit_token_grid_frame_major():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 9, 4, 4, 6, generator=generator)  # 9 pixel frames on a 4x4 encoder grid
    grid = dit_token_grid((3, 4, 10), (1, 2, 2))
    assert grid == (3, 2, 5)
    for mode in ("mean", "subsample"):
        tokens = encoder_features_to_tokens(features, grid, temporal_ratio=4, temporal_mode=mode)
        frames = resize_frames(pool_frames(features, 4, mode), (2, 5))
        assert tokens.shape == (2, 3, 10, 6)
        for f, y, x in [(0, 0, 0), (1, 1, 3), (2, 0, 4), (2, 1, 1)]:
            assert torch.equal(tokens[:, f, y * 5 + x], frames[:, f, y, x])
    # a temporal patch of 2 (CogVideoX 1.5) groups latent frames once more
    features = torch.randn(1, 13, 4, 4, 6, generator=generator)  # 4 latent frames -> 2 token frames
    tokens = encoder_features_to_tokens(features, (2, 4, 4), temporal_ratio=4, temporal_patch=2)
    latents = pool_frames(features, 4)
    torch.testing.assert_close(tokens[:, 1], ((latents[:, 2] + latents[:, 3]) / 2).flatten(1, 2))
    with pytest.raises(ValueError):
        encoder_features_to_tokens(features, (3, 4, 4), temporal_ratio=4)
    with pytest.raises(ValueError):
        dit_token_grid((3, 5, 10), (1, 2, 2))


# ----------------------------------------------------------------------------------------------- capture


def _wan():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=64)
    x = torch.randn(2, 4, 3, 6, 10)
    return model, lambda: model(x, torch.tensor([100.0, 700.0]), torch.randn(2, 7, 32), return_dict=False)[0], 45


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=16, text_embed_dim=16, num_layers=2, sample_width=8,
                                        sample_height=6, sample_frames=9, max_text_seq_length=5)
    x = torch.randn(2, 3, 4, 6, 8)  # [B, F, C, H, W]
    text = torch.randn(2, 5, 16)
    return model, lambda: model(x, text, torch.tensor([10, 500]), return_dict=False)[0], 36


def _hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                                           text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
                                           guidance_embeds=False)
    x, text, mask, pooled = torch.randn(2, 4, 3, 6, 8), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool), \
        torch.randn(2, 8)
    return model, lambda: model(x, torch.tensor([10, 500]), text, mask, pooled, return_dict=False)[0], 36


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                       cross_attention_dim=16, num_layers=2, caption_channels=16)
    x, text, mask = torch.randn(2, 3 * 6 * 8, 4), torch.randn(2, 5, 16), torch.ones(2, 5)
    return model, lambda: model(x, text, torch.tensor([10, 500]), mask, num_frames=3, height=6, width=8,
                                return_dict=False)[0], 144


# (factory, block list attribute, block index): tuple-returning blocks in CogVideoX and HunyuanVideo
MODELS = {
    "wan": (_wan, None, 0),
    "cogvideox": (_cogvideox, None, 1),
    "hunyuan_video_dual": (_hunyuan_video, None, 0),
    "hunyuan_video_single": (_hunyuan_video, "single_transformer_blocks", 0),
    "ltx": (_ltx, None, -1),
}


def _checkpointing(mode: str):
    if mode == "non_reentrant":
        return None  # diffusers' default: torch.utils.checkpoint.checkpoint(..., use_reentrant=False)
    if mode == "non_reentrant_full_recompute":
        return lambda module, *args: checkpoint(module.__call__, *args, use_reentrant=False, early_stop=False)
    assert mode == "reentrant"
    return lambda module, *args: checkpoint(module.__call__, *args, use_reentrant=True)


def _alignment_grads(name: str, mode: str):
    """Gradients of every transformer parameter from the alignment loss alone."""
    factory, blocks, index = MODELS[name]
    torch.manual_seed(0)
    model, run, tokens = factory()
    if mode != "off":
        model.enable_gradient_checkpointing(_checkpointing(mode))
    hidden = find_blocks(model, blocks)[index]
    hidden_dim = model.config.num_attention_heads * model.config.attention_head_dim
    regularizer = CrepaRegularizer(hidden_dim, 12, projector_width=16, neighbors=1, backend="reference")
    targets = torch.randn(2, 3, tokens // 3, 12, generator=torch.Generator().manual_seed(1))
    with HiddenStateCapture(model, index, blocks=blocks) as capture:
        run()
        states = capture.pop()
        assert states.shape == (2, tokens, hidden_dim)
        regularizer(states, targets).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, hidden


@pytest.mark.parametrize("name", MODELS)
def test_alignment_gradients_reach_the_transformer_and_match_without_checkpointing(name):
    expected, block = _alignment_grads(name, "off")
    block_names = [n for n, g in expected.items() if g is not None and g.abs().sum() > 0]
    assert block_names, "the alignment loss reached no transformer parameter"
    assert any(g is not None and g.abs().sum() > 0 for g in (p.grad for p in block.parameters()))
    for mode in ("non_reentrant", "reentrant", "non_reentrant_full_recompute"):
        grads, _ = _alignment_grads(name, mode)
        for parameter, grad in grads.items():
            if expected[parameter] is None or not expected[parameter].any():
                assert grad is None or not grad.any(), f"{mode}: {parameter} got a gradient it should not have"
            else:
                torch.testing.assert_close(grad, expected[parameter], rtol=1e-5, atol=1e-8,
                                           msg=f"{name} {mode} {parameter}")


def test_plain_hook_is_overwritten_by_recomputation_but_the_capture_is_not():
    model, run, _ = _wan()
    model.enable_gradient_checkpointing(_checkpointing("non_reentrant_full_recompute"))
    plain = {}
    handle = model.blocks[0].register_forward_hook(lambda module, args, output: plain.__setitem__("h", output))
    try:
        with HiddenStateCapture(model, 0) as capture:
            output = run()
            in_graph = capture.hidden_states
            assert plain["h"] is in_graph
            (output.square().mean() + in_graph.square().mean()).backward()
            assert plain["h"] is not in_graph  # the recomputation in backward re-ran the hook
            assert capture.hidden_states is in_graph
    finally:
        handle.remove()


def test_reentrant_checkpointing_hides_the_graph_from_a_hook_but_not_from_the_capture():
    model, run, _ = _wan()
    model.enable_gradient_checkpointing(_checkpointing("reentrant"))
    seen_in_hook = []
    handle = model.blocks[0].register_forward_hook(lambda m, a, output: seen_in_hook.append(output.requires_grad))
    try:
        with HiddenStateCapture(model, 0) as capture:
            run()
            assert seen_in_hook == [False]  # work done inside a hook would be cut off from the graph
            assert type(capture.hidden_states.grad_fn).__name__ == "CheckpointFunctionBackward"
    finally:
        handle.remove()


def test_capture_reports_a_checkpoint_function_that_cuts_the_graph():
    model, run, _ = _wan()
    model.enable_gradient_checkpointing(lambda module, *args: torch.no_grad()(module)(*args))
    with HiddenStateCapture(model, 0) as capture:
        run()
        with pytest.raises(RuntimeError, match="cut off from the autograd graph"):
            capture.pop()
        with torch.no_grad():  # no gradient expected: fine
            run()
        assert not capture.pop().requires_grad


def test_capture_ignores_a_whole_model_recomputation():
    model, run, _ = _wan()
    with HiddenStateCapture(model, 1) as capture:
        output = checkpoint(run, use_reentrant=False, early_stop=False)
        in_graph = capture.hidden_states
        output.square().mean().backward()  # re-runs the whole transformer forward inside backward
        assert capture.hidden_states is in_graph


def test_capture_is_the_next_blocks_input_and_removes_cleanly():
    model, run, _ = _wan()
    hook_counts = (len(model._forward_pre_hooks), len(model._forward_hooks), len(model.blocks[0]._forward_hooks))
    next_input = []
    handle = model.blocks[1].register_forward_pre_hook(lambda module, args: next_input.append(args[0]))
    capture = HiddenStateCapture(model, 0)
    run()
    handle.remove()
    assert capture.hidden_states is next_input[0]
    assert capture.pop() is next_input[0]
    with pytest.raises(RuntimeError, match="no hidden states"):
        capture.pop()
    capture.remove()
    capture.remove()  # idempotent
    assert (len(model._forward_pre_hooks), len(model._forward_hooks), len(model.blocks[0]._forward_hooks)) \
        == hook_counts
    run()
    with pytest.raises(RuntimeError):
        capture.hidden_states
    with HiddenStateCapture(model, -1) as capture:
        assert capture.block is model.blocks[1]
    assert len(model.blocks[1]._forward_hooks) == 0
    with pytest.raises(IndexError):
        HiddenStateCapture(model, 2)
    with pytest.raises(ValueError, match="nn.ModuleList"):
        HiddenStateCapture(model, 0, blocks="transformer_blocks")


# ----------------------------------------------------------------------------------------------- regulariser


@pytest.mark.parametrize("options", [
    dict(neighbors=1, neighbor_mode="adjacent", tau=0.7),
    dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True, tau=1.3),
    dict(neighbors=2, neighbor_mode="adjacent", normalize_weights=True, reduction="frame_sum"),
    dict(neighbors=9, neighbor_mode="cumulative", tau=2.0),
    dict(neighbors=0),
])
def test_regularizer_loss_and_figures_against_direct_computation(options):
    torch.manual_seed(3)
    regularizer = CrepaRegularizer(10, 7, loss_weight=0.3, projector_width=20, backend="reference", **options).double()
    batch, frames, tokens = 2, 5, 6
    hidden = torch.randn(batch, frames * tokens, 10, dtype=torch.float64)
    target = torch.randn(batch, frames, tokens, 7, dtype=torch.float64)
    out = regularizer(hidden, target)

    proj = regularizer.projector(hidden).unflatten(1, (frames, tokens))
    torch.testing.assert_close(out.projected, proj)
    expected_loss = cross_frame_align_loss(proj, target, backend="reference", **options)
    torch.testing.assert_close(out.align_loss, expected_loss.detach())
    torch.testing.assert_close(out.loss, 0.3 * expected_loss)
    assert out.loss.requires_grad and not out.align_loss.requires_grad

    cos = torch.einsum("bfnd,bknd->bfk", F.normalize(proj, dim=-1), F.normalize(target, dim=-1)) / tokens
    torch.testing.assert_close(out.self_similarity, cos.diagonal(dim1=1, dim2=2).mean())
    spec = LossOptions(**{k: v for k, v in options.items() if k != "reduction"})
    pairs = [(f, f + o, spec.weight(o)) for f in range(frames) for o in spec.offsets(frames) if 0 <= f + o < frames]
    if not pairs:
        assert out.neighbor_similarity is None
        return
    weighted = sum(w * cos[:, f, k].mean() for f, k, w in pairs) / sum(w for _, _, w in pairs)
    torch.testing.assert_close(out.neighbor_similarity, weighted, rtol=1e-10, atol=1e-12)
    assert not out.self_similarity.requires_grad and not out.neighbor_similarity.requires_grad


# ----------------------------------------------------------------------------------------------- model wrapper


def test_crepa_transformer_equals_capture_plus_regularizer():
    torch.manual_seed(4)
    model, run, tokens = _wan()
    regularizer = CrepaRegularizer(32, 12, projector_width=16, backend="reference")
    targets = torch.randn(2, 3, tokens // 3, 12, dtype=torch.float32)
    x, t, text = torch.randn(2, 4, 3, 6, 10), torch.tensor([100.0, 700.0]), torch.randn(2, 7, 32)
    with HiddenStateCapture(model, 1) as capture:
        expected_prediction = model(x, t, text, return_dict=False)[0]
        expected = regularizer(capture.pop(), targets)
    wrapped = CrepaTransformer(model, regularizer, 1)
    output, alignment = wrapped(x, t, text, targets=targets, return_dict=False)
    assert torch.equal(output[0], expected_prediction)
    assert torch.equal(alignment.loss, expected.loss) and torch.equal(alignment.projected, expected.projected)
    wrapped.remove_hooks()
    assert len(model.blocks[1]._forward_hooks) == 0 and len(model._forward_pre_hooks) == 0


def test_rectified_flow_pair_and_loss():
    generator = torch.Generator().manual_seed(5)
    latents, noise = torch.randn(3, 2, 5, 4, 6, generator=generator, dtype=torch.float64), \
        torch.randn(3, 2, 5, 4, 6, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.0, 0.37, 1.0], dtype=torch.float64)
    noisy, velocity = rectified_flow_pair(latents, noise, t)
    for i in range(3):
        torch.testing.assert_close(noisy[i], (1 - t[i]) * latents[i] + t[i] * noise[i], rtol=1e-15, atol=1e-15)
    assert torch.equal(velocity, noise - latents)
    prediction = velocity + 0.1
    assert flow_matching_loss(prediction.half(), velocity.half()).dtype == torch.float32
    torch.testing.assert_close(flow_matching_loss(prediction, velocity), torch.tensor(0.01, dtype=torch.float64))
    with pytest.raises(ValueError, match="t:"):
        rectified_flow_pair(latents, noise, t[:2])
    with pytest.raises(ValueError, match="noise:"):
        rectified_flow_pair(latents, noise[:2], t)


# ----------------------------------------------------------------------------------------------- trainer

SMALL = trainer.TrainConfig(steps=3, global_batch=2, pixel_frames=9, height=32, width=48, projector_width=32,
                            neighbors=1)
FP32 = trainer.TOLERANCES[torch.float32]


@pytest.fixture(scope="module")
def reference_run():
    return trainer.train(SMALL, "reference")


def _assert_within_tolerance(report):
    failures = {metric: entry for metric, entry in report.items() if not entry["ok"]}
    assert not failures, failures


def test_lockstep_fused_cpu_backend_matches_reference(reference_run):
    reason = available_backends("cpu")["cpu"]
    if reason is not True:
        pytest.skip(f"cpu backend unavailable: {reason}")
    fused = trainer.train(SMALL, "cpu")
    assert fused.backend == "crepa_kernels.ops.native"
    assert reference_run.backend == "crepa_kernels.ops.reference"
    for record in fused.records:
        assert all(math.isfinite(record[k]) for k in ("loss", "align_loss", "grad_norm", "projector_grad_norm",
                                                      "self_similarity", "neighbor_similarity"))
    _assert_within_tolerance(trainer.compare(reference_run, fused, FP32))


def test_lockstep_fused_cuda_emulated_backend_matches_reference(reference_run):
    """The CUDA kernels (run on the CPU through the HIP CPU Runtime) inside the trainer, in lockstep with the
    reference: examples/train_dit.py --backend cuda_emulated."""
    reason = available_backends("cpu")["cuda_emulated"]
    if reason is not True:
        pytest.skip(f"cuda_emulated backend unavailable: {reason}")
    fused = trainer.train(SMALL, "cuda_emulated")
    assert fused.backend == "crepa_kernels.ops.cuda_emulated"
    for record in fused.records:
        assert all(math.isfinite(record[k]) for k in ("loss", "align_loss", "grad_norm", "projector_grad_norm"))
    _assert_within_tolerance(trainer.compare(reference_run, fused, FP32))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # diffusers RMSNorm under autocast
def test_lockstep_under_bf16_autocast():
    reason = available_backends("cpu")["cpu"]
    if reason is not True:  # comparing the reference with itself could not fail
        pytest.skip(f"cpu backend unavailable: {reason}")
    config = dataclasses.replace(SMALL, precision="bf16")
    report = trainer.compare(trainer.train(config, "reference"), trainer.train(config, "cpu"),
                             trainer.TOLERANCES[torch.bfloat16])
    _assert_within_tolerance(report)


def test_lockstep_detects_a_slightly_wrong_loss(reference_run):
    # exp(-1/tau) moves by 0.1%: far below any visible change in training, far above rounding
    wrong = trainer.train(dataclasses.replace(SMALL, tau=1.001), "reference")
    report = trainer.compare(reference_run, wrong, FP32)
    assert not report["align_loss"]["ok"] and not report["projector_grad_norm"]["ok"]
    nan_run = dataclasses.replace(wrong, records=[dict(r, loss=float("nan")) for r in reference_run.records],
                                  params=reference_run.params)
    assert not trainer.compare(reference_run, nan_run, FP32)["loss"]["ok"]


def test_gradient_checkpointing_run_matches_plain_run(reference_run):
    checkpointed = trainer.train(dataclasses.replace(SMALL, gradient_checkpointing=True), "reference")
    report = trainer.compare(reference_run, checkpointed, FP32)
    _assert_within_tolerance(report)
    assert report["projector_grad_norm"]["max_rel_diff"] < 1e-6


def test_diagnostics_records(tmp_path):
    pytest.importorskip("crepa_kernels.diagnostics")
    path = tmp_path / "diagnostics.jsonl"
    config = dataclasses.replace(SMALL, steps=3, neighbors=2, diagnostics_every=2, diagnostics_json=str(path))
    run = trainer.train(config, "reference")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    for record in records:
        assert set(record) == {"step", "neighbors", "cknna", "cross_frame_similarity", "smoothness_proj",
                               "smoothness_target", "align_loss"}
        assert record["neighbors"] == 2
        similarity = np.array(record["cross_frame_similarity"])
        assert similarity.shape == (3, 3) and np.isfinite(similarity).all()
        assert all(math.isfinite(record[k]) for k in ("cknna", "smoothness_proj", "smoothness_target"))
        assert record["align_loss"] == run.records[record["step"]]["align_loss"]


def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun with 2 gloo processes against one process on the same global batch, through the command line."""
    flags = ["--no-lockstep", "--backend", "reference", "--device", "cpu", "--steps", "2", "--global-batch", "4",
             "--pixel-frames", "9", "--height", "32", "--width", "48", "--projector-width", "32", "--neighbors", "2"]
    one = tmp_path / "one.json"
    assert trainer.main([*flags, "--output", str(one), "--save-params", str(tmp_path / "one.pt")]) == 0

    two = tmp_path / "two.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CREPA_KERNELS_BACKEND", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(TRAINER_PATH), *flags, "--output", str(two), "--save-params", str(tmp_path / "two.pt"),
               "--compare-with", str(one)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads(two.read_text())
    assert summary["world_size"] == 2
    _assert_within_tolerance(summary["comparisons"]["compare_with"])

    # the same comparison, recomputed here from the saved files
    _, single = trainer.load_run(str(one))
    _, distributed = trainer.load_run(str(two))
    assert len(distributed.records) == 2 and distributed.params.keys() == single.params.keys()
    _assert_within_tolerance(trainer.compare(single, distributed, trainer.DISTRIBUTED_TOLERANCES[torch.float32]))


# ----------------------------------------------------------------------------------------------- synthetic data


def test_stand_in_encoder_is_frame_wise_and_its_flicker_follows_content():
    """The premise of the REPA*/CREPA figure: the flicker is a function of what a frame shows, not of its index."""
    config = trainer.TrainConfig()
    encoder = trainer.FrozenPatchEncoder(config, torch.Generator().manual_seed(0))
    video = trainer.synthetic_batch(config, step=0, videos=2)["video"]
    order = torch.randperm(video.shape[2], generator=torch.Generator().manual_seed(1))
    features = encoder(video)
    torch.testing.assert_close(encoder(video[:, :, order]), features[:, order])
    # a brightness change of 1/gain moves the features far more than it would without the flicker (0.67 vs 0.10)
    brighter = encoder(video + 1.0 / config.encoder_flicker_gain)
    change = (brighter - features).norm(dim=-1).mean() / features.norm(dim=-1).mean()
    assert change > 0.4


def test_diagnostics_batch_is_fixed_and_never_a_training_batch():
    config = trainer.TrainConfig()
    first, second = trainer.diagnostics_batch(config), trainer.diagnostics_batch(config)
    torch.testing.assert_close(first["video"], second["video"])
    assert (first["t"] == config.diagnostics_t).all()
    for step in range(3):
        training = trainer.synthetic_batch(config, step, videos=first["video"].shape[0])
        assert not torch.allclose(training["video"], first["video"])


def test_capture_keeps_the_first_call_of_a_block_called_twice_in_one_forward():
    """A block run twice in one forward (weight sharing): the capture is its first output, as documented; later
    calls in the same forward are ignored like the recomputations in backward."""

    class SharedBlockModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

        def forward(self, x):
            return self.blocks[0](self.blocks[0](x))

    torch.manual_seed(0)
    model = SharedBlockModel()
    x = torch.randn(2, 3, 4)
    with HiddenStateCapture(model, index=0) as capture:
        model(x)
        torch.testing.assert_close(capture.pop(), model.blocks[0](x), rtol=0, atol=0)


@pytest.mark.parametrize("flag, expected", [("gaussian", "gaussian"), ("0.5,0.25", (0.5, 0.25))])
def test_train_dit_neighbor_weights_reach_the_regularizer(flag, expected):
    """--neighbor-weights: a weighting's name, or w[1..d] as comma-separated numbers, in the regulariser's options."""
    config, _ = trainer._parse(["--neighbors", "2", "--neighbor-weights", flag])
    model = trainer.build_model(config, "reference", torch.device("cpu"), encoder_dim=12)
    assert model.regularizer.options.weights == expected


def test_train_dit_bad_neighbor_weights_are_refused():
    with pytest.raises(ValueError, match="--neighbor-weights: expected one of"):
        trainer.neighbor_weights("laplace")
