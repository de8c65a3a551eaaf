"""The wiring test of tests/test_wiring.py for the sequence-parallel entry points, on 3 gloo processes (one launch):
every option of ``sequence_parallel_align_loss`` and of ``SequenceParallelRegularizer`` (and ``LambdaSchedule``'s
``process_group``), set to a non-default value, gives on every rank what the single-process call with the same
option gives (``cross_frame_align_loss``, ``CrepaRegularizer``, the schedule of one rank alone), and changes the
result on some rank.

3 ranks, so that the shards split frames mid-way (the loss's single-offset boundary terms run) and a sequence
whose length 3 does not divide is split as ``tensor_split`` splits it, not as ``chunk`` would.
"""
from __future__ import annotations

import datetime
import json
import traceback

import torch
import torch.distributed as dist

from crepa_kernels import cross_frame_align_loss
from crepa_kernels.distributed import sequence_parallel_align_loss
from crepa_kernels.distributed.sharded_training import SequenceParallelRegularizer
from crepa_kernels.training import CrepaRegularizer
from harness import pair_straddling_eps, random_grad_output
from test_distributed import launch
from crepa_kernels.training import LambdaSchedule
from test_wiring import (
    BATCH,
    REGULARIZER_CASES,
    SIMILARITIES,
    EntryPoint,
    _make_regularizer,
    _regularizer_inputs,
    _schedule,
    _schedule_lower,
    alignment_state,
    describe,
    options_of,
    outcome,
    same,
    split,
)

WORLD = 3
FRAMES, TOKENS, DIM = 7, 4, 6  # 28 tokens: 10, 10 and 8 + 2 of padding by default (frames split mid-way)
EPS = 0.8
SHARDS = [12, 10, 10]  # uneven, the last 4 tokens padding: every rank's default (its own size x 3) covers 28


def _sequence(rank_seeded: bool):
    seed = 40 + (dist.get_rank() if rank_seeded else 0)
    return pair_straddling_eps((BATCH, FRAMES * TOKENS, DIM), EPS, torch.float64, seed=seed)


