"""Fused CREPA cross-frame representation alignment loss for video diffusion training."""
from .api import cross_frame_align_loss
from .backends import available_backends, explain_backend
from .function import CrossFrameAlignFunction
from .module import CrossFrameAlignLoss
from .spec import LossOptions

__all__ = ["cross_frame_align_loss", "CrossFrameAlignFunction", "CrossFrameAlignLoss", "available_backends",
           "explain_backend", "LossOptions"]
__version__ = "0.1.0"
