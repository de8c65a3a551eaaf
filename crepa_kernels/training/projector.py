"""The projector h_phi that maps DiT hidden states into the encoder's feature space (REPA's MLP)."""
from __future__ import annotations

from torch import nn


def build_projector(hidden_dim: int, encoder_dim: int, *, width: int = 2048, depth: int = 3) -> nn.Sequential:
    """Linear(hidden, width) -> SiLU -> ... -> Linear(width, encoder_dim), ``depth`` Linear layers in all.

    The default (width 2048, depth 3) is REPA's h_phi. It acts on the last dimension, so any leading shape works.
    A plain nn.Sequential (slicing and state-dict keys "0.weight", "2.weight", ... work as usual).
    """
    if depth < 1:
        raise ValueError(f"depth: expected at least 1 Linear layer, got {depth}")
    widths = [hidden_dim] + [width] * (depth - 1) + [encoder_dim]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        if i > 0:
            layers.append(nn.SiLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)
