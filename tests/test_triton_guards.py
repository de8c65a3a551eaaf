"""The Triton ops' host code under torch.compile's symbolic tracing: tau and eps reach the kernels from device
memory (no float kernel argument, so no guard on their values), and the shape guards are ranges, so that a tau
schedule or clips of other lengths in the same regime do not recompile.

On a GPU the ops are triton_ops, whose bodies torch.compile traces with symbolic sizes and scalars; here (no GPU)
tests/triton_host_trace.py runs those bodies on fake CUDA tensors under a ShapeEnv, in a subprocess without
TRITON_INTERPRET, and each guard it installs is evaluated at other values. Before that, Dynamo sees the op call
itself (under the interpreter too, where the op is opaque): its tau and eps must be tensors, or Dynamo specialises
them, and the compiled calls below count that.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing

from crepa_kernels import cross_frame_align_loss
from harness import assert_close_and_finite, random_pair

ROOT = Path(__file__).resolve().parents[1]
TRACED = dict(B=2, F=13, N=97, D=768, tau=0.5, eps=1e-12)
OTHER_VALUES = dict(B=3, N=3600, D=1536, tau=0.7, eps=1e-8)

# (name, dtypes, options, F traced, other F of the same regime, bindings of another regime that must fail a guard;
# on sm_90 unless named)
REGIMES = [
    ("one 16-frame window", ("bfloat16", "bfloat16"), dict(neighbors=1), 13, (2, 9, 15, 16),
     (dict(F=17), dict(D=32), dict(N=2**31))),
    ("one 32-frame window", ("float32", "float32"), dict(neighbors=2, neighbor_mode="cumulative"), 21, (17, 30, 32),
     (dict(F=16), dict(F=33))),
    ("halo mode, fp64 16-frame windows", ("float64", "float64"), dict(neighbors=1, normalize_weights=True), 40,
     (17, 33, 100, 1000), (dict(F=16),)),
    ("halo mode, 32-frame windows", ("float32", "bfloat16"), dict(neighbors=9, neighbor_mode="cumulative"), 33,
     (34, 61, 4000), (dict(F=32), dict(F=9))),
    ("shifted mode", ("bfloat16", "bfloat16"), dict(neighbors=57), 61, (58, 64, 1000),
     (dict(F=57), dict(F=32), dict(D=16))),
    ("shifted mode on sm_86", ("bfloat16", "bfloat16"), dict(neighbors=25, neighbor_mode="cumulative"), 61,
     (33, 64, 1000), (dict(F=32), dict(F=25), dict(D=16))),
]


@pytest.fixture(scope="module")
def traces():
    if torch.version.cuda is None:  # found on torch 2.13.0+cpu: "PyTorch is not linked with support for cuda devices"
        pytest.skip(f"tracing the GPU host code needs fake CUDA tensors, which torch {torch.__version__} (a CPU-only "
                    "build) cannot make")
    cases = []
    for name, dtypes, options, frames, same_frames, others in REGIMES:
        same = [dict(TRACED, F=frames, **OTHER_VALUES)] + [dict(TRACED, F=f) for f in same_frames]
        bindings = same + [{**TRACED, "F": frames, **other} for other in others]
        cases.append(dict(dtypes=dtypes, options=dict(dict(neighbor_mode="adjacent", normalize_weights=False),
                                                      **options),
                          capability=(8, 6) if name.endswith("sm_86") else (9, 0),
                          traced=dict(TRACED, F=frames), bindings=bindings, same=len(same)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_host_trace.py")], input=json.dumps(cases),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(cases), done.stderr
    return [(case, result) for case, result in zip(cases, results)]


@pytest.mark.parametrize("index", range(len(REGIMES)), ids=[regime[0] for regime in REGIMES])
def test_tau_and_eps_reach_the_kernels_from_device_memory(traces, index):
    _, result = traces[index]
    assert result["float_args"] == [], "a float kernel argument pins tau or eps: one graph per value"
    # tau reaches them inside the coefficient table, eps as an fp64 scalar tensor
    assert {"_crepa_forward_kernel", "_crepa_backward_kernel"} == set(result["kernels"])
    assert result["scalar_tensors"] == [1] * len(result["kernels"]), result


@pytest.mark.parametrize("index", range(len(REGIMES)), ids=[regime[0] for regime in REGIMES])
def test_guards_are_ranges_that_admit_the_same_regime(traces, index):
    case, result = traces[index]
    print(f"{REGIMES[index][0]}: {result['guards']}")
    for binding, failed in zip(case["bindings"][:case["same"]], result["failed"]):
        assert failed == [], f"{binding} of the traced regime would recompile: it fails {failed}"
    for binding, failed in zip(case["bindings"][case["same"]:], result["failed"][case["same"]:]):
        assert failed, f"{binding} needs another kernel configuration, yet passes every guard {result['guards']}"
    # no guard names tau or eps: only the sizes steer the host code
    assert not [guard for guard in result["guards"] if "tau" in guard or "eps" in guard], result["guards"]


# (B, F, N, D, tau, eps): one frame regime (one 16-frame window), fp32 (BLOCK_D 16 whatever D)
VARYING_CALLS = [(2, 5, 3, 7, 0.5, 1e-12), (3, 7, 4, 9, 0.7, 1e-8), (2, 9, 5, 20, 0.9, 1e-6), (4, 13, 2, 40, 0.3, 1e-10)]


@pytest.mark.parametrize("dynamic,expected_frames", [(True, [1, 1, 1, 1]), (None, [1, 2, 2, 2])],
                         ids=["dynamic=True", "automatic dynamic"])
def test_compiled_triton_backend_keeps_tau_eps_and_sizes_symbolic(dynamic, expected_frames):
    """torch.compile(fullgraph=True) of the Triton backend with tau, eps and every size changing per call: no
    recompilation with dynamic=True; with automatic dynamic shapes only the first change recompiles. The ops used
    to take tau and eps as Python numbers, which Dynamo specialised (a guard tau == 0.5 per graph)."""
    def loss(p, y, tau, eps):
        return cross_frame_align_loss(p, y, tau=tau, eps=eps, neighbors=2, neighbor_mode="cumulative",
                                      normalize_weights=True, backend="triton")

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, backend=counter, fullgraph=True, dynamic=dynamic)
    for index, (batch, frames, tokens, dim, tau, eps) in enumerate(VARYING_CALLS):
        results = []
        for fn in (compiled, loss):
            proj, target = random_pair((batch, frames, tokens, dim), torch.float32, seed=index)
            proj.requires_grad_(True)
            target.requires_grad_(True)
            value = fn(proj, target, tau, eps)
            value.backward(torch.tensor(0.7))
            results.append((value.detach(), proj.grad, target.grad))
        for name, got, expected in zip(("loss", "grad proj", "grad target"), *results):
            assert_close_and_finite(got, expected, f"call {index}: {name}")
        assert counter.frame_count == expected_frames[index], \
            f"call {index}: {counter.frame_count} compilations, expected {expected_frames[index]}"
