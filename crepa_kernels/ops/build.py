"""Building and loading the C++ extensions, shared by the "cpu"/"cuda" backends (ops/native.py) and "cuda_emulated"
(ops/cuda_emulated.py): where the sources are, their JIT builds with csrc/build_config.py's flags into torch's
extension cache, and loading each extension once, keeping the reason when it cannot load.

Nothing is compiled at import: only :meth:`Extension.load` builds.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent.parent
# A wheel ships the sources as package data; a source checkout has them at the top level.
CSRC_CANDIDATES = (PACKAGE / "csrc", PACKAGE.parent / "csrc")


def csrc_dir() -> Path | None:
    for candidate in CSRC_CANDIDATES:
        if (candidate / "build_config.py").exists():
            return candidate
    return None


def build_config(csrc: Path):
    """csrc/build_config.py as a module (plain Python, shipped beside the sources)."""
    spec = importlib.util.spec_from_file_location("crepa_kernels_build_config", csrc / "build_config.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    return config


def _check_prebuilt_is_ours() -> None:
    """ImportError unless crepa_kernels._C is a file of this package: an editable install's import finder maps
    the name to the checkout it was installed from, whose build lacks this checkout's sources. Checked before the
    import, since a loaded extension has registered its ops for good."""
    spec = importlib.util.find_spec(f"{PACKAGE.name}._C")
    if spec is None or spec.origin is None:
        raise ImportError("no prebuilt crepa_kernels._C")
    if Path(spec.origin).resolve().parent != PACKAGE:
        raise ImportError(f"crepa_kernels._C resolves to {spec.origin}, outside this package {PACKAGE}")


def _jit_build_native():
    """Compiles the shipped sources with ninja into torch's extension cache (rebuilt only when they change)."""
    csrc = csrc_dir()
    if csrc is None:
        raise RuntimeError(f"no prebuilt crepa_kernels._C and no C++ sources in {[str(c) for c in CSRC_CANDIDATES]}")
    config = build_config(csrc)
    home = config.cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)  # before cpp_extension settles its own guess at import
    from torch.utils import cpp_extension

    home = home or cpp_extension.CUDA_HOME
    with_cuda = bool(torch.cuda.is_available() and torch.version.cuda and home)
    if with_cuda:
        cpp_extension.CUDA_HOME = home
    name = "crepa_kernels_jit_cuda" if with_cuda else "crepa_kernels_jit_cpu"
    logger.warning("crepa_kernels: no prebuilt extension; loading the JIT build %s (compiled from %s on first use, "
                   "about a minute, then cached)", name, csrc)
    return cpp_extension.load(
        name=name,
        sources=config.sources(with_cuda, csrc),
        extra_cflags=config.CXX_FLAGS + ([config.CUDA_DEFINE] if with_cuda else []),
        extra_cuda_cflags=config.NVCC_FLAGS + [config.CUDA_DEFINE],
        extra_ldflags=config.LINK_FLAGS,
        extra_include_paths=[str(csrc)],
        with_cuda=with_cuda,
        verbose=False,
    )


def load_native():
    """The CPU/CUDA extension: the prebuilt crepa_kernels._C, else a JIT build of the shipped sources."""
    try:
        _check_prebuilt_is_ours()
        from .. import _C as module
    except ImportError as prebuilt_error:  # absent, another checkout's, or built against another torch
        logger.debug("crepa_kernels._C not importable: %s", prebuilt_error)
        module = _jit_build_native()
    return module


def load_emulated():
    """The CUDA kernels built by the host compiler against the HIP CPU Runtime (always a JIT build)."""
    csrc = csrc_dir()
    if csrc is None:
        raise RuntimeError(f"no C++ sources in {[str(c) for c in CSRC_CANDIDATES]}")
    config = build_config(csrc)
    root = config.hip_cpu_root(csrc)
    if root is None:
        raise RuntimeError(f"the HIP CPU Runtime was not found: set ${config.HIP_CPU_ROOT_VARIABLE} to its folder "
                           f"(holding include/hip/hip_runtime.h) or place it in ../shared/third_party/hip-cpu beside "
                           f"the checkout ({csrc.parent.parent / 'shared' / 'third_party' / 'hip-cpu'})")
    from torch.utils import cpp_extension

    logger.warning("crepa_kernels: building the emulated CUDA kernels against %s (first use: about a minute, then "
                   "cached)", root)
    return cpp_extension.load(
        name="crepa_kernels_jit_cuda_emulated",
        sources=config.emulated_sources(csrc),
        extra_cflags=config.EMULATED_CXX_FLAGS,
        extra_include_paths=[str(csrc), str(root / "include")],
        with_cuda=False,
        verbose=False,
    )


class Extension:
    """One extension module, loaded on first use and then kept; a failure is kept as the reason instead.

    ``build`` returns the module; ``setup(module)`` runs once after it loads (registrations, devices), inside the
    same attempt, so its failure is a reason too.
    """

    def __init__(self, description: str, build: Callable[[], object], setup: Callable[[object], None]):
        self._description = description
        self._build = build
        self._setup = setup
        self._lock = threading.Lock()
        self.module = None
        self.error: str | None = None

    def load(self):
        """The module, or None with the reason in ``error``."""
        with self._lock:
            if self.module is not None or self.error is not None:
                return self.module
            try:
                module = self._build()
                self._setup(module)
                self.module = module
            except Exception as error:  # a build failure is a reason to fall back, not a crash
                self.error = f"{self._description} failed to build or load: {type(error).__name__}: {error}"
            return self.module

    def require(self):
        """The module; RuntimeError with the reason when it cannot load."""
        module = self.load()
        if module is None:
            raise RuntimeError(self.error)
        return module

    def forget(self) -> None:
        """Forgets the outcome, so the next load tries again (tests; a loaded module stays registered)."""
        with self._lock:
            self.module = None
            self.error = None
