"""Per-rank step time of sequence_parallel_align_loss against the single-process loss (CPU, gloo).

Launches ``--world`` gloo ranks on 127.0.0.1 (torch.multiprocessing), one thread each, and times forward+backward
of three things on every rank, interleaved in a new random order each round (the same order on every rank, so
the ranks enter the SP loss's all-reduce together):
  * ``sp``: the sequence-parallel loss on this rank's shard of [B, F*N, D] (replicated, frozen target);
  * ``whole``: cross_frame_align_loss on the whole sequence in this one process;
  * ``share``: cross_frame_align_loss on this rank's share of whole frames (F / world of them, rounded up), the
    work a rank would do if the frames split evenly: what the SP loss should cost plus an all-reduce.
Prints, per rank, the median over rounds of each round's median step time, and the load average before and after.

    PYTHONPATH=$PWD python benchmarks/bench_distributed.py --frames 13 --tokens 1350 --dim 768 --rounds 7
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(loss_fn, leaf) -> float:
    leaf.grad = None  # as optimizer.zero_grad(): the backward writes a new gradient, no accumulation
    start = time.perf_counter()
    loss_fn().backward()
    return time.perf_counter() - start


def _rank_main(rank: int, args, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    from crepa_kernels import cross_frame_align_loss
    from crepa_kernels.distributed import sequence_parallel_align_loss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    torch.manual_seed(0)
    b, f, n, d = args.batch, args.frames, args.tokens, args.dim
    proj_full = torch.randn(b, f * n, d)
    target = torch.randn(b, f, n, d)
    shard = -(-f * n // args.world)
    proj_full = torch.nn.functional.pad(proj_full, (0, 0, 0, shard * args.world - f * n))
    local = proj_full[:, rank * shard : (rank + 1) * shard].clone().requires_grad_(True)
    whole = proj_full[:, : f * n].clone().requires_grad_(True)
    share_frames = -(-f // args.world)
    share = whole.detach()[:, : share_frames * n].clone().requires_grad_(True)
    options = dict(neighbors=args.neighbors, backend=args.backend)

    candidates = {
        "sp": (lambda: sequence_parallel_align_loss(local, target, num_frames=f, **options), local),
        "whole": (lambda: cross_frame_align_loss(whole, target, num_frames=f, **options), whole),
        "share": (lambda: cross_frame_align_loss(share, target[:, :share_frames], num_frames=share_frames,
                                                 **options), share),
    }
    for candidate in candidates.values():  # warm-up
        _step(*candidate)
    order = random.Random(args.seed)  # the same sequence on every rank
    medians = {name: [] for name in candidates}
    for _ in range(args.rounds):
        names = list(candidates)
        order.shuffle(names)
        for name in names:
            dist.barrier()
            times = [_step(*candidates[name]) for _ in range(args.steps)]
            medians[name].append(statistics.median(times) * 1e3)
    results[rank] = {name: {"median_ms": statistics.median(v), "rounds_ms": [round(x, 1) for x in v]}
                     for name, v in medians.items()}
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--tokens", type=int, default=1350)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--neighbors", type=int, default=1)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per candidate per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank_main, args=(args, _free_port(), results), nprocs=args.world, join=True)
    load_after = os.getloadavg()
    report = {
        "config": vars(args),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": load_after,
        "ranks": {rank: results[rank] for rank in sorted(results.keys())},
    }
    print(f"B={args.batch} F={args.frames} N={args.tokens} D={args.dim} d={args.neighbors} fp32, "
          f"{args.world} gloo ranks x 1 thread, {args.rounds} rounds x {args.steps} steps, fwd+bwd ms "
          f"(median of round medians)")
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}; {os.cpu_count()} cores")
    for rank, row in report["ranks"].items():
        print(f"rank {rank}: " + "  ".join(f"{name} {r['median_ms']:.1f}" for name, r in row.items())
              + f"   sp/share {row['sp']['median_ms'] / row['share']['median_ms']:.2f}"
              + f"  sp/whole {row['sp']['median_ms'] / row['whole']['median_ms']:.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
