"""The Triton kernels compile for real GPUs without spilling, within shared memory and with IEEE-rounded maths (no
GPU needed), and match the reference at realistic shapes on a GPU (skipped without one)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import assert_backend_matches_reference, assert_close_and_finite, random_pair

ROOT = Path(__file__).resolve().parents[1]


def test_ahead_of_time_compile_has_no_spills_and_no_approximate_maths():
    # A subprocess, because this pytest process has TRITON_INTERPRET=1 (tests/conftest.py), which turns every
    # @triton.jit kernel into an uncompilable Python function at import time.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_triton.py"), "--quick", "--json",
                           "--no-cache", "--jobs", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.stdout.strip(), done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in results} == {"table", "forward", "backward"}
    assert {r["dtypes"] for r in results} == {"bfloat16/bfloat16", "float32/bfloat16"}
    # both frame tilings (one window; shifted windows for d = 57 on F = 61), both gradients of the shifted backward
    assert {"FRAMES=16", "SHIFTED=1"} <= {word for r in results for word in r["constexprs"].split()}
    assert {"PROJ_GRAD=0", "TARGET_GRAD=0"} <= {word for r in results for word in r["constexprs"].split()}
    for r in results:
        assert r["registers"] > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0, r
        assert 0 <= r["shared_bytes"] <= r["shared_limit"] == 227 * 1024, r
        # the PTX of the loss path: no sqrt.approx / div.full / ex2.approx / ftz (the table's libdevice exp
        # tests its argument's range with abs.ftz.f32, never a value)
        assert set(r["approximate"]) <= ({"abs.ftz.f32"} if r["kernel"] == "table" else set()), r
    assert done.returncode == 0, done.stderr


# In a subprocess (see above): the two shifted-tiling kernels that spilled 16 bytes below sm_90 with sm_90's launch
# configuration (the bf16 backward with the target gradient on sm_80/86/89, the bf16/fp32 forward on sm_80), built
# as the dispatcher would launch them on those GPUs and compiled for them.
SHIFTED_BELOW_SM90 = """
import json, torch
import compile_triton as ct
picked = {86: ("backward", torch.bfloat16, torch.bfloat16), 80: ("forward", torch.bfloat16, torch.float32)}
results = []
for arch, (kernel, proj_dtype, target_dtype) in picked.items():
    case = ct.Case(proj_dtype, target_dtype, 1536, 3600, 61, (("neighbors", 57),))
    launch = next(launch for name, launch in ct.launches(case, arch)
                  if name == kernel and launch.kwargs["SHIFTED"] and not launch.kwargs.get("PROJ_GRAD"))
    source, target, options, _, named = ct.specialise(launch, arch)
    results.append(dict(arch=arch, kernel=kernel, named=named, shared_limit=ct.SHARED_LIMITS[arch],
                        **ct.compile_source(source, target, options)))
print(json.dumps(results))
"""


def test_shifted_tiling_compiles_without_spills_below_sm_90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tools"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SHIFTED_BELOW_SM90], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["arch"], r["kernel"]) for r in results] == [(86, "backward"), (80, "forward")]
    for r in results:
        assert r["registers"] > 0 and r["spill_stores"] == r["spill_loads"] == r["stack_bytes"] == 0, r
        assert r["named"]["SHIFTED"] and r["named"]["num_stages"] == 1 and r["named"]["num_warps"] == 2, r
        assert 0 <= r["shared_bytes"] <= r["shared_limit"], r
        assert not r["approximate"], r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape,dtype", [((1, 13, 1350, 768), torch.bfloat16), ((2, 21, 300, 1152), torch.float32),
                                         ((1, 49, 90, 1024), torch.bfloat16), ((1, 33, 3600, 1536), torch.bfloat16)],
                         ids=str)
def test_gpu_matches_reference_at_realistic_shapes(shape, dtype):
    proj, target = random_pair(shape, dtype, device="cuda")
    for options in (dict(neighbors=1), dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True)):
        assert_backend_matches_reference("triton", proj, target, **options)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape,options", [((1, 33, 64, 256), dict(neighbors=9, neighbor_mode="cumulative")),
                                           ((1, 61, 32, 128), dict(neighbors=57)),
                                           ((1, 61, 32, 128), dict(neighbors=25, neighbor_mode="cumulative",
                                                                   normalize_weights=True))], ids=str)
def test_gpu_large_offsets_take_windows_of_at_most_32_frames(shape, options):
    for dtypes in ((torch.bfloat16, None), (torch.float32, torch.bfloat16)):
        proj, target = random_pair(shape, *dtypes, device="cuda")
        assert_backend_matches_reference("triton", proj, target, **options)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compile_with_varying_shapes():
    """torch.compile(fullgraph=True) on CUDA over calls whose N, F and D change: the backend is chosen while
    tracing and every recompiled graph must still give the reference's loss and gradients."""
    from crepa_kernels import cross_frame_align_loss

    torch._dynamo.reset()

    def step(proj, target):
        return cross_frame_align_loss(proj, target, neighbors=2, neighbor_mode="cumulative", backend="triton")

    compiled = torch.compile(step, fullgraph=True)
    for index, shape in enumerate([(1, 13, 135, 768), (1, 13, 270, 768), (2, 13, 97, 768), (1, 21, 135, 768),
                                   (1, 49, 64, 1024)]):
        proj, target = random_pair(shape, torch.bfloat16, device="cuda", seed=index)
        proj = proj.detach().requires_grad_(True)
        loss = compiled(proj, target.detach())
        (grad,) = torch.autograd.grad(loss, proj)
        reference_proj = proj.detach().double().requires_grad_(True)
        expected = cross_frame_align_loss(reference_proj, target.detach().double(), neighbors=2,
                                          neighbor_mode="cumulative", backend="reference")
        (expected_grad,) = torch.autograd.grad(expected, reference_proj)
        assert_close_and_finite(loss, expected, f"compiled loss {shape}", dtype=torch.float32)
        assert_close_and_finite(grad, expected_grad, f"compiled grad {shape}")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40e9,
                    reason="needs a CUDA device with >= 40 GB")
def test_gpu_offsets_beyond_int32():
    """2.15e9 elements per input: the last token columns sit past 2^31 elements and must index correctly."""
    from crepa_kernels.function import per_frame_loss_on
    from crepa_kernels.reference import per_frame_loss as reference
    from crepa_kernels.spec import LossOptions

    shape = (1, 3, 700_000, 1024)
    assert shape[1] * shape[2] * shape[3] > 2**31
    generator = torch.Generator(device="cuda").manual_seed(0)
    proj = torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    target = (0.7 * proj.detach() + torch.randn(shape, generator=generator, device="cuda",
                                                 dtype=torch.bfloat16)).requires_grad_(True)
    options = LossOptions(neighbors=1)
    loss = per_frame_loss_on("triton", proj, target, options)
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
