"""One forward + backward of the C++ extension's ops on random inputs, nothing else: a target for instruction
counters, which load does not disturb (docs/benchmarks.md, "Adjacent d=1 slower than cumulative d=2?").

    OMP_NUM_THREADS=1 valgrind --tool=callgrind --collect-atstart=no \\
        --toggle-collect='crepa::align_forward_cpu*' --toggle-collect='crepa::align_backward_cpu*' \\
        python benchmarks/one_step.py --dtype fp32 --neighbors 1 --mode adjacent --tokens 135
"""
from __future__ import annotations

import argparse

import torch

from cases import DTYPES
from crepa_kernels.ops import native


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--neighbors", type=int, default=1)
    parser.add_argument("--mode", choices=["adjacent", "cumulative"], default="adjacent")
    parser.add_argument("--shape", type=int, nargs=3, default=[13, 1350, 768], metavar=("F", "N", "D"))
    parser.add_argument("--tokens", type=int, help="override N (instruction counts scale with it)")
    args = parser.parse_args(argv)
    frames, tokens, dim = args.shape
    shape = (1, frames, args.tokens or tokens, dim)
    generator = torch.Generator().manual_seed(0)
    proj = torch.randn(shape, generator=generator)
    target = (torch.randn(shape, generator=generator) + 0.7 * proj).to(DTYPES[args.dtype])
    proj = proj.to(DTYPES[args.dtype])
    native.build_info()  # loads the extension, so its ops exist
    options = (args.neighbors, args.mode == "cumulative", 1.0, False, 1e-12)
    loss, stats = torch.ops.crepa_kernels.align_forward(proj, target, *options)
    grad_loss = torch.full_like(loss, 1.0 / loss.numel())
    grad_proj, _ = torch.ops.crepa_kernels.align_backward(grad_loss, proj, target, stats, *options, True, False)
    print(f"loss {loss.mean().item():.6f}, |grad_proj| {grad_proj.float().norm().item():.6f}")


if __name__ == "__main__":
    main()
