"""Interleaved timing: every implementation of every case, and a memory copy, is timed a few steps in each of
several rounds, in a new random order each round. A change in machine load (another process, frequency,
the allocator's state after a big neighbour) then hits every implementation alike instead of whichever was
being timed in a block at that moment. Ratios between two implementations are taken within each round, on
timings a few seconds apart, and then summarised over the rounds.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from typing import Callable

from measure import StepTimes, Timer, summarize


@dataclass
class Slot:
    """One implementation on one case (or the copy probe), timed ``steps_per_round`` steps per round."""

    label: str  # "<case index>:<implementation>", or "copy"
    forward: Callable
    backward: Callable
    steps_per_round: int
    fwd: list[float] = field(default_factory=list)  # seconds, every timed step in execution order
    bwd: list[float] = field(default_factory=list)
    round_medians: list[dict[str, float]] = field(default_factory=list)  # per round: median seconds per pass
    error: str | None = None

    def record(self, times: StepTimes) -> None:
        self.fwd += times.fwd
        self.bwd += times.bwd
        self.round_medians.append({name: statistics.median(seconds) for name, seconds in times.by_pass().items()})

    def passes(self) -> dict[str, dict]:
        """Per pass: the statistics of every step, plus each round's median (ms)."""
        out = {}
        for name, seconds in StepTimes(self.fwd, self.bwd).by_pass().items():
            stats = summarize(seconds)
            stats["round_medians_ms"] = [medians[name] * 1e3 for medians in self.round_medians]
            stats["round_spread_pct"] = spread_percent(stats["round_medians_ms"])
            out[name] = stats
        return out


def spread_percent(values: list[float]) -> float:
    """(largest - smallest) / median, in percent: how far apart the rounds (or runs) were."""
    return 100 * (max(values) - min(values)) / statistics.median(values)


def steps_per_round(step_seconds: float, budget: float, rounds: int, min_reps: int, max_reps: int) -> int:
    """Steps per round so that all rounds together spend about ``budget`` seconds, within [min_reps, max_reps]
    steps in total (at least one per round)."""
    low = max(1, -(-min_reps // rounds))
    high = max(low, max_reps // rounds)
    wanted = -(-budget // (rounds * max(step_seconds, 1e-9)))
    return int(min(high, max(low, wanted)))


def run_rounds(slots: list[Slot], rounds: int, timer: Timer, seed: int, progress: Callable[[str], None]):
    """Times every slot in each round, in a fresh random order (seeded, so a run can be repeated). Returns the
    schedule: each round's slot labels in the order they ran. A slot that raises keeps its error and leaves the
    later rounds."""
    shuffler = random.Random(seed)
    schedule = []
    for round_index in range(rounds):
        order = list(slots)
        shuffler.shuffle(order)
        ran = []
        for slot in order:
            if slot.error is not None:
                continue
            progress(f"round {round_index + 1}/{rounds}: {slot.label}")
            try:
                slot.record(timer.steps(slot.forward, slot.backward, slot.steps_per_round))
            except Exception as error:  # one broken implementation must not stop the others
                slot.error = f"{type(error).__name__}: {error}"
            ran.append(slot.label)
        schedule.append(ran)
    return schedule


def paired_ratios(numerators: list[float], denominators: list[float]) -> dict[str, float]:
    """Round-by-round ratios (same round, so the same machine state): their median and range."""
    ratios = [a / b for a, b in zip(numerators, denominators)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
