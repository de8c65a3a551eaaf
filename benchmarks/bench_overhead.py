"""Eager-mode dispatch overhead: the time of one call on tiny inputs, where the kernels do almost nothing.

    python benchmarks/bench_overhead.py [--calls 2000]

Reports, per usable backend, the median time of a forward call and of a forward+backward call through
cross_frame_align_loss on [1, 2, 1, 4] fp32 inputs, against two floors: a bare torch op of the same size
(x.mul(y).sum()) and its autograd round trip.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from crepa_kernels import available_backends, cross_frame_align_loss


def median_us(fn, calls: int) -> float:
    for _ in range(min(calls, 200)):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    proj = torch.randn(1, 2, 1, 4, requires_grad=True)
    target = torch.randn(1, 2, 1, 4)

    rows = [
        ("torch floor: x.mul(y).sum()", lambda: proj.mul(target).sum(),
         lambda: proj.mul(target).sum().backward()),
    ]
    for name, usable in available_backends("cpu").items():
        if usable is True and name != "triton":  # triton on CPU is the interpreter: not a dispatch cost
            rows.append((f"cross_frame_align_loss(backend={name!r})",
                         lambda name=name: cross_frame_align_loss(proj, target, backend=name),
                         lambda name=name: cross_frame_align_loss(proj, target, backend=name).backward()))
    print(f"{'call on [1, 2, 1, 4] fp32, 1 thread':<52} {'forward us':>11} {'fwd+bwd us':>11}")
    for label, forward, forward_backward in rows:
        print(f"{label:<52} {median_us(forward, args.calls):>11.1f} {median_us(forward_backward, args.calls):>11.1f}")


if __name__ == "__main__":
    main()
