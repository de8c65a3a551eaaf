"""The weight lambda of the alignment loss over training: warm-up, decay, a hard cutoff step, and a cutoff once an
exponential moving average of the alignment similarity passes a threshold, agreed by every rank.

Why: LoRAs trained with CREPA throughout come out washed out, and work on REPA-style losses (HASTE) finds the
alignment helps early in training and hurts later. Once lambda is 0 the regulariser computes nothing
(:class:`~crepa_kernels.training.CrepaTransformer` does not even capture the block).

lambda at step s (s = number of :meth:`LambdaSchedule.step` calls so far, i.e. optimizer steps done):

* warm-up, s < warmup_steps:   weight * (s + 1) / warmup_steps (never 0, full weight at s = warmup_steps - 1);
* then, with p = min(1, (s - warmup_steps) / decay_steps), from ``weight`` to ``final_weight``:
  constant: weight;  linear: final + (weight - final) * (1 - p);
  cosine: final + (weight - final) * (1 + cos(pi p)) / 2;  polynomial: final + (weight - final) * (1 - p) ** power;
* 0 from ``cutoff_step`` on, and from the step after the similarity EMA first reaches ``similarity_threshold``.

The threshold cutoff is permanent: once the alignment is no longer computed there is no similarity left to watch,
so a "recoverable" mode (SimpleTuner's) cannot be offered together with skipping the compute.
"""
from __future__ import annotations

import math

import torch

from .distributed import rank_and_world

SHAPES = ("constant", "linear", "cosine", "polynomial")


