"""Alignment diagnostics against naive implementations written here, known values, invariances, chunking,
determinism, bad input, and the plotting script on synthetic logs."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from crepa_kernels import LossOptions, cross_frame_align_loss
from crepa_kernels.diagnostics import cknna, cross_frame_similarity, temporal_smoothness

EXACT = dict(rtol=1e-10, atol=1e-12)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def related_pair(n, d1, d2, seed=0, noise=1.0):
    """b is a noisy linear map of a, so that CKNNA is far from both 0 and 1."""
    g = generator(seed)
    a = torch.randn(n, d1, generator=g, dtype=torch.float64)
    b = a @ torch.randn(d1, d2, generator=g, dtype=torch.float64) + noise * torch.randn(n, d2, generator=g,
                                                                                        dtype=torch.float64)
    return a, b


# ----------------------------------------------------------------------------------------------------------------
# naive implementations (dense, loops, no code shared with the package)


def naive_unbiased_hsic(x, y):
    """Song et al. 2012 Eq. 5 on dense [n, n] matrices, diagonals set to zero."""
    n = x.shape[0]
    x = x.clone().fill_diagonal_(0)
    y = y.clone().fill_diagonal_(0)
    ones = torch.ones(n, 1, dtype=x.dtype)
    value = (torch.trace(x @ y) + x.sum() * y.sum() / ((n - 1) * (n - 2))
             - 2 * (ones.T @ x @ y @ ones).squeeze() / (n - 2))
    return value / (n * (n - 3))


def naive_neighbour_mask(kernel, topk):
    n = kernel.shape[0]
    mask = torch.zeros(n, n, dtype=kernel.dtype)
    for i in range(n):
        candidates = sorted((j for j in range(n) if j != i), key=lambda j: -kernel[i, j].item())
        for j in candidates[:topk]:
            mask[i, j] = 1.0
    return mask


def naive_cknna(a, b, topk):
    k, l = a.double() @ a.double().T, b.double() @ b.double().T
    mask_k, mask_l = naive_neighbour_mask(k, topk), naive_neighbour_mask(l, topk)
    both = mask_k * mask_l
    kl = naive_unbiased_hsic(both * k, both * l)
    kk = naive_unbiased_hsic(mask_k * k, mask_k * k)
    ll = naive_unbiased_hsic(mask_l * l, mask_l * l)
    return kl.item() / math.sqrt(kk.item() * ll.item())


def u_centred(kernel):
    """Szekely-Rizzo U-centring, a different route to the unbiased HSIC: HSIC_u = sum(U(K) * U(L)) / (n (n-3))."""
    n = kernel.shape[0]
    kernel = kernel.clone().fill_diagonal_(0)
    rows = kernel.sum(1, keepdim=True)
    cols = kernel.sum(0, keepdim=True)
    centred = kernel - rows / (n - 2) - cols / (n - 2) + kernel.sum() / ((n - 1) * (n - 2))
    return centred.fill_diagonal_(0)


def unbiased_linear_cka(a, b):
    k, l = u_centred(a @ a.T), u_centred(b @ b.T)
    return (k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum())


def naive_similarity(proj, target, eps=1e-12):
    p, y = proj.double(), target.double()
    batch, frames, tokens, _ = p.shape
    result = torch.zeros(frames, frames, dtype=torch.float64)
    for f in range(frames):
        for k in range(frames):
            total = 0.0
            for b in range(batch):
                for n in range(tokens):
                    u, v = p[b, f, n], y[b, k, n]
                    total += (u @ v).item() / (max(u.norm().item(), eps) * max(v.norm().item(), eps))
            result[f, k] = total / (batch * tokens)
    return result


def naive_smoothness(states):
    s = states.double()
    batch, frames = s.shape[:2]
    total = 0.0
    for b in range(batch):
        for f in range(frames - 1):
            u, v = s[b, f].mean(0), s[b, f + 1].mean(0)
            total += (u @ v).item() / (max(u.norm().item(), 1e-12) * max(v.norm().item(), 1e-12))
    return total / (batch * (frames - 1))


# ----------------------------------------------------------------------------------------------------------------
# CKNNA


@pytest.mark.parametrize("n,d1,d2,topk", [(37, 5, 9, 2), (50, 16, 16, 7), (23, 3, 1, 22), (41, 8, 4, 10)])
def test_cknna_matches_naive(n, d1, d2, topk):
    a, b = related_pair(n, d1, d2, seed=n)
    expected = naive_cknna(a, b, topk)
    actual = cknna(a, b, topk=topk)
    assert actual.dtype == torch.float64 and actual.dim() == 0
    assert 0.05 < abs(expected) < 0.999, f"uninformative case: {expected}"
    torch.testing.assert_close(actual.item(), expected, **EXACT)


def test_cknna_fp32_and_mixed_inputs_match_naive():
    a, b = related_pair(45, 6, 11, seed=3)
    a32, b16 = a.float(), b.bfloat16()
    expected = naive_cknna(a32.double(), b16.double(), 5)
    torch.testing.assert_close(cknna(a32, b16, topk=5).item(), expected, **EXACT)


def test_cknna_with_all_neighbours_is_unbiased_linear_cka():
    a, b = related_pair(31, 7, 5, seed=4)
    torch.testing.assert_close(cknna(a, b, topk=30).item(), unbiased_linear_cka(a, b).item(), **EXACT)


def test_cknna_known_values():
    g = generator(5)
    a = torch.randn(300, 24, generator=g, dtype=torch.float64)
    orthogonal, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    isometry, _ = torch.linalg.qr(torch.randn(40, 24, generator=g, dtype=torch.float64))  # [40, 24], orthonormal cols
    assert cknna(a, a).item() == pytest.approx(1.0, abs=1e-12)
    assert cknna(a, a @ orthogonal).item() == pytest.approx(1.0, abs=1e-10)
    assert cknna(a, a @ isometry.T).item() == pytest.approx(1.0, abs=1e-10)  # wider: 24 -> 40 features
    independent = [cknna(a, torch.randn(300, 24, generator=g, dtype=torch.float64)).item() for _ in range(3)]
    assert all(abs(value) < 0.1 for value in independent), independent
    # and a related pair is clearly in between, so the tests above can fail
    assert 0.2 < cknna(*related_pair(300, 24, 24, seed=6)).item() < 0.9


def test_cknna_invariances():
    a, b = related_pair(60, 9, 13, seed=7)
    value = cknna(a, b, topk=6)
    torch.testing.assert_close(cknna(3.7 * a, 0.01 * b, topk=6), value, **EXACT)
    perm = torch.randperm(60, generator=generator(8))
    torch.testing.assert_close(cknna(a[perm], b[perm], topk=6), value, **EXACT)
    # not symmetric: the neighbour mask is not, so the HSIC cross term depends on the order (as published)
    torch.testing.assert_close(cknna(b, a, topk=6).item(), naive_cknna(b, a, 6), **EXACT)
    assert abs(cknna(b, a, topk=6).item() - value.item()) > 1e-3


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 59, 61, 1000])
def test_cknna_chunked_equals_unchunked(chunk_size):
    a, b = related_pair(61, 10, 6, seed=9)
    whole = cknna(a, b, topk=5, chunk_size=61)
    torch.testing.assert_close(cknna(a, b, topk=5, chunk_size=chunk_size), whole, **EXACT)
    torch.testing.assert_close(cknna(a, b, topk=5), whole, **EXACT)


def test_cknna_is_deterministic_and_accepts_non_contiguous_inputs():
    a, b = related_pair(80, 12, 30, seed=10)
    first = cknna(a, b, topk=8, chunk_size=9)
    assert torch.equal(first, cknna(a, b, topk=8, chunk_size=9))
    wide = torch.stack([b, b], dim=2).flatten(1)[:, ::2]  # a strided view with the values of b
    assert not wide.is_contiguous()
    torch.testing.assert_close(cknna(a.T.contiguous().T, wide, topk=8), first, **EXACT)


def test_cknna_ignores_autograd_state():
    a, b = related_pair(30, 4, 4, seed=11)
    value = cknna(a.requires_grad_(), b, topk=4)
    assert not value.requires_grad


@pytest.mark.parametrize(
    "args,kwargs,error,name",
    [
        ((torch.randn(10, 3).numpy(), torch.randn(10, 3)), {}, TypeError, "a:"),
        ((torch.randn(10, 3), torch.ones(10, 3, dtype=torch.int64)), {}, TypeError, "b:"),
        ((torch.randn(10), torch.randn(10, 3)), {}, ValueError, "a:"),
        ((torch.randn(10, 3), torch.randn(2, 10, 3)), {}, ValueError, "b:"),
        ((torch.randn(10, 0), torch.randn(10, 3)), {}, ValueError, "a:"),
        ((torch.randn(10, 3), torch.randn(11, 3)), {}, ValueError, "a and b"),
        ((torch.randn(3, 3), torch.randn(3, 3)), dict(topk=2), ValueError, "n >= 4"),
        ((torch.randn(10, 3), torch.randn(10, 3)), dict(topk=10), ValueError, "topk"),
        ((torch.randn(10, 3), torch.randn(10, 3)), dict(topk=1), ValueError, "topk"),
        ((torch.randn(10, 3), torch.randn(10, 3)), dict(topk=0), ValueError, "topk"),
        ((torch.randn(10, 3), torch.randn(10, 3)), dict(topk=3.0), TypeError, "topk"),
        ((torch.randn(10, 3), torch.randn(10, 3)), dict(topk=True), TypeError, "topk"),
        ((torch.randn(10, 3), torch.randn(10, 3)), dict(topk=3, chunk_size=0), ValueError, "chunk_size"),
        ((torch.randn(10, 3), torch.randn(10, 3)), dict(topk=3, chunk_size=2.5), TypeError, "chunk_size"),
    ],
)
def test_cknna_rejects_bad_input(args, kwargs, error, name):
    with pytest.raises(error, match=name):
        cknna(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# cross-frame similarity


def frames_pair(shape, seed, dtype=torch.float64):
    g = generator(seed)
    proj = torch.randn(shape, generator=g, dtype=torch.float64)
    # correlated, and drifting along the frame axis so that S has structure
    drift = torch.linspace(0, 1, shape[1], dtype=torch.float64).view(1, -1, 1, 1)
    target = 0.8 * proj + drift * torch.randn(shape, generator=g, dtype=torch.float64) + 0.3
    return proj.to(dtype), target.to(dtype)


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 1, 4, 5), (3, 4, 1, 1), (1, 3, 2, 33)])
def test_similarity_matches_naive(shape):
    proj, target = frames_pair(shape, seed=sum(shape))
    actual = cross_frame_similarity(proj, target)
    assert actual.shape == (shape[1], shape[1]) and actual.dtype == torch.float64
    torch.testing.assert_close(actual, naive_similarity(proj, target), **EXACT)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 5, 100])
def test_similarity_token_chunks_and_layouts(chunk_size):
    proj, target = frames_pair((2, 4, 5, 6), seed=12)
    expected = naive_similarity(proj, target)
    flat_proj, flat_target = proj.flatten(1, 2), target.flatten(1, 2)
    actual = cross_frame_similarity(flat_proj, flat_target, num_frames=4, chunk_size=chunk_size)
    torch.testing.assert_close(actual, expected, **EXACT)
    # non-contiguous views: a feature-strided slice and a transposed copy
    strided = torch.stack([proj, proj], dim=-1).flatten(-2)[..., ::2]
    assert not strided.is_contiguous()
    transposed = target.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(cross_frame_similarity(strided, transposed, chunk_size=chunk_size), expected, **EXACT)


def test_similarity_reduced_precision_inputs():
    proj, target = frames_pair((2, 3, 4, 9), seed=13)
    proj16, target32 = proj.bfloat16(), target.float()
    expected = naive_similarity(proj16.double(), target32.double())
    torch.testing.assert_close(cross_frame_similarity(proj16, target32), expected, **EXACT)


OPTIONS = [
    dict(neighbors=0),
    dict(neighbors=1, tau=0.7),
    dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True, tau=1.3),
    dict(neighbors=9, neighbor_mode="adjacent"),
    dict(neighbors=1, eps=0.5),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_similarity_band_is_the_loss(options):
    """-loss(reduction="none").mean over batch == the band of S weighted by the loss's frame coefficients."""
    proj, target = frames_pair((3, 6, 5, 7), seed=14)
    # short tokens exercise the eps clamp: |proj[0, 2, 1]| < 1e-12, and |target[1, 4, 0]| < 0.5
    proj[0, 2, 1] *= 1e-13
    target[1, 4, 0] *= 0.5 / target[1, 4, 0].norm() * 0.3
    similarity = cross_frame_similarity(proj, target, eps=options.get("eps", 1e-12))
    loss = cross_frame_align_loss(proj, target, reduction="none", backend="reference", **options)
    coefficients = torch.tensor(LossOptions(**options).frame_coefficients(6), dtype=torch.float64)
    torch.testing.assert_close(-loss.mean(0), (coefficients * similarity).sum(1), **EXACT)
    if options["neighbors"] == 0:
        torch.testing.assert_close(-loss.mean(0), similarity.diagonal(), **EXACT)


