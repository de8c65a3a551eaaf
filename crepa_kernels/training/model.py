"""A transformer and its CREPA regulariser behind one forward, so that a data-parallel wrapper syncs both."""
from __future__ import annotations

import torch
from torch import nn

from .capture import HiddenStateCapture
from .regularizer import AlignmentOutput, CrepaRegularizer


class CrepaTransformer(nn.Module):
    """``transformer(*args, **kwargs)`` plus ``regularizer(hidden states of blocks[block_index], targets)``.

    Wrap this module, not the transformer alone, in DistributedDataParallel: the projector's gradients are then
    averaged over ranks like the transformer's. The capture hooks sit on the transformer inside, which keeps
    calling them under the wrapper.

        model = CrepaTransformer(transformer, CrepaRegularizer(hidden_dim, encoder_dim), block_index=8)
        output, alignment = model(noisy, timestep, text, targets=targets, return_dict=False)
        loss = flow_matching_loss(output[0], velocity) + alignment.loss
    """

    def __init__(self, transformer: nn.Module, regularizer: CrepaRegularizer, block_index: int, *,
                 blocks: str | None = None, output_index: int = 0) -> None:
        super().__init__()
        self.transformer = transformer
        self.regularizer = regularizer
        self.capture = HiddenStateCapture(transformer, block_index, blocks=blocks, output_index=output_index)

    def forward(self, *args, targets: torch.Tensor, **kwargs) -> tuple[object, AlignmentOutput]:
        """The transformer's output as it returns it, and the alignment of this forward's captured states with
        ``targets`` ([B, F, N, encoder_dim] on the DiT's token grid)."""
        output = self.transformer(*args, **kwargs)
        return output, self.regularizer(self.capture.pop(), targets)

    def remove_hooks(self) -> None:
        """Detach the capture from the transformer (the transformer is then as it was before)."""
        self.capture.remove()
