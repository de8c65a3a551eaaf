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
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import crepa_kernels
from cases import BASELINES, DTYPES, PRESETS, Case
from crepa_kernels import cross_frame_align_loss
from eager_crepa import crepa_loss
from measure import MemoryMeter, Timer, machine_info, versions
from report import format_case, format_header, format_summary, markdown_results, readme_table, save_plot
from rounds import Slot, paired_ratios, run_rounds, spread_percent, steps_per_round
from traffic import minimum_bytes, projection_table

REPO = Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = BASELINES + crepa_kernels.backends.BACKEND_NAMES

# Defaults per device: a CPU run takes about three minutes on two cores; a GPU can afford the wider sweep.
# Adjacent d=2 costs exactly what d=1 does (two neighbours), so the second setting is cumulative d=2 (four).
DEFAULTS = {
    "cpu": dict(presets=["cogvideox-5b"], dims=[768], dtypes=["fp32", "bf16"],
                neighbours=[(1, "adjacent"), (2, "cumulative")], rounds=6, budget=1.0, min_reps=5, max_reps=50,
                warmup=0, copy_mb=512),
    "cuda": dict(presets=list(PRESETS), dims=[1024], dtypes=["bf16", "fp32"],
                 neighbours=[(1, "adjacent"), (2, "cumulative")], rounds=10, budget=0.5, min_reps=10,
                 max_reps=200, warmup=10, copy_mb=1024),
}
COPY_STEPS_PER_ROUND = 3
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
    parser.add_argument("--rounds", type=int,
                        help="rounds of interleaved timing: each round times every implementation of every case "
                             "(and the copy) a few steps, in a new random order (default: 6 on CPU, 10 on CUDA)")
    parser.add_argument("--budget", type=float,
                        help="seconds of timed steps per implementation and case over all rounds, within the reps "
                             "bounds (default: 1.0 on CPU, 0.5 on CUDA)")
    parser.add_argument("--min-reps", type=int, help="timed steps per implementation and case, at least "
                                                     "(default: 5 on CPU, 10 on CUDA; at least one per round)")
    parser.add_argument("--max-reps", type=int, help="and at most (default: 50 on CPU, 200 on CUDA)")
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
    for name in ("rounds", "budget", "min_reps", "max_reps", "warmup", "copy_mb"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.min_reps < 1 or args.max_reps < args.min_reps:
        parser.error("expected 1 <= --min-reps <= --max-reps")
    if args.rounds < 1:
        parser.error(f"--rounds: expected a positive int, got {args.rounds}")
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

    def __init__(self):
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, what: str) -> None:
        line = f"[{time.perf_counter() - self.start:5.0f}s] {what}"
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
        options = case.eager_options()

        def eager(proj, target):
            return crepa_loss(proj, target, **options)

        # static shapes; each case's graph is compiled on its first call and stays cached through the rounds
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


def prepare_implementation(name, case, proj, target, expected, args, timer, meter, say):
    """First call (checked against the reference), the memory step and the warm-up. Returns the record so far,
    the step functions, the seconds of one step and the reference result."""
    inputs = [proj, target] if case.target_grad else [proj]
    loss_function = make_loss_function(name, case)

    def forward():
        return loss_function(proj, target)

    def backward(loss):
        return torch.autograd.grad(loss, inputs)

    record = {}
    say(f"{name} first call" + (" (compiling)" if name == "compile" else ""))
    cache_hits_before = compile_cache_hits()
    first_call_start = time.perf_counter()
    loss = forward()
    grads = backward(loss)
    if args.device.type == "cuda":
        torch.cuda.synchronize(args.device)
    record["first_call_s"] = time.perf_counter() - first_call_start
    if name == "compile":
        # a warm on-disk cache (an earlier run on this machine) makes "compiling" mostly loading
        record["compile_cache_hits"] = compile_cache_hits() - cache_hits_before
    if name == "reference" and expected is None:
        expected = (loss.detach(), [g.detach() for g in grads])
    elif expected is None:
        raise RuntimeError("the reference backend failed on this case, so there is nothing to check against")
    else:
        check_agreement(loss, grads, *expected)
    del loss, grads

    say(f"{name} memory and warm-up")
    record["memory"], step_seconds, loss, grads = meter.measure(forward, backward)
    del loss, grads
    for _ in range(args.warmup):
        step_seconds = min(step_seconds, timer.step(forward, backward))
    return record, forward, backward, step_seconds, expected


