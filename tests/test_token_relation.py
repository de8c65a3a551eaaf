"""token_relation_loss (VideoREPA's token relation distillation): every backend against a float64 oracle that
builds the full [B, T, T] relation matrices, VideoREPA's three formulas restated, gradients, kinks, errors."""
from __future__ import annotations

import pytest
import torch

from crepa_kernels import TokenRelationFunction, TokenRelationLoss, token_relation_loss
from crepa_kernels.relation_function import relation_backend_reason
from harness import random_grad_output, random_pair

FUSED = [name for name in ("cpu", "triton") if relation_backend_reason(name, torch.device("cpu")) is None]
BACKENDS = ["reference", *FUSED]
# T = F N crosses the cpu kernel's 128-row and 512-key blocks and the Triton tiles; F=1, N=1, D=1 edges
SHAPES = [(2, 3, 5, 7), (1, 1, 4, 3), (2, 4, 1, 5), (1, 3, 4, 1), (1, 3, 200, 9)]
MARGINS = [0.0, 0.35, 2.5]  # 2.5 is above every |delta| (cosines lie in [-1, 1])


def oracle(proj, target, pairs="all", margin=0.0, anchors=None, reduction="mean", eps=1e-12):
    """The loss from the full relation matrices in float64 (what the fused backends must not build)."""
    p, y = (x.double() for x in (proj, target))
    batch, frames, tokens_per_frame, dim = p.shape
    p_hat = (p / p.norm(dim=-1, keepdim=True).clamp_min(eps)).reshape(batch, -1, dim)
    y_hat = (y / y.norm(dim=-1, keepdim=True).clamp_min(eps)).reshape(batch, -1, dim)
    tokens = p_hat.shape[1]
    terms = torch.relu((p_hat @ p_hat.mT - y_hat @ y_hat.mT).abs() - margin)  # [B, T, T]
    frame = torch.arange(tokens) // tokens_per_frame
    counted = torch.ones(tokens, tokens)
    if pairs == "spatial":
        counted = (frame[:, None] == frame[None, :]).double()
    elif pairs == "temporal":
        counted = (frame[:, None] != frame[None, :]).double()
    multiplicity = torch.ones(tokens) if anchors is None else torch.bincount(anchors, minlength=tokens).double()
    counted = counted * multiplicity
    per_frame = (terms * counted).sum(dim=-1).view(batch, frames, tokens_per_frame).sum(dim=-1)
    if reduction == "none":
        return per_frame
    return per_frame.sum() / (batch * counted.sum())


def _compare(backend, shape, pairs, margin, anchors, reduction, proj_dtype=torch.float64, target_dtype=None,
             tolerance=(1e-10, 1e-12)):
    proj, target = random_pair(shape, proj_dtype, target_dtype, seed=sum(shape))
    loss = token_relation_loss(proj, target, pairs=pairs, margin=margin, anchors=anchors, reduction=reduction,
                               backend=backend)
    proj64, target64 = (x.detach().double().requires_grad_(True) for x in (proj, target))
    expected = oracle(proj64, target64, pairs, margin, anchors, reduction)
    rtol, atol = tolerance
    assert not torch.isnan(loss).any()
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=atol)
    grad_output = random_grad_output(expected)
    grads = torch.autograd.grad(loss, (proj, target), grad_output.to(loss.dtype))
    expected_grads = torch.autograd.grad(expected, (proj64, target64), grad_output)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == proj.dtype or got.dtype == target.dtype
        # atol relative to the largest gradient; a floor for gradients that vanish analytically (D=1, N=1 spatial)
        scale = max(want.abs().max().item(), 0.1)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pairs", ["all", "spatial", "temporal"])
