"""Saving the regulariser apart from the model (or LoRA) weights: the projectors' tensors and the schedule's state
in one safetensors file, loaded back with shape checks so that a file from another configuration fails clearly."""
from __future__ import annotations

import json
import os

import torch

from .regularizer import CrepaRegularizer

FORMAT = "crepa_kernels.training.state/1"


def save_crepa_state(path: str | os.PathLike, regularizer: CrepaRegularizer) -> None:
    """Write ``regularizer``'s projectors and schedule state to ``path`` (safetensors; the schedule in the
    metadata as JSON, whose float repr round-trips exactly). Call it on one rank: DDP keeps the ranks equal."""
    from safetensors.torch import save_file

    tensors = {name: value.detach().cpu().contiguous() for name, value in regularizer.state_dict().items()}
    metadata = {"format": FORMAT, "schedule": json.dumps(regularizer.schedule.state_dict()),
                "layers": json.dumps(regularizer.layer_names), "teachers": json.dumps(regularizer.teacher_names)}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_crepa_state(path: str | os.PathLike, regularizer: CrepaRegularizer) -> None:
    """Load a file written by :func:`save_crepa_state` into ``regularizer`` (on its parameters' device).

    Raises ValueError, before changing anything, when the file is not such a file, its schedule state is not valid,
    or its tensors differ from the regulariser's in names or shapes (another hidden_dim, encoder_dim, projector kind, width, depth, number of
    layers or teachers, or sharing)."""
    from safetensors import safe_open

    path = os.fspath(path)
    expected = regularizer.state_dict()
    with safe_open(path, framework="pt", device="cpu") as source:
        metadata = source.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: not a CREPA regulariser state (metadata format {metadata.get('format')!r}, "
                             f"expected {FORMAT!r})")
        names = set(source.keys())
        missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: the file's projector tensors do not match this regulariser's "
                             f"(missing {missing}, unexpected {unexpected}): another number of layers, teachers, "
                             "projector kind or depth, or projector sharing")
        for name in sorted(names):
            shape = tuple(source.get_slice(name).get_shape())
            if shape != tuple(expected[name].shape):
                raise ValueError(f"{path}: {name} has shape {shape} in the file, this regulariser's is "
                                 f"{tuple(expected[name].shape)} (another hidden_dim, encoder_dim or width?)")
        try:
            schedule = json.loads(metadata["schedule"])
            regularizer.schedule.checked_state(schedule)
        except (KeyError, json.JSONDecodeError, ValueError) as error:
            raise ValueError(f"{path}: the schedule state in the file's metadata is not valid: {error}") from None
        tensors = {name: source.get_tensor(name) for name in names}
    with torch.no_grad():
        regularizer.load_state_dict(tensors)
    regularizer.schedule.load_state_dict(schedule)
