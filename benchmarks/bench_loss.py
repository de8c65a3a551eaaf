"""Speed, bandwidth and memory of every crepa_kernels backend against the eager and torch.compile baselines.

    python benchmarks/bench_loss.py                          # the default sweep for this machine
    python benchmarks/bench_loss.py --preset wan2.1 --dim 1024 --dtype bf16
    python benchmarks/bench_loss.py --projection             # bytes per call and GPU time implied, no run

One table per case on stdout, progress on stderr, every measurement in a JSON file (see docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import crepa_kernels
from cases import BASELINES, DTYPES, PRESETS, Case
from crepa_kernels import cross_frame_align_loss
from eager_crepa import crepa_loss
from measure import MemoryMeter, Timer, copy_bandwidth, machine_info, summarize, versions
from report import format_case, format_header, format_summary, markdown_results, save_plot
from traffic import minimum_bytes, projection_table

REPO = Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = BASELINES + crepa_kernels.backends.BACKEND_NAMES

# Defaults per device: a CPU run stays under two minutes on two cores; a GPU can afford the wider sweep.
# Adjacent d=2 costs exactly what d=1 does (two neighbours), so the second setting is cumulative d=2 (four).
DEFAULTS = {
    "cpu": dict(presets=["cogvideox-5b"], dims=[768], dtypes=["fp32", "bf16"],
                neighbours=[(1, "adjacent"), (2, "cumulative")], budget=1.0, min_reps=5, max_reps=50,
                warmup=0, copy_mb=512),
    "cuda": dict(presets=list(PRESETS), dims=[1024], dtypes=["bf16", "fp32"],
                 neighbours=[(1, "adjacent"), (2, "cumulative")], budget=0.5, min_reps=10, max_reps=200,
                 warmup=10, copy_mb=1024),
}
# Loose agreement with the package's reference before timing: a wrong kernel is not worth timing.
CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}


# ---------------------------------------------------------------------------------------------------- set-up

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    parser.add_argument("--preset", nargs="+", choices=list(PRESETS) + ["all"], help="shape presets")
    parser.add_argument("--dim", nargs="+", type=int, help="feature dims D (768, 1024, 1536: DINOv2-B, L, g)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, help="override the preset's latent frames F")
    parser.add_argument("--tokens", type=int, help="override the preset's tokens per frame N")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), help="input dtypes (both inputs)")
    parser.add_argument("--neighbors", nargs="+", type=int, help="d values; with --mode, every combination")
    parser.add_argument("--mode", nargs="+", choices=["adjacent", "cumulative"])
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--normalize-weights", action="store_true")
    parser.add_argument("--target-grad", action="store_true",
                        help="the target requires grad too (default: frozen encoder features, as in CREPA)")
    parser.add_argument("--backends", nargs="+", choices=IMPLEMENTATIONS,
                        help="implementations to run (default: both baselines and every usable backend)")
    parser.add_argument("--budget", type=float,
                        help="seconds of timed steps per implementation and case, within the reps bounds "
                             "(default: 1.0 on CPU, 0.5 on CUDA)")
    parser.add_argument("--min-reps", type=int, help="default: 5 on CPU, 10 on CUDA")
    parser.add_argument("--max-reps", type=int, help="default: 50 on CPU, 200 on CUDA")
    parser.add_argument("--warmup", type=int,
                        help="extra untimed steps after the first call and the memory step (default: 0 on CPU, "
                             "10 on CUDA)")
    parser.add_argument("--copy-mb", type=int,
                        help="MiB of each tensor of the bandwidth copy (default: 512 on CPU, 1024 on CUDA)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="default: bench_results/bench_<timestamp>.json")
    parser.add_argument("--plot", nargs="?", type=Path, const=True, default=None,
                        help="also save a PNG of the times (default path: the JSON's, with .png)")
    parser.add_argument("--markdown", action="store_true", help="also print the results as a markdown table")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="print the markdown table of a saved run's JSON and exit (runs nothing)")
    parser.add_argument("--projection", action="store_true",
                        help="print the bytes-per-call projection table for the presets and exit")
    args = parser.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    defaults = DEFAULTS[args.device.type]
    for name in ("budget", "min_reps", "max_reps", "warmup", "copy_mb"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.min_reps < 1 or args.max_reps < args.min_reps:
        parser.error("expected 1 <= --min-reps <= --max-reps")
    for name in ("batch", "frames", "tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}: expected a positive int, got {value}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected a positive int, got {args.threads}")
    if args.dim and min(args.dim) < 1:
        parser.error("--dim: expected positive ints")
    if args.neighbors and min(args.neighbors) < 0:
        parser.error("--neighbors: expected non-negative ints")
    if not (args.tau > 0 and math.isfinite(args.tau)):
        parser.error("--tau: expected a positive finite number")

    presets = args.preset or (defaults["presets"] if args.frames is None and args.tokens is None else
                              ["cogvideox-5b"])
    args.presets = list(PRESETS) if "all" in presets else presets
    args.dims = args.dim or defaults["dims"]
    args.dtypes = args.dtype or defaults["dtypes"]
    if args.neighbors is None and args.mode is None:
        args.neighbours = defaults["neighbours"]
    else:
        args.neighbours = [(d, m) for m in (args.mode or ["adjacent"]) for d in (args.neighbors or [1])]
    return args


def build_cases(args) -> list[Case]:
    cases = []
    for preset in args.presets:
        frames = args.frames or PRESETS[preset].frames
        tokens = args.tokens or PRESETS[preset].tokens
        name = preset if args.frames is None and args.tokens is None else f"{preset}*"
        for dim in args.dims:
            for dtype in args.dtypes:
                for neighbors, mode in args.neighbours:
                    cases.append(Case(name, args.batch, frames, tokens, dim, dtype, neighbors, mode, args.tau,
                                      args.normalize_weights, args.target_grad))
    return cases


def implementation_plan(args) -> tuple[list[str], dict[str, str]]:
    """Implementations to run, in table order, and a reason for each one left out."""
    usable = crepa_kernels.available_backends(args.device)
    requested = args.backends or list(IMPLEMENTATIONS)
    run, skipped = [], {}
    for name in IMPLEMENTATIONS:
        if name not in requested:
            continue
        reason = None if name in BASELINES or usable[name] is True else usable[name]
        if name == "triton" and args.device.type == "cpu" and args.backends is None:
            reason = ("on CPU, Triton runs only under TRITON_INTERPRET=1, an interpreter far too slow to be worth "
                      "timing (ask for it anyway with --backends triton)")
        if reason is None:
            run.append(name)
        else:
            skipped[name] = reason
    return run, skipped


# ---------------------------------------------------------------------------------------------------- running

class Progress:
    """One status line on stderr (rewritten in place on a terminal)."""

    def __init__(self, total: int):
        self.total = total
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, index: int, case: Case, what: str) -> None:
        elapsed = time.perf_counter() - self.start
        line = f"[case {index}/{self.total} {elapsed:5.0f}s] {case.short_label()}: {what}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def clear(self) -> None:
        """Erases the status line, so that the tables on stdout start on a clean terminal line."""
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def done(self) -> None:
        self.clear()
        sys.stderr.write(f"done in {time.perf_counter() - self.start:.0f}s\n")


def make_inputs(case: Case, device: torch.device, seed: int):
    generator = torch.Generator(device=device).manual_seed(seed)
    proj = torch.randn(case.shape, generator=generator, dtype=torch.float32, device=device)
    # correlated like a trained projection, so cosines are far from 0 and the agreement check means something
    target = torch.randn(case.shape, generator=generator, dtype=torch.float32, device=device).add_(proj, alpha=0.7)
    proj = proj.to(case.torch_dtype).requires_grad_(True)
    target = target.to(case.torch_dtype).requires_grad_(case.target_grad)
    return proj, target


def make_loss_function(name: str, case: Case):
    """(proj, target) -> scalar mean loss, for one implementation."""
    if name == "eager":
        return functools.partial(crepa_loss, **case.eager_options())
    if name == "compile":
        torch._dynamo.reset()  # every case compiles from scratch (static shapes), its time reported on its own
        options = case.eager_options()

        def eager(proj, target):
            return crepa_loss(proj, target, **options)

        return torch.compile(eager, dynamic=False)
    return functools.partial(cross_frame_align_loss, backend=name, reduction="mean", **case.loss_options())


def check_agreement(loss, grads, expected_loss, expected_grads) -> None:
    """Raises unless loss and gradients match the package's reference loosely (per the gradient dtype)."""
    tolerance = CHECK_TOLERANCE[torch.float32]
    error = abs(loss.item() - expected_loss.item())
    if not math.isfinite(loss.item()) or error > tolerance * max(1.0, abs(expected_loss.item())):
        raise AssertionError(f"loss {loss.item():.8g} disagrees with the reference {expected_loss.item():.8g}")
    for name, grad, expected in zip(("proj", "target"), grads, expected_grads):
        tolerance = CHECK_TOLERANCE[expected.dtype]
        scale = expected.float().abs().max().item()
        error = (grad.float() - expected.float()).abs().max().item()
        if not math.isfinite(error) or error > tolerance * scale:
            raise AssertionError(f"grad_{name} differs from the reference by {error:.3g} (max |grad| {scale:.3g})")