def test_similarity_is_deterministic_and_detached():
    proj, target = frames_pair((2, 5, 9, 4), seed=15, dtype=torch.float32)
    first = cross_frame_similarity(proj.requires_grad_(), target, chunk_size=4)
    assert torch.equal(first, cross_frame_similarity(proj, target, chunk_size=4))
    assert not first.requires_grad
    assert proj.grad is None


def test_similarity_does_not_modify_fp64_contiguous_inputs():
    proj, target = frames_pair((1, 3, 4, 5), seed=16)
    proj_before, target_before = proj.clone(), target.clone()
    cross_frame_similarity(proj, target)
    assert torch.equal(proj, proj_before) and torch.equal(target, target_before)


@pytest.mark.parametrize(
    "proj,target,kwargs,error,name",
    [
        (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 6), {}, ValueError, "proj and target"),
        (torch.randn(2, 12, 5), torch.randn(2, 12, 5), {}, ValueError, "num_frames"),
        (torch.randn(2, 12, 5), torch.randn(2, 12, 5), dict(num_frames=5), ValueError, "num_frames"),
        (torch.randn(12, 5), torch.randn(12, 5), {}, ValueError, "proj"),
        (torch.randn(2, 3, 4, 5), torch.ones(2, 3, 4, 5, dtype=torch.int32), {}, TypeError, "target"),
        (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), dict(eps=0.0), ValueError, "eps"),
        (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), dict(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_similarity_rejects_bad_input(proj, target, kwargs, error, name):
    with pytest.raises(error, match=name):
        cross_frame_similarity(proj, target, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    a, b = related_pair(70, 9, 5, seed=19)
    torch.testing.assert_close(cknna(a.cuda().float(), b.cuda(), topk=6, chunk_size=8).cpu(),
                               cknna(a.float(), b, topk=6), **EXACT)
    proj, target = frames_pair((2, 4, 6, 5), seed=20, dtype=torch.float32)
    torch.testing.assert_close(cross_frame_similarity(proj.cuda(), target.cuda(), chunk_size=4).cpu(),
                               cross_frame_similarity(proj, target), **EXACT)
    torch.testing.assert_close(temporal_smoothness(proj.cuda()).cpu(), temporal_smoothness(proj), **EXACT)


# ----------------------------------------------------------------------------------------------------------------
# temporal smoothness


@pytest.mark.parametrize("shape", [(2, 5, 3, 7), (1, 2, 1, 1), (3, 4, 6, 2)])
def test_smoothness_matches_naive(shape):
    states, _ = frames_pair(shape, seed=17 + shape[1])
    states = states + torch.linspace(0, 2, shape[1], dtype=torch.float64).view(1, -1, 1, 1)
    actual = temporal_smoothness(states)
    assert actual.dim() == 0 and actual.dtype == torch.float64
    torch.testing.assert_close(actual.item(), naive_smoothness(states), **EXACT)
    flat = temporal_smoothness(states.flatten(1, 2).float(), num_frames=shape[1])
    torch.testing.assert_close(flat.item(), naive_smoothness(states.float()), **EXACT)


def test_smoothness_known_values_and_invariance():
    g = generator(18)
    frame = torch.randn(2, 1, 5, 8, generator=g, dtype=torch.float64)
    static = frame.expand(2, 6, 5, 8)
    assert temporal_smoothness(static).item() == pytest.approx(1.0, abs=1e-12)
    signs = torch.tensor([1.0, -1.0] * 3, dtype=torch.float64).view(1, 6, 1, 1)
    assert temporal_smoothness(static * signs).item() == pytest.approx(-1.0, abs=1e-12)
    moving = torch.randn(2, 6, 5, 8, generator=g, dtype=torch.float64)
    scales = torch.rand(2, 6, 1, 1, generator=g, dtype=torch.float64) + 0.1
    torch.testing.assert_close(temporal_smoothness(moving * scales), temporal_smoothness(moving), **EXACT)


@pytest.mark.parametrize(
    "states,kwargs,error,name",
    [
        (torch.randn(2, 1, 3, 4), {}, ValueError, "2 frames"),
        (torch.randn(2, 6, 4), {}, ValueError, "num_frames"),
        (torch.randn(2, 6, 4), dict(num_frames=0), ValueError, "num_frames"),
        (torch.randn(2, 6, 4), dict(num_frames=2.0), TypeError, "num_frames"),
        (torch.ones(2, 3, 4, 5, dtype=torch.int64), {}, TypeError, "states"),
        ([[1.0]], {}, TypeError, "states"),
    ],
)
def test_smoothness_rejects_bad_input(states, kwargs, error, name):
    with pytest.raises(error, match=name):
        temporal_smoothness(states, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# plotting script


def load_plot_script():
    path = Path(__file__).resolve().parent.parent / "examples" / "plot_alignment.py"
    spec = importlib.util.spec_from_file_location("plot_alignment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_synthetic_log(path, neighbors, frames=5, steps=(0, 10, 20, 30), seed=0):
    """Records in the trainer's JSON-lines format, with made-up values (rendering test only)."""
    g = generator(seed)
    with open(path, "w") as log:
        for step in steps:
            similarity = torch.rand(frames, frames, generator=g) * 0.5 + 0.5 * torch.eye(frames)
            record = dict(step=step, neighbors=neighbors, cknna=0.1 + step / 100, cross_frame_similarity=similarity.tolist(),
                          smoothness_proj=0.5 + step / 100, smoothness_target=0.9, align_loss=-0.5)
            log.write(json.dumps(record) + "\n")


def test_plot_renders_png_from_logs(tmp_path):
    pytest.importorskip("matplotlib")
    plot = load_plot_script()
    repa, crepa = tmp_path / "repa.jsonl", tmp_path / "crepa.jsonl"
    write_synthetic_log(repa, neighbors=0, seed=1)
    write_synthetic_log(crepa, neighbors=1, seed=2, steps=(30, 0, 20, 10))  # unsorted steps are fine
    out = tmp_path / "figures" / "alignment.png"
    plot.main(["--logs", str(repa), str(crepa), "--out", str(out), "--note", "synthetic logs"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    records = plot.load_log(crepa)
    assert [r["step"] for r in records] == [0, 10, 20, 30]
    assert plot.run_label(records) == "CREPA (neighbors=1)"


def test_plot_rejects_incomplete_logs(tmp_path):
    plot = load_plot_script()
    log = tmp_path / "bad.jsonl"
    log.write_text(json.dumps(dict(step=0, neighbors=0)) + "\n")
    with pytest.raises(ValueError, match="lacks"):
        plot.load_log(log)
