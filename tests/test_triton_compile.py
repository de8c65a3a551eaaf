"""The Triton kernels compile for real GPUs without spilling (no GPU needed), and match the reference at
realistic shapes on a GPU (skipped without one)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import assert_backend_matches_reference, random_pair

ROOT = Path(__file__).resolve().parents[1]


def test_ahead_of_time_compile_has_no_spills():
    # A subprocess, because this pytest process has TRITON_INTERPRET=1 (tests/test_triton_backend.py), which turns
    # every @triton.jit kernel into an uncompilable Python function at import time.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_triton.py"), "--quick", "--json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.stdout.strip(), done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in results} == {"forward", "backward"}
    assert {r["dtype"] for r in results} == {"bfloat16", "float32"}
    for r in results:
        assert r["registers"] > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape,dtype", [((1, 13, 1350, 768), torch.bfloat16), ((2, 21, 300, 1152), torch.float32),
                                         ((1, 49, 90, 1024), torch.bfloat16)], ids=str)
def test_gpu_matches_reference_at_realistic_shapes(shape, dtype):
    proj, target = random_pair(shape, dtype, device="cuda")
    for options in (dict(neighbors=1), dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True)):
        assert_backend_matches_reference("triton", proj, target, **options)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40e9,
                    reason="needs a CUDA device with >= 40 GB")
def test_gpu_offsets_beyond_int32():
    """2.15e9 elements per input: the last token columns sit past 2^31 elements and must index correctly."""
    from crepa_kernels.ops import triton_loss
    from crepa_kernels.reference import per_frame_loss as reference
    from crepa_kernels.spec import LossOptions

    shape = (1, 3, 700_000, 1024)
    assert shape[1] * shape[2] * shape[3] > 2**31
    generator = torch.Generator(device="cuda").manual_seed(0)
    proj = torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    target = (0.7 * proj.detach() + torch.randn(shape, generator=generator, device="cuda",
                                                 dtype=torch.bfloat16)).requires_grad_(True)
    options = LossOptions(neighbors=1)
    loss = triton_loss.per_frame_loss(proj, target, options)
    grad_loss = torch.tensor([[0.3, 1.7, -0.6]], device="cuda")
    grad_proj, grad_target = torch.autograd.grad(loss, (proj, target), grad_loss)

    num_tokens = shape[2]
    expected = torch.zeros_like(loss, dtype=torch.float64)
    for start in range(0, num_tokens, 100_000):  # tokens are independent: the token mean splits into chunks
        chunk = slice(start, start + 100_000)
        part = reference(proj.detach()[:, :, chunk], target.detach()[:, :, chunk], options)
        expected += part.double() * (min(num_tokens, start + 100_000) - start) / num_tokens
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)

    last = slice(num_tokens - 64, num_tokens)  # past 2^31 elements in frame 2
    p = proj.detach()[:, :, last].double().requires_grad_(True)
    y = target.detach()[:, :, last].double().requires_grad_(True)
    ref_grads = torch.autograd.grad(reference(p, y, options) * (64 / num_tokens), (p, y), grad_loss.double())
    for grad, ref_grad in zip((grad_proj[:, :, last], grad_target[:, :, last]), ref_grads):
        scale = ref_grad.abs().max().item()
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-2 * scale)