def test_matches_the_float64_oracle(backend, shape, pairs):
    if pairs == "temporal" and shape[1] == 1:
        pytest.skip("no temporal pair with one frame (tested as an error)")
    if backend == "triton" and shape[2] * shape[1] > 100:
        shape = shape[:2] + (30,) + shape[3:]  # the interpreter is slow; 90 tokens still cross its row blocks
    for margin in MARGINS:
        for reduction in ("mean", "none"):
            _compare(backend, shape, pairs, margin, None, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs", ["all", "spatial", "temporal"])
def test_anchors_restrict_the_keys(backend, pairs):
    shape = (2, 3, 5, 6)
    anchors = torch.tensor([14, 0, 7, 7, 3])  # unsorted, one repeated: it counts twice
    for margin, reduction in ((0.0, "mean"), (0.2, "none")):
        _compare(backend, shape, pairs, margin, anchors, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.bfloat16)])
def test_low_precision_and_mixed_dtypes(backend, dtypes):
    # the oracle sees the same (rounded) input values; the loss accumulates in fp32
    tolerance = (1e-5, 1e-5) if dtypes == (torch.float32, torch.float32) else (1e-2, 1e-2)
    _compare(backend, (2, 3, 7, 10), "all", 0.1, None, "mean", *dtypes, tolerance=tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    proj, target = random_pair((1, 2, 3, 4), torch.float64, seed=5)
    for pairs, margin in (("all", 0.05), ("temporal", 0.0), ("spatial", 0.1)):
        def loss(p, y):
            return token_relation_loss(p, y, pairs=pairs, margin=margin, reduction="none", backend=backend)
        assert torch.autograd.gradcheck(loss, (proj, target))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_is_not_hidden(backend):
    proj, target = random_pair((1, 2, 3, 4), torch.float32, seed=2)
    with torch.no_grad():
        target[0, 1, 2, 0] = float("nan")
    loss = token_relation_loss(proj, target, margin=0.1, backend=backend)
    assert torch.isnan(loss)
    _, target_grad = torch.autograd.grad(loss, (proj, target))
    assert torch.isnan(target_grad).any()  # the NaN token's own gradient (proj's follows torch's sign(NaN) = 0 in
    # the reference, NaN in the fused kernels: either shows the NaN in the loss)
    # a NaN in frame 1 reaches frame 0's spatial loss through no pair
    per_frame = token_relation_loss(proj, target, pairs="spatial", reduction="none", backend=backend)
    assert not torch.isnan(per_frame[0, 0]) and torch.isnan(per_frame[0, 1])


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic(backend):
    proj, target = random_pair((1, 2, 70, 12), torch.float32, seed=9)
    runs = []
    for _ in range(2):
        loss = token_relation_loss(proj, target, margin=0.05, backend=backend)
        runs.append((loss, *torch.autograd.grad(loss, (proj, target))))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_cpu_result_does_not_depend_on_the_thread_count():
    if "cpu" not in FUSED:
        pytest.skip("the cpu backend is unavailable here")
    proj, target = random_pair((2, 3, 90, 12), torch.float32, seed=13)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            loss = token_relation_loss(proj, target, pairs="temporal", margin=0.02, reduction="none", backend="cpu")
            runs.append((loss, *torch.autograd.grad(loss, (proj, target), torch.ones_like(loss))))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kink_at_the_margin_gives_no_gradient(backend):
    # y^ tokens are +-e1 or e2, p^ all e1: every delta is exactly 0, 1 or 2 and |delta| = margin = 1 on some pairs
    basis = torch.eye(3, dtype=torch.float64)
    target = torch.stack([basis[0], -basis[0], basis[1], basis[0]]).view(1, 2, 2, 3).requires_grad_(True)
    proj = basis[0].expand(1, 2, 2, 3).clone().requires_grad_(True)
    for margin in (1.0, 2.0):
        loss = token_relation_loss(proj, target, margin=margin, backend=backend)
        expected = oracle(proj, target, margin=margin)
        torch.testing.assert_close(loss, expected)
        grad_ref = torch.autograd.grad(
            torch.relu((_rel(proj) - _rel(target)).abs() - margin).mean(), (proj, target))
        grads = torch.autograd.grad(loss, (proj, target))
        for got, want in zip(grads, grad_ref):
            torch.testing.assert_close(got, want)
    identical = token_relation_loss(proj, proj.detach().clone(), backend=backend)
    assert identical.item() == 0.0
    assert not torch.autograd.grad(identical, proj)[0].any()


def _rel(x):
    """VideoREPA's relation matrix of [B, F, N, D] features: normalise, flatten the tokens, Gram matrix."""
    x = torch.nn.functional.normalize(x, dim=-1).flatten(1, 2)
    return x @ x.mT


def test_porting_videorepa_formulas():
    """VideoREPA's token_relation_distillation{,_only_spatial,_only_temporal} (lora_trainer.py), restated with
    their tensor operations, give the same loss and gradients as pairs="all" / "spatial" / "temporal"."""
    batch, frames, tokens, dim, margin = 2, 4, 6, 8, 0.1
    proj, target = random_pair((batch, frames, tokens, dim), torch.float64, seed=11)

    def all_pairs(p, y):  # relu(|A A^T - Y Y^T| - margin).mean() over [B, FN, FN]
        return torch.relu((_rel(p) - _rel(y)).abs() - margin).mean()

    def only_spatial(p, y):  # per-frame [B F, N, N] Gram matrices
        def rel(x):
            x = torch.nn.functional.normalize(x, dim=-1).flatten(0, 1)
            return x @ x.mT
        return torch.relu((rel(p) - rel(y)).abs() - margin).mean()

    def only_temporal(p, y):  # full matrix, same-frame blocks zeroed, mean rescaled to the other-frame pairs
        terms = torch.relu((_rel(p) - _rel(y)).abs() - margin).clone()
        terms = terms.reshape(batch, frames, tokens, frames, tokens)
        for f in range(frames):
            terms[:, f, :, f, :] = 0.0
        return terms.mean() * (frames * tokens) ** 2 / (frames * (frames - 1) * tokens ** 2)

    for pairs, formula in (("all", all_pairs), ("spatial", only_spatial), ("temporal", only_temporal)):
        expected = formula(proj, target)
        for backend in BACKENDS:
            loss = token_relation_loss(proj, target, pairs=pairs, margin=margin, backend=backend)
            torch.testing.assert_close(loss, expected)
            for got, want in zip(torch.autograd.grad(loss, (proj, target)),
                                 torch.autograd.grad(expected, (proj, target), retain_graph=True)):
                torch.testing.assert_close(got, want)


def test_three_forms_agree():
    proj, target = random_pair((2, 3, 4, 5), torch.float64, seed=3)
    anchors = torch.tensor([1, 5, 9])
    grad_output = torch.tensor([[0.3, -1.2, 2.0], [0.7, 0.1, -0.4]], dtype=torch.float64)
    for backend in BACKENDS:
        results = []
        for form in ("function", "apply", "module"):
            if form == "function":
                loss = token_relation_loss(proj, target, pairs="temporal", margin=0.1, anchors=anchors,
                                           reduction="none", backend=backend)
            elif form == "apply":
                loss = TokenRelationFunction.apply(proj, target, "temporal", 0.1, anchors, None, "none", 1e-12,
                                                   backend)
            else:
                module = TokenRelationLoss(pairs="temporal", margin=0.1, reduction="none", backend=backend)
                loss = module(proj, target, anchors=anchors)
            results.append((loss, *torch.autograd.grad(loss, (proj, target), grad_output)))
        for other in results[1:]:
            for got, want in zip(other, results[0]):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
        # the mean: kept one-pass gradients (function) and the backward pass (apply)
        mean = token_relation_loss(proj, target, margin=0.1, backend=backend)
        applied = TokenRelationFunction.apply(proj, target, "all", 0.1, None, None, "mean", 1e-12, backend)
        torch.testing.assert_close(mean, applied, rtol=0, atol=1e-15)
        for got, want in zip(torch.autograd.grad(mean * 1.7, (proj, target)),
                             torch.autograd.grad(applied * 1.7, (proj, target))):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-16)


