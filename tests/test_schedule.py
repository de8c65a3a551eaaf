"""crepa_kernels.training.LambdaSchedule: values at given steps, the similarity cutoff, exact resume, and a
threshold cutoff agreed by 2 gloo processes."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crepa_kernels.training import LambdaSchedule


def _values(schedule: LambdaSchedule, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(schedule.value())
        schedule.step()
    return values


@pytest.mark.parametrize("warmup_from_zero", [True, False])
@pytest.mark.parametrize("shape", ["constant", "linear", "cosine", "polynomial"])
def test_values_at_given_steps(shape, warmup_from_zero):
    weight, final, warmup, decay, power = 0.7, 0.05, 3, 5, 2.5
    schedule = LambdaSchedule(weight, shape=shape, warmup_steps=warmup, decay_steps=None if shape == "constant"
                              else decay, final_weight=final, power=power, warmup_from_zero=warmup_from_zero)
    values = _values(schedule, 12)
    for step, value in enumerate(values):
        if step < warmup:
            expected = weight * (step + (0 if warmup_from_zero else 1)) / warmup
        else:
            p = min(1.0, (step - warmup) / decay)
            fraction = {"constant": 1.0, "linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2,
                        "polynomial": (1 - p) ** power}[shape]
            expected = weight if shape == "constant" else final + (weight - final) * fraction
        assert value == pytest.approx(expected, rel=1e-15, abs=1e-15), (shape, step)
    # upstream's warm-up starts at 0 (the first step computes nothing); the other one never does
    assert (values[0] == 0) == warmup_from_zero
    if shape != "constant":
        assert values[warmup + decay:] == [pytest.approx(final)] * (12 - warmup - decay)


def test_spot_values():
    # written out by hand: weight 1, no warm-up, 4 decay steps to 0
    cosine = _values(LambdaSchedule(1.0, shape="cosine", decay_steps=4), 6)
    assert cosine == pytest.approx([1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2, 0.0, 0.0])
    linear = _values(LambdaSchedule(0.5, shape="linear", warmup_steps=2, decay_steps=2), 6)
    assert linear == pytest.approx([0.0, 0.25, 0.5, 0.25, 0.0, 0.0])
    linear = _values(LambdaSchedule(0.5, shape="linear", warmup_steps=2, decay_steps=2, warmup_from_zero=False), 6)
    assert linear == pytest.approx([0.25, 0.5, 0.5, 0.25, 0.0, 0.0])
    polynomial = _values(LambdaSchedule(1.0, shape="polynomial", decay_steps=2, power=2.0), 3)
    assert polynomial == pytest.approx([1.0, 0.25, 0.0])


def test_cutoff_step_and_activity():
    schedule = LambdaSchedule(0.5, cutoff_step=3)
    assert _values(schedule, 5) == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert not schedule.active
    assert LambdaSchedule(0.5, cutoff_step=0).value() == 0.0
    assert not LambdaSchedule(0.0).active
    decayed = LambdaSchedule(0.5, shape="linear", decay_steps=2)
    decayed.step(), decayed.step()
    assert not decayed.active  # decayed to final_weight = 0: off as well


def test_similarity_ema_cutoff_by_hand():
    decay, threshold = 0.5, 0.6
    schedule = LambdaSchedule(0.5, similarity_threshold=threshold, similarity_ema_decay=decay)
    similarities = [0.2, 0.9, 0.8, 0.9, 0.1, 0.1]
    ema, cut_at, seen = None, None, []
    for step, similarity in enumerate(similarities):
        assert schedule.value() == (0.0 if cut_at is not None else 0.5)
        if cut_at is None:
            ema = similarity if ema is None else decay * ema + (1 - decay) * similarity
            if ema >= threshold:
                cut_at = step
        schedule.step(torch.tensor(similarity, dtype=torch.float64) if step % 2 else similarity)
        seen.append(schedule.similarity_ema)
        assert schedule.similarity_ema == pytest.approx(ema, rel=1e-15)
    # 0.2 -> 0.55 -> 0.675: crosses at step 2, lambda is 0 from step 3 on and stays 0 (permanent)
    assert cut_at == 2 and schedule.threshold_step == 2 and schedule.cut_off
    assert seen[2:] == [seen[2]] * 4  # once cut off, the EMA is no longer updated
    metrics = schedule.metrics()
    assert metrics == {"lambda": 0.0, "schedule_step": 6.0, "similarity_ema": seen[2], "similarity_cutoff": 1.0}
    assert math.isnan(LambdaSchedule(similarity_threshold=0.5).metrics()["similarity_ema"])


def test_counts_weight_the_similarity_and_an_empty_step_is_skipped():
    schedule = LambdaSchedule(0.5, similarity_threshold=2.0, similarity_ema_decay=0.0)  # EMA = last mean
    schedule.step(torch.tensor(0.3), count=torch.tensor(4.0))
    assert schedule.similarity_ema == pytest.approx(0.3)
    schedule.step(torch.tensor(float("nan")), count=0)  # nothing included on this rank: no update
    assert schedule.similarity_ema == pytest.approx(0.3)


def test_resume_from_state_dict_continues_exactly():
    def make():
        return LambdaSchedule(0.8, shape="cosine", warmup_steps=2, decay_steps=20, final_weight=0.1, cutoff_step=40,
                              similarity_threshold=0.7, similarity_ema_decay=0.9)

    generator = torch.Generator().manual_seed(0)
    similarities = (torch.rand(30, generator=generator, dtype=torch.float64) * 0.9).tolist()
    straight = make()
    for similarity in similarities[:11]:
        straight.step(similarity)
    state = json.loads(json.dumps(straight.state_dict()))  # as save_crepa_state stores it
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == straight.state_dict()
    for similarity in similarities[11:]:
        assert resumed.value() == straight.value() and resumed.metrics() == straight.metrics()
        straight.step(similarity)
        resumed.step(similarity)
    assert resumed.state_dict() == straight.state_dict()
    assert straight.steps_done == 30 and straight.similarity_ema is not None


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        LambdaSchedule(shape="exponential")
    with pytest.raises(ValueError, match="decay_steps"):
        LambdaSchedule(shape="cosine")
    with pytest.raises(ValueError, match="weight"):
        LambdaSchedule(-1.0)
    with pytest.raises(ValueError, match="similarity_ema_decay"):
        LambdaSchedule(similarity_ema_decay=1.0)
    with pytest.raises(ValueError, match="cutoff_step"):
        LambdaSchedule(cutoff_step=-2)
    with pytest.raises(ValueError, match="similarity"):
        LambdaSchedule(similarity_threshold=0.5).step()  # the threshold needs the step's similarity
    with pytest.raises(ValueError, match="keys"):
        LambdaSchedule().load_state_dict({"steps_done": 3})
    with pytest.raises(ValueError, match="steps_done"):
        LambdaSchedule().load_state_dict({"steps_done": -1, "similarity_ema": None, "threshold_step": None})
    with pytest.raises(ValueError, match="similarity_ema"):
        LambdaSchedule().load_state_dict({"steps_done": 3, "similarity_ema": "0.5", "threshold_step": None})
    with pytest.raises(ValueError, match="threshold_step"):  # the cutoff happens at a step already done
        LambdaSchedule().load_state_dict({"steps_done": 3, "similarity_ema": 0.5, "threshold_step": 3})


# ----------------------------------------------------------------------------------------------- 2 processes

# Per rank and step: (similarity, number of frames it was averaged over). With per-rank EMAs rank 0 would cut off
# at step 0 and rank 1 at step 4; the count-weighted mean over both crosses at step 3.
RANK_SIMILARITIES = [
    [(0.6, 2), (0.7, 2), (0.8, 2), (0.9, 2), (0.9, 2), (0.9, 2)],
    [(0.1, 6), (0.3, 6), (0.5, 6), (0.6, 6), (0.6, 6), (0.6, 6)],
]
DECAY, THRESHOLD = 0.5, 0.5


def _expected_cutoff() -> int:
    ema = None
    for step in range(len(RANK_SIMILARITIES[0])):
        pairs = [rank[step] for rank in RANK_SIMILARITIES]
        mean = sum(s * c for s, c in pairs) / sum(c for _, c in pairs)
        ema = mean if ema is None else DECAY * ema + (1 - DECAY) * mean
        if ema >= THRESHOLD:
            return step
    raise AssertionError("the mean never crosses")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        schedule = LambdaSchedule(0.5, similarity_threshold=THRESHOLD, similarity_ema_decay=DECAY)
        values = []
        for similarity, count in RANK_SIMILARITIES[rank]:
            values.append(schedule.value())
            schedule.step(torch.tensor(similarity), torch.tensor(float(count)))
        with open(f"{out_dir}/rank{rank}.json", "w") as out:
            json.dump({"values": values, "state": schedule.state_dict()}, out)
    finally:
        dist.destroy_process_group()


def test_threshold_cutoff_agreed_by_two_gloo_processes(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    cut = _expected_cutoff()
    assert cut == 3
    for result in results:
        assert result["state"]["threshold_step"] == cut
        assert result["values"] == [0.5] * (cut + 1) + [0.0] * (len(RANK_SIMILARITIES[0]) - cut - 1)
    assert results[0] == results[1]  # the same EMA to the last bit on both ranks
    # what each rank would have done on its own (SimpleTuner's per-rank EMA): different steps
    for rank, expected in ((0, 0), (1, 4)):
        alone = LambdaSchedule(0.5, similarity_threshold=THRESHOLD, similarity_ema_decay=DECAY)
        for similarity, count in RANK_SIMILARITIES[rank]:
            alone.step(similarity, count)
        assert alone.threshold_step == expected


def test_similarity_ema_keeps_decay_of_the_history():
    """An asymmetric decay: the EMA keeps 0.9 of its history and takes 0.1 of each new similarity (with decay 0.5,
    as above, swapping the two weights would go unnoticed; issue 16's mutation run)."""
    schedule = LambdaSchedule(0.5, similarity_threshold=10.0, similarity_ema_decay=0.9)
    for similarity in (0.2, 0.8, 0.5):
        schedule.step(similarity)
    assert schedule.similarity_ema == pytest.approx(0.9 * (0.9 * 0.2 + 0.1 * 0.8) + 0.1 * 0.5, rel=1e-14)
