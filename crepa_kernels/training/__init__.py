"""CREPA inside a DiT trainer: projectors, checkpointing-safe block capture, token-grid mapping, the regulariser
(several layers and teachers, sample weights and frame masks), its lambda schedule, saving it apart from the model,
the model wrapper that puts a transformer and its regulariser behind one forward, the rectified-flow step pieces,
a meter of the memory a step keeps for backward, and the encoder adapters and offline feature cache that give the
targets."""
from .capture import HiddenStateCapture, find_blocks
from .ranks import mean_over_ranks, rank_and_world
from .encoders import EncoderAdapter, adapter_for
from .feature_cache import FeatureCache, build_feature_cache
from .flow import SelfFlowViews, flow_matching_loss, rectified_flow_pair, self_flow_views
from .memory import SavedTensorMeter, projector_activation_bytes, reset_peak_rss
from .model import CrepaTransformer
from .projector import PROJECTOR_KINDS, build_projector
from .regularizer import AlignmentOutput, CrepaRegularizer
from .schedule import LambdaSchedule
from .state import load_crepa_state, save_crepa_state
from .token_grid import (
    dit_token_grid,
    encoder_features_to_tokens,
    group_frames,
    latent_frame_count,
    pick_frames,
    pool_frames,
    resample_token_grid,
    resample_tokens,
    resize_frames,
    spatial_normalize,
)
from .weighting import (
    TIMESTEP_WEIGHTS,
    cosine_timestep_weight,
    hard_timestep_weight,
    reduce_weighted,
    sigmoid_timestep_weight,
    snr_timestep_weight,
    timestep_weight,
)

__all__ = [
    "PROJECTOR_KINDS",
    "TIMESTEP_WEIGHTS",
    "AlignmentOutput",
    "CrepaRegularizer",
    "CrepaTransformer",
    "EncoderAdapter",
    "FeatureCache",
    "HiddenStateCapture",
    "LambdaSchedule",
    "SavedTensorMeter",
    "SelfFlowViews",
    "adapter_for",
    "build_feature_cache",
    "build_projector",
    "cosine_timestep_weight",
    "dit_token_grid",
    "encoder_features_to_tokens",
    "find_blocks",
    "flow_matching_loss",
    "group_frames",
    "hard_timestep_weight",
    "latent_frame_count",
    "load_crepa_state",
    "mean_over_ranks",
    "pick_frames",
    "pool_frames",
    "projector_activation_bytes",
    "rank_and_world",
    "rectified_flow_pair",
    "reduce_weighted",
    "resample_token_grid",
    "resample_tokens",
    "reset_peak_rss",
    "resize_frames",
    "save_crepa_state",
    "self_flow_views",
    "sigmoid_timestep_weight",
    "snr_timestep_weight",
    "spatial_normalize",
    "timestep_weight",
]
