"""A transformer and its CREPA regulariser behind one forward, so that a data-parallel wrapper syncs both."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .capture import HiddenStateCapture
from .regularizer import AlignmentOutput, CrepaRegularizer


class CrepaTransformer(nn.Module):
    """``transformer(*args, **kwargs)`` plus ``regularizer(hidden states of the captured blocks, targets)``.

    ``block_index``: one block index, or one per layer of a regulariser built with ``num_layers`` > 1. Wrap this
    module, not the transformer alone, in DistributedDataParallel: the projectors' gradients are then averaged over
    ranks like the transformer's. The capture hooks sit on the transformer inside, which keeps calling them under
    the wrapper. While the regulariser's lambda is 0 the blocks are not captured and nothing is computed: the targets
    are not needed then (pass ``targets=None`` and skip the encoder or the cache read when ``regularizer.active`` is
    False).

        model = CrepaTransformer(transformer, CrepaRegularizer(hidden_dim, encoder_dim), block_index=8)
        output, alignment = model(noisy, timestep, text, targets=targets, return_dict=False)
        loss = flow_matching_loss(output[0], velocity) + alignment.loss
    """

    def __init__(self, transformer: nn.Module, regularizer: CrepaRegularizer, block_index: int | Sequence[int], *,
                 blocks: str | None = None, output_index: int = 0) -> None:
        super().__init__()
        layers = 1 if isinstance(block_index, int) else len(block_index)
        if layers != regularizer.num_layers:
            raise ValueError(f"block_index: the regulariser aligns {regularizer.num_layers} layer(s), "
                             f"got {layers} block index(es) ({block_index})")
        self.transformer = transformer
        self.regularizer = regularizer
        self.capture = HiddenStateCapture(transformer, block_index, blocks=blocks, output_index=output_index)

    def forward(self, *args, targets: torch.Tensor | Sequence[torch.Tensor] | None,
                sample_weight: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None,
                **kwargs) -> tuple[object, AlignmentOutput]:
        """The transformer's output as it returns it, and the alignment of this forward's captured states with
        ``targets`` ([B, F, N, encoder_dim] on the DiT's token grid, or one such tensor per teacher; None is
        accepted while lambda is 0; a callable returning them is called after the transformer's forward, for
        targets read from that forward)."""
        active = self.regularizer.active
        if active and targets is None:
            raise ValueError("targets: lambda > 0 this step (or its similarity is watched), so the alignment needs "
                             "the targets, got None")
        self.capture.enabled = active
        output = self.transformer(*args, **kwargs)
        if not active:
            return output, self.regularizer.skipped_output()
        if callable(targets):  # targets from this very forward (a deeper block of the same DiT)
            targets = targets()
        return output, self.regularizer(self.capture.pop(), targets, sample_weight=sample_weight,
                                        frame_mask=frame_mask)

    def remove_hooks(self) -> None:
        """Detach the capture from the transformer (the transformer is then as it was before)."""
        self.capture.remove()