def bench_implementation(name, case, proj, target, expected, args, timer, meter, progress):
    inputs = [proj, target] if case.target_grad else [proj]
    loss_function = make_loss_function(name, case)

    def forward():
        return loss_function(proj, target)

    def backward(loss):
        return torch.autograd.grad(loss, inputs)

    record = {}
    progress("first call" + (" (compiling)" if name == "compile" else ""))
    cache_hits_before = compile_cache_hits()
    first_call_start = time.perf_counter()
    loss = forward()
    grads = backward(loss)
    if args.device.type == "cuda":
        torch.cuda.synchronize(args.device)
    record["first_call_s"] = time.perf_counter() - first_call_start
    if name == "reference" and expected is None:
        expected = (loss.detach(), [g.detach() for g in grads])
    elif expected is None:
        raise RuntimeError("the reference backend failed on this case, so there is nothing to check against")
    else:
        check_agreement(loss, grads, *expected)
    del loss, grads

    record["memory"], step_seconds, loss, grads = meter.measure(forward, backward)
    del loss, grads
    for _ in range(args.warmup):
        step_seconds = min(step_seconds, timer.step(forward, backward))
    reps = max(args.min_reps, min(args.max_reps, math.ceil(args.budget / max(step_seconds, 1e-9))))
    progress(f"timing {reps} steps of ~{step_seconds * 1e3:.3g} ms")
    times = timer.steps(forward, backward, reps)
    record["passes"] = {name_: summarize(seconds) for name_, seconds in times.by_pass().items()}
    if name == "compile":
        record["compile_s"] = max(0.0, record["first_call_s"] - record["passes"]["fwd+bwd"]["median_ms"] / 1e3)
        # a warm on-disk cache (an earlier run on this machine) makes "compiling" mostly loading
        record["compile_cache_hits"] = compile_cache_hits() - cache_hits_before
    return record, expected


