"""Frozen vision encoders as CREPA targets: a video batch in, features on the DiT's token grid out.

An adapter wraps a transformers encoder and does what each trainer otherwise re-implements:

* **Input.** A video batch ``[B, 3, F, H, W]`` (``layout="BCFHW"``, what video VAEs take) or ``[B, F, 3, H, W]``
  (``"BFCHW"``), with values in the stated ``value_range``: ``(0, 1)`` or ``(-1, 1)`` (diffusers' VAE input).
* **The encoder's own preprocessing.** Values are rescaled to [0, 1], each frame is resized (bilinear or bicubic
  as the image processor config says, antialiased, as transformers' processors resize) to the encoder's input size,
  then normalised with the processor's mean and std (ImageNet's for all three models when no processor config is
  given). Frames are never cropped: every DiT token needs a target, borders included.
* **Input size.** DINOv2 and DINOv3 take any multiple of their patch: ``resolution`` is the shorter side (default:
  the processor's crop size, 224, else the config's ``image_size``), the longer side keeps the aspect ratio, and both
  are rounded to the nearest multiple of the patch; or an explicit ``(h, w)``; or ``"token_grid"``, which makes the
  encoder's patch grid equal to the DiT's (H', W'), so no spatial resampling of features is needed. V-JEPA 2's
  rotary positions assume a square grid of ``crop_size / patch_size`` (its config), so its frames are resized to
  ``crop_size`` x ``crop_size``, stretched: a non-square video's aspect is not kept.
* **Prefix tokens** (DINOv2's CLS, DINOv3's CLS and registers, DINOv2-with-registers' too) are dropped; V-JEPA 2 has
  none.
* **The token grid.** Features are mapped onto the DiT's (F', H', W') with
  :func:`~crepa_kernels.training.token_grid.encoder_features_to_tokens`: latent frame 0 <- pixel frame 0, latent
  frame k <- its group of ``temporal_ratio`` pixel frames (the causal VAE's), then bilinear 2-D per frame.
* **V-JEPA 2's tubelets.** Its tokens cover ``tubelet_size`` (T = 2) consecutive frames. The video is front-padded
  with T - 1 copies of frame 0, so frame 0 forms a tubelet of its own, exactly as the causal VAE encodes frame 0
  alone; every later tubelet then lies inside one VAE group when T divides ``temporal_ratio`` (checked). Tubelets
  are mapped like frames with the ratio ``temporal_ratio / T``: latent frame 0 <- tubelet 0, latent frame k <- the
  mean (or, with ``temporal_mode="subsample"``, the last) of its r / T tubelets. For Wan (r = 4) and 17 frames:
  tubelets (0,0), (1,2), (3,4), ..., (15,16); latent frame 1 <- tubelets (1,2) and (3,4).
* **Subsampling.** With ``temporal_mode="subsample"`` the image encoders see only the frames kept (0, r, 2r, ...).
* **Bounded memory.** Frames go through the encoder ``chunk_size`` at a time (images for DINOv2/v3; videos for
  V-JEPA 2, whose attention spans all frames of a video), under ``torch.no_grad``, in bf16 autocast where the device
  supports it (``compute_dtype="auto"``: CUDA with bf16; fp32 elsewhere). Features come out in fp32.

``from_pretrained(name_or_path)`` loads a checkpoint and its processor settings; :func:`adapter_for` wraps a model
you built (the tests use small random configs: nothing is downloaded).
"""
from __future__ import annotations

import contextlib
import hashlib
import json

import torch
import torch.nn.functional as F
from torch import nn

from .token_grid import TEMPORAL_MODES, encoder_features_to_tokens, latent_frame_count

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("BCFHW", "BFCHW")
RESAMPLE_MODES = ("bilinear", "bicubic")
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # the integer codes in image processor configs
# config keys that do not change what the encoder computes (bookkeeping, output switches, the weights' dtype:
# the weights digest covers that)
_CONFIG_KEYS_IGNORED = {"transformers_version", "architectures", "dtype", "torch_dtype", "output_hidden_states",
                        "output_attentions", "return_dict", "use_cache", "chunk_size_feed_forward"}


