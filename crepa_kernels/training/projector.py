"""The projector h_phi that maps DiT hidden states into the encoder's feature space.

Two kinds:
* ``"mlp"``: REPA's h_phi, Linear(hidden, width) -> SiLU -> ... -> Linear(width, encoder_dim), ``depth`` Linear
  layers in all (width 2048, depth 3 in REPA and the CREPA paper).
* ``"linear"``: LayerNorm(hidden) -> Linear(hidden, encoder_dim), the projector SimpleTuner and takenoko use by
  default: far fewer parameters and saved activations, no hidden width.
* ``"conv"``: iREPA's (arXiv 2512.10794) convolution over each frame's token grid, Conv2d(hidden, encoder_dim,
  3 x 3, zero padding 1): neighbouring tokens feed each projection. Needs the frame's (h, w) token grid.
"""
from __future__ import annotations

import torch
from torch import nn

PROJECTOR_KINDS = ("mlp", "linear", "conv")


class ConvProjector(nn.Module):
    """Conv2d over each frame's (h, w) token grid. Input [..., N, hidden] or frame-major [B, F * N, hidden] with
    N = h * w tokens per frame (x fastest); output the same shape with encoder_dim channels."""

    def __init__(self, hidden_dim: int, encoder_dim: int, grid: tuple[int, int], kernel_size: int = 3) -> None:
        super().__init__()
        if len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid):
            raise ValueError(f"grid: expected the (h, w) token grid of a frame, two positive ints, got {grid!r}")
        self.grid = tuple(grid)
        self.conv = nn.Conv2d(hidden_dim, encoder_dim, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.grid
        if x.shape[-2] % (height * width):
            raise ValueError(f"x: {x.shape[-2]} tokens are not whole frames of the {height} x {width} token grid")
        maps = x.reshape(-1, height, width, x.shape[-1]).permute(0, 3, 1, 2)
        out = self.conv(maps).permute(0, 2, 3, 1)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def build_projector(hidden_dim: int, encoder_dim: int, *, kind: str = "mlp", width: int = 2048,
                    depth: int = 3, grid: tuple[int, int] | None = None) -> nn.Module:
    """A projector of the given kind (``width`` and ``depth`` apply to "mlp" only, ``grid`` to "conv" only).

    It acts on the last dimension, so any leading shape works. A plain nn.Sequential (slicing and state-dict keys
    "0.weight", "2.weight", ... work as usual).
    """
    if kind not in PROJECTOR_KINDS:
        raise ValueError(f"kind: expected one of {PROJECTOR_KINDS}, got {kind!r}")
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, encoder_dim))
    if kind == "conv":
        if grid is None:
            raise ValueError("grid: the 'conv' projector needs the (h, w) token grid of a frame, got None")
        return ConvProjector(hidden_dim, encoder_dim, grid)
    if depth < 1:
        raise ValueError(f"depth: expected at least 1 Linear layer, got {depth}")
    widths = [hidden_dim] + [width] * (depth - 1) + [encoder_dim]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        if i > 0:
            layers.append(nn.SiLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)
