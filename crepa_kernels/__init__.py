"""Fused CREPA cross-frame representation alignment loss for video diffusion training."""
from .api import cross_frame_align_loss
from .backends import available_backends, explain_backend
from .function import CrossFrameAlignFunction
from .module import CrossFrameAlignLoss
from .relation_api import TokenRelationLoss, token_relation_loss
from .relation_function import TokenRelationFunction
from .spec import LossOptions

__all__ = ["cross_frame_align_loss", "CrossFrameAlignFunction", "CrossFrameAlignLoss", "available_backends",
           "explain_backend", "LossOptions", "token_relation_loss", "TokenRelationFunction", "TokenRelationLoss"]
__version__ = "0.1.0"
