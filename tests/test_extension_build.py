"""The C++ extension's build: it loads (prebuilt or JIT), says how it was compiled, and ships its sources."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crepa_kernels import gpu_limits
from crepa_kernels.ops import build, native

ROOT = Path(__file__).resolve().parent.parent
build_config = build.build_config(ROOT / "csrc")
reason = native.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"C++ extension unavailable: {reason}")


def test_build_info():
    info = native.build_info()
    assert set(info) == {"cuda", "openmp", "torch", "cpu_isa"}
    assert info["cpu_isa"] in ("avx2", "baseline")
    assert info["openmp"], "without -fopenmp at::parallel_for runs on one thread"
    assert info["torch"] == torch.__version__.split("+")[0]


def test_sources_for_the_jit_fallback_are_found():
    csrc = build.csrc_dir()
    assert csrc is not None
    config = build.build_config(csrc)
    for source in config.sources(with_cuda=True, csrc=csrc):
        assert Path(source).exists(), source
    assert (csrc / "crepa_math.h").exists() and (csrc / "crepa_ops.h").exists()


def test_built_package_ships_the_sources(tmp_path):
    """What a wheel holds: setup.py's build_py copies csrc/ into the package, where the JIT fallback looks."""
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    shipped = {path.name for path in (tmp_path / "crepa_kernels" / "csrc").iterdir()}
    expected = {path.name for path in (ROOT / "csrc").iterdir() if path.suffix in (".h", ".cpp", ".cu", ".py")}
    assert expected and expected <= shipped


def _check_cuda_build():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_cuda_build
    finally:
        sys.path.pop(0)
    return check_cuda_build


def test_cuda_arch_list_has_ptx_and_blackwell():
    """Issue 12 defect 7: without PTX or Blackwell SASS a prebuilt extension has no kernel image for Blackwell."""
    check = _check_cuda_build()
    for arch_list in (build_config.CUDA_ARCHS, build_config.DEFAULT_CUDA_ARCHS):
        sass, ptx = check.required_code(arch_list)
        assert {"sm_80", "sm_90", "sm_100", "sm_120"} <= sass, arch_list
        assert ptx, f"{arch_list}: no PTX for GPUs newer than its SASS"
    sass, ptx = check.required_code(build_config.CUDA_ARCHS)
    assert {"sm_86", "sm_89", "sm_110"} <= sass and set(gpu_limits.CHECKED_ARCHS) >= sass
    assert check.required_code("8.0;9.0+PTX") == ({"sm_80", "sm_90"}, {"compute_90"})


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="no nvcc to ask which architectures it supports")
def test_nvcc_supports_every_listed_arch():
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    supported = set(subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=True).stdout.split())
    sass, ptx = _check_cuda_build().required_code(build_config.CUDA_ARCHS)
    assert sass <= supported, sass - supported
    assert {arch.replace("compute_", "sm_") for arch in ptx} <= supported


def _installed_cuda_code() -> tuple[set[str], set[str]]:
    spec = importlib.util.find_spec("crepa_kernels._C")
    if spec is None or not native.build_info()["cuda"]:
        return set(), set()
    check = _check_cuda_build()
    return check.embedded_code(check.find_cuobjdump(), Path(spec.origin))


def test_cuda_build_has_no_local_memory():
    sass, ptx = _installed_cuda_code()
    sass_required, ptx_required = _check_cuda_build().required_code(build_config.CUDA_ARCHS)
    if not (sass >= sass_required and ptx >= ptx_required):
        pytest.skip(f"no installed build for {build_config.CUDA_ARCHS} to inspect; building one takes minutes: "
                    "run `python tools/check_cuda_build.py` (CI does, in `make test`)")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_cuda_build.py")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
