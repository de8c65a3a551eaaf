"""The compiled kernels ("cpu", and the CUDA kernels through "cuda_emulated") read the neighbour weights from the
coefficient table they are handed, and compute none of their own (issue 22).

Each backend gets an ARBITRARY random non-negative table (no tau gives it: independent per row and slot, zero where a
slot does not land) through the backend protocol's forward / backward, and its loss and both gradients are compared
with a float64 computation with that same table (tests/coefficient_oracle.py). A table it did not read, a row or slot
read in the wrong place, or a weight computed from tau fails here. A table of the wrong shape, dtype or device, or a
non-contiguous one, is refused before any work, with the argument named.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from coefficient_oracle import arbitrary_table, table_oracle
from crepa_kernels import backends
from crepa_kernels.ops import cuda_emulated, native
from crepa_kernels.spec import LossOptions, coefficient_table, compute_dtype
from harness import TOLERANCES, random_grad_output, random_pair

ROOT = Path(__file__).resolve().parents[1]
BACKEND_MODULES = {"cpu": native, "cuda_emulated": cuda_emulated}
# no neighbours (W = 1: the last table entry is read), adjacent, cumulative, and d >= F (the band reaches the whole
# clip, F * W = 45 entries: more than the 32 threads a CUDA block has at this D)
BANDS = [LossOptions(neighbors=0), LossOptions(neighbors=2), LossOptions(neighbors=2, neighbor_mode="cumulative"),
         LossOptions(neighbors=9, neighbor_mode="cumulative", eps=1e-8)]


def backend_or_skip(name: str):
    reason = backends.unavailable_reason(name, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{name} unavailable: {reason}")
    return BACKEND_MODULES[name]


def run_protocol(module, proj, target, table, options, grad_loss, needs=(True, True)):
    """forward then backward as crepa_kernels.function calls them."""
    loss, *saved = module.forward(proj, target, table, options)
    grads = module.backward(grad_loss.to(loss.dtype), proj, target, table, tuple(saved), options, *needs)
    return loss, grads


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    rtol, atol = TOLERANCES[actual.dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * expected.abs().max().item(),
                               msg=lambda message: f"{what}: {message}")


@pytest.mark.parametrize("options", BANDS, ids=lambda o: f"{o.neighbor_mode}{o.neighbors}")
@pytest.mark.parametrize("proj_dtype,target_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                     (torch.bfloat16, torch.bfloat16),
                                                     (torch.float32, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("backend", list(BACKEND_MODULES))
def test_loss_and_gradients_follow_an_arbitrary_table(backend, proj_dtype, target_dtype, options):
    module = backend_or_skip(backend)
    shape = (2, 5, 3, 13)  # odd sizes: D % 8 != 0, F * N odd
    proj, target = (x.detach() for x in random_pair(shape, proj_dtype, target_dtype, seed=90))
    acc = compute_dtype(proj, target)
    table = arbitrary_table(options, shape[1], acc, seed=91)
    assert not torch.allclose(table, coefficient_table(options, shape[1], acc))
    grad_loss = random_grad_output(torch.empty(shape[:2], dtype=acc))
    loss, (grad_proj, grad_target) = run_protocol(module, proj, target, table, options, grad_loss)
    expected_loss, expected_proj, expected_target = table_oracle(proj, target, table, options, grad_loss)
    assert loss.dtype == acc and grad_proj.dtype == proj_dtype and grad_target.dtype == target_dtype
    assert_matches(loss, expected_loss, f"{backend} loss")
    assert_matches(grad_proj, expected_proj, f"{backend} grad proj")
    assert_matches(grad_target, expected_target, f"{backend} grad target")


@pytest.mark.parametrize("backend", list(BACKEND_MODULES))
def test_each_table_entry_reaches_its_frame(backend):
    """One non-zero entry at a time: L and the gradients move exactly where C[f, slot] says, in float64."""
    module = backend_or_skip(backend)
    shape = (1, 4, 3, 9)
    options = LossOptions(neighbors=1, neighbor_mode="cumulative")
    proj, target = (x.detach() for x in random_pair(shape, torch.float64, seed=92))
    grad_loss = random_grad_output(torch.empty(shape[:2], dtype=torch.float64))
    for f, slot in [(0, 0), (0, 2), (3, 1), (2, 2)]:
        table = torch.zeros(4, 3, dtype=torch.float64)
        table[f, slot] = 0.75
        loss, (grad_proj, grad_target) = run_protocol(module, proj, target, table, options, grad_loss)
        expected = table_oracle(proj, target, table, options, grad_loss)
        for name, actual, wanted in zip(("loss", "grad proj", "grad target"), (loss, grad_proj, grad_target),
                                        expected):
            torch.testing.assert_close(actual, wanted, rtol=1e-12, atol=1e-14,
                                       msg=lambda m: f"C[{f}, {slot}] {name}: {m}")
        assert torch.count_nonzero(loss) == 1


@pytest.mark.parametrize("backend", list(BACKEND_MODULES))
def test_only_the_gradients_asked_for(backend):
    module = backend_or_skip(backend)
    shape = (2, 5, 3, 8)
    options = LossOptions(neighbors=2, neighbor_mode="cumulative")
    proj, target = (x.detach() for x in random_pair(shape, torch.float32, seed=93))
    table = arbitrary_table(options, shape[1], torch.float32, seed=94)
    grad_loss = random_grad_output(torch.empty(shape[:2]))
    _, expected_proj, expected_target = table_oracle(proj, target, table, options, grad_loss)
    for needs in ((True, False), (False, True)):
        _, (grad_proj, grad_target) = run_protocol(module, proj, target, table, options, grad_loss, needs)
        assert (grad_proj is None) != needs[0] and (grad_target is None) != needs[1]
        grad, expected = (grad_proj, expected_proj) if needs[0] else (grad_target, expected_target)
        assert_matches(grad, expected, f"{backend} {needs}")


def ops_of(backend: str):
    return torch.ops.crepa_kernels if backend == "cpu" else torch.ops.crepa_kernels_emulated


SCALAR_NAMES = {torch.float32: "Float", torch.float64: "Double"}  # as c10 prints them


def bad_tables(acc: torch.dtype):
    """(table, what the message must say) for F = 5, cumulative d = 2 (W = 5)."""
    good = torch.rand(5, 5, dtype=acc)
    other = torch.float64 if acc == torch.float32 else torch.float32
    return [
        (good[:, :3], r"coefficients: expected the \[F, W\] = \[5, 5\] table of this call's band, got \[5, 3\]"),
        (good[:4], r"coefficients: expected the \[F, W\] = \[5, 5\] table .* got \[4, 5\]"),
        (good.reshape(25), r"coefficients: expected the \[F, W\] = \[5, 5\] table .* got \[25\]"),
        (good.to(other), rf"coefficients: expected {SCALAR_NAMES[acc]} \(the accumulation dtype of these inputs\), "
                         rf"got {SCALAR_NAMES[other]}"),
        (good.t(), r"coefficients: expected a contiguous tensor, got strides \[1, 5\]"),
    ]


@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", list(BACKEND_MODULES))
def test_bad_tables_are_refused_before_any_work(backend, acc):
    backend_or_skip(backend)
    ops = ops_of(backend)
    proj, target = (x.detach() for x in random_pair((2, 5, 3, 8), acc, seed=95))
    good = coefficient_table(LossOptions(neighbors=2, neighbor_mode="cumulative"), 5, acc)
    loss, stats = ops.align_forward(proj, target, good, 2, True, 1e-12)
    for table, message in bad_tables(acc):
        with pytest.raises(ValueError, match=message):
            ops.align_forward(proj, target, table, 2, True, 1e-12)
        with pytest.raises(ValueError, match=message):
            ops.align_backward(torch.ones_like(loss), proj, target, stats, table, 2, True, 1e-12, True, True)


@pytest.mark.parametrize("backend", list(BACKEND_MODULES))
def test_a_table_on_another_device_is_refused(backend):
    """No second device here: the CPU kernel is called directly (below the dispatcher, which would otherwise send a
    call with a meta tensor to the fake implementation) with the table on the meta device."""
    backend_or_skip(backend)
    op = ops_of(backend).align_forward.default
    proj, target = (x.detach() for x in random_pair((1, 3, 2, 8), torch.float32, seed=96))
    table = torch.empty(3, 3, device="meta")
    with pytest.raises(ValueError, match="coefficients: expected the inputs' device cpu, got meta"):
        op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), proj, target, table, 1, True, 1e-12)


def test_no_kernel_source_computes_a_weight():
    """Grep-level: no exponential, tau or normalisation left in the kernels' sources (the arbitrary-table tests above
    prove that what they use is the table)."""
    sources = ["crepa_math.h", "crepa_cpu.cpp", "crepa_cuda_kernels.cu", "crepa_cuda.cpp", "crepa_cuda_launch.h",
               "crepa_cuda_plan.h", "crepa_ops.cpp", "crepa_ops.h", "crepa_cuda_emulated.cpp"]
    forbidden = re.compile(r"\b(exp|expf|__expf|exp2f?|expm1f?|exp_of|tau|normalize_weights|neighbour_weight|"
                           r"frame_coefficient|fill_coefficients)\b")
    for name in sources:
        code = "\n".join(line.split("//")[0] for line in (ROOT / "csrc" / name).read_text().splitlines())
        assert not forbidden.search(code), f"{name}: {forbidden.search(code).group(0)}"
