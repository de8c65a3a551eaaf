"""Bytes a pass must move (the roofline numerator), an estimate of what the eager formulation moves, and the
GPU time they imply (a projection, not a measurement)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cases import DTYPES, PRESETS
from eager_crepa import crepa_loss

LOSS_BYTES_PER_FRAME = 4  # the [B, F] fp32 per-frame loss, written by the forward and its gradient read by the backward


def minimum_bytes(shape, proj_dtype, target_dtype, target_grad: bool) -> dict[str, int]:
    """The least memory traffic of each pass: every input element read once, every output element written once.

    forward:  read proj and target, write L[B, F].
    backward: read proj, target and grad_L, write grad_proj (and grad_target when the target requires grad).
    Per-token statistics a kernel may keep between the passes (a few fp32 per token, under 1% of the inputs
    at D >= 768) are left out: this is the floor, not a model of any one kernel.
    """
    batch, frames, tokens, dim = shape
    elements = batch * frames * tokens * dim
    proj_bytes = elements * torch.empty((), dtype=proj_dtype).element_size()
    target_bytes = elements * torch.empty((), dtype=target_dtype).element_size()
    loss_bytes = batch * frames * LOSS_BYTES_PER_FRAME
    forward = proj_bytes + target_bytes + loss_bytes
    backward = proj_bytes + target_bytes + loss_bytes + proj_bytes + (target_bytes if target_grad else 0)
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}


def _distinct_bytes(tensor: torch.Tensor) -> int:
    """Bytes a kernel touches in ``tensor``: broadcast (stride-0) dimensions are read once."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


_WRITE_ONLY = {"fill_", "zero_", "zeros", "zeros_like", "ones_like", "full", "scalar_tensor"}


class _KernelTraffic(TorchDispatchMode):
    """Adds up, over every ATen op that runs, the bytes of its tensor inputs (read) and outputs (written)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._schema.name in ("aten::detach", "aten::empty", "aten::empty_like",
                                                   "aten::empty_strided"):
            return out
        name = func._schema.name.split("::")[-1]
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if name in _WRITE_ONLY:
            inputs = []
        elif name == "copy_":
            inputs = inputs[1:]  # copy_ writes self without reading it
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.bytes += sum(map(_distinct_bytes, inputs)) + sum(map(_distinct_bytes, outputs))
        return out


def eager_bytes_estimate(shape, dtype, target_grad: bool, **loss_options) -> dict[str, int]:
    """An estimate of the eager baseline's traffic: each ATen kernel it launches reads its inputs once and
    writes its outputs once, with no reuse through caches between kernels. Run on meta tensors, so it is
    instant for any shape; it counts the kernels of this torch version's eager and autograd formulas."""
    proj = torch.empty(shape, dtype=dtype, device="meta", requires_grad=True)
    target = torch.empty(shape, dtype=dtype, device="meta", requires_grad=target_grad)
    inputs = [proj, target] if target_grad else [proj]
    with _KernelTraffic() as forward:
        loss = crepa_loss(proj, target, **loss_options)
    with _KernelTraffic() as backward:
        torch.autograd.grad(loss, inputs)
    return {"fwd": forward.bytes, "bwd": backward.bytes, "fwd+bwd": forward.bytes + backward.bytes}


GPU_BANDWIDTH_TBPS = {"H100": 3.35, "A100": 2.0}  # HBM peak, TB/s: H100 SXM, A100 80GB SXM (rounded)


def projection_table(dims=(768, 1024, 1536), dtypes=("bf16", "fp32")) -> str:
    """Markdown: the minimum bytes per call for the presets (B=1, target frozen) and the time they take at
    peak GPU memory bandwidth, next to the eager formulation's estimated bytes (adjacent d=1).
    Arithmetic, not a measurement."""
    gpus = list(GPU_BANDWIDTH_TBPS)
    header = ["preset", "D", "dtype", "min fwd MB", "min bwd MB"]
    header += [f"{gpu} {pass_name} µs" for gpu in gpus for pass_name in ("fwd", "bwd")]
    header += ["eager fwd+bwd MB (est.)", "eager / fused bytes"] + [f"eager {gpu} fwd+bwd µs" for gpu in gpus]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def microseconds(nbytes, gpu):
        return f"{nbytes / (GPU_BANDWIDTH_TBPS[gpu] * 1e12) * 1e6:.0f}"

    for preset_name, preset in PRESETS.items():
        for dim in dims:
            for dtype in dtypes:
                shape = (1, preset.frames, preset.tokens, dim)
                fused = minimum_bytes(shape, DTYPES[dtype], DTYPES[dtype], target_grad=False)
                eager = eager_bytes_estimate(shape, DTYPES[dtype], False, neighbors=1, mode="adjacent")
                cells = [preset_name, str(dim), dtype, f"{fused['fwd'] / 1e6:.0f}", f"{fused['bwd'] / 1e6:.0f}"]
                cells += [microseconds(fused[p], gpu) for gpu in gpus for p in ("fwd", "bwd")]
                cells += [f"{eager['fwd+bwd'] / 1e6:.0f}", f"{eager['fwd+bwd'] / fused['fwd+bwd']:.1f}x"]
                cells += [microseconds(eager["fwd+bwd"], gpu) for gpu in gpus]
                rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
