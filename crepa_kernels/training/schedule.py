"""The weight lambda of the alignment loss over training: warm-up, decay, a hard cutoff step, and a cutoff once an
exponential moving average of the alignment similarity passes a threshold, agreed by every rank.

Why: LoRAs trained with CREPA throughout come out washed out, and work on REPA-style losses (HASTE) finds the
alignment helps early in training and hurts later. Once lambda is 0 the regulariser computes nothing
(:class:`~crepa_kernels.training.CrepaTransformer` does not even capture the block).

lambda at step s (s = number of :meth:`LambdaSchedule.step` calls so far, i.e. optimizer steps done):

* warm-up, s < warmup_steps:   weight * s / warmup_steps (0 at s = 0), as SimpleTuner, musubi-tuner's LTX-2 and
  minimax-h3 trainers and the usual learning-rate warm-ups do; with ``warmup_from_zero=False``,
  weight * (s + 1) / warmup_steps (never 0, full weight at s = warmup_steps - 1);
* then, with p = min(1, (s - warmup_steps) / decay_steps), from ``weight`` to ``final_weight``:
  constant: weight;  linear: final + (weight - final) * (1 - p);
  cosine: final + (weight - final) * (1 + cos(pi p)) / 2;  polynomial: final + (weight - final) * (1 - p) ** power;
* 0 from ``cutoff_step`` on, and while the similarity cutoff holds.

The similarity cutoff watches an exponential moving average (EMA) of a similarity the regulariser reports (which
one: ``CrepaRegularizer(similarity_signal=...)``); it holds once the EMA reaches ``similarity_threshold``:

* ``threshold_mode="permanent"``: from then on, for good; nothing is computed any more.
* ``threshold_mode="recoverable"`` (SimpleTuner's and musubi-tuner's): while the EMA stays at or above the
  threshold. The regulariser keeps computing the similarity (a forward pass without gradient) so that the EMA can
  fall back below it.
* ``cutoff_timing="next_step"`` (the default): :meth:`LambdaSchedule.step`, after the optimizer step, folds the
  step's similarity (of all its micro-batches) in, and the cutoff applies from the next step.
  ``cutoff_timing="same_step"`` (the upstream trainers'): each forward of the regulariser folds its own similarity
  in (:meth:`LambdaSchedule.observe`) before lambda is read, so the step that crosses the threshold already has
  lambda = 0, and each micro-batch updates the EMA, as upstream. A forward whose ``update_cutoff=False`` (a
  validation pass, musubi-tuner's ``update_cutoff=False``) leaves the EMA alone.
* Steps where the shape gives lambda = 0 (warm-up's step 0, a decay to 0) add nothing to the EMA, as in
  musubi-tuner, which computes nothing then; ``similarity_every_step=True`` computes the similarity on those steps
  too and folds it in, as SimpleTuner (which always computes the alignment) does.
"""
from __future__ import annotations

import math

import torch

from .ranks import rank_and_world

SHAPES = ("constant", "linear", "cosine", "polynomial")
THRESHOLD_MODES = ("permanent", "recoverable")
CUTOFF_TIMINGS = ("next_step", "same_step")


