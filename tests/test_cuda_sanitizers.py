"""The CUDA kernels under AddressSanitizer and UndefinedBehaviorSanitizer (tests/sanitizer/cuda_kernels_harness.cpp:
the HIP CPU build of csrc/crepa_cuda_kernels.cu without torch, every buffer a heap block of exactly its size).

Shapes with tails: D % 8 != 0 (a partial last chunk), an odd F * N, D past one block of threads, more columns than
one launch (a capped grid), both the vector and the element path, every dtype. Any report fails the test, and the
outputs must match the float64 reference. The harness is built once per content of its sources (about two minutes)
into .sanitizer_build/ beside the tests' checkout (or $CREPA_SANITIZER_BUILD_DIR).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from coefficient_oracle import arbitrary_table, table_oracle
from crepa_kernels.spec import LossOptions, coefficient_table
from harness import assert_close_and_finite, random_grad_output, random_pair, reference_in_float64

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HARNESS = Path(__file__).resolve().parent / "sanitizer" / "cuda_kernels_harness.cpp"
SOURCES = [HARNESS, CSRC / "crepa_cuda_kernels.cu", CSRC / "crepa_cuda_launch.h", CSRC / "crepa_cuda_plan.h",
           CSRC / "crepa_cuda_portability.h", CSRC / "crepa_math.h"]
FLAGS = ["-std=c++17", "-O2", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "--param=asan-stack=0",
         "-fno-omit-frame-pointer", "-D_GLIBCXX_SANITIZE_VECTOR", "-DCREPA_HIP_CPU"]
DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}


def _hip_cpu_root() -> Path | None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("crepa_kernels_build_config", CSRC / "build_config.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    return config.hip_cpu_root(CSRC)


HIP_CPU = _hip_cpu_root()
COMPILER = shutil.which(os.environ.get("CXX", "g++"))
pytestmark = pytest.mark.skipif(HIP_CPU is None or COMPILER is None,
                                reason=f"needs the HIP CPU Runtime (found: {HIP_CPU}) and a C++ compiler")


@pytest.fixture(scope="module")
def harness() -> Path:
    """The sanitized harness binary, built when its sources or flags changed."""
    key = hashlib.sha256(" ".join([COMPILER, *FLAGS, str(HIP_CPU)]).encode())
    for source in SOURCES:
        key.update(source.read_bytes())
    build_dir = Path(os.environ.get("CREPA_SANITIZER_BUILD_DIR", ROOT / ".sanitizer_build"))
    binary = build_dir / f"cuda_kernels_harness-{key.hexdigest()[:16]}"
    if not binary.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        command = [COMPILER, *FLAGS, f"-I{HIP_CPU / 'include'}", f"-I{CSRC}", str(HARNESS), "-o", str(partial),
                   "-lpthread"]
        build = subprocess.run(command, capture_output=True, text=True)
        assert build.returncode == 0, build.stderr[-3000:]
        partial.rename(binary)
    return binary


# (B, F, N, D), options, dtype, element offset of the inputs in their blocks, blocks per launch (0: no cap)
CASES = [
    ((2, 5, 3, 7), dict(neighbors=1), "f32", 0, 0),  # D % 8 != 0: the element path's partial chunk; F * N odd
    ((1, 3, 5, 33), dict(neighbors=2, neighbor_mode="cumulative", normalize_weights=True), "bf16", 0, 0),
    ((2, 4, 3, 40), dict(neighbors=2, neighbor_mode="cumulative"), "f32", 0, 0),  # the vector path
    ((2, 4, 3, 40), dict(neighbors=1), "f16", 0, 0),
    ((1, 3, 3, 48), dict(neighbors=9, neighbor_mode="cumulative"), "f64", 0, 0),  # d >= F
    ((2, 3, 5, 40), dict(neighbors=1, tau=0.3), "bf16", 3, 0),  # misaligned: the element path with D % 8 == 0
    ((1, 3, 3, 2051), dict(neighbors=1), "f32", 0, 0),  # D past 256 threads * 8: several chunks per thread
    ((3, 5, 7, 13), dict(neighbors=2, neighbor_mode="cumulative"), "f32", 0, 4),  # 21 columns in launches of 4
    ((2, 3, 5, 16), dict(neighbors=1), "f64", 0, 3),  # the vector path over several launches
    ((1, 1, 1, 1), dict(neighbors=0), "f32", 0, 0),
]


def run_harness(binary: Path, tmp_path: Path, shape, options: dict, dtype_name: str, offset: int, grid: int,
                coefficients: torch.Tensor | None = None):
    """Runs the harness on fresh inputs with ``coefficients`` as the table (default: spec.coefficient_table's)."""
    dtype = DTYPES[dtype_name]
    loss_options = LossOptions(**options)
    proj, target = random_pair(shape, dtype, seed=81)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_loss = random_grad_output(torch.empty(shape[:2], dtype=acc))
    if coefficients is None:
        coefficients = coefficient_table(loss_options, shape[1], acc)
    for name, tensor in (("proj", proj), ("target", target), ("grad_loss", grad_loss),
                         ("coefficients", coefficients)):
        (tmp_path / f"{name}.bin").write_bytes(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    B, F, N, D = shape
    arguments = [str(tmp_path), B, F, N, D, loss_options.neighbors, int(loss_options.neighbor_mode == "cumulative"),
                 repr(float(loss_options.eps)), dtype_name, offset, grid]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:detect_stack_use_after_return=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    run = subprocess.run([str(binary), *map(str, arguments)], capture_output=True, text=True, env=env, timeout=600)
    report = run.stderr
    assert run.returncode == 0 and "Sanitizer" not in report and "runtime error" not in report, report[-4000:]

    def read(name, like_dtype, size):
        data = torch.frombuffer(bytearray((tmp_path / f"{name}.bin").read_bytes()), dtype=like_dtype)
        return data.reshape(size)

    return proj, target, grad_loss, run.stdout.strip(), {
        "loss": read("loss", acc, shape[:2]),
        "grad_proj": read("grad_proj", dtype, shape),
        "grad_target": read("grad_target", dtype, shape),
    }


@pytest.mark.parametrize("shape,options,dtype_name,offset,grid", CASES, ids=str)
def test_kernels_are_clean_under_asan_and_ubsan(harness, tmp_path, shape, options, dtype_name, offset, grid):
    proj, target, grad_loss, path, out = run_harness(harness, tmp_path, shape, options, dtype_name, offset, grid)
    expected_path = "vector" if shape[3] % 8 == 0 and offset % 8 == 0 else "element"
    assert path == f"{expected_path} path"
    options = dict(options, reduction="none")
    # the harness's loss is [B, F] per frame (the kernels' output); the reference with reduction="none" is too
    expected, (expected_proj, expected_target) = reference_in_float64(proj, target, grad_loss, **options)
    assert_close_and_finite(out["loss"], expected, f"loss {shape} {dtype_name}")
    for name, expected_grad in (("grad_proj", expected_proj), ("grad_target", expected_target)):
        assert_close_and_finite(out[name], expected_grad, f"{name} {shape} {dtype_name}")


@pytest.mark.parametrize("dtype_name", ["f32", "bf16"])
def test_an_arbitrary_table_under_the_sanitizers(harness, tmp_path, dtype_name):
    """A random table no tau gives, in a heap block of exactly [F, W]: read whole, and nothing past it."""
    shape, band = (2, 6, 3, 13), dict(neighbors=3, neighbor_mode="cumulative")
    options = LossOptions(**band)
    table = arbitrary_table(options, shape[1], torch.float32, seed=82)
    proj, target, grad_loss, _, out = run_harness(harness, tmp_path, shape, band, dtype_name, 0, 0, coefficients=table)
    expected_loss, expected_proj, expected_target = table_oracle(proj, target, table, options, grad_loss)
    assert_close_and_finite(out["loss"], expected_loss, f"loss {dtype_name}")
    assert_close_and_finite(out["grad_proj"], expected_proj, f"grad_proj {dtype_name}")
    assert_close_and_finite(out["grad_target"], expected_target, f"grad_target {dtype_name}")
