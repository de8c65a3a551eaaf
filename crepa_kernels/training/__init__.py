"""CREPA inside a DiT trainer: projector, checkpointing-safe block capture, token-grid mapping, regulariser."""
from .capture import HiddenStateCapture, find_blocks
from .projector import build_projector
from .regularizer import AlignmentOutput, CrepaRegularizer
from .token_grid import (
    dit_token_grid,
    encoder_features_to_tokens,
    group_frames,
    latent_frame_count,
    pool_frames,
    resize_frames,
)

__all__ = [
    "AlignmentOutput",
    "CrepaRegularizer",
    "HiddenStateCapture",
    "build_projector",
    "dit_token_grid",
    "encoder_features_to_tokens",
    "find_blocks",
    "group_frames",
    "latent_frame_count",
    "pool_frames",
    "resize_frames",
]
