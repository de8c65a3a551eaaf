"""Encoder adapters (crepa_kernels.training.encoders) on small random transformers DINOv2, DINOv3 and V-JEPA 2
models: shapes on non-square grids, prefix tokens dropped, chunking, and agreement with a hand-written
preprocessing + forward. Nothing is downloaded."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from crepa_kernels.training.encoders import (  # noqa: E402
    ImageEncoderAdapter,
    VideoEncoderAdapter,
    adapter_for,
    from_pretrained,
    random_encoder,
)

IMAGE_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")
ALL_TYPES = (*IMAGE_TYPES, "vjepa2")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's, written out here on purpose
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _video(batch=2, frames=9, height=40, width=72, seed=0):
    """[B, 3, F, H, W] in [0, 1], a non-square frame size."""
    return torch.rand(batch, 3, frames, height, width, generator=torch.Generator().manual_seed(seed))


def _latent_pool(features, ratio):
    """Hand-written causal-VAE time mapping: frame 0 alone, then means of groups of ``ratio``."""
    groups = [features[:, :1]] + [features[:, 1 + i:1 + i + ratio].mean(1, keepdim=True)
                                  for i in range(0, features.shape[1] - 1, ratio)]
    return torch.cat(groups, 1)


def _to_grid(features, height, width):
    """[B, F, h, w, D] -> [B, F, height * width, D], each frame's map resized bilinearly in 2-D."""
    b, f, h, w, d = features.shape
    maps = features.permute(0, 1, 4, 2, 3).reshape(b * f, d, h, w)
    maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return maps.reshape(b, f, d, height * width).transpose(2, 3)