def compile_cache_hits() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def bench_case(index, case, plan, args, timer, meter, progress, copy_gbps) -> dict:
    say = functools.partial(progress, index, case)
    proj, target = make_inputs(case, args.device, args.seed)
    traffic = minimum_bytes(case.shape, proj.dtype, target.dtype, case.target_grad)
    result = {"case": asdict(case), "shape": list(case.shape), "min_bytes": traffic,
              "input_bytes": proj.numel() * proj.element_size() + target.numel() * target.element_size(),
              "grad_bytes": proj.numel() * proj.element_size()
              + (target.numel() * target.element_size() if case.target_grad else 0),
              "implementations": {}}
    # the package's reference runs first: its first call is what every other implementation is checked against
    order = sorted(plan, key=lambda name: name != "reference")
    expected = None
    if "reference" not in plan:
        inputs = [proj, target] if case.target_grad else [proj]
        loss = cross_frame_align_loss(proj, target, backend="reference", **case.loss_options())
        expected = (loss.detach(), [g.detach() for g in torch.autograd.grad(loss, inputs)])
    for name in order:
        try:
            record, expected = bench_implementation(name, case, proj, target, expected, args, timer, meter,
                                                    lambda what, name=name: say(f"{name} {what}"))
        except Exception as error:  # one broken implementation must not hide the others' numbers
            record = {"error": f"{type(error).__name__}: {error}"}
        result["implementations"][name] = record
    result["implementations"] = {name: result["implementations"][name] for name in plan}  # table order
    add_derived_numbers(result, copy_gbps)
    return result


