"""CI check of the CUDA build: the extension compiles for sm_80 and sm_90 and no kernel uses local memory.

Takes the installed crepa_kernels._C when it holds sm_80 and sm_90 code (`make test` installs it with
`pip install --no-build-isolation -e .`), else builds one with FORCE_CUDA=1 into a temporary directory. Prints
each kernel's resource use (cuobjdump -res-usage) and exits non-zero on a missing architecture or on any stack
frame / local memory (register spills land there). No GPU is needed.

    python tools/check_cuda_build.py [--rebuild]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_ARCHS = ("sm_80", "sm_90")
KERNELS = ("forward_kernel", "backward_kernel", "reduce_tokens_kernel")
FORBIDDEN = ("STACK", "LOCAL")


def find_cuobjdump() -> str:
    candidates = [shutil.which("cuobjdump"), Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:  # the triton wheel bundles one; some toolkits ship without it
        candidates.append(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return str(candidate)
    sys.exit("check_cuda_build: cuobjdump not found (CUDA toolkit or the triton wheel provides it)")


def installed_extension() -> Path | None:
    spec = importlib.util.find_spec("crepa_kernels._C")
    return Path(spec.origin) if spec and spec.origin else None


def build_extension(directory: Path) -> Path:
    env = dict(os.environ, FORCE_CUDA="1")
    env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    command = [sys.executable, "setup.py", "build_ext", "--build-lib", str(directory / "lib"),
               "--build-temp", str(directory / "temp")]
    print("check_cuda_build: building:", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    (library,) = (directory / "lib").rglob("_C*.so")
    return library


def resource_usage(cuobjdump: str, library: Path) -> list[tuple[str, str, dict[str, int]]]:
    """(arch, function, {REG, STACK, SHARED, LOCAL, ...}) for every kernel in the library."""
    output = subprocess.run([cuobjdump, "-res-usage", str(library)], check=True, capture_output=True, text=True).stdout
    rows, arch, function = [], None, None
    for line in output.splitlines():
        line = line.strip()
        if match := re.match(r"arch = (sm_\w+)", line):
            arch = match.group(1)
        elif match := re.match(r"Function (\S+):", line):
            function = match.group(1)
        elif function and line.startswith("REG:"):
            fields = {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            rows.append((arch, function, fields))
            function = None
    return rows


def short_name(mangled: str) -> str:
    """forward_kernel<float, vector> from the mangled name (template arguments: accumulator, 16-byte access)."""
    kernel = next((name for name in KERNELS if name in mangled), mangled)
    acc = "double" if "IdL" in mangled or "IdEE" in mangled else "float"
    vector = "vector" if "Lb1E" in mangled else ("scalar" if "Lb0E" in mangled else "")
    return f"{kernel}<{acc}{', ' + vector if vector else ''}>"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rebuild", action="store_true", help="build a fresh FORCE_CUDA=1 extension")
    args = parser.parse_args()
    cuobjdump = find_cuobjdump()

    library = None if args.rebuild else installed_extension()
    rows = resource_usage(cuobjdump, library) if library else []
    with tempfile.TemporaryDirectory() as temporary:
        if not {arch for arch, _, _ in rows} >= set(REQUIRED_ARCHS):
            if library:
                print(f"check_cuda_build: {library} lacks {REQUIRED_ARCHS} code, rebuilding", flush=True)
            library = build_extension(Path(temporary))
            rows = resource_usage(cuobjdump, library)
        print(f"check_cuda_build: {library}")
        print(f"{'arch':7} {'kernel':38} {'REG':>4} {'STACK':>6} {'SHARED':>7} {'LOCAL':>6}")
        failures = []
        for arch, function, fields in rows:
            print(f"{arch:7} {short_name(function):38} {fields.get('REG', 0):4} {fields.get('STACK', 0):6} "
                  f"{fields.get('SHARED', 0):7} {fields.get('LOCAL', 0):6}")
            failures += [f"{arch} {short_name(function)}: {key}={fields[key]}" for key in FORBIDDEN if fields.get(key)]
        for arch in REQUIRED_ARCHS:
            found = {name for a, function, _ in rows if a == arch for name in KERNELS if name in function}
            failures += [f"{arch}: no {name}" for name in KERNELS if name not in found]
    if failures:
        print("check_cuda_build: FAILED\n  " + "\n  ".join(failures))
        return 1
    print(f"check_cuda_build: OK, {len(rows)} kernels for {', '.join(REQUIRED_ARCHS)}, no stack frame or local memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