def test_token_counts_of_the_small_configs():
    """The layouts the adapters rely on: DINOv2 patch 14 on 56x84 -> CLS + 24; DINOv3 patch 16 with 4 registers on
    64x96 -> CLS + 4 + 24; V-JEPA 2 tubelets of 2 frames, no CLS."""
    with torch.no_grad():
        assert random_encoder("dinov2")(torch.randn(1, 3, 56, 84)).last_hidden_state.shape[1] == 1 + 24
        assert random_encoder("dinov3_vit")(torch.randn(1, 3, 64, 96)).last_hidden_state.shape[1] == 1 + 4 + 24
        vjepa = random_encoder("vjepa2")(pixel_values_videos=torch.randn(1, 6, 3, 32, 32), skip_predictor=True)
        assert vjepa.last_hidden_state.shape[1] == 3 * 2 * 2


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_shapes_on_non_square_grids(model_type):
    adapter = adapter_for(random_encoder(model_type), temporal_ratio=4)
    video = _video(frames=9, height=40, width=72)
    features = adapter.encode(video)
    if model_type == "vjepa2":
        assert isinstance(adapter, VideoEncoderAdapter)
        assert features.shape == (2, 5, 2, 2, 32)  # (1 pad + 9) / 2 tubelets on its square 32x32 input
    else:
        assert isinstance(adapter, ImageEncoderAdapter)
        patch = adapter.patch_size[0]
        shorter = adapter.model.config.image_size  # default resolution: the config's image size as shorter side
        expected = (shorter // patch, round(72 * shorter / 40 / patch))
        assert adapter.input_size(40, 72) == (expected[0] * patch, expected[1] * patch)
        assert features.shape == (2, 9, *expected, 32)
    for grid in [(3, 5, 9), (3, 3, 7), (3, 1, 2)]:
        targets = adapter(video, grid)
        assert targets.shape == (2, grid[0], grid[1] * grid[2], 32) and targets.dtype == torch.float32
        assert torch.isfinite(targets).all()
    bfchw = adapter_for(random_encoder(model_type), temporal_ratio=4, layout="BFCHW")
    torch.testing.assert_close(bfchw(video.transpose(1, 2), (3, 5, 9)), adapter(video, (3, 5, 9)), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", IMAGE_TYPES)
def test_image_encoder_equals_hand_written_preprocessing_and_forward(model_type):
    """Values in [-1, 1], resized to an explicit non-square size, ImageNet normalisation, CLS (and registers)
    sliced off last_hidden_state, then the VAE's time grouping and a 2-D resize onto the DiT grid."""
    model = random_encoder(model_type, seed=3)
    patch = model.config.patch_size
    size = (3 * patch, 5 * patch)
    adapter = adapter_for(model, temporal_ratio=4, value_range=(-1.0, 1.0), resolution=size, resample="bicubic",
                          chunk_size=4)
    video = _video(frames=9, height=37, width=61, seed=1) * 2 - 1
    grid = (3, 4, 7)

    frames = video.transpose(1, 2).flatten(0, 1)  # [B * F, 3, H, W]
    pixels = F.interpolate((frames + 1) / 2, size=size, mode="bicubic", align_corners=False, antialias=True)
    with torch.no_grad():
        hidden = model(pixel_values=(pixels - MEAN) / STD).last_hidden_state
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    assert hidden.shape[1] == prefix + 15
    patches = hidden[:, prefix:].reshape(2, 9, 3, 5, -1)
    expected = _to_grid(_latent_pool(patches, 4), 4, 7)

    torch.testing.assert_close(adapter(video, grid), expected, rtol=1e-5, atol=1e-5)
    encoded = adapter.encode(video)
    torch.testing.assert_close(encoded, patches, rtol=1e-5, atol=1e-5)
    # no prefix token in the output: the CLS / register rows are not among the encoded tokens
    tokens = encoded.reshape(18 * 15, -1)
    for row in hidden.reshape(18, -1, hidden.shape[-1])[:, :prefix].reshape(-1, hidden.shape[-1]):
        assert (tokens - row).abs().amax(dim=1).min() > 1e-3


def test_vjepa2_equals_hand_written_preprocessing_and_forward():
    """Frame 0 is duplicated in front so it forms tubelet 0 alone; latent frame k takes tubelets 2k - 1 and 2k."""
    model = random_encoder("vjepa2", seed=4)
    adapter = adapter_for(model, temporal_ratio=4, chunk_size=1)
    video = _video(frames=9, height=40, width=72, seed=2)
    grid = (3, 5, 9)

    frames = video.transpose(1, 2)  # [B, F, 3, H, W]
    frames = torch.cat([frames[:, :1], frames], 1)  # 10 frames: 5 tubelets (0,0) (1,2) (3,4) (5,6) (7,8)
    pixels = F.interpolate(frames.flatten(0, 1), size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    pixels = ((pixels - MEAN) / STD).unflatten(0, (2, 10))
    with torch.no_grad():
        hidden = model(pixel_values_videos=pixels, skip_predictor=True).last_hidden_state
    assert hidden.shape[1] == 5 * 2 * 2  # no CLS token
    tubelets = hidden.reshape(2, 5, 2, 2, -1)
    latent = torch.stack([tubelets[:, 0], tubelets[:, 1:3].mean(1), tubelets[:, 3:5].mean(1)], 1)
    expected = _to_grid(latent, 5, 9)

    torch.testing.assert_close(adapter.encode(video), tubelets, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter(video, grid), expected, rtol=1e-5, atol=1e-5)
    subsample = adapter_for(model, temporal_ratio=4, temporal_mode="subsample")
    torch.testing.assert_close(subsample(video, grid), _to_grid(tubelets[:, [0, 2, 4]], 5, 9), rtol=1e-5, atol=1e-5)


def test_image_encoder_subsampling_encodes_only_the_frames_it_keeps():
    """temporal_mode="subsample": pixel frames 0, 4, 8 (each VAE group's last), and nothing else goes through the
    encoder."""
    model = random_encoder("dinov3_vit", seed=9)
    video = _video(frames=9, height=40, width=72, seed=5)
    everything = adapter_for(model, temporal_ratio=4).encode(video)
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["pixel_values"].shape[0]),
                                           with_kwargs=True)
    subsample = adapter_for(model, temporal_ratio=4, temporal_mode="subsample")
    targets = subsample(video, (3, 5, 9))
    hook.remove()
    assert sum(seen) == 2 * 3
    torch.testing.assert_close(targets, _to_grid(everything[:, [0, 4, 8]], 5, 9), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="1 \\+ k \\* 4 frames"):
        subsample(_video(frames=8), (2, 5, 9))


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_chunked_equals_unchunked_and_chunks_bound_the_encoder_batch(model_type):
    model = random_encoder(model_type, seed=5)
    video = _video(batch=3, frames=5, height=33, width=50, seed=3)
    grid = (2, 3, 5)
    whole = adapter_for(model, temporal_ratio=4, chunk_size=64)(video, grid)
    for chunk_size in (1, 2, 7):
        seen = []
        hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
            next(v for v in kwargs.values() if isinstance(v, torch.Tensor)).shape[0]), with_kwargs=True)
        chunked = adapter_for(model, temporal_ratio=4, chunk_size=chunk_size)(video, grid)
        hook.remove()
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
        assert max(seen) <= chunk_size  # frames per forward (videos for V-JEPA 2)
        assert sum(seen) == (3 if model_type == "vjepa2" else 15)


