"""torch.compile(fullgraph=True) through the public API, and autocast (issue 7).

Backend-specific op checks (opcheck, fake tensors) live with each backend's tests.
"""
import pytest
import torch

from crepa_kernels import available_backends, cross_frame_align_loss
from harness import assert_close_and_finite, random_pair

CPU_COMPILABLE = [name for name, ok in available_backends("cpu").items() if ok is True and name != "triton"]


def _loss_and_grads(loss_fn, proj, target):
    proj = proj.detach().requires_grad_(True)
    target = target.detach().requires_grad_(True)
    loss = loss_fn(proj, target)
    grads = torch.autograd.grad(loss, (proj, target))
    return loss, grads


@pytest.mark.parametrize("backend", CPU_COMPILABLE + ["auto"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def step(proj, target):
        return cross_frame_align_loss(proj, target, neighbors=2, neighbor_mode="cumulative", tau=0.7,
                                      normalize_weights=True, backend=backend)

    proj, target = random_pair((2, 5, 3, 11), torch.float32)
    compiled = torch.compile(step, fullgraph=True)  # fullgraph: any graph break is an error
    loss, grads = _loss_and_grads(compiled, proj, target)
    expected, expected_grads = _loss_and_grads(step, proj, target)
    assert_close_and_finite(loss, expected, f"compiled {backend} loss")
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close_and_finite(grad, expected_grad, f"compiled {backend} grad")


@pytest.mark.parametrize("backend", CPU_COMPILABLE)
def test_autocast_cpu_bf16(backend):
    torch.manual_seed(0)
    projector = torch.nn.Linear(16, 9)
    hidden = torch.randn(2, 4 * 3, 16)
    target = torch.randn(2, 4, 3, 9, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        proj = projector(hidden)
        assert proj.dtype == torch.bfloat16
        loss = cross_frame_align_loss(proj, target, num_frames=4, neighbors=1, backend=backend)
    assert loss.dtype == torch.float32
    expected = cross_frame_align_loss(proj.detach().double(), target.double(), num_frames=4, neighbors=1,
                                      backend="reference")
    assert_close_and_finite(loss, expected, f"autocast {backend}", dtype=torch.float32)
    loss.backward()
    assert torch.isfinite(projector.weight.grad).all()

