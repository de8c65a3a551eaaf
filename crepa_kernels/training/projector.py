"""The projector h_phi that maps DiT hidden states into the encoder's feature space.

Two kinds:
* ``"mlp"``: REPA's h_phi, Linear(hidden, width) -> SiLU -> ... -> Linear(width, encoder_dim), ``depth`` Linear
  layers in all (width 2048, depth 3 in REPA and the CREPA paper).
* ``"linear"``: LayerNorm(hidden) -> Linear(hidden, encoder_dim), the projector SimpleTuner and takenoko use by
  default: far fewer parameters and saved activations, no hidden width.
"""
from __future__ import annotations

from torch import nn

PROJECTOR_KINDS = ("mlp", "linear")


def build_projector(hidden_dim: int, encoder_dim: int, *, kind: str = "mlp", width: int = 2048,
                    depth: int = 3) -> nn.Sequential:
    """A projector of the given kind (``width`` and ``depth`` apply to "mlp" only).

    It acts on the last dimension, so any leading shape works. A plain nn.Sequential (slicing and state-dict keys
    "0.weight", "2.weight", ... work as usual).
    """
    if kind not in PROJECTOR_KINDS:
        raise ValueError(f"kind: expected one of {PROJECTOR_KINDS}, got {kind!r}")
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, encoder_dim))
    if depth < 1:
        raise ValueError(f"depth: expected at least 1 Linear layer, got {depth}")
    widths = [hidden_dim] + [width] * (depth - 1) + [encoder_dim]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        if i > 0:
            layers.append(nn.SiLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)
