"""Backend selection looks at the call (shape, dtypes, options), not only the device: "auto" passes over a backend
that cannot run a call with one warning, a named one raises with the reason before any kernel runs, and
explain_backend says which backend a call would use and why. Backends are made to refuse a call by patching their
call_unsupported_reason, so the fallback paths run without a GPU."""
import types
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

from crepa_kernels import available_backends, cross_frame_align_loss, explain_backend
from crepa_kernels import backends, gpu_limits
from crepa_kernels.ops import native, triton_loss, triton_plan
from harness import assert_close_and_finite, random_pair

CPU_KERNEL = available_backends("cpu")["cpu"] is True
needs_cpu_kernel = pytest.mark.skipif(not CPU_KERNEL, reason=f"cpu backend unusable: {available_backends('cpu')['cpu']}")


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch):
    """Resolution is cached per call; the tests patch reasons, so each starts and ends with an empty cache."""
    monkeypatch.delenv(backends.ENV_OVERRIDE, raising=False)
    backends._resolve.cache_clear()
    backends._size_limits.cache_clear()
    triton_plan._cached_capability.cache_clear()  # the tests patch torch.cuda.get_device_capability
    yield
    backends._resolve.cache_clear()
    backends._size_limits.cache_clear()
    triton_plan._cached_capability.cache_clear()


def _refuse_when(monkeypatch, module, predicate, reason="refused for the test"):
    """Makes ``module`` refuse the calls for which predicate(proj, target, options) holds; records what it saw."""
    seen = []
    original = module.call_unsupported_reason

    def patched(proj, target, options):
        seen.append((proj.shape, proj.dtype, target.dtype, options.neighbors))
        return reason if predicate(proj, target, options) else original(proj, target, options)

    monkeypatch.setattr(module, "call_unsupported_reason", patched)
    return seen


def _record_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if "crepa_kernels" in str(w.message)]


@needs_cpu_kernel
def test_auto_falls_back_for_a_call_the_first_backend_refuses(monkeypatch):
    seen = _refuse_when(monkeypatch, native, lambda p, y, o: o.neighbors == 2 and p.shape[2] == 5)
    proj, target = random_pair((2, 6, 5, 7))

    def loss(neighbors):
        return cross_frame_align_loss(proj, target, neighbors=neighbors, neighbor_mode="cumulative")

    # the refused call runs on the reference, with one warning over repeated calls; the reasons saw the real call
    refused, caught = _record_warnings(lambda: [loss(2), loss(2)])
    assert len(caught) == 1 and "'cpu': refused for the test" in str(caught[0].message)
    assert ((2, 6, 5, 7), torch.float32, torch.float32, 2) in seen
    expected = cross_frame_align_loss(proj.double(), target.double(), neighbors=2, neighbor_mode="cumulative",
                                      backend="reference")
    for value in refused:
        assert_close_and_finite(value, expected, "fallback loss", dtype=torch.float32)
    assert explain_backend(proj, target, neighbors=2, neighbor_mode="cumulative").backend == "reference"
    # another call of the same process still runs on the fused kernel, without a warning
    _, caught = _record_warnings(lambda: loss(1))
    assert not caught
    assert explain_backend(proj, target, neighbors=1, neighbor_mode="cumulative").backend == "cpu"


@needs_cpu_kernel
def test_named_backend_refusing_a_call_raises_before_any_kernel(monkeypatch):
    _refuse_when(monkeypatch, native, lambda p, y, o: y.dtype == torch.bfloat16, "no bf16 targets today")
    ran = []
    monkeypatch.setattr(native, "forward", lambda *args: ran.append(args))
    proj, target = random_pair((1, 3, 4, 5), torch.float32, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"backend='cpu' cannot run this call: no bf16 targets today"):
        cross_frame_align_loss(proj, target, backend="cpu")
    assert not ran
    assert available_backends(proj=proj, target=target)["cpu"] == "no bf16 targets today"
    choice = explain_backend(proj, target, backend="cpu")
    assert choice.backend is None and "no bf16 targets today" in choice.error


