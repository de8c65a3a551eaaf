"""The upstream trainers' conventions across ranks: examples/train_dit.py with a recoverable, same-step similarity
cutoff (SimpleTuner's "total" similarity, its neighbour clamp) under DDP, FSDP2 and sequence parallelism on 2 gloo
processes, step for step against one process, the DDP and sequence-parallel runs with an EMA teacher's targets;
and the recoverable schedule agreed by 2 processes."""
from __future__ import annotations

import dataclasses
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from test_distributed import launch

pytest.importorskip("diffusers")
from test_training import SMALL, _assert_within_tolerance, trainer  # noqa: E402  (the trainer, loaded by path)

from crepa_kernels.training import LambdaSchedule  # noqa: E402

# 3 token frames, neighbours 4 clamped to 2; a threshold the similarity EMA of this run crosses both ways
CONFIG = dataclasses.replace(
    SMALL, steps=4, global_batch=2, neighbors=4, clamp_neighbors=True, similarity_signal="total",
    similarity_threshold=-0.09, similarity_ema_decay=0.5, threshold_mode="recoverable", cutoff_timing="same_step",
)
EMA_TEACHER = dict(target_source="ema_teacher", teacher_momentum=0.9)
MODES = {"ddp": {}, "ddp, ema teacher": EMA_TEACHER, "fsdp joint, ema teacher": dict(fsdp="joint", **EMA_TEACHER),
         "sequence parallel, ema teacher": dict(sequence_parallel=True, **EMA_TEACHER)}


def _train_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # a failing rank must not hang CI
    try:
        for index, changes in enumerate(MODES.values()):
            result = trainer.train(dataclasses.replace(CONFIG, **changes), "auto")
            torch.save(result.records, os.path.join(out_dir, f"{index}-rank{rank}.pt"))
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{index}.pt"))
        _recoverable_schedules(rank, out_dir)  # in the same processes: one spawn for both tests
    finally:
        dist.destroy_process_group()


def test_recoverable_same_step_cutoff_and_ema_teacher_under_ddp_fsdp2_and_sequence_parallelism(tmp_path):
    singles = {source: trainer.train(dataclasses.replace(CONFIG, **changes), "auto")
               for source, changes in (("encoder", {}), ("ema_teacher", EMA_TEACHER))}
    lambdas = [record["lambda"] for record in singles["encoder"].records]
    assert lambdas == [0.5, 0.0, 0.5, 0.0]  # cut, lifted by the step that crosses back (with its graph), cut again
    launch(2, _train_worker, str(tmp_path))
    for index, (name, changes) in enumerate(MODES.items()):
        single = singles[changes.get("target_source", "encoder")]
        distributed = torch.load(tmp_path / f"{index}.pt", weights_only=False)
        report = trainer.compare(single, distributed, trainer.DISTRIBUTED_TOLERANCES[torch.float32])
        _assert_within_tolerance(report)
        ranks = [torch.load(tmp_path / f"{index}-rank{rank}.pt", weights_only=False) for rank in range(2)]
        for key in ("lambda", "schedule/similarity_ema", "schedule/similarity_cutoff"):
            # every rank holds the same EMA to the last bit and takes the same decision, as one process does
            assert [r[key] for r in ranks[0]] == [r[key] for r in ranks[1]], (name, key)
        assert [r["lambda"] for r in ranks[0]] == [r["lambda"] for r in single.records], name
    _check_recoverable_schedules(tmp_path)


# Per rank and step: (similarity, frames). The count-weighted mean over both ranks rises past the threshold, falls
# back under it, and rises again; each rank alone would decide otherwise.
RANK_SIMILARITIES = [
    [(0.9, 2), (0.9, 2), (0.9, 2), (0.1, 2), (0.1, 2), (0.9, 2), (0.9, 2)],
    [(0.2, 6), (0.6, 6), (0.6, 6), (0.1, 6), (0.1, 6), (0.7, 6), (0.7, 6)],
]
DECAY, THRESHOLD = 0.5, 0.5


def _recoverable_schedules(rank: int, out_dir: str) -> None:
    values = {}
    for timing in ("next_step", "same_step"):
        schedule = LambdaSchedule(0.5, similarity_threshold=THRESHOLD, similarity_ema_decay=DECAY,
                                  threshold_mode="recoverable", cutoff_timing=timing)
        values[timing] = []
        for similarity, count in RANK_SIMILARITIES[rank]:
            if timing == "same_step":
                schedule.observe(torch.tensor(similarity), torch.tensor(float(count)))
            values[timing].append(schedule.value())
            schedule.step(torch.tensor(similarity) if timing == "next_step" else None, torch.tensor(float(count)))
    torch.save(values, os.path.join(out_dir, f"schedule{rank}.pt"))


def _check_recoverable_schedules(tmp_path) -> None:
    """The recoverable cutoff of 2 processes, each with its own similarities: the EMA of their count-weighted
    mean, the same decisions on both ranks, one step later with next-step timing."""
    results = [torch.load(tmp_path / f"schedule{rank}.pt") for rank in range(2)]
    assert results[0] == results[1]
    ema, decisions = None, []
    for step in range(len(RANK_SIMILARITIES[0])):
        pairs = [rank[step] for rank in RANK_SIMILARITIES]
        mean = sum(s * c for s, c in pairs) / sum(c for _, c in pairs)
        ema = mean if ema is None else DECAY * ema + (1 - DECAY) * mean
        decisions.append(0.0 if ema >= THRESHOLD else 0.5)
    assert decisions == [0.5, 0.0, 0.0, 0.5, 0.5, 0.5, 0.0]  # cut at step 1, back at 3, cut again at 6
    # each rank alone (a per-rank EMA, as upstream) would decide otherwise
    assert decisions not in ([0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.0])
    assert results[0]["same_step"] == decisions
    assert results[0]["next_step"] == [0.5] + decisions[:-1]