@pytest.mark.parametrize("model_type", ["dinov2", "vjepa2"])
def test_bf16_compute_is_close_to_fp32_and_leaves_no_gradient(model_type):
    model = random_encoder(model_type, seed=6)
    video = _video(frames=5, seed=4).requires_grad_()
    exact = adapter_for(model, temporal_ratio=4, compute_dtype=torch.float32)(video, (2, 3, 5))
    fast = adapter_for(model, temporal_ratio=4, compute_dtype=torch.bfloat16)(video, (2, 3, 5))
    assert fast.dtype == torch.float32 and not fast.requires_grad and not exact.requires_grad
    assert not torch.equal(fast, exact)  # bf16 really ran
    assert (fast - exact).norm() / exact.norm() < 3e-2
    assert adapter_for(model, temporal_ratio=4).resolved_compute_dtype() == torch.float32  # "auto" on the CPU


def test_the_encoder_stays_in_eval_mode_inside_a_module_put_in_training_mode():
    adapter = adapter_for(random_encoder("dinov3_vit", seed=13), temporal_ratio=4)
    video = _video(frames=5)
    evaluated = adapter(video, (2, 3, 5))
    parent = torch.nn.ModuleDict({"encoder": adapter}).train()
    assert parent.training and adapter.training and not adapter.model.training
    torch.testing.assert_close(adapter(video, (2, 3, 5)), evaluated, rtol=0, atol=0)


def test_resolution_token_grid_matches_the_dit_grid_without_spatial_resampling():
    model = random_encoder("dinov3_vit", seed=7)
    adapter = adapter_for(model, temporal_ratio=4, resolution="token_grid")
    video = _video(frames=5, height=30, width=50)
    assert adapter.input_size(30, 50, (2, 3, 5)) == (48, 80)
    features = adapter.encode(video, (2, 3, 5))
    assert features.shape[2:4] == (3, 5)
    torch.testing.assert_close(adapter(video, (2, 3, 5)), _latent_pool(features, 4).flatten(2, 3))


# processor configs as the checkpoints ship them (file name, settings), and what the adapter takes from them
PROCESSORS = {
    "dinov2": ("preprocessor_config.json", {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "resample": 2,
                                            "crop_size": {"height": 42, "width": 42}, "size": {"shortest_edge": 48}},
               dict(resolution=42, resample="bilinear")),
    "dinov3_vit": ("preprocessor_config.json", {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
                                                "resample": 2, "size": {"height": 48, "width": 48}},
                   dict(resolution=48, resample="bilinear")),
    "vjepa2": ("video_preprocessor_config.json", {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
                                                  "crop_size": {"height": 32, "width": 32},
                                                  "size": {"shortest_edge": 36}},
               dict(resample="bilinear")),
}


@pytest.mark.parametrize("model_type", list(PROCESSORS))
def test_from_pretrained_reads_a_local_checkpoint_and_its_processor_config(tmp_path, monkeypatch, model_type):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = random_encoder(model_type, seed=8)
    model.save_pretrained(tmp_path)
    filename, processor, expected = PROCESSORS[model_type]
    (tmp_path / filename).write_text(json.dumps(processor))
    adapter = from_pretrained(str(tmp_path), temporal_ratio=4)
    assert type(adapter.model) is type(model) and adapter.resample == expected["resample"]
    torch.testing.assert_close(adapter.image_std.flatten(), torch.tensor([0.2, 0.25, 0.3]))
    by_hand = adapter_for(model, temporal_ratio=4, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3),
                          **expected)
    assert adapter.resolution == by_hand.resolution
    video = _video(frames=5)
    torch.testing.assert_close(adapter(video, (2, 3, 5)), by_hand(video, (2, 3, 5)), rtol=0, atol=0)
    assert adapter.describe((2, 3, 5))["encoder"]["weights_sha256"] == by_hand.describe((2, 3, 5))["encoder"][
        "weights_sha256"]
    if model_type == "dinov2":
        assert from_pretrained(str(tmp_path), temporal_ratio=4, resolution=28).resolution == 28  # kwargs override