def compile_cache_hits() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def prepare_case(index, case, plan, args, timer, meter, progress):
    """Inputs, the agreement check, memory and warm-up of every implementation of one case. Returns the case's
    result (without times yet) and a timing slot per implementation that got through."""
    def say(what: str) -> None:
        progress(f"case {index + 1}: {case.short_label()}: {what}")

    proj, target = make_inputs(case, args.device, args.seed)
    traffic = minimum_bytes(case.shape, proj.dtype, target.dtype, case.target_grad)
    result = {"case": asdict(case), "shape": list(case.shape), "min_bytes": traffic,
              "input_bytes": proj.numel() * proj.element_size() + target.numel() * target.element_size(),
              "grad_bytes": proj.numel() * proj.element_size()
              + (target.numel() * target.element_size() if case.target_grad else 0),
              "implementations": {name: {} for name in plan}}  # table order
    # the package's reference runs first: its first call is what every other implementation is checked against
    order = sorted(plan, key=lambda name: name != "reference")
    expected = None
    if "reference" not in plan:
        inputs = [proj, target] if case.target_grad else [proj]
        loss = cross_frame_align_loss(proj, target, backend="reference", **case.loss_options())
        expected = (loss.detach(), [g.detach() for g in torch.autograd.grad(loss, inputs)])
    slots = {}
    for name in order:
        try:
            record, forward, backward, step_seconds, expected = prepare_implementation(
                name, case, proj, target, expected, args, timer, meter, say)
            record["steps_per_round"] = steps_per_round(step_seconds, args.budget, args.rounds, args.min_reps,
                                                        args.max_reps)
            slots[name] = Slot(f"{index}:{name}", forward, backward, record["steps_per_round"])
        except Exception as error:  # one broken implementation must not hide the others' numbers
            record = {"error": f"{type(error).__name__}: {error}"}
        result["implementations"][name] = record
    return result, slots


def copy_slot(device: torch.device, megabytes: int) -> tuple[Slot, int]:
    """STREAM-style copy, timed in every round like an implementation: GB/s = (bytes read + bytes written) /
    time of ``dst.copy_(src)``. Returns the slot and the bytes one copy moves."""
    count = megabytes * 2**20 // 4
    src = torch.ones(count, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)  # touched here, so the timed copies pay no page faults
    dst.copy_(src)
    return Slot("copy", lambda: dst.copy_(src), lambda _: None, COPY_STEPS_PER_ROUND), 2 * src.numel() * 4


def copy_summary(slot: Slot, moved: int) -> dict:
    """The copy bandwidth of the whole run (median step) and of each round."""
    seconds = statistics.median(slot.fwd)
    round_gbps = [moved / medians["fwd"] / 1e9 for medians in slot.round_medians]
    return {"bytes": moved, "median_ms": seconds * 1e3, "gbps": moved / seconds / 1e9, "reps": len(slot.fwd),
            "round_gbps": round_gbps, "round_spread_pct": spread_percent(round_gbps)}


def finish_case(result: dict, slots: dict[str, Slot], copy_round_gbps: list[float]) -> None:
    """Step statistics of each implementation's slot, then the numbers derived from them."""
    for name, slot in slots.items():
        record = result["implementations"][name]
        if slot.error is not None:
            result["implementations"][name] = {"error": slot.error}
            continue
        record["passes"] = slot.passes()
        if name == "compile":
            record["compile_s"] = max(0.0, record["first_call_s"] - record["passes"]["fwd+bwd"]["median_ms"] / 1e3)
    add_derived_numbers(result, copy_round_gbps)