def _local(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """This rank's shard of a [B, S, D] sequence, padded with NaN past its end."""
    total = sum(sizes)
    padded = torch.cat([x.detach(), x.new_full((x.shape[0], total - x.shape[1], x.shape[2]), float("nan"))], 1)
    start = sum(sizes[:dist.get_rank()])
    return padded[:, start:start + sizes[dist.get_rank()]].clone()


GROUPS: list = []


def _loss_layout(arguments: dict, flags: dict):
    if "group" in arguments:  # each rank alone in its group, with its own whole sequence
        arguments["group"] = GROUPS[dist.get_rank()]
        proj, target = _sequence(rank_seeded=True)
        return proj, target, [FRAMES * TOKENS]
    proj, target = _sequence(rank_seeded=False)
    sizes = SHARDS if flags.get("_uneven") else [10, 10, 10]
    return proj, target, sizes


def _sp_loss(kwargs):
    arguments, flags = split(kwargs)
    proj, target, sizes = _loss_layout(arguments, flags)
    local = _local(proj, sizes) if len(sizes) > 1 else proj.detach().clone()
    local.requires_grad_(True)
    target_argument = _local(target, sizes) if flags.get("_sharded_target") else target.detach()
    loss = sequence_parallel_align_loss(local, target_argument, num_frames=FRAMES, **arguments)
    (grad,) = torch.autograd.grad(loss, [local], random_grad_output(loss, seed=3))
    return [loss, grad]


def _sp_loss_lower(kwargs):
    arguments, flags = split(kwargs)
    proj, target, sizes = _loss_layout(arguments, flags)
    for name in ("group", "shard_sizes", "seq_len", "target_sharded"):
        arguments.pop(name, None)
    loss = cross_frame_align_loss(proj, target.detach(), num_frames=FRAMES, **arguments)
    (grad,) = torch.autograd.grad(loss, [proj], random_grad_output(loss, seed=3))
    return [loss, _local(grad, sizes).nan_to_num(0.0) if len(sizes) > 1 else grad]


SP_LOSS_CASES = {
    "tau": dict(tau=3.7, neighbors=3),
    "neighbors": dict(neighbors=3),
    "neighbor_mode": dict(neighbor_mode="cumulative", neighbors=3),
    "normalize_weights": dict(normalize_weights=True, neighbor_mode="cumulative", neighbors=2),
    "reduction": [dict(reduction="none"), dict(reduction="frame_sum")],
    "eps": [dict(eps=EPS), dict(eps=EPS, neighbors=2, normalize_weights=True)],
    "backend": dict(backend="cuda", _raises=True),
    "target_sharded": dict(target_sharded=True, seq_len=FRAMES * TOKENS, _sharded_target=True),
    "seq_len": dict(seq_len=FRAMES * TOKENS, target_sharded=True, _sharded_target=True),
    "shard_sizes": [dict(shard_sizes=SHARDS, _uneven=True),
                    dict(shard_sizes=SHARDS, target_sharded=True, seq_len=FRAMES * TOKENS, _uneven=True,
                         _sharded_target=True, neighbors=2)],
    "group": dict(group="each rank alone"),
    "weights": [dict(weights="gaussian", tau=0.8, neighbors=2, neighbor_mode="cumulative"),
                dict(weights=torch.tensor([0.3, 1.4], dtype=torch.float64), neighbors=2, neighbor_mode="cumulative",
                     normalize_weights=True)],
}

SP_TOKENS = 2  # 5 frames x 2 tokens = 10: tensor_split gives 4, 3, 3 tokens, chunk would give 4, 4, 2


def _alignment(alignment) -> list:
    if alignment.nonfinite:  # the figures are NaN then: only what the skipped step gives
        return [alignment.loss, alignment.included_frames, *alignment_state(alignment)]
    neighbor = alignment.neighbor_similarity
    return [alignment.loss, alignment.self_similarity, "no neighbours" if neighbor is None else neighbor,
            sorted(alignment.terms), *[alignment.terms[name] for name in sorted(alignment.terms)],
            alignment.cutoff_similarity, alignment.included_frames, *alignment_state(alignment)]


def _sp_regularizer_arguments(kwargs):
    arguments, flags = split(kwargs)
    forward = {name: arguments.pop(name) for name in ("sample_weight", "frame_mask", "update_cutoff", "hidden_frames")
               if name in arguments}
    if arguments.get("group") == "each rank alone":
        arguments["group"] = GROUPS[dist.get_rank()]
    return arguments, flags, forward


def _inputs(flags):
    hidden, targets = _regularizer_inputs(flags, tokens=SP_TOKENS)
    if flags.get("_rank_inputs"):  # each rank its own sequence
        hidden = [(h.detach() + 0.5 * dist.get_rank()).requires_grad_(True) for h in hidden]
    return hidden, targets


def _sp_regularizer(kwargs):
    arguments, flags, forward = _sp_regularizer_arguments(kwargs)
    hidden, targets = _inputs(flags)
    regularizer = _make_regularizer(arguments, flags, kind=SequenceParallelRegularizer)
    single = len(hidden) == 1 and len(targets) == 1
    return _alignment(regularizer(hidden[0] if single else hidden, targets[0] if single else targets, **forward))


def _refused(case: dict) -> bool:
    """A shard of the sequence holds no whole frame: the grid alignments and the convolution over the token grid
    are refused by the sequence-parallel regulariser (documented in its constructor)."""
    return (case.get("frame_align", "exact") != "exact" or case.get("token_align", "exact") != "exact"
            or case.get("pool_tokens", False) or case.get("projector") == "conv")


def _sp_regularizer_lower(kwargs):
    arguments, flags, forward = _sp_regularizer_arguments(kwargs)
    if _refused(arguments):
        raise ValueError("refused by a sequence-parallel regulariser")
    for name in ("group", "shard_full_states"):
        arguments.pop(name, None)
    hidden, targets = _inputs(flags)
    regularizer = _make_regularizer(arguments, flags, kind=CrepaRegularizer)
    single = len(hidden) == 1 and len(targets) == 1
    return _alignment(regularizer(hidden[0] if single else hidden, targets[0] if single else targets, **forward))


def _with_full_states(case: dict) -> dict:
    return {"shard_full_states": True, **case}


def _sp_case(case: dict) -> dict:
    if _refused(case):  # on the targets' grid, so that only the option makes the difference
        return _with_full_states({**{k: v for k, v in case.items() if not k.startswith("_") and k not in (
            "hidden_frames", "frame_mask")}, "_raises": True})
    return _with_full_states(case)


SP_REGULARIZER_CASES = {
    **{name: _sp_case(case) if isinstance(case, dict) else [_sp_case(c) for c in case]
       for name, case in REGULARIZER_CASES.items()
       if name not in ("checkpoint_projector", "eps", "hidden_frames", "projector_grid")},
    # the hidden states stay one sequence (a shard of it): hidden_frames only has to divide its length
    "hidden_frames": _with_full_states(dict(hidden_frames=3, _raises=True)),
    "eps": _with_full_states(dict(eps=0.38)),
    # the sharded projection recomputed in backward: the figures and loss as without it
    "checkpoint_projector": _with_full_states(dict(checkpoint_projector=True, _same_as_default=True)),
    "shard_full_states": dict(shard_full_states=True),
    # every rank alone: its shard is the whole sequence
    "group": _with_full_states(dict(group="each rank alone", _rank_inputs=True)),
}

def _rank_similarities():
    return [s + (0.15, 0.0, -0.1)[dist.get_rank()] for s in SIMILARITIES]


def _schedule_arguments(kwargs):
    arguments = dict(kwargs)
    if arguments.get("process_group") == "each rank alone":
        arguments["process_group"] = GROUPS[dist.get_rank()]
    return arguments


def _rank_schedule(kwargs):
    """Each rank feeds its own similarities; the EMA is the group's (the world's by default)."""
    return _schedule(_schedule_arguments(kwargs), _rank_similarities())


def _rank_schedule_lower(kwargs):
    arguments = _schedule_arguments(kwargs)
    arguments.pop("process_group")  # one rank alone in its group: the single-process schedule on its similarities
    return _schedule_lower(arguments, _rank_similarities())


ENTRY_POINTS = {
    "sequence_parallel_align_loss": (EntryPoint((sequence_parallel_align_loss,), _sp_loss, _sp_loss_lower),
                                     SP_LOSS_CASES),
    "SequenceParallelRegularizer": (EntryPoint((SequenceParallelRegularizer.__init__, CrepaRegularizer.__init__,
                                                CrepaRegularizer.forward), _sp_regularizer, _sp_regularizer_lower,
                                               dict(backend="reference", projector_width=16)),
                                    SP_REGULARIZER_CASES),
    # only the option tests/test_wiring.py cannot run in one process
    "LambdaSchedule": (EntryPoint((LambdaSchedule.__init__,), _rank_schedule, _rank_schedule_lower,
                                  dict(similarity_threshold=0.6, similarity_ema_decay=0.5)),
                       {"process_group": dict(process_group="each rank alone")}),
}
ONLY = {"LambdaSchedule": {"process_group"}}
# options that change no value an entry point returns, with the reason
EXEMPT = {("SequenceParallelRegularizer", "projector_grid"): "read only by the 'conv' projector, which a "
                                                                "sequence-parallel regulariser refuses (the "
                                                                "projector case checks that)"}


def _cases():
    for entry_name, (entry, cases) in ENTRY_POINTS.items():
        for option in options_of(entry):
            if (entry_name in ONLY and option not in ONLY[entry_name]) or (entry_name, option) in EXEMPT:
                continue
            case = cases.get(option)
            if case is None:
                yield entry_name, option, None
                continue
            for c in case if isinstance(case, list) else [case]:
                yield entry_name, option, c


def _check(entry_name: str, option: str, case: dict) -> dict:
    entry = ENTRY_POINTS[entry_name][0]
    arguments = {**entry.common, **case}
    base = {**entry.common, **{k: v for k, v in case.items() if k != option}}
    raises = arguments.pop("_raises", False)
    same_as_default = arguments.pop("_same_as_default", False)
    base.pop("_raises", None)
    base.pop("_same_as_default", None)
    got, expected = outcome(entry.run, arguments), outcome(entry.lower, arguments)
    default = outcome(entry.run, base)
    return {"equal": same(got, expected) and raises == (expected.error is not None),
            "changes": not same(got, default) or same_as_default,
            "got": describe(got), "expected": describe(expected)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    GROUPS[:] = [dist.new_group([r]) for r in range(world)]
    results = []
    try:
        for entry_name, option, case in _cases():
            if case is None:
                results.append({"entry": entry_name, "option": option, "missing": True})
                continue
            try:
                result = _check(entry_name, option, case)
            except Exception:
                result = {"equal": False, "changes": False, "got": traceback.format_exc(), "expected": ""}
            results.append({"entry": entry_name, "option": option, "case": repr(case), **result})
        dist.barrier()
    finally:
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
        dist.destroy_process_group()


def test_sequence_parallel_options_reach_the_computation(tmp_path):
    out = tmp_path / "results.json"
    launch(WORLD, _worker, str(out))
    per_rank = json.loads(out.read_text())
    problems = []
    for checks in zip(*per_rank):
        first = checks[0]
        name = f"{first['entry']}({first['option']})"
        if first.get("missing"):
            problems.append(f"{name}: no case in tests/test_wiring_distributed.py: add a non-default value")
            continue
        for rank, check in enumerate(checks):
            if not check["equal"]:
                problems.append(f"{name} {first['case']} rank {rank}: got {check['got']}, one level down "
                                f"{check['expected']}")
        if not any(check["changes"] for check in checks):
            problems.append(f"{name} {first['case']}: changes nothing on any rank, so a dropped option would pass")
    assert not problems, "\n".join(problems)
