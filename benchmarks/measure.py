"""How the benchmark measures: step timing, memory and the machine description.

Timing. One repetition is one training step of the loss: forward, then backward of that same forward, with a
timestamp at each boundary. Forward, backward and forward+backward are three readings of the same steps, so
the backward is measured directly, in its real context (right after its own forward, freeing the saved
tensors as training does), rather than as a difference of two noisy medians or by re-running a retained graph
(which keeps the saved tensors alive, so it never pays for freeing them).
On CPU the passes run synchronously on this thread, so time.perf_counter at the boundaries is exact; on CUDA
the timestamps are CUDA events on the current stream, and the L2 cache is flushed before each step.

Memory. On CUDA, the caching allocator's counters. On CPU, the growth of this process's resident set, read
from /proc: torch's CPU allocator hands tensors straight to glibc malloc (no caching), so with malloc_trim
returning freed heap pages to the kernel before each reading, resident growth is the memory the step really
holds, including any scratch space a C++ extension takes outside torch. The peak is VmHWM after resetting it
through /proc/self/clear_refs. A probe of a known allocation size checks the method on every run.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from crepa_kernels.training.memory import reset_peak_rss

L2_FLUSH_BYTES = 256 * 2**20


@dataclass
class StepTimes:
    """Seconds per repetition for each pass."""

    fwd: list[float]
    bwd: list[float]

    @property
    def total(self) -> list[float]:
        return [f + b for f, b in zip(self.fwd, self.bwd)]

    def by_pass(self) -> dict[str, list[float]]:
        return {"fwd": self.fwd, "bwd": self.bwd, "fwd+bwd": self.total}


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median and spread in milliseconds (quartiles by linear interpolation)."""
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "min_ms": ms[0], "max_ms": ms[-1],
            "reps": len(ms)}


class Timer:
    """Times steps of ``forward() -> loss`` then ``backward(loss)`` on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if self.cuda else None

    def step(self, forward, backward) -> float:
        """Runs one warm-up step; returns its wall time."""
        start = time.perf_counter()
        backward(forward())
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def steps(self, forward, backward, reps: int) -> StepTimes:
        gc.collect()
        if self.cuda:
            return self._cuda_steps(forward, backward, reps)
        fwd, bwd = [], []
        for _ in range(reps):
            start = time.perf_counter()
            loss = forward()
            middle = time.perf_counter()
            backward(loss)
            end = time.perf_counter()
            del loss
            fwd.append(middle - start)
            bwd.append(end - middle)
        return StepTimes(fwd, bwd)

    def _cuda_steps(self, forward, backward, reps: int) -> StepTimes:
        events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(reps)]
        for start, middle, end in events:
            self._flush.zero_()  # evict the inputs from L2, as the rest of a training step would
            start.record()
            loss = forward()
            middle.record()
            backward(loss)
            end.record()
            del loss
        torch.cuda.synchronize(self.device)
        fwd = [start.elapsed_time(middle) / 1e3 for start, middle, _ in events]
        bwd = [middle.elapsed_time(end) / 1e3 for _, middle, end in events]
        return StepTimes(fwd, bwd)


# ---------------------------------------------------------------------------------------------------- memory

def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_freed_memory() -> None:
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)  # every arena's free pages go back to the kernel


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def _peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")



def cpu_memory_method() -> str | None:
    """Why CPU memory cannot be measured here, or None when it can."""
    if not os.path.exists("/proc/self/statm"):
        return "no /proc/self/statm (not Linux)"
    if _LIBC is None:
        return "not glibc: freed memory may stay resident, so resident growth would mislead"
    if not reset_peak_rss():
        return "/proc/self/clear_refs is not writable: the peak cannot be reset"
    return None


class MemoryMeter:
    """Memory a step holds above what existed before it: after the forward (held until the backward) and at
    the peak of forward + backward (this includes the gradients the backward returns)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.unavailable = None if device.type == "cuda" else cpu_memory_method()

    def measure(self, forward, backward):
        """Runs one step. Returns ({"held_bytes", "peak_bytes"} or None when unavailable, the seconds spent in
        forward and backward alone, the loss, backward's result)."""
        cuda = self.device.type == "cuda"
        if self.unavailable:
            start = time.perf_counter()
            loss = forward()
            result = backward(loss)
            if cuda:
                torch.cuda.synchronize(self.device)
            return None, time.perf_counter() - start, loss, result
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            reset_peak_rss()
            before = _resident_bytes()

        start = time.perf_counter()
        loss = forward()
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if cuda:
            held = torch.cuda.memory_allocated(self.device) - before
        else:
            _LIBC.malloc_trim(0)  # count what the forward keeps, not what it freed
            held = _resident_bytes() - before

        start = time.perf_counter()
        result = backward(loss)
        if cuda:
            torch.cuda.synchronize(self.device)
        seconds += time.perf_counter() - start
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device) - before
        else:
            peak = _peak_resident_bytes() - before
        return {"held_bytes": held, "peak_bytes": peak}, seconds, loss, result

    def probe(self, megabytes: int = 64) -> dict | None:
        """Measures a tensor of known size the same way, so a reader can see the method is sound here."""
        if self.unavailable:
            return None
        size = megabytes * 2**20
        allocate = functools.partial(torch.ones, size, dtype=torch.uint8, device=self.device)
        measured, _, _, _ = self.measure(allocate, lambda _: None)
        release_freed_memory()
        return {"allocated_bytes": size, "measured_held_bytes": measured["held_bytes"]}


# ---------------------------------------------------------------------------------------------------- machine

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(device: torch.device) -> dict:
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _total_memory_bytes(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": None,
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": properties.name, "memory_bytes": properties.total_memory,
                       "capability": f"{properties.major}.{properties.minor}",
                       "multiprocessors": properties.multi_processor_count}
    return info


def versions() -> dict:
    import crepa_kernels

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "crepa_kernels": crepa_kernels.__version__}
    try:
        import triton

        found["triton"] = triton.__version__
    except Exception as error:  # triton is optional
        found["triton"] = f"unavailable: {type(error).__name__}"
    return found
