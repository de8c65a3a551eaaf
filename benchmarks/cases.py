"""The benchmark's cases: video DiT shape presets, dtypes, and one measured configuration."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Preset:
    frames: int  # latent frames F
    tokens: int  # tokens per latent frame N
    video: str


# Latent video of common DiT fine-tuning setups: 4x temporal and 8x spatial VAE compression, 2x2 patches.
PRESETS = {
    "cogvideox-5b": Preset(13, 1350, "49 frames at 480x720"),
    "wan2.1": Preset(21, 1560, "81 frames at 480x832"),
    "hunyuanvideo": Preset(33, 3600, "129 frames at 720x1280"),
}
ENCODERS = {768: "DINOv2-B", 1024: "DINOv2-L", 1536: "DINOv2-g"}
BASELINES = ("eager", "compile")  # the implementations every backend is compared with
PASSES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Case:
    preset: str
    batch: int
    frames: int
    tokens: int
    dim: int
    dtype: str
    neighbors: int
    mode: str
    tau: float
    normalize_weights: bool
    target_grad: bool

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.frames, self.tokens, self.dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def loss_options(self) -> dict:
        return dict(tau=self.tau, neighbors=self.neighbors, neighbor_mode=self.mode,
                    normalize_weights=self.normalize_weights)

    def eager_options(self) -> dict:
        return dict(tau=self.tau, neighbors=self.neighbors, mode=self.mode, normalize_weights=self.normalize_weights)

    def label(self) -> str:
        encoder = ENCODERS.get(self.dim)
        dim = f"D={self.dim}" + (f" ({encoder})" if encoder else "")
        return (f"{self.preset}  B={self.batch} F={self.frames} N={self.tokens} {dim}  {self.dtype}  "
                f"{self.mode} d={self.neighbors} tau={self.tau:g}"
                + ("  normalized" if self.normalize_weights else "")
                + ("  target requires grad" if self.target_grad else "  target frozen"))

    def short_label(self) -> str:
        return f"{self.preset} D={self.dim} {self.dtype} {self.mode[:3]} d={self.neighbors}"
