"""The reference as a backend: runs anywhere torch does."""
from __future__ import annotations

import torch

from .reference import per_frame_loss  # noqa: F401  (the backend entry point)


def unavailable_reason(device: torch.device) -> str | None:
    return None


def call_unsupported_reason(proj, target, options) -> str | None:
    return None  # the specification runs every valid call
