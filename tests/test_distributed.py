"""sequence_parallel_align_loss on 2, 3 and 4 gloo processes against one process (cross_frame_align_loss).

Each world size is one process-group launch that runs every case, so start-up is paid once per world size.
Every rank builds the same full inputs from the case's seed, computes the single-process loss and gradients
itself, then its shard's loss and gradients, and compares: the loss on every rank, the proj shard's gradient with
its slice (zero on padding), the target's gradient with the whole (replicated) or its slice (sharded).
Padding tokens hold NaN, so a kernel that read them would fail the comparison.
"""
from __future__ import annotations

import datetime
import math
import os
import random
import socket
import traceback
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from harness import assert_close_and_finite, random_grad_output, random_pair

WORLD_SIZES = (2, 3, 4)


@dataclass(frozen=True)
class Case:
    name: str
    frames: int
    tokens: int
    layout: str  # "even" (equal shards), "padded" (equal shards, last padded), "uneven" (shard_sizes=), "dtensor"
    target: str = "replicated"  # or "sharded"
    options: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    target_dtype: torch.dtype | None = None
    target_grad: bool = False
    backend: str = "auto"
    compiled: bool = False  # through torch.compile(fullgraph=True): the collectives must trace
    batch: int = 2
    dim: int = 9
    worlds: tuple[int, ...] = WORLD_SIZES


ADJ1 = dict(neighbors=1)
ADJ2 = dict(neighbors=2, neighbor_mode="adjacent", normalize_weights=True, tau=0.7)
CUM2 = dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True)
CUM3 = dict(neighbors=3, neighbor_mode="cumulative", tau=0.5)

CASES = [
    # shards that split frames mid-way (35 tokens in frames of 7), last shard padded
    Case("mid-frame padded", 5, 7, "padded", options=ADJ1),
    Case("mid-frame padded sharded target grad", 5, 7, "padded", "sharded", options=ADJ1, target_grad=True),
    Case("uneven replicated grad none", 6, 5, "uneven", options=dict(CUM2, reduction="none"), target_grad=True),
    Case("uneven sharded frame_sum", 6, 5, "uneven", "sharded", options=dict(CUM3, reduction="frame_sum")),
    # F smaller than the world size
    Case("F < world replicated", 2, 5, "padded", options=dict(neighbors=1, neighbor_mode="cumulative",
                                                              normalize_weights=True), target_grad=True),
    Case("F < world sharded", 2, 5, "uneven", "sharded", options=ADJ1, target_grad=True),
    # d >= 2 with shards shorter than the offset: the halo comes from two ranks away
    Case("d=2 across ranks sharded", 6, 2, "even", "sharded", options=ADJ2, target_grad=True, batch=1),
    Case("d=3 across ranks sharded", 7, 2, "uneven", "sharded", options=CUM3),
    Case("whole frames per rank", 12, 4, "even", "sharded", options=CUM2, target_grad=True),
    Case("REPA* d=0", 4, 6, "even", "sharded", options=dict(neighbors=0)),
    Case("d beyond F", 4, 3, "padded", "sharded", options=dict(neighbors=9, neighbor_mode="cumulative")),
    # bf16, and mixed dtypes
    Case("bf16 replicated", 5, 7, "padded", options=CUM2, dtype=torch.bfloat16, target_grad=True),
    Case("bf16 sharded", 6, 5, "uneven", "sharded", options=ADJ2, dtype=torch.bfloat16, target_grad=True),
    Case("fp32 proj bf16 target", 5, 7, "uneven", "sharded", options=ADJ1, target_dtype=torch.bfloat16),
    # float64: the decomposition is exact up to summation order
    Case("fp64 reference", 6, 5, "uneven", "sharded", options=CUM3, dtype=torch.float64, backend="reference",
         target_grad=True),
    Case("fp64 cpu none", 5, 7, "padded", options=dict(ADJ2, reduction="none"), dtype=torch.float64,
         backend="cpu", target_grad=True),
    # DTensor inputs (torch.chunk shards: the last ones may be short or empty)
    Case("dtensor replicated", 5, 3, "dtensor", options=ADJ1, target_grad=True),
    Case("dtensor sharded", 5, 3, "dtensor", "sharded", options=CUM2, target_grad=True),
    # the Triton kernels (interpreted here), one world size
    Case("triton", 5, 7, "padded", "sharded", options=ADJ1, target_grad=True, backend="triton", worlds=(3,)),
    Case("compiled", 5, 7, "padded", "sharded", options=ADJ1, target_grad=True, compiled=True, worlds=(2,)),
]


