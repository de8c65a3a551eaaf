"""The three forms of the loss on a realistic shape: what CrossFrameAlignFunction.apply's recomputed statistics cost.

    python benchmarks/bench_forms.py [--backend cpu] [--dtype fp32] [--rounds 40]

Times forward + backward of the functional form, the module and ``CrossFrameAlignFunction.apply`` on one
[B, F, N, D] case (default: CogVideoX-5B latents with DINOv2-B features, d=1, target frozen), interleaved call by
call in a new random order each round, and reports each form's median and its ratio to the functional form's. The
functional form and the module keep the per-token statistics for the backward; ``apply``, which returns the bare
loss, recomputes them there with the forward kernel.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from cases import DTYPES, PRESETS
from crepa_kernels import CrossFrameAlignFunction, CrossFrameAlignLoss, available_backends, cross_frame_align_loss


def forms(proj, target, backend: str, neighbors: int) -> dict:
    module = CrossFrameAlignLoss(neighbors=neighbors, backend=backend)
    return {
        "functional": lambda: cross_frame_align_loss(proj, target, neighbors=neighbors, backend=backend),
        "module": lambda: module(proj, target),
        "Function.apply": lambda: CrossFrameAlignFunction.apply(proj, target, 1.0, neighbors, "adjacent", False,
                                                                "mean", None, 1e-12, backend),
    }


def time_rounds(calls: dict, proj: torch.Tensor, rounds: int, warmup: int, synchronize=lambda: None,
                seed: int = 0) -> dict[str, list[float]]:
    """Seconds of each call's forward + backward (the gradient of proj, returned rather than accumulated into
    proj.grad), one sample per call per round, in a new order each round."""
    order = list(calls)
    samples = {name: [] for name in order}
    shuffle = random.Random(seed).shuffle
    for round_index in range(warmup + rounds):
        shuffle(order)
        for name in order:
            synchronize()
            start = time.perf_counter()
            torch.autograd.grad(calls[name](), proj)
            synchronize()
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cogvideox-5b")
    parser.add_argument("--tokens", type=int, help="tokens per frame N (default: the preset's)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--neighbors", type=int, default=1)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if args.backend in ("cuda", "triton") else "cpu"
    reason = available_backends(device)[args.backend]
    if reason is not True:
        parser.error(f"backend {args.backend!r} cannot run here: {reason}")
    preset = PRESETS[args.preset]
    shape = (1, preset.frames, args.tokens or preset.tokens, args.dim)
    generator = torch.Generator().manual_seed(0)
    proj = torch.randn(shape, generator=generator).to(device=device, dtype=DTYPES[args.dtype]).requires_grad_(True)
    target = torch.randn(shape, generator=generator).to(device=device, dtype=DTYPES[args.dtype])
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples = time_rounds(forms(proj, target, args.backend, args.neighbors), proj, args.rounds, args.warmup,
                          synchronize)
    medians = {name: statistics.median(times) * 1e3 for name, times in samples.items()}
    print(f"{args.backend} backend, {list(shape)} {args.dtype}, adjacent d={args.neighbors}, target frozen, "
          f"{torch.get_num_threads()} threads; forward + backward, median of {args.rounds} interleaved rounds")
    for name, median in medians.items():
        print(f"{name:<16} {median:8.2f} ms  {median / medians['functional']:5.2f}x the functional form")


if __name__ == "__main__":
    main()
