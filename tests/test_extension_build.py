"""The C++ extension's build: it loads (prebuilt or JIT), says how it was compiled, and ships its sources."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crepa_kernels.ops import extension

ROOT = Path(__file__).resolve().parent.parent
reason = extension.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"C++ extension unavailable: {reason}")


def test_build_info():
    info = extension.build_info()
    assert set(info) == {"cuda", "openmp", "torch", "cpu_isa"}
    assert info["cpu_isa"] in ("avx2", "baseline")
    assert info["openmp"], "without -fopenmp at::parallel_for runs on one thread"
    assert info["torch"] == torch.__version__.split("+")[0]


def test_sources_for_the_jit_fallback_are_found():
    csrc = extension._csrc_dir()
    assert csrc is not None
    config = extension._build_config(csrc)
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


def _installed_cuda_archs() -> set[str]:
    spec = importlib.util.find_spec("crepa_kernels._C")
    if spec is None or not extension.build_info()["cuda"]:
        return set()
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_cuda_build
    finally:
        sys.path.pop(0)
    return {arch for arch, _, _ in check_cuda_build.resource_usage(check_cuda_build.find_cuobjdump(), Path(spec.origin))}


def test_cuda_build_has_no_local_memory():
    archs = _installed_cuda_archs()
    if not archs >= {"sm_80", "sm_90"}:
        pytest.skip("no installed sm_80 + sm_90 build to inspect; building one takes minutes: "
                    "run `python tools/check_cuda_build.py` (CI does, from .ci/run)")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_cuda_build.py")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
