"""The public API: input handling, bad input, dispatch and NaN propagation."""
import dataclasses
import math

import pytest
import torch

import crepa_kernels
from crepa_kernels import available_backends, cross_frame_align_loss
from harness import random_pair
from naive import naive_loss

OPTION_NAMES = {field.name for field in dataclasses.fields(crepa_kernels.LossOptions)}


def test_import_and_defaults_match_the_spec():
    proj, target = random_pair((2, 4, 3, 6), torch.float64)
    loss = cross_frame_align_loss(proj, target)
    torch.testing.assert_close(loss, naive_loss(proj, target, neighbors=1, tau=1.0))
    assert loss.shape == ()


def test_flattened_inputs_are_frame_major():
    proj, target = random_pair((2, 4, 3, 6), torch.float64)
    expected = cross_frame_align_loss(proj, target, reduction="none")
    flat = cross_frame_align_loss(proj.flatten(1, 2), target.flatten(1, 2), num_frames=4, reduction="none")
    mixed = cross_frame_align_loss(proj.flatten(1, 2), target, num_frames=4, reduction="none")
    torch.testing.assert_close(flat, expected)
    torch.testing.assert_close(mixed, expected)


def test_non_contiguous_inputs():
    proj, target = random_pair((2, 6, 3, 8), torch.float64)
    proj_t = proj.detach().transpose(0, 2).contiguous().transpose(0, 2).requires_grad_(True)
    target_sliced = torch.cat([target.detach(), target.detach()], dim=-1)[..., ::2].requires_grad_(True)
    assert not proj_t.is_contiguous() and not target_sliced.is_contiguous()
    loss = cross_frame_align_loss(proj_t, target_sliced, neighbors=2, neighbor_mode="cumulative")
    expected = naive_loss(proj_t.detach(), target_sliced.detach(), neighbors=2, neighbor_mode="cumulative")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert proj_t.grad.shape == proj_t.shape and target_sliced.grad.shape == target_sliced.shape


def test_nan_and_inf_are_not_hidden():
    for bad in (math.nan, math.inf):
        proj, target = random_pair((1, 3, 2, 4), torch.float32)
        with torch.no_grad():
            target[0, 2, 1, 0] = bad
        assert torch.isnan(cross_frame_align_loss(proj, target))


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


BAD_INPUTS = [
    # (kwargs, exception, words the message must contain)
    (dict(proj=_t(2, 3, 4, 5), target=_t(2, 3, 4, 6)), ValueError, ["proj and target", "(2, 3, 4, 5)", "(2, 3, 4, 6)"]),
    (dict(proj=_t(2, 3, 4, 5, 1), target=_t(2, 3, 4, 5, 1)), ValueError, ["proj", "4-D", "5-D"]),
    (dict(proj=_t(12, 5), target=_t(12, 5)), ValueError, ["proj", "2-D"]),
    (dict(proj=_t(2, 12, 5), target=_t(2, 12, 5)), ValueError, ["proj", "num_frames"]),
    (dict(proj=_t(2, 12, 5), target=_t(2, 12, 5), num_frames=5), ValueError, ["num_frames=5", "12"]),
    (dict(proj=_t(2, 3, 4, 5), target=_t(2, 3, 4, 5), num_frames=4), ValueError, ["num_frames=4"]),
    (dict(proj=_t(2, 12, 5), target=_t(2, 12, 5), num_frames=0), ValueError, ["num_frames", "0"]),
    (dict(proj=_t(2, 12, 5), target=_t(2, 12, 5), num_frames=2.0), TypeError, ["num_frames", "float"]),
    (dict(proj=_t(2, 0, 4, 5), target=_t(2, 0, 4, 5)), ValueError, ["proj", "empty", "(2, 0, 4, 5)"]),
    (dict(proj=_t(2, 3, 4, 0), target=_t(2, 3, 4, 0)), ValueError, ["empty"]),
    (dict(proj=torch.ones(2, 3, 4, 5, dtype=torch.int64), target=_t(2, 3, 4, 5)), TypeError, ["proj", "int64"]),
    (dict(proj=_t(2, 3, 4, 5), target=torch.ones(2, 3, 4, 5, dtype=torch.bool)), TypeError, ["target", "bool"]),
    (dict(proj=[1.0], target=_t(2, 3, 4, 5)), TypeError, ["proj", "list"]),
    (dict(tau=0.0), ValueError, ["tau", "0.0"]),
    (dict(tau=-1.0), ValueError, ["tau"]),
    (dict(tau=math.inf), ValueError, ["tau", "inf"]),
    (dict(tau=math.nan), ValueError, ["tau", "nan"]),
    (dict(tau="1"), TypeError, ["tau", "str"]),
    (dict(neighbors=-1), ValueError, ["neighbors", "-1"]),
    (dict(neighbors=1.0), TypeError, ["neighbors", "float"]),
    (dict(neighbors=True), TypeError, ["neighbors", "bool"]),
    (dict(neighbor_mode="both"), ValueError, ["neighbor_mode", "'both'", "adjacent"]),
    (dict(reduction="sum"), ValueError, ["reduction", "'sum'", "frame_sum"]),
    (dict(backend="cudnn"), ValueError, ["backend", "'cudnn'", "reference"]),
    (dict(backend=None), TypeError, ["backend", "NoneType"]),
    (dict(eps=0.0), ValueError, ["eps", "0.0"]),
    (dict(eps=-1e-6), ValueError, ["eps"]),
    (dict(normalize_weights="yes"), TypeError, ["normalize_weights", "str"]),
]


