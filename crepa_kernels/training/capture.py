"""Capture of the hidden states leaving one block of a diffusers video transformer, checkpointing-safe.

diffusers' video transformers (Wan, CogVideoX, HunyuanVideo, LTX, Mochi, ...) keep their blocks in an
``nn.ModuleList`` called ``blocks`` or ``transformer_blocks`` and, with gradient checkpointing on, call each block
through ``self._gradient_checkpointing_func(block, *args)``, by default
``torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)``. A block's forward hooks run
inside that call, so a plain "store the output" hook goes wrong in two ways:

* non-reentrant: the forward runs with grad on and returns the hook's tensor itself, so the first capture is in the
  graph. But backward re-runs the block to rebuild its saved tensors. By default that recomputation stops at the
  last saved tensor, before the block's hooks run; with ``set_checkpoint_early_stop(False)`` (or a checkpoint
  function that disables early stop) it runs to the end and the hook fires again, overwriting the capture with the
  recomputed output: a tensor of a throwaway graph the loss never saw. Anything read from the capture after a
  backward (a second backward, gradient accumulation with separate backwards, logging) then sees the wrong tensor,
  and backpropagating through it fails or keeps the recomputed graph alive.
* reentrant (``use_reentrant=True``, a common ``gradient_checkpointing_func``): the block runs under no_grad, so
  the hook sees a tensor with no grad_fn; only after ``CheckpointFunction.apply`` returns does autograd attach
  ``CheckpointFunctionBackward`` to that same object. Work done inside the hook (projecting, casting) is therefore
  cut off from the graph, and the recomputation in backward fires the hook again, as above.

So the capture is armed by the transformer's own forward pre-hook, takes the first output of the block during that
forward, stores the tensor untouched (autograd-recorded work in the checkpointed region done in the forward but
skipped in the recomputation changes the number of saved tensors, which non-reentrant checkpointing rejects), and
ignores every later call: the recomputations in backward happen after the transformer's forward returned. A
transformer forward that itself runs inside a backward (the whole model checkpointed from outside) is a
recomputation too and is ignored.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

# Attribute names of the block list in diffusers' video transformers, in the order they are tried.
BLOCK_LIST_NAMES = ("blocks", "transformer_blocks")


def find_blocks(transformer: nn.Module, name: str | None = None) -> nn.ModuleList:
    """The transformer's list of blocks: ``transformer.<name>``, or the first of BLOCK_LIST_NAMES it has."""
    names = (name,) if name is not None else BLOCK_LIST_NAMES
    for candidate in names:
        blocks = getattr(transformer, candidate, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise ValueError(
        f"{type(transformer).__name__} has no non-empty nn.ModuleList named {' or '.join(map(repr, names))}; "
        "pass blocks=<attribute name> (e.g. 'single_transformer_blocks' for HunyuanVideo)"
    )


def _inside_backward() -> bool:
    # -1 outside the autograd engine; checkpoint recomputation always runs inside a backward.
    return torch._C._current_graph_task_id() != -1


class HiddenStateCapture:
    """Records the hidden states leaving ``blocks[index]`` during each forward of ``transformer``.

    ``index`` is one block index, or a sequence of them to capture several blocks in one forward (then
    :meth:`pop` and :attr:`hidden_states` give a list, in that order). Attach it to the unwrapped model (hooks on
    it keep firing under DistributedDataParallel). Blocks that return a tuple, such as CogVideoX's and
    HunyuanVideo's ``(hidden_states, encoder_hidden_states)``, give their element ``output_index``. Set
    ``enabled = False`` to skip capturing (nothing is stored; the hooks return at once). Use as a context manager
    or call :meth:`remove`.

        with HiddenStateCapture(transformer, index=8) as capture:
            prediction = transformer(...)
            hidden_states = capture.pop()      # [B, tokens, hidden_dim], in the autograd graph of that forward
    """

    def __init__(
        self, transformer: nn.Module, index: int | Sequence[int], *, blocks: str | None = None,
        output_index: int = 0,
    ) -> None:
        block_list = find_blocks(transformer, blocks)
        self._single = isinstance(index, int)
        indices = [index] if self._single else list(index)
        if not indices:
            raise ValueError("index: expected a block index or a non-empty sequence of them, got an empty sequence")
        for i in indices:
            if not isinstance(i, int) or not -len(block_list) <= i < len(block_list):
                raise IndexError(f"index: {type(transformer).__name__} has {len(block_list)} blocks, got {i}")
        self.blocks = [block_list[i] for i in indices]
        if len({id(b) for b in self.blocks}) != len(self.blocks):
            raise ValueError(f"index: the same block appears twice in {indices}")
        self.output_index = output_index
        self.enabled = True
        self._armed = [False] * len(self.blocks)
        self._grad_expected = [False] * len(self.blocks)
        self._states: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._handles = [
            transformer.register_forward_pre_hook(self._arm),
            transformer.register_forward_hook(self._disarm, always_call=True),
        ]
        for position, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_hook(functools.partial(self._record, position)))

    @property
    def block(self) -> nn.Module:
        """The captured block (a capture of one block index)."""
        if not self._single:
            raise AttributeError("this capture has several blocks: use .blocks")
        return self.blocks[0]

    def _arm(self, module, args) -> None:
        if _inside_backward():
            return
        self._states = [None] * len(self.blocks)
        if not self.enabled:
            return
        grad_on = torch.is_grad_enabled()
        self._armed = [True] * len(self.blocks)
        self._grad_expected = [grad_on and any(p.requires_grad for p in b.parameters()) for b in self.blocks]

    def _record(self, position, module, args, output) -> None:
        if not self._armed[position]:
            return
        self._armed[position] = False
        self._states[position] = output[self.output_index] if isinstance(output, (tuple, list)) else output

    def _disarm(self, module, args, output) -> None:
        self._armed = [False] * len(self.blocks)

    def _checked(self, position: int) -> torch.Tensor:
        states = self._states[position]
        if states is None:
            raise RuntimeError("no hidden states captured: the block did not run since the last pop/forward/remove"
                               + ("" if self.enabled else " (the capture is disabled)"))
        if self._grad_expected[position] and not states.requires_grad:
            raise RuntimeError(
                "the captured hidden states are cut off from the autograd graph although the block has trainable "
                "parameters and ran with grad enabled; read the capture after the transformer's forward returns"
            )
        return states

    @property
    def hidden_states(self) -> torch.Tensor | list[torch.Tensor]:
        """The capture of the last forward (kept until the next forward, :meth:`pop` or :meth:`remove`)."""
        states = [self._checked(position) for position in range(len(self.blocks))]
        return states[0] if self._single else states

    def pop(self) -> torch.Tensor | list[torch.Tensor]:
        """The capture, released here so it does not outlive the step's graph."""
        states = self.hidden_states
        self._states = [None] * len(self.blocks)
        return states

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._states = [None] * len(self.blocks)
        self._armed = [False] * len(self.blocks)

    def __enter__(self) -> HiddenStateCapture:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
