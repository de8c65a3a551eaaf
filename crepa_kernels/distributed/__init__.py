"""CREPA on torch.distributed: the loss of a sequence sharded across ranks (context / sequence parallelism)."""
from .loss import sequence_parallel_align_loss

__all__ = ["sequence_parallel_align_loss"]