def test_only_the_requested_gradient():
    proj, target = random_pair((1, 2, 3, 4), torch.float64, target_requires_grad=False)
    for backend in BACKENDS:
        loss = token_relation_loss(proj, target, backend=backend)
        loss.backward()
        assert target.grad is None and proj.grad is not None
        proj.grad = None


def test_double_backward_raises():
    proj, target = random_pair((1, 2, 3, 4), torch.float64)
    (grad,) = torch.autograd.grad(token_relation_loss(proj, target, backend="reference"), proj, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD_CALLS = [
    (dict(pairs="frames"), ValueError, ["pairs", "'frames'", "spatial"]),
    (dict(pairs=None), ValueError, ["pairs", "None"]),
    (dict(margin=-0.1), ValueError, ["margin", "-0.1"]),
    (dict(margin=float("nan")), ValueError, ["margin", "nan"]),
    (dict(margin="0.1"), TypeError, ["margin", "str"]),
    (dict(reduction="sum"), ValueError, ["reduction", "'sum'", "none"]),
    (dict(eps=0.0), ValueError, ["eps", "0.0"]),
    (dict(anchors=[1, 2]), TypeError, ["anchors", "list"]),
    (dict(anchors=torch.tensor([0.5])), TypeError, ["anchors", "float32"]),
    (dict(anchors=torch.tensor([[1]])), ValueError, ["anchors", "(1, 1)"]),
    (dict(anchors=torch.tensor([], dtype=torch.int64)), ValueError, ["anchors", "(0,)"]),
    (dict(anchors=torch.tensor([0, 12])), ValueError, ["anchors", "[0, 12)", "12"]),
    (dict(anchors=torch.tensor([-1])), ValueError, ["anchors", "-1"]),
    (dict(backend="gpu"), ValueError, ["backend", "'gpu'"]),
    (dict(backend="cuda"), RuntimeError, ["backend='cuda'", "tensor cores", "triton"]),
]


@pytest.mark.parametrize("kwargs, error, words", BAD_CALLS)
def test_bad_arguments_name_the_argument(kwargs, error, words):
    with pytest.raises(error) as info:
        token_relation_loss(_t(2, 3, 4, 5), _t(2, 3, 4, 5), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_inputs_and_empty_means():
    with pytest.raises(ValueError, match=r"proj and target.*\(2, 3, 4, 5\).*\(2, 3, 4, 6\)"):
        token_relation_loss(_t(2, 3, 4, 5), _t(2, 3, 4, 6))
    with pytest.raises(ValueError, match="num_frames"):
        token_relation_loss(_t(2, 12, 5), _t(2, 12, 5))
    with pytest.raises(TypeError, match="target: expected a floating-point dtype"):
        token_relation_loss(_t(2, 3, 4, 5), torch.ones(2, 3, 4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="temporal.*2 frames"):
        token_relation_loss(_t(2, 1, 4, 5), _t(2, 1, 4, 5), pairs="temporal")
    # per-frame sums of no pair are zeros, not an error
    assert not token_relation_loss(_t(2, 1, 4, 5), _t(2, 1, 4, 5), pairs="temporal", reduction="none").any()
    flat = token_relation_loss(_t(2, 12, 5), _t(2, 12, 5), num_frames=3)
    assert flat.shape == ()
    for bad in (dict(pairs="x"), dict(margin=-1.0), dict(backend="gpu")):
        with pytest.raises(ValueError):
            TokenRelationLoss(**bad)


def test_rotation_invariance_distinguishes_it_from_crepa():
    from crepa_kernels import cross_frame_align_loss

    proj, target = random_pair((1, 3, 4, 6), torch.float64, seed=4)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rotated = proj @ rotation
    torch.testing.assert_close(token_relation_loss(rotated, target), token_relation_loss(proj, target))
    assert not torch.allclose(cross_frame_align_loss(rotated, target), cross_frame_align_loss(proj, target))


def test_past_two_to_the_31_pair_terms():
    """B (F N)^2 = 2,147,580,964 > 2^31 pair terms through the fused cpu backend, against a closed form: p^ is the
    same e1 for every token, y^ is e2 for the tokens t with t % 3 == 0 and e1 otherwise, so delta = 1 between the
    two classes and 0 within one."""
    if "cpu" not in FUSED:
        pytest.skip("the cpu backend is unavailable here")
    frames, tokens_per_frame, margin = 2, 23171, 0.25
    tokens = frames * tokens_per_frame
    assert tokens ** 2 > 2 ** 31
    second = torch.arange(tokens) % 3 == 0
    proj = torch.zeros(1, tokens, 3)
    proj[..., 0] = 2.0
    target = torch.zeros(1, tokens, 3)
    target[0, second, 1] = 0.5
    target[0, ~second, 0] = 3.0
    proj.requires_grad_(True)
    target.requires_grad_(True)
    loss = token_relation_loss(proj, target, margin=margin, num_frames=frames, backend="cpu")
    n_second = int(second.sum())
    n_first = tokens - n_second
    pairs = tokens ** 2
    expected = (1 - margin) * 2 * n_first * n_second / pairs
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    grad_proj, grad_target = torch.autograd.grad(loss, (proj, target))
    assert not grad_proj.any()  # every p^_j is p^_i: the gradient is radial and the normalisation removes it
    # dL/dy_k = -(2 / M) (tokens of the other class) e_other / |y_k|
    expected_target = torch.zeros(tokens, 3, dtype=torch.float64)
    expected_target[second, 0] = -2 * n_first / pairs / 0.5
    expected_target[~second, 1] = -2 * n_second / pairs / 3.0
    torch.testing.assert_close(grad_target[0].double(), expected_target, rtol=1e-5, atol=0)


def test_cpu_kernel_writes_every_output_element():
    # with poisoning on, every buffer the C++ kernel allocates starts as NaN (the Triton backend's always do)
    if "cpu" not in FUSED:
        pytest.skip("the cpu backend is unavailable here")
    from crepa_kernels.ops import native

    native.set_poison_buffers(True)
    try:
        for pairs in ("spatial", "all"):
            _compare("cpu", (2, 3, 50, 6), pairs, 0.1, None, "none")
            _compare("cpu", (2, 3, 50, 6), pairs, 0.0, torch.tensor([3, 77, 149]), "mean")
    finally:
        native.set_poison_buffers(False)


# In a subprocess: this pytest process has TRITON_INTERPRET=1, under which @triton.jit kernels cannot be compiled.
RELATION_COMPILE = """
import json, torch
import compile_triton as ct
picked = [(80, ct.RelationCase(torch.bfloat16, torch.bfloat16, 1024, "temporal")),
          (86, ct.RelationCase(torch.float32, torch.bfloat16, 1024, "all"))]
results = []
for arch, case in picked:
    for name, launch in ct.launches(case, arch):
        source, target, options, _, named = ct.specialise(launch, arch)
        results.append(dict(arch=arch, kernel=name, named=named, **ct.compile_source(source, target, options)))
print(json.dumps(results))
"""


def test_relation_kernels_compile_without_spills():
    """The relation kernels that spilled with earlier tile sizes (sm_80 bf16 temporal loss; sm_86 fp32 projector
    with bf16 features); tools/compile_triton.py (make test) compiles every case for sm_80/86/89/90."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tools"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", RELATION_COMPILE], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["arch"], r["kernel"]) for r in results] == [(80, "relation_loss"), (80, "relation_grad"),
                                                          (80, "relation_grad"), (86, "relation_loss"),
                                                          (86, "relation_grad"), (86, "relation_grad")]
    for r in results:
        assert r["registers"] > 0 and r["spill_stores"] == r["spill_loads"] == r["stack_bytes"] == 0, r
        assert not r["approximate"], r
