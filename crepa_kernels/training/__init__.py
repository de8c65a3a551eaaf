"""CREPA inside a DiT trainer: projector, checkpointing-safe block capture, token-grid mapping, regulariser, the
model wrapper that puts a transformer and its regulariser behind one forward, the rectified-flow step pieces, and
the encoder adapters and offline feature cache that give the targets."""
from .capture import HiddenStateCapture, find_blocks
from .distributed import mean_over_ranks, rank_and_world
from .encoders import EncoderAdapter, adapter_for
from .feature_cache import FeatureCache, build_feature_cache
from .flow import flow_matching_loss, rectified_flow_pair
from .model import CrepaTransformer
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
    "CrepaTransformer",
    "EncoderAdapter",
    "FeatureCache",
    "HiddenStateCapture",
    "adapter_for",
    "build_feature_cache",
    "build_projector",
    "dit_token_grid",
    "encoder_features_to_tokens",
    "find_blocks",
    "flow_matching_loss",
    "group_frames",
    "latent_frame_count",
    "mean_over_ranks",
    "pool_frames",
    "rank_and_world",
    "rectified_flow_pair",
    "resize_frames",
]