def test_describe_changes_with_everything_that_changes_the_features():
    base = adapter_for(random_encoder("dinov2", seed=9), temporal_ratio=4).describe((2, 3, 5))
    assert base == json.loads(json.dumps(base))  # plain JSON
    variants = [
        adapter_for(random_encoder("dinov2", seed=10), temporal_ratio=4).describe((2, 3, 5)),  # other weights
        adapter_for(random_encoder("dinov2", seed=9, num_hidden_layers=3), temporal_ratio=4).describe((2, 3, 5)),
        adapter_for(random_encoder("dinov2", seed=9), temporal_ratio=4, resolution=28).describe((2, 3, 5)),
        adapter_for(random_encoder("dinov2", seed=9), temporal_ratio=8).describe((2, 3, 5)),
        adapter_for(random_encoder("dinov2", seed=9), temporal_ratio=4).describe((2, 3, 6)),
    ]
    for variant in variants:
        assert variant != base
    assert adapter_for(random_encoder("dinov2", seed=9), temporal_ratio=4).describe((2, 3, 5)) == base


def test_weights_digest_follows_the_weights_as_they_are_now():
    adapter = adapter_for(random_encoder("dinov2", seed=9), temporal_ratio=4)
    before = adapter.describe((2, 3, 5))["encoder"]["weights_sha256"]
    other = random_encoder("dinov2", seed=10)
    adapter.model.load_state_dict(other.state_dict())  # new weights into the same adapter: new features, new key
    assert adapter.describe((2, 3, 5))["encoder"]["weights_sha256"] == \
        adapter_for(other, temporal_ratio=4).describe((2, 3, 5))["encoder"]["weights_sha256"] != before
    adapter.model.register_buffer("scale", torch.tensor(2.0))  # a 0-dim tensor is hashed too
    with_scale = adapter.weights_sha256()
    adapter.model.scale.fill_(3.0)
    assert adapter.weights_sha256() != with_scale


def test_bad_input_is_rejected_with_the_argument_named():
    model = random_encoder("dinov2")
    adapter = adapter_for(model, temporal_ratio=4)
    with pytest.raises(ValueError, match="video: expected BCFHW"):
        adapter(torch.rand(2, 9, 3, 40, 72), (3, 5, 9))
    with pytest.raises(TypeError, match="video: expected a floating-point tensor"):
        adapter(torch.zeros(1, 3, 5, 8, 8, dtype=torch.uint8), (2, 1, 1))
    with pytest.raises(ValueError, match="token_grid"):
        adapter(_video(frames=5), (2, 3))
    with pytest.raises(ValueError, match="4 frames|pixel frames"):
        adapter(_video(frames=6), (2, 3, 5))
    with pytest.raises(ValueError, match="value_range"):
        adapter_for(model, temporal_ratio=4, value_range=(1, 0))
    with pytest.raises(ValueError, match="layout"):
        adapter_for(model, temporal_ratio=4, layout="BHWCF")
    with pytest.raises(ValueError, match="resolution"):
        adapter_for(model, temporal_ratio=4, resolution=(30, 42))  # 30 is not a multiple of 14
    with pytest.raises(ValueError, match="resolution: VJEPA2Model"):
        adapter_for(random_encoder("vjepa2"), temporal_ratio=4, resolution=64)
    with pytest.raises(ValueError, match="temporal_ratio"):
        adapter_for(random_encoder("vjepa2"), temporal_ratio=3)
    with pytest.raises(TypeError, match="model: expected one of"):
        adapter_for(torch.nn.Linear(2, 2), temporal_ratio=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_type", ["dinov3_vit", "vjepa2"])
def test_auto_compute_dtype_is_bf16_on_a_cuda_device_and_close_to_fp32(model_type):
    model = random_encoder(model_type, seed=12)
    adapter = adapter_for(model, temporal_ratio=4).cuda()
    if not torch.cuda.is_bf16_supported():
        assert adapter.resolved_compute_dtype() == torch.float32
        return
    assert adapter.resolved_compute_dtype() == torch.bfloat16
    video = _video(frames=9, seed=7)
    fast = adapter(video.cuda(), (3, 5, 9))
    exact = adapter_for(model, temporal_ratio=4, compute_dtype=torch.float32).cuda()(video.cuda(), (3, 5, 9))
    assert fast.dtype == torch.float32 and fast.is_cuda
    assert (fast - exact).norm() / exact.norm() < 3e-2