@pytest.mark.parametrize("kwargs,exception,words", BAD_INPUTS, ids=lambda v: str(v)[:40])
def test_bad_input_raises_a_clear_error(kwargs, exception, words):
    kwargs = dict(kwargs)
    proj = kwargs.pop("proj", _t(2, 3, 4, 5))
    target = kwargs.pop("target", _t(2, 3, 4, 5))
    with pytest.raises(exception) as info:
        cross_frame_align_loss(proj, target, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize("kwargs,exception,words",
                         [case for case in BAD_INPUTS if set(case[0]) <= OPTION_NAMES | {"backend"}],
                         ids=lambda v: str(v)[:40])
def test_bad_option_raises_when_the_module_is_built(kwargs, exception, words):
    """The module checks its options at construction, before any input is seen (eps = 0 included: no dtype makes
    it valid)."""
    with pytest.raises(exception) as info:
        crepa_kernels.CrossFrameAlignLoss(**kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put tensors on two devices")
def test_different_devices():
    with pytest.raises(ValueError, match="same device"):
        cross_frame_align_loss(_t(1, 2, 3, 4), _t(1, 2, 3, 4).cuda())


def test_different_devices_meta():
    # the meta device stands in for a second device on machines without a GPU
    with pytest.raises(ValueError, match="same device"):
        cross_frame_align_loss(_t(1, 2, 3, 4), torch.empty(1, 2, 3, 4, device="meta"))


def test_available_backends_reports_true_or_a_reason():
    backends = available_backends("cpu")
    assert set(backends) == {"reference", "triton", "cpu", "cuda", "cuda_emulated"}
    assert backends["reference"] is True
    for name, value in backends.items():
        assert value is True or (isinstance(value, str) and value), name
    assert isinstance(available_backends("cpu")["cuda"], str)  # the CUDA backend never runs on CPU tensors


def test_named_backend_that_cannot_run_raises_with_its_reason():
    reason = available_backends("cpu")["cuda"]
    with pytest.raises(RuntimeError) as info:
        cross_frame_align_loss(_t(1, 2, 3, 4), _t(1, 2, 3, 4), backend="cuda")
    assert "cuda" in str(info.value) and reason in str(info.value)


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("CREPA_KERNELS_BACKEND", "reference")
    proj, target = random_pair((1, 3, 2, 4), torch.float64)
    torch.testing.assert_close(cross_frame_align_loss(proj, target), naive_loss(proj, target))
    monkeypatch.setenv("CREPA_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="CREPA_KERNELS_BACKEND"):
        cross_frame_align_loss(proj, target)


def test_version():
    assert crepa_kernels.__version__


def test_auto_picks_the_fused_cpu_backend_when_it_is_usable(monkeypatch):
    from crepa_kernels.backends import resolve_backend_name

    monkeypatch.delenv("CREPA_KERNELS_BACKEND", raising=False)
    expected = "cpu" if available_backends("cpu")["cpu"] is True else "reference"
    assert resolve_backend_name("auto", "cpu", None) == expected


def test_auto_order_on_cuda_prefers_triton_then_the_cuda_kernel():
    from crepa_kernels.backends import AUTO_ORDER

    assert AUTO_ORDER["cuda"] == ("triton", "cuda", "reference")


def test_environment_variable_leaves_a_named_backend_alone(monkeypatch):
    """CREPA_KERNELS_BACKEND overrides "auto" only: an explicitly named backend runs even when it names another
    (or a nonsense) backend."""
    from crepa_kernels.backends import resolve_backend_name

    proj, target = random_pair((1, 3, 2, 4), torch.float64)
    for override in ("cpu", "nonsense"):
        monkeypatch.setenv("CREPA_KERNELS_BACKEND", override)
        assert resolve_backend_name("reference", "cpu", None) == "reference"
        torch.testing.assert_close(cross_frame_align_loss(proj, target, backend="reference"), naive_loss(proj, target))