class LambdaSchedule:
    """lambda(step) as described in the module docstring; ``state_dict``/``load_state_dict`` resume it exactly.

    The similarity EMA is updated by :meth:`step` from the alignment's self similarity, averaged over all ranks
    (weighted by the number of frames each rank included), so every rank of DDP, FSDP or context parallelism sees
    the same EMA and cuts off at the same step. Every rank must call :meth:`step` once per optimizer step.
    """

    def __init__(self, weight: float = 0.5, *, shape: str = "constant", warmup_steps: int = 0,
                 decay_steps: int | None = None, final_weight: float = 0.0, power: float = 1.0,
                 cutoff_step: int | None = None, similarity_threshold: float | None = None,
                 similarity_ema_decay: float = 0.99, process_group=None) -> None:
        if shape not in SHAPES:
            raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight: expected a finite value >= 0, got {weight}")
        if not math.isfinite(final_weight) or final_weight < 0:
            raise ValueError(f"final_weight: expected a finite value >= 0, got {final_weight}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps}")
        if shape != "constant" and (decay_steps is None or decay_steps < 1):
            raise ValueError(f"decay_steps: the {shape!r} shape needs decay_steps >= 1, got {decay_steps}")
        if power <= 0:
            raise ValueError(f"power: expected > 0, got {power}")
        if cutoff_step is not None and cutoff_step < 0:
            raise ValueError(f"cutoff_step: expected >= 0 or None, got {cutoff_step}")
        if similarity_threshold is not None and not math.isfinite(similarity_threshold):
            raise ValueError(f"similarity_threshold: expected a finite value or None, got {similarity_threshold}")
        if not 0.0 <= similarity_ema_decay < 1.0:
            raise ValueError(f"similarity_ema_decay: expected a value in [0, 1), got {similarity_ema_decay}")
        self.weight, self.shape, self.warmup_steps, self.decay_steps = float(weight), shape, warmup_steps, decay_steps
        self.final_weight, self.power, self.cutoff_step = float(final_weight), float(power), cutoff_step
        self.similarity_threshold, self.similarity_ema_decay = similarity_threshold, similarity_ema_decay
        self.process_group = process_group
        self.steps_done = 0
        self.similarity_ema: float | None = None  # None until the first similarity arrives
        self.threshold_step: int | None = None  # the step whose update took the EMA past the threshold

    def __repr__(self) -> str:
        return (f"LambdaSchedule(weight={self.weight}, shape={self.shape!r}, warmup_steps={self.warmup_steps}, "
                f"decay_steps={self.decay_steps}, final_weight={self.final_weight}, power={self.power}, "
                f"cutoff_step={self.cutoff_step}, similarity_threshold={self.similarity_threshold}, "
                f"similarity_ema_decay={self.similarity_ema_decay})")

    def value_at(self, step: int) -> float:
        """lambda at ``step`` from the shape and the cutoff step alone (the similarity cutoff is state)."""
        if self.cutoff_step is not None and step >= self.cutoff_step:
            return 0.0
        if step < self.warmup_steps:
            return self.weight * (step + 1) / self.warmup_steps
        if self.shape == "constant":
            return self.weight
        p = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        if self.shape == "linear":
            fraction = 1.0 - p
        elif self.shape == "cosine":
            fraction = 0.5 * (1.0 + math.cos(math.pi * p))
        else:
            fraction = (1.0 - p) ** self.power
        return self.final_weight + (self.weight - self.final_weight) * fraction

    @property
    def cut_off(self) -> bool:
        """Whether the similarity EMA has passed the threshold (permanently)."""
        return self.threshold_step is not None

    def value(self) -> float:
        """lambda for the current step."""
        return 0.0 if self.cut_off else self.value_at(self.steps_done)

    @property
    def active(self) -> bool:
        return self.value() > 0.0

    def step(self, similarity: torch.Tensor | float | None = None, count: torch.Tensor | float = 1.0) -> None:
        """End of an optimizer step: advance, and fold this step's ``similarity`` (a mean over ``count`` frames
        on this rank) into the EMA while a threshold is watched. A collective when a threshold is set and the
        schedule is active: call it on every rank."""
        if self.similarity_threshold is not None and self.active:
            if similarity is None:
                raise ValueError("similarity: a similarity threshold is set and lambda > 0, so step() needs this "
                                 "step's similarity (alignment.self_similarity)")
            self._update_ema(similarity, count)
        self.steps_done += 1

    def _update_ema(self, similarity, count) -> None:
        similarity = torch.as_tensor(similarity, dtype=torch.float64)
        count = torch.as_tensor(count, dtype=torch.float64, device=similarity.device)
        # a rank that included no frame has a NaN similarity and adds nothing
        totals = torch.stack([torch.where(count > 0, similarity.detach().double() * count, 0.0), count])
        if rank_and_world(self.process_group)[1] > 1:
            import torch.distributed as dist

            dist.all_reduce(totals, group=self.process_group)
        weighted_sum, total = totals.tolist()  # one host sync per step while the threshold is watched
        if total == 0:
            return  # no frame was included anywhere: nothing to average
        mean = weighted_sum / total
        if self.similarity_ema is None:
            self.similarity_ema = mean
        else:
            decay = self.similarity_ema_decay
            self.similarity_ema = decay * self.similarity_ema + (1 - decay) * mean
        if self.similarity_ema >= self.similarity_threshold:
            self.threshold_step = self.steps_done

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "similarity_ema": self.similarity_ema,
                "threshold_step": self.threshold_step}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done, self.similarity_ema, self.threshold_step = self.checked_state(state)

    def checked_state(self, state: dict) -> tuple[int, float | None, int | None]:
        """(steps_done, similarity_ema, threshold_step) of ``state``, validated without loading it (so that a
        caller loading more than the schedule can check everything before changing anything)."""
        expected = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            raise ValueError(f"state: expected a dict with the keys {sorted(expected)}, got {state!r}")
        steps_done, ema, threshold_step = state["steps_done"], state["similarity_ema"], state["threshold_step"]
        if not isinstance(steps_done, int) or steps_done < 0:
            raise ValueError(f"state['steps_done']: expected an int >= 0, got {steps_done!r}")
        if ema is not None and not (isinstance(ema, (int, float)) and math.isfinite(ema)):
            raise ValueError(f"state['similarity_ema']: expected a finite number or None, got {ema!r}")
        if threshold_step is not None and not (isinstance(threshold_step, int) and 0 <= threshold_step < steps_done):
            raise ValueError(f"state['threshold_step']: expected None or an int in [0, steps_done = {steps_done}), "
                             f"got {threshold_step!r}")
        return steps_done, None if ema is None else float(ema), threshold_step

    def metrics(self) -> dict[str, float]:
        """lambda and the schedule's state, as floats to log (NaN for an EMA not started yet)."""
        return {"lambda": self.value(), "schedule_step": float(self.steps_done),
                "similarity_ema": math.nan if self.similarity_ema is None else self.similarity_ema,
                "similarity_cutoff": float(self.cut_off)}