def add_derived_numbers(result: dict, copy_gbps: float | None) -> None:
    """Achieved bandwidth, its share of the measured copy bandwidth and the speed-up over each baseline."""
    records = result["implementations"]
    for record in records.values():
        for pass_name, stats in record.get("passes", {}).items():
            seconds = stats["median_ms"] / 1e3
            stats["gbps"] = result["min_bytes"][pass_name] / seconds / 1e9
            stats["pct_of_copy_bandwidth"] = 100 * stats["gbps"] / copy_gbps if copy_gbps else None
            for baseline in BASELINES:
                base = records.get(baseline, {}).get("passes", {}).get(pass_name)
                stats[f"speedup_vs_{baseline}"] = base["median_ms"] / stats["median_ms"] if base else None


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    if args.projection:
        print(projection_table())
        return 0
    if args.render:
        print(markdown_results(json.loads(args.render.read_text())))
        return 0
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (the tests)


def run(args) -> int:
    started = datetime.datetime.now().astimezone()
    json_path = args.json or REPO / "bench_results" / f"bench_{started:%Y%m%d_%H%M%S}.json"
    cases = build_cases(args)
    plan, skipped = implementation_plan(args)

    timer = Timer(args.device)
    meter = MemoryMeter(args.device)
    sys.stderr.write(f"measuring copy bandwidth ({args.copy_mb} MB)...\n")
    copy = copy_bandwidth(timer, args.copy_mb)
    report = {
        "timestamp": started.isoformat(timespec="seconds"),
        "command": [sys.executable, str(Path(__file__).resolve())] + args.argv,
        "device": str(args.device),
        "machine": machine_info(args.device),
        "versions": versions(),
        "options": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()},
        "environment": {k: v for k, v in os.environ.items()
                        if k.startswith(("CREPA_", "TRITON_", "OMP_", "MKL_", "CUDA_VISIBLE"))},
        "methodology": {
            "timing": "per step: forward then backward of that forward, timestamped at each boundary "
                      + ("(CUDA events, L2 flushed before each step)" if args.device.type == "cuda"
                         else "(time.perf_counter)"),
            "bytes": "minimum traffic: inputs read once, outputs written once (see traffic.minimum_bytes)",
            "memory": "torch.cuda allocator counters" if args.device.type == "cuda"
                      else "resident-set growth from /proc after malloc_trim, peak from VmHWM after clear_refs",
        },
        "copy_bandwidth": copy,
        "memory_method_unavailable": meter.unavailable,
        "memory_probe": meter.probe(),
        "backends": {name: (usable if usable is True else str(usable))
                     for name, usable in crepa_kernels.available_backends(args.device).items()},
        "implementations_run": plan,
        "skipped": skipped,
        "results": [],
    }
    print(format_header(report), flush=True)

    progress = Progress(len(cases))
    for index, case in enumerate(cases, start=1):
        result = bench_case(index, case, plan, args, timer, meter, progress, copy["gbps"])
        report["results"].append(result)
        progress.clear()
        print("\n" + format_case(result), flush=True)
    progress.done()
    print("\n" + format_summary(report["results"]))

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nresults: {json_path}")
    if args.markdown:
        print("\n" + markdown_results(report))
    if args.plot is not None:
        plot_path = json_path.with_suffix(".png") if args.plot is True else args.plot
        print(save_plot(report["results"], plot_path))
    failures = [(Case(**r["case"]).short_label(), name) for r in report["results"]
                for name, record in r["implementations"].items() if "error" in record]
    for label, name in failures:
        print(f"FAILED: {name} on {label}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