class LambdaSchedule:
    """lambda(step) as described in the module docstring; ``state_dict``/``load_state_dict`` resume it exactly.

    The similarity EMA is updated by :meth:`step` from the alignment's self similarity, averaged over all ranks
    (weighted by the number of frames each rank included), so every rank of DDP, FSDP or context parallelism sees
    the same EMA and cuts off at the same step. Every rank must call :meth:`step` once per optimizer step.
    """

    def __init__(self, weight: float = 0.5, *, shape: str = "constant", warmup_steps: int = 0,
                 decay_steps: int | None = None, final_weight: float = 0.0, power: float = 1.0,
                 cutoff_step: int | None = None, similarity_threshold: float | None = None,
                 similarity_ema_decay: float = 0.99, threshold_mode: str = "permanent",
                 cutoff_timing: str = "next_step", similarity_every_step: bool = False,
                 warmup_from_zero: bool = True, process_group=None) -> None:
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
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode: expected one of {THRESHOLD_MODES}, got {threshold_mode!r}")
        if cutoff_timing not in CUTOFF_TIMINGS:
            raise ValueError(f"cutoff_timing: expected one of {CUTOFF_TIMINGS}, got {cutoff_timing!r}")
        for name, flag in (("similarity_every_step", similarity_every_step), ("warmup_from_zero", warmup_from_zero)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__} {flag!r}")
        self.weight, self.shape, self.warmup_steps, self.decay_steps = float(weight), shape, warmup_steps, decay_steps
        self.final_weight, self.power, self.cutoff_step = float(final_weight), float(power), cutoff_step
        self.similarity_threshold, self.similarity_ema_decay = similarity_threshold, similarity_ema_decay
        self.threshold_mode, self.cutoff_timing = threshold_mode, cutoff_timing
        self.similarity_every_step, self.warmup_from_zero = similarity_every_step, warmup_from_zero
        self.process_group = process_group
        self.steps_done = 0
        self.similarity_ema: float | None = None  # None until the first similarity arrives
        self.threshold_step: int | None = None  # the step whose update first took the EMA past the threshold
        self.over_threshold = False  # whether the EMA is at or above the threshold now

    def __repr__(self) -> str:
        return (f"LambdaSchedule(weight={self.weight}, shape={self.shape!r}, warmup_steps={self.warmup_steps}, "
                f"decay_steps={self.decay_steps}, final_weight={self.final_weight}, power={self.power}, "
                f"cutoff_step={self.cutoff_step}, similarity_threshold={self.similarity_threshold}, "
                f"similarity_ema_decay={self.similarity_ema_decay}, threshold_mode={self.threshold_mode!r}, "
                f"cutoff_timing={self.cutoff_timing!r}, similarity_every_step={self.similarity_every_step}, "
                f"warmup_from_zero={self.warmup_from_zero})")

    def value_at(self, step: int) -> float:
        """lambda at ``step`` from the shape and the cutoff step alone (the similarity cutoff is state)."""
        if self.cutoff_step is not None and step >= self.cutoff_step:
            return 0.0
        if step < self.warmup_steps:
            return self.weight * (step + (0 if self.warmup_from_zero else 1)) / self.warmup_steps
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
        """Whether the similarity cutoff holds now: the EMA has reached the threshold (once, when permanent; at the
        last update, when recoverable)."""
        if self.threshold_mode == "permanent":
            return self.threshold_step is not None
        return self.over_threshold

    @property
    def needs_similarity(self) -> bool:
        """Whether this step's similarity is to be folded into the EMA: a threshold is watched, the cutoff is not
        final (permanent, or past ``cutoff_step``), and the shape's lambda is > 0 (or ``similarity_every_step``).
        The regulariser then computes it even while a recoverable cutoff holds lambda at 0."""
        if self.similarity_threshold is None or (self.threshold_mode == "permanent" and self.cut_off):
            return False
        if self.cutoff_step is not None and self.steps_done >= self.cutoff_step:
            return False
        return self.similarity_every_step or self.value_at(self.steps_done) > 0.0

    @property
    def computes(self) -> bool:
        """Whether the regulariser computes anything this step: lambda > 0, or the similarity is watched."""
        return self.active or self.needs_similarity

    def value(self) -> float:
        """lambda for the current step."""
        return 0.0 if self.cut_off else self.value_at(self.steps_done)

    @property
    def active(self) -> bool:
        return self.value() > 0.0

    def step(self, similarity: torch.Tensor | float | None = None, count: torch.Tensor | float = 1.0) -> None:
        """End of an optimizer step: advance, and with ``cutoff_timing="next_step"`` fold this step's
        ``similarity`` (a mean over ``count`` frames on this rank) into the EMA while :attr:`needs_similarity`.
        A collective then: call it on every rank."""
        if self.cutoff_timing == "next_step" and self.needs_similarity:
            if similarity is None:
                raise ValueError("similarity: a similarity threshold is watched this step, so step() needs this "
                                 "step's similarity (the regulariser's end_step passes it)")
            self._update_ema(similarity, count)
        self.steps_done += 1

    def observe(self, similarity: torch.Tensor | float, count: torch.Tensor | float = 1.0) -> None:
        """``cutoff_timing="same_step"``: fold one forward's ``similarity`` (a mean over ``count`` frames on this
        rank) into the EMA now, so that :meth:`value` already reflects it. A collective: every rank's forward
        calls it. Does nothing unless :attr:`needs_similarity`."""
        if self.cutoff_timing != "same_step":
            raise RuntimeError("observe: only with cutoff_timing='same_step' (with 'next_step', step() folds the "
                               "similarity in)")
        if self.needs_similarity:
            self._update_ema(similarity, count)

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
        self.over_threshold = self.similarity_ema >= self.similarity_threshold
        if self.over_threshold and self.threshold_step is None:
            self.threshold_step = self.steps_done

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "similarity_ema": self.similarity_ema,
                "threshold_step": self.threshold_step, "over_threshold": self.over_threshold}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done, self.similarity_ema, self.threshold_step, self.over_threshold = self.checked_state(state)

    def checked_state(self, state: dict) -> tuple[int, float | None, int | None, bool]:
        """(steps_done, similarity_ema, threshold_step, over_threshold) of ``state``, validated without loading it
        (so that a caller loading more than the schedule can check everything before changing anything). A state
        saved before ``over_threshold`` existed (permanent cutoffs only) gets it from ``threshold_step``."""
        expected = set(self.state_dict())
        if isinstance(state, dict) and set(state) == expected - {"over_threshold"}:
            state = {**state, "over_threshold": state["threshold_step"] is not None}
        if not isinstance(state, dict) or set(state) != expected:
            raise ValueError(f"state: expected a dict with the keys {sorted(expected)}, got {state!r}")
        steps_done, ema, threshold_step = state["steps_done"], state["similarity_ema"], state["threshold_step"]
        over_threshold = state["over_threshold"]
        if not isinstance(steps_done, int) or steps_done < 0:
            raise ValueError(f"state['steps_done']: expected an int >= 0, got {steps_done!r}")
        if ema is not None and not (isinstance(ema, (int, float)) and math.isfinite(ema)):
            raise ValueError(f"state['similarity_ema']: expected a finite number or None, got {ema!r}")
        if threshold_step is not None and not (isinstance(threshold_step, int) and 0 <= threshold_step < steps_done):
            raise ValueError(f"state['threshold_step']: expected None or an int in [0, steps_done = {steps_done}), "
                             f"got {threshold_step!r}")
        if not isinstance(over_threshold, bool) or (over_threshold and threshold_step is None):
            raise ValueError(f"state['over_threshold']: expected a bool, True only once threshold_step is set, got "
                             f"{over_threshold!r}")
        return steps_done, None if ema is None else float(ema), threshold_step, over_threshold

    def metrics(self) -> dict[str, float]:
        """lambda and the schedule's state, as floats to log (NaN for an EMA not started yet)."""
        return {"lambda": self.value(), "schedule_step": float(self.steps_done),
                "similarity_ema": math.nan if self.similarity_ema is None else self.similarity_ema,
                "similarity_cutoff": float(self.cut_off)}