class CollectiveLog(TorchDispatchMode):
    """The collectives that run, by op name and shape of their input (observed at the dispatcher)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace in ("_c10d_functional", "c10d") and name not in ("wait_tensor", "_wrap_tensor_autograd"):
            self.calls.append((name, tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


def check_communication(case: Case, forward: list, backward: list, batch: int, world: int) -> None:
    """One all-reduce of [B, F] (plus one halo all-to-all with a sharded target) forward; backward nothing for a
    frozen target, else one collective for the target's gradient."""
    names = [name for name, _ in forward]
    assert ("all_reduce", (batch, case.frames)) in forward and names.count("all_reduce") == 1, forward
    halo = names.count("all_to_all_single")
    assert len(forward) == 1 + halo and halo <= (case.target == "sharded"), forward
    if not case.target_grad:
        assert backward == [], backward
    elif case.target == "sharded":
        assert [name for name, _ in backward] == ["all_to_all_single"] * halo, backward
    else:
        assert [name for name, _ in backward] == ["all_reduce"], backward


def shard_sizes(case: Case, world: int) -> list[int]:
    total = case.frames * case.tokens
    if case.layout == "even":
        assert total % world == 0, case
        return [total // world] * world
    if case.layout in ("padded", "dtensor"):
        chunk = math.ceil(total / world)
        if case.layout == "padded":
            return [chunk] * world
        return [max(0, min(chunk, total - r * chunk)) for r in range(world)]
    # uneven: random cuts (one rank may be empty), then 3 tokens of padding on the last shard
    rng = random.Random(f"{case.name}/{world}")
    cuts = sorted(rng.randint(0, total) for _ in range(world - 1))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    sizes[-1] += 3
    return sizes


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if expected.numel():  # a rank may hold an empty shard
        assert_close_and_finite(actual, expected, what)


def _pad(x: torch.Tensor, total: int) -> torch.Tensor:
    padding = x.new_full((x.shape[0], total - x.shape[1], x.shape[2]), float("nan"))
    return torch.cat([x.detach(), padding], dim=1)


def run_case(case: Case, rank: int, world: int, seed: int) -> None:
    from crepa_kernels import cross_frame_align_loss
    from crepa_kernels.distributed import sequence_parallel_align_loss

    frames, tokens = case.frames, case.tokens
    total = frames * tokens
    proj, target = random_pair((case.batch, total, case.dim), case.dtype, case.target_dtype, seed=seed,
                               target_requires_grad=case.target_grad)
    options = dict(num_frames=frames, backend=case.backend, **case.options)

    expected = cross_frame_align_loss(proj, target, **options)
    grad_output = random_grad_output(expected, seed + 1)
    wrt = [proj, target] if case.target_grad else [proj]
    expected_grads = torch.autograd.grad(expected, wrt, grad_output)

    sizes = shard_sizes(case, world)
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    proj_local = _pad(proj, sum(sizes))[:, local].clone().requires_grad_(True)
    if case.target == "sharded":
        target_local = _pad(target, sum(sizes))[:, local].clone().requires_grad_(case.target_grad)
    else:
        target_local = target.detach().clone().requires_grad_(case.target_grad)

    proj_arg, target_arg, extra = proj_local, target_local, {}
    if case.layout == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh = init_device_mesh("cpu", (world,))
        proj_arg = DTensor.from_local(proj_local, mesh, [Shard(1)], run_check=False, shape=proj.shape,
                                      stride=proj.stride())
        if case.target == "sharded":
            target_arg = DTensor.from_local(target_local, mesh, [Shard(1)], run_check=False, shape=target.shape,
                                            stride=target.stride())
        else:
            target_arg = DTensor.from_local(target_local, mesh, [Replicate()], run_check=False)
    else:
        if case.layout == "uneven":
            extra["shard_sizes"] = sizes
        if case.target == "sharded":
            extra["target_sharded"] = True
            if sum(sizes) != total:
                extra["seq_len"] = total

    wrt_local = [proj_local, target_local] if case.target_grad else [proj_local]
    if case.compiled:
        compiled = torch.compile(sequence_parallel_align_loss, fullgraph=True, backend="aot_eager")
        loss = compiled(proj_arg, target_arg, **options, **extra)
        grads = torch.autograd.grad(loss, wrt_local, grad_output)
    else:
        with CollectiveLog() as forward_log:
            loss = sequence_parallel_align_loss(proj_arg, target_arg, **options, **extra)
        with CollectiveLog() as backward_log:
            grads = torch.autograd.grad(loss, wrt_local, grad_output)
        check_communication(case, forward_log.calls, backward_log.calls, case.batch, world)

    assert_matches(loss, expected.detach(), f"{case.name}: loss")
    expected_proj = torch.cat([expected_grads[0], torch.zeros_like(_pad(proj, sum(sizes))[:, total:])], dim=1)
    assert_matches(grads[0], expected_proj[:, local], f"{case.name}: proj grad (rank {rank})")
    if case.target_grad:
        expected_target = expected_grads[1]
        if case.target == "sharded":
            padded = torch.cat([expected_target, torch.zeros_like(_pad(target, sum(sizes))[:, total:])], dim=1)
            expected_target = padded[:, local]
        assert_matches(grads[1], expected_target, f"{case.name}: target grad (rank {rank})")


def check_nan_propagates(rank: int, world: int) -> None:
    """A NaN in one real token of one rank's shard makes the loss NaN on every rank."""
    from crepa_kernels.distributed import sequence_parallel_align_loss

    proj, target = random_pair((1, 35, 6), seed=7, target_requires_grad=False)
    proj = proj.detach().clone()
    proj[0, 20, 3] = float("nan")
    chunk = math.ceil(35 / world)
    local = _pad(proj, chunk * world)[:, rank * chunk : (rank + 1) * chunk]
    loss = sequence_parallel_align_loss(local, target, num_frames=5)
    assert torch.isnan(loss), loss


def check_sub_mesh_groups(rank: int, world: int) -> None:
    """On a (dp=2, cp=2) mesh each dp row is its own sequence-parallel group: group=mesh["cp"], its ProcessGroup, and
    a DTensor [Shard(0), Shard(1)] all give each row the single-process loss and gradients of its own samples."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from crepa_kernels import cross_frame_align_loss
    from crepa_kernels.distributed import sequence_parallel_align_loss

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    dp, cp = mesh.get_local_rank("dp"), mesh.get_local_rank("cp")
    proj, target = random_pair((4, 35, 6), seed=11, target_requires_grad=False)
    rows, tokens = slice(2 * dp, 2 * dp + 2), slice(18 * cp, 18 * cp + 18)  # torch.chunk of 35 tokens: 18, 17
    options = dict(num_frames=5, neighbors=2, neighbor_mode="cumulative")
    mine = proj[rows].detach().requires_grad_(True)
    expected = cross_frame_align_loss(mine, target[rows], **options)
    (expected_grad,) = torch.autograd.grad(expected, [mine])
    for how in ("sub-mesh", "process group", "dtensor"):
        local = proj[rows, tokens].detach().clone().requires_grad_(True)
        if how == "dtensor":
            local_target = DTensor.from_local(target[rows], mesh, [Shard(0), Replicate()], run_check=False,
                                              shape=target.shape, stride=target.stride())
            argument = DTensor.from_local(local, mesh, [Shard(0), Shard(1)], run_check=False, shape=proj.shape,
                                          stride=proj.stride())
            loss = sequence_parallel_align_loss(argument, local_target, **options)
        else:
            group = mesh["cp"] if how == "sub-mesh" else mesh["cp"].get_group()
            loss = sequence_parallel_align_loss(local, target[rows], group=group, shard_sizes=[18, 17], **options)
        (grad,) = torch.autograd.grad(loss, [local])
        assert_matches(loss, expected.detach(), f"{how}: loss (rank {rank})")
        assert_matches(grad, expected_grad[:, tokens], f"{how}: proj grad (rank {rank})")


EXTRA_CHECKS = {2: [check_nan_propagates], 3: [check_nan_propagates], 4: [check_nan_propagates, check_sub_mesh_groups]}


def _worker(rank: int, world: int, port: int, names: list[str]) -> None:
    torch.set_num_threads(1)
    # a short timeout: a rank that fails a case leaves the others waiting in a collective, which must not hang CI
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    failures = []
    try:
        for index, case in enumerate(c for c in CASES if c.name in names):
            try:
                run_case(case, rank, world, seed=100 * world + index)
            except Exception:  # collect every failing case, then fail once
                failures.append(f"[world {world} rank {rank}] {case.name}:\n{traceback.format_exc()}")
        for check in EXTRA_CHECKS[world]:
            try:
                check(rank, world)
            except Exception:
                failures.append(f"[world {world} rank {rank}] {check.__name__}:\n{traceback.format_exc()}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if failures:
        raise AssertionError("\n".join(failures))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, worker, *args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(worker, args=(world, free_port(), *args), nprocs=world, join=True)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_matches_single_process(world):
    launch(world, _worker, [c.name for c in CASES if world in c.worlds])