def test_environment_variable_names_a_backend_that_must_run_the_call(monkeypatch):
    _refuse_when(monkeypatch, backends._load("reference"), lambda p, y, o: True, "the reference is off")
    monkeypatch.setenv(backends.ENV_OVERRIDE, "reference")
    proj, target = random_pair((1, 3, 4, 5))
    with pytest.raises(RuntimeError, match="environment variable CREPA_KERNELS_BACKEND='reference' cannot run"):
        cross_frame_align_loss(proj, target)


def test_no_backend_left_raises(monkeypatch):
    for name in ("reference", "cpu"):
        _refuse_when(monkeypatch, backends._load(name), lambda p, y, o: True, f"{name} refuses")
    proj, target = random_pair((1, 3, 4, 5))
    with pytest.raises(RuntimeError, match="no crepa_kernels backend can run this call"):
        cross_frame_align_loss(proj, target)
    choice = explain_backend(proj, target)
    assert choice.backend is None and choice.reasons["reference"] == "reference refuses"


def test_an_unsupported_dtype_falls_back_to_the_reference_for_real():
    """float8 is a floating dtype the spec accepts and the fused kernels do not: no patching needed."""
    # seeded, correlated inputs: an unseeded pair gave a loss near 0, where fp32 cancellation exceeded the tolerance
    proj, target = (x.detach() for x in random_pair((1, 3, 4, 8), seed=21))
    proj = proj.to(torch.float8_e4m3fn)
    reasons = available_backends(proj=proj, target=target, neighbors=1)
    assert reasons["reference"] is True
    assert "float8_e4m3fn" in reasons["cpu"] and "float8_e4m3fn" in reasons["triton"]
    loss, caught = _record_warnings(lambda: cross_frame_align_loss(proj, target))
    expected = cross_frame_align_loss(proj.double(), target.double(), backend="reference")
    assert_close_and_finite(loss, expected.float(), "float8 loss", dtype=torch.float32)
    assert len(caught) == (1 if CPU_KERNEL else 0)


def test_explain_backend_lists_every_backend_with_its_reason():
    proj, target = random_pair((1, 5, 4, 3), torch.bfloat16)
    choice = explain_backend(proj, target, neighbors=2, num_frames=None)
    assert choice.requested == "auto" and choice.candidates == backends.AUTO_ORDER["cpu"]
    assert set(choice.reasons) == set(backends.BACKEND_NAMES)
    assert choice.backend == ("cpu" if CPU_KERNEL else "reference")
    assert "cuda tensors" in choice.reasons["cuda"]
    text = str(choice)
    assert f"runs on {choice.backend!r}" in text and all(name in text for name in backends.BACKEND_NAMES)
    # the same rules as the call: a 3-D input needs num_frames, bad options raise as the loss would
    with pytest.raises(ValueError, match="num_frames"):
        explain_backend(proj.flatten(1, 2), target.flatten(1, 2))
    with pytest.raises(ValueError, match="neighbor_mode"):
        explain_backend(proj, target, neighbor_mode="both")
    with pytest.raises(TypeError, match="need proj and target"):
        available_backends("cpu", neighbors=2)


def test_cuda_order_passes_to_the_cuda_kernel_when_triton_refuses(monkeypatch):
    """The CUDA device order, with both GPU backends made available: a call Triton refuses goes to 'cuda'."""
    real_reason = backends.unavailable_reason
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name, device: None if name in ("triton", "cuda") else real_reason(name, device))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    _refuse_when(monkeypatch, triton_loss, lambda p, y, o: o.neighbors > 4, "window too wide for the test")
    monkeypatch.setattr(native, "call_unsupported_reason", lambda p, y, o: None)
    device = torch.device("cuda", 0)
    key = ((1, 33, 10, 64), torch.bfloat16, torch.bfloat16, True, False, 9, "cumulative", False, ())
    choice = backends._choose("auto", None, device, key)
    assert choice.backend == "cuda" and choice.reasons["triton"] == "window too wide for the test"
    assert backends._choose("auto", None, device, key[:5] + (1,) + key[6:]).backend == "triton"
    # a GPU older than sm_80 (no bf16 tl.dot, not checked ahead of time) goes to the CUDA kernel too
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    triton_plan._cached_capability.cache_clear()
    choice = backends._choose("auto", None, device, key[:5] + (1,) + key[6:])
    assert choice.backend == "cuda" and "7.5" in choice.reasons["triton"]


