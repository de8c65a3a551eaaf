"""Packaging, and the C++/CUDA extension crepa_kernels._C when torch is importable at build time.

* `pip install --no-build-isolation .` (torch present): builds crepa_kernels._C with ninja. A CUDAExtension when torch
  is a CUDA build and a CUDA toolkit with nvcc is found, or when FORCE_CUDA=1; a CppExtension otherwise.
  Architectures from TORCH_CUDA_ARCH_LIST (default: csrc/build_config.py DEFAULT_CUDA_ARCHS); MAX_JOBS bounds the
  parallel compiles.
* `pip install .` (isolated, no torch): the pure-Python package; the extension is compiled on first use.

Either way the sources ship inside the package (crepa_kernels/csrc) for that JIT fallback.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
sys.path.insert(0, str(CSRC))
import build_config  # noqa: E402  (csrc/build_config.py: the flags and sources, shared with the JIT loader)


class BuildPyWithSources(build_py):
    """Copies csrc/ into the package as crepa_kernels/csrc, where the JIT loader of an installed package looks."""

    def run(self):
        super().run()
        destination = Path(self.build_lib) / "crepa_kernels" / "csrc"
        destination.mkdir(parents=True, exist_ok=True)
        for source in sorted(CSRC.iterdir()):
            if source.suffix in (".h", ".cpp", ".cu", ".py"):
                shutil.copy2(source, destination / source.name)


def _wants_cuda(torch_module, cuda_home) -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch_module.version.cuda is not None and cuda_home is not None and (Path(cuda_home) / "bin" / "nvcc").exists()


def extensions():
    """(ext_modules, cmdclass) for the extension, or nothing when torch is not importable here."""
    cuda_home = build_config.cuda_home()
    if cuda_home:
        # before torch.utils.cpp_extension is imported: it settles CUDA_HOME at import time
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("setup.py: torch is not importable; building the pure-Python package (JIT extension on first use)")
        return [], {}
    cuda_home = cuda_home or cpp_extension.CUDA_HOME
    with_cuda = _wants_cuda(torch, cuda_home)
    sources = [str(Path(path).relative_to(ROOT)) for path in build_config.sources(with_cuda)]
    compile_args = {"cxx": list(build_config.CXX_FLAGS)}
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build_config.DEFAULT_CUDA_ARCHS)
        compile_args["cxx"].append(build_config.CUDA_DEFINE)
        compile_args["nvcc"] = build_config.NVCC_FLAGS + [build_config.CUDA_DEFINE]
        extension_class = cpp_extension.CUDAExtension
    else:
        extension_class = cpp_extension.CppExtension
    extension = extension_class(
        name="crepa_kernels._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args=compile_args,
        extra_link_args=list(build_config.LINK_FLAGS),
    )
    print(f"setup.py: building crepa_kernels._C with{'' if with_cuda else 'out'} CUDA")
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