class EncoderAdapter(nn.Module):
    """A frozen transformers encoder, its preprocessing and the mapping of its features onto a DiT token grid.

    Call it as ``adapter(video, token_grid)`` -> ``[B, F', H' * W', D]`` fp32 targets; ``adapter.encode(video)``
    gives the features on the encoder's own grid, ``[B, F_enc, h, w, D]``.
    """

    tubelet_size = 1  # frames per encoder token in time

    def __init__(
        self,
        model: nn.Module,
        *,
        temporal_ratio: int,
        temporal_patch: int = 1,
        temporal_mode: str = "mean",
        layout: str = "BCFHW",
        value_range: tuple[float, float] = (0.0, 1.0),
        resolution: int | tuple[int, int] | str | None = None,
        image_mean: tuple[float, ...] = IMAGENET_MEAN,
        image_std: tuple[float, ...] = IMAGENET_STD,
        resample: str = "bilinear",
        chunk_size: int = 16,
        compute_dtype: str | torch.dtype = "auto",
        name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(temporal_ratio, int) or temporal_ratio < 1:
            raise ValueError(f"temporal_ratio: expected a positive int, got {temporal_ratio!r}")
        if not isinstance(temporal_patch, int) or temporal_patch < 1:
            raise ValueError(f"temporal_patch: expected a positive int, got {temporal_patch!r}")
        if temporal_mode not in TEMPORAL_MODES:
            raise ValueError(f"temporal_mode: expected one of {TEMPORAL_MODES}, got {temporal_mode!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        low, high = (float(v) for v in value_range)
        if not high > low:
            raise ValueError(f"value_range: expected (low, high) with high > low, e.g. (0, 1) or (-1, 1), got "
                             f"{value_range!r}")
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample: expected one of {RESAMPLE_MODES}, got {resample!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
        if compute_dtype not in ("auto", torch.float32, torch.bfloat16):
            raise ValueError(f"compute_dtype: expected 'auto', torch.float32 or torch.bfloat16, got {compute_dtype!r}")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError(f"image_mean, image_std: expected 3 values each, std > 0, got {image_mean}, {image_std}")
        if temporal_ratio % self.tubelet_size != 0:
            raise ValueError(f"temporal_ratio: the encoder's tubelets of {self.tubelet_size} frames must divide the "
                             f"VAE's temporal ratio, got {temporal_ratio}")
        self.model = model.eval().requires_grad_(False)
        self.temporal_ratio, self.temporal_patch, self.temporal_mode = temporal_ratio, temporal_patch, temporal_mode
        self.layout, self.value_range = layout, (low, high)
        self.resample, self.chunk_size, self.compute_dtype = resample, chunk_size, compute_dtype
        self.name_or_path = name_or_path
        self.patch_size = _pair(model.config.patch_size)
        self.resolution = self._check_resolution(resolution)
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), False)

    def train(self, mode: bool = True) -> EncoderAdapter:
        """The encoder stays in eval mode, whatever its parent module is put in (DINOv3 jitters its positions in
        training mode)."""
        super().train(mode)
        self.model.eval()
        return self

    # --- what each encoder differs in -------------------------------------------------------------------------
    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens in ``last_hidden_state`` (CLS, registers)."""
        return 1 + getattr(self.model.config, "num_register_tokens", 0)

    def _check_resolution(self, resolution):
        if resolution is None:
            return int(_pair(self.model.config.image_size)[0])
        if resolution == "token_grid" or (isinstance(resolution, int) and resolution > 0):
            return resolution
        if (isinstance(resolution, (tuple, list)) and len(resolution) == 2
                and all(isinstance(v, int) and v > 0 and v % p == 0 for v, p in zip(resolution, self.patch_size))):
            return tuple(resolution)
        raise ValueError(f"resolution: expected a shorter side in pixels, (height, width) multiples of the patch "
                         f"{self.patch_size}, or 'token_grid', got {resolution!r}")

    def input_size(self, height: int, width: int, token_grid: tuple[int, int, int] | None = None) -> tuple[int, int]:
        """The (h, w) each frame is resized to before the encoder, for a video of height x width pixels."""
        (patch_h, patch_w), resolution = self.patch_size, self.resolution
        if resolution == "token_grid":
            if token_grid is None:
                raise ValueError("token_grid: resolution='token_grid' needs the DiT's (F', H', W') token grid")
            return token_grid[1] * patch_h, token_grid[2] * patch_w
        if isinstance(resolution, tuple):
            return resolution
        scale = resolution / min(height, width)
        return (max(patch_h, round(height * scale / patch_h) * patch_h),
                max(patch_w, round(width * scale / patch_w) * patch_w))

    def _encode_chunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, h, w] normalised frames -> [n, 1, h / p, w / p, D] patch features."""
        grid = (pixels.shape[-2] // self.patch_size[0], pixels.shape[-1] // self.patch_size[1])
        hidden = self.model(pixel_values=pixels).last_hidden_state
        expected = self.prefix_tokens + grid[0] * grid[1]
        if hidden.shape[1] != expected:
            raise RuntimeError(f"{type(self.model).__name__} returned {hidden.shape[1]} tokens for a {grid} patch grid,"
                               f" expected {self.prefix_tokens} prefix + {grid[0] * grid[1]} patch tokens")
        return hidden[:, self.prefix_tokens:].float().unflatten(1, (1, *grid))

    def _encoder_batches(self, frames: torch.Tensor):
        """[B, F, 3, H, W] -> the chunks of frames the encoder sees at once, [n, 3, H, W], in order."""
        return frames.flatten(0, 1).split(self.chunk_size)

    def _encoder_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """The frames as the encoder sees them in time (V-JEPA 2 pads the front)."""
        return frames

    # --- shared ---------------------------------------------------------------------------------------------------
    def frames(self, video: torch.Tensor) -> torch.Tensor:
        """Validate a video batch and return it as [B, F, 3, H, W]."""
        if not isinstance(video, torch.Tensor) or not video.is_floating_point():
            raise TypeError(f"video: expected a floating-point tensor, got "
                            f"{video.dtype if isinstance(video, torch.Tensor) else type(video).__name__}")
        channel_dim = 1 if self.layout == "BCFHW" else 2
        if video.dim() != 5 or video.shape[channel_dim] != 3 or 0 in video.shape:
            raise ValueError(f"video: expected {self.layout} ({'[B, 3, F, H, W]' if channel_dim == 1 else '[B, F, 3, H, W]'}"
                             f"), got shape {tuple(video.shape)}")
        return video.transpose(1, 2) if channel_dim == 1 else video

    def preprocess(self, frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[n, 3, H, W] frames in ``value_range`` -> [n, 3, h, w] normalised encoder input, in fp32."""
        low, high = self.value_range
        pixels = (frames.float() - low) / (high - low)
        if tuple(pixels.shape[-2:]) != tuple(size):
            pixels = F.interpolate(pixels, size=tuple(size), mode=self.resample, align_corners=False, antialias=True)
        return (pixels - self.image_mean) / self.image_std

    @property
    def device(self) -> torch.device:
        """Where the encoder runs (move it with ``.to``)."""
        return self.image_mean.device

    def resolved_compute_dtype(self) -> torch.dtype:
        if self.compute_dtype != "auto":
            return self.compute_dtype
        supported = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if supported else torch.float32

    def _autocast(self):
        dtype = self.resolved_compute_dtype()
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, token_grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Features on the encoder's own grid: [B, F_enc, h, w, D] fp32 (F_enc: pixel frames, or V-JEPA 2's tubelets).
        ``token_grid`` is needed only with ``resolution="token_grid"``."""
        frames = self._encoder_frames(self.frames(video))
        size = self.input_size(frames.shape[-2], frames.shape[-1], token_grid)
        batch = frames.shape[0]
        with self._autocast():
            chunks = [self._encode_chunk(self.preprocess(chunk, size)) for chunk in self._encoder_batches(frames)]
        features = torch.cat(chunks)  # [B * F_enc, 1, h, w, D] or [B, F_enc, h, w, D]
        return features.reshape(batch, -1, *features.shape[2:])

    def forward(self, video: torch.Tensor, token_grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, F', H' * W', D] fp32 targets on the DiT's (F', H', W') token grid."""
        if len(token_grid) != 3 or not all(isinstance(v, int) and v > 0 for v in token_grid):
            raise ValueError(f"token_grid: expected the DiT's (F', H', W') as positive ints, got {token_grid!r}")
        return encoder_features_to_tokens(
            self.encode(video, token_grid), tuple(token_grid), temporal_ratio=self.encoded_frame_ratio,
            temporal_patch=self.temporal_patch, temporal_mode=self.temporal_mode)

    @property
    def encoded_frame_ratio(self) -> int:
        """Pixel frames per VAE group, counted in the frames :meth:`encode` returns."""
        return self.temporal_ratio // self.tubelet_size

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    def weights_sha256(self) -> str:
        """A digest of the encoder's weights and buffers as they are now (recomputed on every call, once per cache
        build: a digest kept from before a ``load_state_dict`` would key new features with the old weights)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def describe(self, token_grid: tuple[int, int, int]) -> dict:
        """Everything that changes the features this adapter gives for ``token_grid``, as plain JSON values: the key
        of the offline feature cache (crepa_kernels.training.feature_cache)."""
        config = {k: v for k, v in self.model.config.to_dict().items()
                  if not k.startswith("_") and k not in _CONFIG_KEYS_IGNORED}
        description = {
            "encoder": {"class": type(self.model).__name__, "name_or_path": self.name_or_path, "config": config,
                        "weights_sha256": self.weights_sha256()},
            "preprocessing": {"resolution": self.resolution, "resample": self.resample, "antialias": True,
                              "image_mean": self.image_mean.flatten().tolist(),
                              "image_std": self.image_std.flatten().tolist(), "value_range": list(self.value_range),
                              "compute_dtype": str(self.resolved_compute_dtype()).removeprefix("torch.")},
            "frame_mapping": {"temporal_ratio": self.temporal_ratio, "temporal_patch": self.temporal_patch,
                              "temporal_mode": self.temporal_mode, "tubelet_size": self.tubelet_size},
            "token_grid": list(token_grid),
            "feature_dim": self.feature_dim,
        }
        return json.loads(json.dumps(description, sort_keys=True, default=str))  # plain JSON types, canonical


class ImageEncoderAdapter(EncoderAdapter):
    """DINOv2 (``Dinov2Model``: CLS + patches; ``Dinov2WithRegistersModel``: CLS + registers + patches) and DINOv3
    (``DINOv3ViTModel``: CLS + registers + patches), applied to each frame. With ``temporal_mode="subsample"`` only
    the frames kept (0, r, 2r, ...: each VAE group's last) are encoded, r times less work."""

    def _encoder_frames(self, frames: torch.Tensor) -> torch.Tensor:
        if self.temporal_mode != "subsample":
            return frames
        latent_frame_count(frames.shape[1], self.temporal_ratio)  # checks 1 + k * r frames
        return frames[:, ::self.temporal_ratio]

    @property
    def encoded_frame_ratio(self) -> int:
        return 1 if self.temporal_mode == "subsample" else self.temporal_ratio


class VideoEncoderAdapter(EncoderAdapter):
    """V-JEPA 2 (``VJEPA2Model``): tokens are tubelets of ``tubelet_size`` frames x patch x patch, no CLS token.
    ``chunk_size`` counts videos here: attention spans all the frames of a video."""

    def __init__(self, model: nn.Module, **kwargs) -> None:
        self.tubelet_size = model.config.tubelet_size
        super().__init__(model, **kwargs)

    @property
    def prefix_tokens(self) -> int:
        return 0

    def _check_resolution(self, resolution):
        crop = self.model.config.crop_size
        if resolution not in (None, crop, (crop, crop)):
            raise ValueError(f"resolution: VJEPA2Model's rotary positions assume a {crop}x{crop} input (its config's "
                             f"crop_size), got {resolution!r}")
        return (crop, crop)

    def _encoder_frames(self, frames: torch.Tensor) -> torch.Tensor:
        # T - 1 copies of frame 0 in front: frame 0 is then a tubelet of its own, as it is a latent frame of its own
        pad = frames[:, :1].expand(-1, self.tubelet_size - 1, -1, -1, -1)
        frames = torch.cat([pad, frames], dim=1)
        if frames.shape[1] % self.tubelet_size != 0:
            raise ValueError(f"video: {frames.shape[1] - self.tubelet_size + 1} frames do not give whole tubelets of "
                             f"{self.tubelet_size} after frame 0; expected 1 + k * {self.temporal_ratio} frames")
        return frames

    def _encoder_batches(self, frames: torch.Tensor):
        return frames.split(self.chunk_size)  # whole videos

    def _encode_chunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, F_pad, 3, h, w] -> [n, F_pad / T, h / p, w / p, D]."""
        grid = (pixels.shape[-2] // self.patch_size[0], pixels.shape[-1] // self.patch_size[1])
        tubelets = pixels.shape[1] // self.tubelet_size
        hidden = self.model(pixel_values_videos=pixels, skip_predictor=True).last_hidden_state
        return hidden.float().unflatten(1, (tubelets, *grid))

    def preprocess(self, frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[n, F, 3, H, W] videos -> [n, F, 3, h, w] normalised encoder input."""
        return super().preprocess(frames.flatten(0, 1), size).unflatten(0, frames.shape[:2])


_ADAPTERS = {  # config.model_type -> (transformers model class name, adapter class, default resampling)
    "dinov2": ("Dinov2Model", ImageEncoderAdapter, "bicubic"),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", ImageEncoderAdapter, "bicubic"),
    "dinov3_vit": ("DINOv3ViTModel", ImageEncoderAdapter, "bilinear"),
    "vjepa2": ("VJEPA2Model", VideoEncoderAdapter, "bilinear"),
}


def adapter_for(model: nn.Module, **kwargs) -> EncoderAdapter:
    """Wrap a transformers ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``DINOv3ViTModel`` or ``VJEPA2Model``.
    Keyword arguments are those of :class:`EncoderAdapter` (``temporal_ratio`` is required)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ADAPTERS or type(model).__name__ != _ADAPTERS[model_type][0]:
        supported = ", ".join(entry[0] for entry in _ADAPTERS.values())
        raise TypeError(f"model: expected one of {supported}, got {type(model).__name__}")
    _, adapter_class, resample = _ADAPTERS[model_type]
    return adapter_class(model, **{"resample": resample, **kwargs})


def processor_settings(name_or_path: str) -> dict:
    """The resize and normalisation settings of a checkpoint's (video) preprocessor config, as adapter kwargs."""
    from transformers.utils import cached_file

    for filename in ("preprocessor_config.json", "video_preprocessor_config.json"):
        path = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)
        if path is not None:
            break
    else:
        return {}
    with open(path) as source:
        config = json.load(source)
    settings = {key: tuple(config[key]) for key in ("image_mean", "image_std") if key in config}
    if config.get("resample") in _PIL_RESAMPLE:
        settings["resample"] = _PIL_RESAMPLE[config["resample"]]
    crop, size = config.get("crop_size"), config.get("size")
    if isinstance(crop, dict) and "height" in crop:
        settings["resolution"] = min(crop["height"], crop.get("width", crop["height"]))
    elif isinstance(crop, int):
        settings["resolution"] = crop
    elif isinstance(size, dict) and ("shortest_edge" in size or "height" in size):
        settings["resolution"] = size.get("shortest_edge") or min(size["height"], size.get("width", size["height"]))
    return settings


def from_pretrained(name_or_path: str, *, temporal_ratio: int, **kwargs) -> EncoderAdapter:
    """Load a DINOv2, DINOv3 or V-JEPA 2 checkpoint (a hub name or a local folder) with its processor's resize and
    normalisation settings; ``kwargs`` (those of :class:`EncoderAdapter`) override them."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(name_or_path)
    if config.model_type not in _ADAPTERS:
        raise ValueError(f"name_or_path: {name_or_path} is a {config.model_type!r} model; supported: "
                         f"{', '.join(_ADAPTERS)}")
    model = getattr(transformers, _ADAPTERS[config.model_type][0]).from_pretrained(name_or_path)
    settings = processor_settings(name_or_path)
    if config.model_type == "vjepa2":
        settings.pop("resolution", None)  # its input is the config's crop_size
    return adapter_for(model, temporal_ratio=temporal_ratio, name_or_path=str(name_or_path), **{**settings, **kwargs})


def load_encoder(name: str, *, temporal_ratio: int, **kwargs) -> EncoderAdapter:
    """An adapter from a command-line name: a checkpoint (hub name or folder) for :func:`from_pretrained`, or
    ``random:MODEL_TYPE[:SEED]`` (e.g. ``random:dinov2``) for a small random model (:func:`random_encoder`)."""
    if not name.startswith("random:"):
        return from_pretrained(name, temporal_ratio=temporal_ratio, **kwargs)
    _, model_type, *seed = name.split(":")
    if len(seed) > 1 or (seed and not seed[0].isdigit()):
        raise ValueError(f"encoder: expected random:MODEL_TYPE or random:MODEL_TYPE:SEED, got {name!r}")
    model = random_encoder(model_type, seed=int(seed[0]) if seed else 0)
    return adapter_for(model, temporal_ratio=temporal_ratio, name_or_path=name, **kwargs)


# Small configs for tests and smoke runs (a few thousand parameters; the patch and register layouts of the real ones)
_SMALL_CONFIGS = {
    "dinov2": dict(patch_size=14, image_size=56),
    "dinov2_with_registers": dict(patch_size=14, image_size=56, num_register_tokens=4),
    "dinov3_vit": dict(patch_size=16, image_size=64, num_register_tokens=4),
    "vjepa2": dict(patch_size=16, crop_size=32, tubelet_size=2, frames_per_clip=4, pred_hidden_size=32,
                   pred_num_attention_heads=2, pred_num_hidden_layers=1),
}


def random_encoder(model_type: str, *, seed: int = 0, hidden_size: int = 32, **config) -> nn.Module:
    """A randomly initialised encoder of ``model_type`` (a key of the supported types) with a small config, seeded:
    what the tests and ``examples/train_dit.py --encoder`` use, since no weights can be downloaded there."""
    import transformers

    if model_type not in _SMALL_CONFIGS:
        raise ValueError(f"model_type: expected one of {tuple(_SMALL_CONFIGS)}, got {model_type!r}")
    model_class = getattr(transformers, _ADAPTERS[model_type][0])
    settings = dict(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden_size)
    if model_type == "vjepa2":
        settings.pop("intermediate_size")  # V-JEPA 2 sizes its MLP by mlp_ratio
    settings.update(_SMALL_CONFIGS[model_type], **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(model_class.config_class(**settings)).eval()


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