def test_triton_runs_its_shifted_tiling_on_every_checked_arch(monkeypatch):
    """F=61 with d=57 takes the shifted tiling, whose kernels spilled on sm_80 to sm_89 with sm_90's launch
    configuration and were refused there; below sm_90 they now take one stage and 2 warps (the backward 4 on sm_80),
    which compile clean
    (tools/compile_triton.py, tests/test_triton_compile.py). The capability changes no tile size, so the buffers
    (stats_shapes) and the grid stay those of any other device."""
    options = backends.LossOptions(neighbors=57)
    shape = (1, 61, 3600, 1536)
    for capability in ((8, 0), (8, 6), (8, 9), (9, 0)):
        triton_plan._cached_capability.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        for device in (torch.device("cuda"), torch.device("cuda", 1)):
            spec = backends.InputSpec(shape, torch.bfloat16, device, True)
            assert triton_loss.call_unsupported_reason(spec, spec, options) is None, capability
            assert triton_plan.device_capability(device) == capability
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            tiling = triton_plan.frame_tiling(61, 57, triton_plan.max_window(dtype, dtype))
            halo = triton_plan.frame_tiling(61, 1, triton_plan.max_window(dtype, dtype))
            assert tiling.shifted and not halo.shifted
            for kernel in ("forward", "backward"):
                chosen = triton_plan.launch_config(kernel, 1536, tiling, dtype, capability)
                interpreter = triton_plan.launch_config(kernel, 1536, tiling, dtype)
                assert (chosen.block_n, chosen.block_d) == (interpreter.block_n, interpreter.block_d)
                below = capability < (9, 0)
                # sm_80's backward takes 4 warps: at 2 its fp32 target-gradient kernel spilled 4 bytes
                warps = 4 if capability < (8, 6) and kernel == "backward" else 2
                assert ((chosen.num_warps, chosen.num_stages) == (warps, 1)) == below, (capability, kernel, chosen)
                assert chosen == interpreter or below
                # the other tilings keep their configuration on every architecture
                assert triton_plan.launch_config(kernel, 1536, halo, dtype, capability) == \
                    triton_plan.launch_config(kernel, 1536, halo, dtype)
    assert triton_plan.device_capability(torch.device("cpu")) is None
    assert triton_plan.device_capability(torch.device("meta")) is None


def test_triton_reads_the_capability_once_per_device(monkeypatch):
    """A host query per launch would be cheap but is not needed: cached per indexed device; torch.device("cuda")
    (the current device, which can change) is asked each time."""
    asked = []

    def capability(device=None):
        asked.append(device)
        return (8, 6)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    for _ in range(3):
        for device in (torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda")):
            assert triton_plan.device_capability(device) == (8, 6)
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1)] + [torch.device("cuda")] * 3


def test_triton_reasons_for_calls_it_cannot_run():
    spec = backends.InputSpec((1, 33, 10, 64), torch.float8_e5m2, torch.device("cpu"), True)
    assert "float8_e5m2" in triton_loss.call_unsupported_reason(spec, spec, backends.LossOptions())
    ok = backends.InputSpec((1, 33, 10, 64), torch.bfloat16, torch.device("cpu"), True)
    assert triton_loss.call_unsupported_reason(ok, ok, backends.LossOptions(neighbors=8)) is None
    unknown = backends.InputSpec(None, torch.bfloat16, torch.device("cpu"), True)  # while torch.compile traces
    assert triton_loss.call_unsupported_reason(unknown, unknown, backends.LossOptions(neighbors=8)) is None


