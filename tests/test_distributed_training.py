"""examples/train_dit.py under FSDP2 and sequence parallelism (2 gloo processes) against one process, and the GPU
check of the sequence-parallel regulariser inside diffusers' own context parallelism (skips without 2 GPUs)."""
from __future__ import annotations

import dataclasses
import datetime
import os

import pytest
import torch
import torch.distributed as dist

from test_distributed import free_port, launch

pytest.importorskip("diffusers")
from test_training import SMALL, _assert_within_tolerance, trainer  # noqa: E402  (the trainer, loaded by path)

from crepa_kernels.distributed.sharded_training import (  # noqa: E402
    SequenceParallelRegularizer,
    context_parallel_shard_sizes,
    shard_model,
    sum_gradients,
)

CONFIG = dataclasses.replace(SMALL, global_batch=2, neighbors=2, neighbor_mode="cumulative")
MODES = {  # name -> the configuration's changes
    "fsdp joint": dict(fsdp="joint"),
    "fsdp separate": dict(fsdp="separate"),
    "sequence parallel": dict(sequence_parallel=True),
}


def _train_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # a failing rank must not hang CI
    try:
        for index, (name, changes) in enumerate(MODES.items()):
            result = trainer.train(dataclasses.replace(CONFIG, **changes), "auto")
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{index}.pt"))
        _check_fsdp_units(world)
    finally:
        dist.destroy_process_group()


def _check_fsdp_units(world: int) -> None:
    """The two FSDP2 layouts: the projector in the root unit, or a unit of its own; parameters are DTensors."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for mode in ("joint", "separate"):
        model = shard_model(trainer.build_model(CONFIG, "auto", torch.device("cpu"), CONFIG.encoder_dim), mode)
        assert isinstance(model, FSDPModule) and isinstance(model.transformer.blocks[0], FSDPModule)
        assert isinstance(model.regularizer.projector, FSDPModule) == (mode == "separate")
        weight = model.regularizer.projector[0].weight
        assert isinstance(weight, DTensor) and weight.to_local().shape[0] == -(-weight.shape[0] // world)


def test_fsdp2_and_sequence_parallel_steps_match_one_process(tmp_path):
    single = trainer.train(CONFIG, "auto")
    launch(2, _train_worker, str(tmp_path))
    for index, name in enumerate(MODES):
        distributed = torch.load(tmp_path / f"{index}.pt", weights_only=False)
        assert len(distributed.records) == CONFIG.steps
        report = trainer.compare(single, distributed, trainer.DISTRIBUTED_TOLERANCES[torch.float32])
        _assert_within_tolerance(report)


def test_fsdp_refuses_diagnostics_before_training():
    # the diagnostics forward runs on rank 0 alone; a sharded model there would all-gather on one rank and hang
    with pytest.raises(ValueError, match="--diagnostics-every is not supported with --fsdp"):
        trainer.train(dataclasses.replace(CONFIG, fsdp="joint", diagnostics_every=1, diagnostics_json="d.jsonl"), "auto")


def test_context_parallel_shard_sizes_follow_tensor_split():
    for length, world in [(75, 2), (75, 3), (76, 4), (5, 4), (3, 4)]:
        sizes = context_parallel_shard_sizes(length, world)
        assert sizes == [len(part) for part in torch.arange(length).tensor_split(world)]


# ---- GPU: diffusers' enable_parallelism (Ulysses) hands the capture this rank's shard ----

def _ulysses_worker(rank: int, world: int, port: int) -> None:
    from diffusers import ContextParallelConfig

    from crepa_kernels.training import CrepaRegularizer, HiddenStateCapture

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        transformer = trainer.build_transformer(CONFIG).to(device)
        generator = torch.Generator().manual_seed(1)
        # 3 latent frames of 2 x 3 tokens: 18 tokens, 9 per rank, so frame 1 straddles the two ranks
        latents = torch.randn(2, CONFIG.latent_channels, 3, 4, 6, generator=generator).to(device)
        timestep = torch.tensor([300.0, 700.0], device=device)
        text = torch.randn(2, CONFIG.text_tokens, 32, generator=generator).to(device)
        targets = torch.randn(2, 3, 6, 16, generator=generator).to(device)
        options = dict(neighbors=1, projector_width=32, backend="auto")
        reference = CrepaRegularizer(32, 16, **options).to(device)
        sequence_parallel = SequenceParallelRegularizer(32, 16, **options).to(device)
        sequence_parallel.load_state_dict(reference.state_dict())

        capture = HiddenStateCapture(transformer, 0)
        transformer(latents, timestep, text, return_dict=False)
        expected = reference(capture.pop().detach(), targets)
        expected.loss.backward()

        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        transformer(latents, timestep, text, return_dict=False)
        shard = capture.pop().detach()
        assert shard.shape[1] == context_parallel_shard_sizes(18, world)[rank]
        got = sequence_parallel(shard, targets)
        got.loss.backward()
        sum_gradients(sequence_parallel.parameters())
        torch.testing.assert_close(got.align_loss, expected.align_loss, rtol=1e-4, atol=1e-6)
        for mine, theirs in zip(sequence_parallel.parameters(), reference.parameters()):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="diffusers' enable_parallelism with ulysses_degree=2 needs 2 CUDA devices (NCCL)")
def test_ulysses_context_parallel_matches_one_gpu():
    torch.multiprocessing.spawn(_ulysses_worker, args=(2, free_port()), nprocs=2, join=True)
