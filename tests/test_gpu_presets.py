"""The GPU backends against the reference at the benchmark's realistic presets: every preset at the DINOv2 width
paired with it, every dtype, adjacent and cumulative neighbours (including a reach past 8 frames), the target
gradient on. Skipped without a GPU; `make gpu-check` runs them.

The float64 reference runs on the GPU a chunk of tokens at a time (tokens are independent and the loss is a mean
over them), so the largest preset (hunyuanvideo at D=1536, 1.46 GB per float64 input) never needs the reference's
float64 temporaries for the whole problem at once."""
import sys
from pathlib import Path

import pytest
import torch

from crepa_kernels import available_backends, cross_frame_align_loss
from harness import assert_close_and_finite, loss_and_grads, random_pair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cases import PRESETS  # noqa: E402

PRESET_DIMS = {"cogvideox-5b": 768, "wan2.1": 1024, "hunyuanvideo": 1536}
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.float64, torch.float64), (torch.float32, torch.bfloat16)]  # last: fp32 projector, bf16 features
OPTIONS = [dict(neighbors=1), dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True,
                                   reduction="frame_sum"),
           dict(neighbors=9, neighbor_mode="cumulative", tau=0.3, reduction="none")]
CHUNK_TOKENS = 256



def reference_in_chunks(proj, target, grad_output, reduction="mean", chunk_tokens=CHUNK_TOKENS, **options):
    """The reference's loss and gradients in float64 on the inputs' device, ``chunk_tokens`` tokens at a time."""
    batch, frames, tokens, _ = proj.shape
    per_frame = torch.zeros(batch, frames, dtype=torch.float64, device=proj.device)
    grads = [torch.empty(x.shape, dtype=torch.float64, device=x.device) for x in (proj, target)]
    # d loss / d per_frame_loss[b, f] for each reduction
    upstream = {"none": grad_output, "mean": grad_output.expand(batch, frames) / (batch * frames),
                "frame_sum": grad_output.expand(batch, frames) / batch}[reduction].double()
    for start in range(0, tokens, chunk_tokens):
        chunk = slice(start, min(tokens, start + chunk_tokens))
        p = proj.detach()[:, :, chunk].double().requires_grad_(True)
        y = target.detach()[:, :, chunk].double().requires_grad_(True)
        share = (chunk.stop - chunk.start) / tokens  # the chunk's weight in the token mean
        part = cross_frame_align_loss(p, y, backend="reference", reduction="none", **options) * share
        per_frame += part.detach()
        grad_p, grad_y = torch.autograd.grad(part, (p, y), upstream)
        grads[0][:, :, chunk] = grad_p
        grads[1][:, :, chunk] = grad_y
    loss = {"none": per_frame, "mean": per_frame.mean(), "frame_sum": per_frame.sum(dim=1).mean()}[reduction]
    return loss, grads


@pytest.mark.parametrize("reduction", ["mean", "frame_sum", "none"])
def test_reference_in_chunks_is_the_reference(reduction):
    """The chunked float64 reference the GPU tests compare with (runs on the CPU: it must not wait for a GPU to be
    checked): equal to the reference on the whole input, with a last chunk shorter than the others."""
    proj, target = random_pair((2, 5, 37, 9), seed=32)
    options = dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True, tau=0.5)
    loss, grads, grad_output = loss_and_grads(proj.double(), target.double(), "reference", reduction=reduction,
                                              **options)
    chunked, chunked_grads = reference_in_chunks(proj, target, grad_output, reduction=reduction, chunk_tokens=8,
                                                 **options)
    torch.testing.assert_close(chunked, loss, rtol=1e-12, atol=1e-14)
    for grad, expected in zip(chunked_grads, grads):
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{o.get('neighbor_mode', 'adjacent')}-d{o['neighbors']}")
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
@pytest.mark.parametrize("preset", list(PRESET_DIMS))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backend_matches_reference_at_preset(backend, preset, dtypes, options):
    usable = available_backends("cuda")[backend]
    if usable is not True:
        pytest.skip(f"{backend} unavailable on this GPU: {usable}")
    shape = (1, PRESETS[preset].frames, PRESETS[preset].tokens, PRESET_DIMS[preset])
    proj, target = random_pair(shape, *dtypes, seed=31, device="cuda")
    loss, grads, grad_output = loss_and_grads(proj, target, backend, **options)
    expected, expected_grads = reference_in_chunks(proj, target, grad_output, **options)

    assert loss.dtype == (torch.float64 if torch.float64 in dtypes else torch.float32)
    assert_close_and_finite(loss, expected, f"{backend} {preset} loss {options}")
    for name, grad, expected_grad, source in zip(("proj", "target"), grads, expected_grads, (proj, target)):
        assert grad.dtype == source.dtype and grad.shape == source.shape
        assert_close_and_finite(grad, expected_grad, f"{backend} {preset} grad {name} {options}")