def test_cuda_kernel_reasons_follow_its_launch_plan(monkeypatch):
    """The CUDA forward refuses what needs more shared memory per block than the device allows; the reason says so
    first, from the same launch plan (tests/test_cuda_limits.py covers the plan). Cumulative F=61, d=25 (fp32), which
    the old 48 KB cap refused, fits a 99 KB device; F=300 with every frame a neighbour does not. B * N past the
    grid's x limit takes several launches. Device properties of an sm_86 GPU, patched in."""
    properties = types.SimpleNamespace(shared_memory_per_block_optin=101376)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    cuda = torch.device("cuda")
    options = backends.LossOptions(neighbors=25, neighbor_mode="cumulative")
    spec = backends.InputSpec((1, 61, 100, 1024), torch.float32, cuda, True)
    assert native.call_unsupported_reason(spec, spec, options) is None
    wide = backends.InputSpec((1, 300, 100, 1024), torch.float32, cuda, True)
    reason = native.call_unsupported_reason(wide, wide, backends.LossOptions(neighbors=299, neighbor_mode="cumulative"))
    assert "F=300" in reason and "101376 bytes" in reason
    huge = backends.InputSpec((2, 13, 2**30, 8), torch.bfloat16, cuda, True)
    assert native.call_unsupported_reason(huge, huge, backends.LossOptions()) is None
    tracing = backends.InputSpec(None, torch.bfloat16, cuda, True)
    assert native.call_unsupported_reason(tracing, tracing, backends.LossOptions()) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "7.5" in native.call_unsupported_reason(spec, spec, options)


# --- under torch.compile: a backend's size limits (issue 20, defect 3) -------------------------------------------
# While torch.compile traces, the sizes may be symbolic and call_key leaves the shape out; a backend that refuses some
# sizes gives size_limits instead, which the traced sizes are compared with (range guards). Without that, "auto"
# picked a backend the sizes then made raise at run time.

# F <= 6 frames for D <= 16, F <= 4 for wider tokens: a size limit like the CUDA kernel's shared-memory staircase
TEST_SIZE_LIMITS = ((16, 6), (None, 4))


def _outside_test_limits(frames, dim) -> bool:
    return frames > (6 if dim <= 16 else 4)


