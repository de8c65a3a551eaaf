"""What the lockstep check of examples/train_dit.py records about a run and how it compares two runs: tolerances,
the per-step and final-parameter comparison, peak memory, and saving / loading runs for --compare-with."""
from __future__ import annotations

import json
import math
import resource
from dataclasses import dataclass

import torch

from crepa_kernels.training.memory import reset_peak_rss

# Largest relative difference allowed between the reference run and the fused run, by compute dtype. Per step:
# the total loss, the alignment loss, the gradient norm before clipping, and that of the projector alone (only the
# alignment loss feeds it, so it is the most direct check of a fused backward); at the end: all parameters as one
# vector, |difference| / |value| in the 2-norm. Per tensor or per element would flag tensors whose gradient is near
# zero, which AdamW's division by sqrt(v) + eps moves by up to lr * |gradient difference| / eps.
# fp32: the two loss implementations differ by reduction order only. Measured on this CPU over 10-20 steps
# (docs/training.md): <= 2e-7 on the per-step metrics (1.7e-6 once, on a total loss where the flow and alignment
# terms nearly cancel) and <= 9e-8 on the parameters, while changing tau by 0.1% (a smaller error than any kernel
# bug we care about) moves the alignment loss and the projector's gradient norm by 4e-4 and the parameters by 5e-5
# within 3 steps. The runs drift apart as training goes on: the bounds are for short lockstep runs (tens of steps).
# bf16 autocast: the projected states and their gradients are bf16, so a 1-ulp fp32 difference can flip the bf16
# rounding (2^-8 relative) of an element. Measured with CPU autocast over 10 steps: 1e-4 (loss), 9e-5 (alignment
# loss), 2.6e-4 and 3e-4 (gradient norms), 7e-5 (parameters); the bounds leave ~7x for GPU kernels, not measured.
# lambda comes from the same schedule code on both sides: equal, unless the similarity cutoff fell on another step.
TOLERANCES = {
    torch.float32: {"loss": 1e-5, "align_loss": 1e-5, "grad_norm": 1e-5, "projector_grad_norm": 1e-5, "params": 1e-6,
                    "lambda": 0.0},
    torch.bfloat16: {"loss": 2e-3, "align_loss": 1e-3, "grad_norm": 1e-2, "projector_grad_norm": 1e-2, "params": 5e-4,
                     "lambda": 0.0},
}
# A run on W processes against one process: gradients are averaged over ranks (a different summation order) and
# the DiT's matmuls see a smaller batch, so differences are of fp32 rounding size on both sides.
DISTRIBUTED_TOLERANCES = TOLERANCES


@dataclass
class RunResult:
    backend: str  # the module that computed the loss
    # per step: loss, flow_loss, align_loss (None where lambda was 0), lambda, grad_norm, projector_grad_norm,
    # self/neighbor similarity, per-layer alignment losses, the schedule's state, step_time_s, peak_memory_mib
    # (targets, forward, backward and update: CUDA memory allocated on a GPU, RSS on the CPU), saved_mib (what
    # autograd kept for backward, SavedTensorMeter)
    records: list[dict]
    params: dict[str, torch.Tensor]  # final parameters on the CPU (transformer.* and projector.*)
    step_time_s: float  # median over steps after the first
    memory: dict[str, float]


class PeakMemory:
    """Peak memory of a run and of each step: max_memory_allocated on CUDA; on the CPU the peak RSS of the process,
    whose high-water mark is reset at the start (Linux /proc/self/clear_refs), so sequential runs are measured
    separately. ``step_peak_mib()`` returns the peak since its previous call (or the start) and starts a new one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_reset = reset_peak_rss()
        self.rss_start_mib = _rss_mib("VmRSS")
        self.peaks = {"rss": 0.0, "cuda": 0.0}  # the run's peaks over the steps already measured
        return self

    def _read_and_reset(self) -> dict[str, float]:
        current = {"rss": _rss_mib("VmHWM")}
        if self.rss_reset:
            reset_peak_rss()
        if self.device.type == "cuda":
            current["cuda"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        for kind, value in current.items():
            self.peaks[kind] = max(self.peaks[kind], value)
        return current

    def step_peak_mib(self) -> float:
        """CUDA memory allocated on a GPU, the process's RSS on the CPU."""
        return self._read_and_reset()["cuda" if self.device.type == "cuda" else "rss"]

    def __exit__(self, *exc_info) -> None:
        self._read_and_reset()
        self.figures = {"rss_start_mib": self.rss_start_mib, "peak_rss_mib": self.peaks["rss"],
                        "peak_rss_is_per_run": self.rss_reset}
        if self.device.type == "cuda":
            self.figures["max_memory_allocated_mib"] = self.peaks["cuda"]