def add_derived_numbers(result: dict, copy_round_gbps: list[float] | None) -> None:
    """Achieved bandwidth, its share of the copy bandwidth of the same round and the speed-up over each baseline
    in the same round, summarised over the rounds (median and range)."""
    records = result["implementations"]
    for record in records.values():
        for pass_name, stats in record.get("passes", {}).items():
            moved = result["min_bytes"][pass_name]
            rounds_ms = stats["round_medians_ms"]
            stats["gbps"] = moved / (stats["median_ms"] / 1e3) / 1e9
            if copy_round_gbps:
                share = paired_ratios([100 * moved / ms / 1e6 for ms in rounds_ms], copy_round_gbps)
                stats["pct_of_copy_bandwidth"] = share["median"]
                stats["pct_of_copy_bandwidth_range"] = [share["min"], share["max"]]
            else:
                stats["pct_of_copy_bandwidth"] = stats["pct_of_copy_bandwidth_range"] = None
            for baseline in BASELINES:
                base = records.get(baseline, {}).get("passes", {}).get(pass_name)
                ratio = paired_ratios(base["round_medians_ms"], rounds_ms) if base else None
                stats[f"speedup_vs_{baseline}"] = ratio["median"] if ratio else None
                stats[f"speedup_vs_{baseline}_range"] = [ratio["min"], ratio["max"]] if ratio else None


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
                         else "(time.perf_counter)")
                      + f"; {args.rounds} rounds, each timing every implementation of every case and the copy "
                        "a few steps, in a new random order per round; ratios are taken within each round",
            "bytes": "minimum traffic: inputs read once, outputs written once (see traffic.minimum_bytes)",
            "memory": "torch.cuda allocator counters" if args.device.type == "cuda"
                      else "resident-set growth from /proc after malloc_trim, peak from VmHWM after clear_refs",
        },
        "memory_method_unavailable": meter.unavailable,
        "memory_probe": meter.probe(),
        "backends": {name: (usable if usable is True else str(usable))
                     for name, usable in crepa_kernels.available_backends(args.device).items()},
        "implementations_run": plan,
        "skipped": skipped,
    }

    progress = Progress()
    torch._dynamo.reset()
    # every case keeps its own compiled graph for the whole run: room for one per case, so none falls back to eager
    limit = max(torch._dynamo.config.recompile_limit, len(cases) + 1)
    with torch._dynamo.config.patch(recompile_limit=limit):
        prepared = [prepare_case(index, case, plan, args, timer, meter, progress) for index, case in enumerate(cases)]
        copy, copy_moved = copy_slot(args.device, args.copy_mb)
        slots = [copy] + [slot for _, case_slots in prepared for slot in case_slots.values()]
        graphs_before = compiled_graphs()
        report["schedule"] = run_rounds(slots, args.rounds, timer, args.seed, progress)
        report["recompiles_during_timing"] = compiled_graphs() - graphs_before
    progress.done()
    report["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["copy_bandwidth"] = copy_summary(copy, copy_moved)
    report["results"] = []
    for result, case_slots in prepared:
        finish_case(result, case_slots, report["copy_bandwidth"]["round_gbps"])
        report["results"].append(result)

    print(format_header(report), flush=True)
    for result in report["results"]:
        print("\n" + format_case(result), flush=True)
    print("\n" + format_summary(report["results"]))
    if report["recompiles_during_timing"]:
        print(f"WARNING: torch.compile compiled {report['recompiles_during_timing']} graphs during the timed rounds; "
              "the compile rows include that time", file=sys.stderr)

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nresults: {json_path}")
    if args.markdown:
        print("\n" + markdown_results(report))
        print("\n" + readme_table(report))
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