@needs_cpu_kernel
def test_compiled_auto_runs_where_eager_runs_past_a_size_limit(monkeypatch):
    """The CPU kernel is given TEST_SIZE_LIMITS: eager selection refuses past them, and its forward raises there as
    the CUDA forward does. Compiled with dynamic shapes, every call must run on the backend eager selection picks
    (the patched kernel doubles its loss, so a wrong graph shows in the value) and recompile only when it crosses
    a limit: 4 graphs for 6 calls."""
    original_forward = native.forward

    def limited_forward(proj, target, coefficients, options):
        if _outside_test_limits(proj.shape[1], proj.shape[3]):
            raise NotImplementedError("the test's size limit")
        per_frame, *saved = original_forward(proj, target, coefficients, options)
        return (2 * per_frame, *saved)  # marks the kernel's results

    def limited_reason(proj, target, options):
        if proj.shape is not None and _outside_test_limits(proj.shape[1], proj.shape[3]):
            return "past the test's size limit"
        return None

    monkeypatch.setattr(native, "forward", limited_forward)
    monkeypatch.setattr(native, "call_unsupported_reason", limited_reason)
    monkeypatch.setattr(native, "size_limits", lambda proj, target, options: TEST_SIZE_LIMITS)
    traced = []
    original_resolve = backends._resolve

    def recording_resolve(*args):  # runs only while torch.compile traces (or in eager calls)
        traced.append(original_resolve(*args))
        return traced[-1]

    recording_resolve.cache_clear = original_resolve.cache_clear
    monkeypatch.setattr(backends, "_resolve", recording_resolve)

    def loss(proj, target):
        return cross_frame_align_loss(proj, target, neighbors=1, backend="auto")

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, backend=counter, fullgraph=True, dynamic=True)
    calls = [((2, 3, 5, 8), "cpu", 1), ((2, 5, 5, 8), "cpu", 1), ((2, 7, 5, 8), "reference", 2),
             ((2, 9, 5, 8), "reference", 2), ((2, 5, 5, 20), "reference", 3), ((2, 3, 5, 20), "cpu", 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto passing over the refusing kernel
        for shape, expected_backend, graphs in calls:
            proj, target = random_pair(shape, seed=shape[1] + shape[3])
            assert explain_backend(proj, target, neighbors=1).backend == expected_backend, shape
            got = compiled(proj, target)
            got_grads = torch.autograd.grad(got, (proj, target))
            expected = loss(proj, target)
            expected_grads = torch.autograd.grad(expected, (proj, target))
            assert_close_and_finite(got, expected, f"compiled loss {shape}")
            for grad, expected_grad in zip(got_grads, expected_grads):
                assert_close_and_finite(grad, expected_grad, f"compiled gradient {shape}")
            assert counter.frame_count == graphs, (shape, counter.frame_count)
            assert traced[-1] == expected_backend, (shape, traced)
    torch._dynamo.reset()


def test_traced_selection_sees_the_cuda_kernels_shared_memory_limit(monkeypatch):
    """The issue's case without a GPU: fp64, cumulative d=64, F=128 needs about 132 KB of shared memory per block,
    past the 99 KB of sm_86/89/120. With the Triton backend unavailable, "auto" on a CUDA device must pass over the
    CUDA kernel for it in the traced key (torch.compile: shape None) exactly where it does for the eager key, on
    every checked architecture and around every step of its size limits."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    original_unavailable = backends.unavailable_reason
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device: "not here" if name == "triton" else (
        None if name == "cuda" else original_unavailable(name, device)))
    cuda = torch.device("cuda", 0)
    options = backends.LossOptions(neighbors=64, neighbor_mode="cumulative")

    def choices(shape, dtype):
        with FakeTensorMode():
            proj = torch.empty(shape, dtype=dtype, device="cuda", requires_grad=True)
        eager = backends._choose("auto", None, cuda, backends.call_key(proj, proj, options))
        with monkeypatch.context() as tracing:
            tracing.setattr(torch.compiler, "is_compiling", lambda: True)
            traced_key = backends.call_key(proj, proj, options)
        assert traced_key[0] is None  # no size in the traced key: dynamic shapes stay dynamic
        return eager, backends._choose("auto", None, cuda, traced_key)

    for arch in gpu_limits.CHECKED_ARCHS:
        properties = types.SimpleNamespace(shared_memory_per_block_optin=gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[arch])
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None, p=properties: p)
        backends._size_limits.cache_clear()
        for dtype in (torch.float64, torch.bfloat16):
            accumulation = torch.float64 if dtype == torch.float64 else torch.float32
            limits = native.cuda_size_limits(options, accumulation, properties.shared_memory_per_block_optin)
            frames_at_steps = {frames for _, frames in limits}
            dims = [1, 255, 256, 257, 1536, 4096] + [dim + extra for dim, _ in limits if dim for extra in (0, 1)]
            for dim in dims:
                for frames in sorted({2, 64, 128, 300} | {f + extra for f in frames_at_steps for extra in (0, 1)}):
                    if frames < 1:
                        continue
                    eager, traced = choices((1, frames, 7, dim), dtype)
                    assert eager.backend == traced.backend, (arch, dtype, frames, dim, eager, traced)
        issue_eager, issue_traced = choices((1, 128, 3600, 1536), torch.float64)
        needs_fallback = arch in ("sm_86", "sm_89", "sm_120", "sm_121")
        assert issue_traced.backend == ("reference" if needs_fallback else "cuda"), arch
        if needs_fallback:
            assert "'cuda' runs for this call" in issue_traced.reasons["cuda"], issue_traced
            assert "bytes of shared memory" in issue_eager.reasons["cuda"], issue_eager