def _rss_mib(field: str) -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _relative(a: float | None, b: float | None) -> float:
    if a == b:  # also both None: a step where lambda was 0 in both runs and the alignment was not computed
        return 0.0
    if a is None or b is None:
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-30)  # a NaN on either side gives NaN, which fails every check


def _relative_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    if torch.equal(a, b):
        return 0.0
    return (a - b).norm().item() / max(a.norm().item(), b.norm().item(), 1e-30)


def compare(first: RunResult, second: RunResult, tolerances: dict[str, float]) -> dict[str, dict]:
    """Largest relative differences: per-step metrics (and the step where each peaks), and the final parameters
    (all tensors as one vector, |difference| / |value| in the 2-norm; the tensor differing most is named)."""
    report = {}
    for metric in ("loss", "align_loss", "grad_norm", "projector_grad_norm", "lambda"):
        diffs = [_relative(a[metric], b[metric]) for a, b in zip(first.records, second.records)]
        if len(first.records) != len(second.records) or not diffs:
            diffs.append(math.inf)
        step = max(range(len(diffs)), key=lambda i: math.inf if math.isnan(diffs[i]) else diffs[i])
        report[metric] = {"max_rel_diff": diffs[step], "step": step, "tolerance": tolerances[metric]}
    names = sorted(first.params)
    if names != sorted(second.params):
        report["params"] = {"max_rel_diff": math.inf, "tensor": "<parameter names differ>"}
    else:
        flat = [torch.cat([run.params[n].double().flatten() for n in names]) for run in (first, second)]
        worst = max(names, key=lambda n: _relative_norm(first.params[n].double(), second.params[n].double()))
        report["params"] = {"max_rel_diff": _relative_norm(*flat), "tensor": worst}
    report["params"]["tolerance"] = tolerances["params"]
    for entry in report.values():
        entry["ok"] = entry["max_rel_diff"] <= entry["tolerance"]  # False for NaN
    return report


def save_params(result: RunResult, path: str) -> None:
    torch.save(result.params, path)


def load_params(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def summary(result: RunResult) -> dict:
    return {"backend": result.backend, "records": result.records, "step_time_s": result.step_time_s,
            "memory": result.memory}


def load_run(path: str) -> tuple[dict, RunResult]:
    """A run written by --output with --save-params: its config and its (last) run with the final parameters."""
    with open(path) as source:
        summary = json.load(source)
    if not summary.get("params_path"):
        raise ValueError(f"{path}: written without --save-params, no parameters to compare")
    run = summary["runs"]["fused"]
    return summary["config"], RunResult(backend=run["backend"], records=run["records"],
                                        params=load_params(summary["params_path"]),
                                        step_time_s=run["step_time_s"], memory=run["memory"])


def print_run(role: str, result: RunResult) -> None:
    memory, last = result.memory, result.records[-1]
    line = (f"{role:9s} {result.backend:34s} {result.step_time_s * 1e3:8.1f} ms/step  "
            f"peak RSS {memory['peak_rss_mib']:.0f} MiB (start {memory['rss_start_mib']:.0f})")
    if "max_memory_allocated_mib" in memory:
        line += f"  max_memory_allocated {memory['max_memory_allocated_mib']:.1f} MiB"
    step_peaks = sorted(record["peak_memory_mib"] for record in result.records if "peak_memory_mib" in record)
    if step_peaks:
        line += f"  per step: median {step_peaks[len(step_peaks) // 2]:.1f}, max {step_peaks[-1]:.1f} MiB"
    align = "off (lambda 0)" if last["align_loss"] is None else f"{last['align_loss']:.6f}"
    print(line + f"  final loss {last['loss']:.6f} align {align}")


def print_report(title: str, report: dict, dtype: torch.dtype) -> None:
    print(title)
    for metric, entry in report.items():
        where = f"at step {entry['step']}" if "step" in entry else f"(most in {entry['tensor']})"
        print(f"  {metric:19s} max rel diff {entry['max_rel_diff']:.3e} {where}  "
              f"(tolerance {entry['tolerance']:.0e}, {dtype})  {'ok' if entry['ok'] else 'FAIL'}")


