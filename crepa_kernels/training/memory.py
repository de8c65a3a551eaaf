"""How much memory a step keeps for its backward: a meter of the tensors autograd saves, and the size of what the
projector alone saves, to project the measured figures to other shapes; and the reset of the process's peak RSS
that per-step peak memory on the CPU needs."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

from .projector import PROJECTOR_KINDS


class SavedTensorMeter:
    """Bytes of the distinct storages autograd saves for backward inside the ``with`` block, parameters excluded
    (they are held anyway). A storage saved by several ops, or a view of one, counts once. Regions run under
    non-reentrant activation checkpointing are not seen: their tensors are dropped and recomputed.

        with SavedTensorMeter(exclude=model.parameters()) as meter:
            loss = model(...)
        meter.bytes
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {_storage_key(p) for p in exclude}
        self._seen: set = set()
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._seen and key not in self._excluded:
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hooks.__exit__(*exc_info)


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set size (VmHWM in /proc/self/status) to its current size, so that the
    peak of a step or a run can be read on its own; False where that is not possible (not Linux, or
    /proc/self/clear_refs not writable)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak RSS (Documentation/filesystems/proc.rst)
        return True
    except OSError:
        return False


def _storage_key(tensor: torch.Tensor) -> tuple:
    if isinstance(tensor, DTensor):  # FSDP2's sharded parameters: the storage is the local shard's
        tensor = tensor.to_local()
    return tensor.device, tensor.untyped_storage().data_ptr()


def projector_activation_bytes(tokens: int, hidden_dim: int, *, kind: str = "mlp", width: int = 2048,
                               depth: int = 3, element_size: int = 4, input_cast: bool = False) -> int:
    """Bytes the projector keeps for its backward beyond its input (the captured states, held by the DiT's graph)
    and its output (held by the loss): what ``checkpoint_projector=True`` frees, for ``tokens`` tokens.

    "mlp": each hidden layer keeps its Linear's output (the SiLU's input) and the SiLU's output (the next Linear's
    input), 2 * width per token each. "linear": the LayerNorm's output (the Linear's input), hidden_dim per token,
    and its mean and reciprocal std, 2 per token (in fp32 at least). ``input_cast``: the projector runs in a wider dtype than the
    states (an fp32 projector on bf16 states), so its first layer keeps its own cast copy of the input as well.
    """
    modelled = tuple(k for k in PROJECTOR_KINDS if k != "conv")  # what "conv" keeps depends on the conv kernel
    if kind not in modelled:
        raise ValueError(f"kind: expected one of {modelled}, got {kind!r}")
    if kind == "mlp":
        per_token = 2 * width * (depth - 1) * element_size
    else:
        per_token = hidden_dim * element_size + 2 * max(element_size, 4)
    if input_cast:
        per_token += hidden_dim * element_size
    return tokens * per_token
