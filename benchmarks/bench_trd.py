"""Token relation distillation: VideoREPA's eager formulation, torch.compile of it and the fused backends.

    python benchmarks/bench_trd.py                       # VideoREPA's shape and full resolution, fp32, CPU
    python benchmarks/bench_trd.py --shapes videorepa --rounds 8
    python benchmarks/bench_trd.py --projection          # FLOPs per call and the GPU time implied, no run

Forward + backward (the gradient of proj; the encoder features are frozen, as in VideoREPA) of pairs="all",
margin 0.1. Time: one step per implementation per round, in a new random order each round, after a checked
warm-up step; the table gives the median over rounds and each implementation's ratio to torch.compile's, taken
within each round. Memory: one separate step per implementation, measured as bench_loss.py does (measure.py:
resident memory above the step's start on CPU, the allocator's peak on CUDA): "held" is what the forward keeps
for the backward, "peak" the high-water mark of forward + backward.

Full resolution (F=24, N=1350: 32,400 tokens): one [T, T] fp32 matrix is 4.2 GB and the eager formulation's
autograd graph holds several, so it is not run there by default (it would take most of a 24 GB machine that
others share); its memory is given as the measured VideoREPA-shape figure scaled by (T_full / T)^2, labelled as
a projection. --eager-full runs it anyway.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from measure import MemoryMeter, machine_info, versions

from crepa_kernels import token_relation_loss
from crepa_kernels.relation_function import relation_backend_reason

SHAPES = {"videorepa": (1, 24, 150, 1024), "full": (1, 24, 1350, 1024)}  # [B, F, N, D]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MARGIN = 0.1
# Dense tensor-core peaks (TFLOP/s; NVIDIA's data sheets, without sparsity) and the fraction of peak a tuned GEMM-
# like kernel reaches in practice, for the projection only
GPU_PEAKS = {"H100 SXM": {"bf16": 989.0, "fp32": 494.0}, "A100 SXM": {"bf16": 312.0, "fp32": 156.0}}
ASSUMED_EFFICIENCY = 0.5


def eager_videorepa(proj, target, margin=MARGIN):
    """VideoREPA's token_relation_distillation as its trainer writes it: normalise, both [B, T, T] relation
    matrices by bmm, relu(|difference| - margin), mean."""
    p = F.normalize(proj.float().flatten(1, 2), dim=-1)
    y = F.normalize(target.float().flatten(1, 2), dim=-1)
    return torch.relu((torch.bmm(p, p.transpose(1, 2)) - torch.bmm(y, y.transpose(1, 2))).abs() - margin).mean()


def implementations(device: torch.device, skip_eager: bool) -> dict:
    found = {}
    if not skip_eager:
        found["eager"] = eager_videorepa
        found["torch.compile"] = torch.compile(eager_videorepa)
    for backend in ("cpu", "triton"):
        if relation_backend_reason(backend, device) is None:
            found[f"fused {backend}"] = (lambda b: lambda p, y: token_relation_loss(p, y, margin=MARGIN,
                                                                                   backend=b))(backend)
    if device.type == "cpu":
        found.pop("fused triton", None)  # the interpreter: correctness only
    return found


def _inputs(shape, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    proj = torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    target = (0.7 * proj.detach().float() + torch.randn(shape, generator=generator).to(device)).to(dtype)
    return proj, target


def flops(shape, dim_out_block=128) -> dict:
    """Multiply-adds x 2 per call (pairs="all", proj gradient only). The relation tiles cost 2 T^2 D per input;
    the proj gradient C p^ another 2 T^2 D. The cpu kernel forms the tiles once (loss and gradient in one pass);
    the Triton gradient kernel re-forms them for every chunk of dim_out_block output features."""
    batch, frames, tokens, dim = shape
    t2d = batch * (frames * tokens) ** 2 * dim
    return {"one pass (cpu)": 6 * t2d, "triton": 4 * t2d + -(-dim // dim_out_block) * 4 * t2d + 2 * t2d,
            "eager": 4 * t2d + 2 * 2 * t2d}


def projection(shapes) -> str:
    lines = ["| shape | kernel | GFLOP | " + " | ".join(f"{gpu} {kind} (ms)" for gpu in GPU_PEAKS
                                                      for kind in ("bf16",)) + " |",
             "|---|---|---:|" + "---:|" * len(GPU_PEAKS)]
    for name in shapes:
        for kernel, count in flops(SHAPES[name]).items():
            times = [count / (peaks["bf16"] * 1e12 * ASSUMED_EFFICIENCY) * 1e3 for peaks in GPU_PEAKS.values()]
            lines.append(f"| {name} {SHAPES[name]} | {kernel} | {count / 1e9:,.0f} | "
                         + " | ".join(f"{t:,.1f}" for t in times) + " |")
    return ("Projection, not a measurement: FLOPs / (dense bf16 tensor-core peak x "
            f"{ASSUMED_EFFICIENCY:.0%}).\n" + "\n".join(lines))


def step(function, proj, target):
    loss = function(proj, target)
    (grad,) = torch.autograd.grad(loss, proj)
    return loss, grad


def run_shape(name, dtype, device, rounds, eager_full):
    shape = SHAPES[name]
    skip_eager = name == "full" and not eager_full
    proj, target = _inputs(shape, dtype, device)
    calls = implementations(device, skip_eager)
    meter = MemoryMeter(device)
    rows = {}
    check = None
    print(f"\n{name} {shape} {str(dtype)[6:]}: warm-up and memory", file=sys.stderr, flush=True)
    for label, function in calls.items():
        warm = None
        if rounds:  # a warm-up step (it compiles), checked against the first implementation's loss
            start = time.perf_counter()
            loss, _ = step(function, proj, target)
            warm = time.perf_counter() - start
            if check is None:
                check = loss.item()
            elif abs(loss.item() - check) > 1e-3 * abs(check):
                raise SystemExit(f"{label}: loss {loss.item()} disagrees with {check}: not timing a wrong result")
        memory, seconds, loss, _ = meter.measure(lambda: function(proj, target),
                                                 lambda loss: torch.autograd.grad(loss, proj))
        if not torch.isfinite(loss):
            raise SystemExit(f"{label}: non-finite loss {loss.item()}")
        rows[label] = dict(warmup_s=warm, memory=memory, memory_step_s=seconds, times=[])
        print(f"  {label}: warm-up {warm} s, memory step {seconds:.2f} s, loss {loss.item():.6f}, {memory}",
              file=sys.stderr, flush=True)
    order = list(calls)
    for round_index in range(rounds):
        random.Random(round_index).shuffle(order)
        for label in order:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(calls[label], proj, target)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rows[label]["times"].append(time.perf_counter() - start)
        print(f"  round {round_index + 1}/{rounds} done", file=sys.stderr, flush=True)
    return dict(shape=shape, dtype=str(dtype), rows=rows, skipped_eager=skip_eager)


def _gb(value):
    return "n/a" if value is None else f"{value / 1e9:.2f}"


def table(result, projected_from=None) -> str:
    rows = result["rows"]
    base = rows.get("torch.compile")
    lines = ["| implementation | fwd+bwd median (ms) | torch.compile time / this | held (GB) | peak (GB) |",
             "|---|---:|---:|---:|---:|"]
    for label, row in rows.items():
        times = row["times"] or [row["memory_step_s"]]
        median = statistics.median(times) * 1e3
        ratio = (f"{statistics.median(b / t for b, t in zip(base['times'], times)):.2f}x"
                 if base and row["times"] and label != "torch.compile" else "")
        memory = row["memory"] or {}
        lines.append(f"| {label} | {median:,.0f} | {ratio} | {_gb(memory.get('held_bytes'))} | "
                     f"{_gb(memory.get('peak_bytes'))} |")
    if projected_from is not None:
        scale = (projected_from[1] / projected_from[0]) ** 2
        for label in ("eager", "torch.compile"):
            memory = projected_from[2].get(label, {}).get("memory") or {}
            if memory:
                lines.append(f"| {label} (projected: VideoREPA-shape memory x {scale:.0f}; not run) | | | "
                             f"{_gb(memory['held_bytes'] * scale)} | {_gb(memory['peak_bytes'] * scale)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds at VideoREPA's shape")
    parser.add_argument("--full-rounds", type=int, default=0,
                        help="timed rounds at full resolution (default 0: its memory step is its one timing)")
    parser.add_argument("--eager-full", action="store_true", help="run the eager formulation at full resolution")
    parser.add_argument("--projection", action="store_true", help="print the FLOP projection only")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    if args.projection:
        print(projection(args.shapes))
        return
    device = torch.device(args.device)
    info = dict(machine=machine_info(device), versions=versions(), command=" ".join(sys.argv), results={})
    print(f"machine: {info['machine']['cpu_model']}, {info['machine']['torch_threads']} torch threads, "
          f"{_gb(info['machine']['memory_bytes'])} GB; load {info['machine']['load_average']}")
    for name in args.shapes:
        rounds = args.rounds if name == "videorepa" else args.full_rounds
        info["results"][name] = run_shape(name, DTYPES[args.dtype], device, rounds, args.eager_full)
    for name, result in info["results"].items():
        projected_from = None
        if result["skipped_eager"] and "videorepa" in info["results"]:
            tokens = [SHAPES[s][1] * SHAPES[s][2] for s in ("videorepa", name)]
            projected_from = (*tokens, info["results"]["videorepa"]["rows"])
        print(f"\n### {name} {tuple(result['shape'])} {result['dtype'][6:]}, pairs='all', margin {MARGIN}, "
              f"proj gradient\n")
        print(table(result, projected_from))
    print("\n" + projection(args.shapes))
    if args.json:
        args.json.write_text(json.dumps(info, indent=1, default=str))


if __name__ == "__main__":
    main()
