"""CI check of the CUDA build, no GPU needed.

Checks that the extension holds SASS for every architecture of build_config.CUDA_ARCHS and the PTX it lists, that
no kernel uses a stack frame or local memory (register spills land there), and that on each architecture every
kernel's static shared memory plus the most dynamic shared memory its launches can ask for fits the per-block
limit (crepa_kernels.gpu_limits; static is the cubin's figure minus the driver's reservation it includes from sm_90
on). The dynamic part comes from the launch planner the CUDA launcher uses: the forward and backward admit up to
the device's limit (refusing larger shapes in the forward), so their static shared memory must be 0; the token
reduction uses no dynamic shared memory. Also prints, per architecture, the dynamic shared memory
of the benchmark presets and the widest band each accumulation dtype can run.

Takes the installed crepa_kernels._C when it holds all of that code (`make test` installs it with
`pip install --no-build-isolation -e .`), else builds one with FORCE_CUDA=1 and the full list into a temporary
directory (minutes: nvcc compiles the kernels once per architecture).

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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "csrc"))
import build_config  # noqa: E402  (csrc/build_config.py: the architecture list setup.py builds)

from crepa_kernels import gpu_limits  # noqa: E402
from crepa_kernels.ops import native  # noqa: E402
from crepa_kernels.spec import LossOptions  # noqa: E402

KERNELS = ("forward_kernel", "backward_kernel", "reduce_tokens_kernel")
FORBIDDEN = ("STACK", "LOCAL")
# the kernels whose dynamic shared memory grows with the band: the planner admits up to the device's limit
BAND_KERNELS = ("forward_kernel", "backward_kernel")
# benchmarks/cases.py PRESETS (F, N) with the encoder widths of benchmarks/cases.py ENCODERS
PRESETS = {"cogvideox-5b": (13, 1350), "wan2.1": (21, 1560), "hunyuanvideo": (33, 3600)}
DIMS = (768, 1024, 1536)
ACC_DTYPES = (torch.float32, torch.float64)


def required_code(arch_list: str = build_config.CUDA_ARCHS) -> tuple[set[str], set[str]]:
    """({'sm_80', ...}, {'compute_120'}) from a TORCH_CUDA_ARCH_LIST string: SASS for each, PTX for '+PTX' ones."""
    sass, ptx = set(), set()
    for entry in arch_list.replace(" ", ";").split(";"):
        if not entry:
            continue
        number = entry.removesuffix("+PTX").replace(".", "")
        sass.add(f"sm_{number}")
        if entry.endswith("+PTX"):
            ptx.add(f"compute_{number}")
    return sass, ptx


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
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=build_config.CUDA_ARCHS)
    env.setdefault("MAX_JOBS", "1")
    command = [sys.executable, "setup.py", "build_ext", "--build-lib", str(directory / "lib"),
               "--build-temp", str(directory / "temp")]
    print(f"check_cuda_build: building for {build_config.CUDA_ARCHS}:", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    (library,) = (directory / "lib").rglob("_C*.so")
    return library


def embedded_code(cuobjdump: str, library: Path) -> tuple[set[str], set[str]]:
    """The SASS architectures ('sm_90') and PTX virtual architectures ('compute_120') the library embeds."""
    def listing(flag: str) -> str:
        result = subprocess.run([cuobjdump, flag, str(library)], capture_output=True, text=True)
        return result.stdout  # exits non-zero when there is no file of that kind
    sass = set(re.findall(r"\.(sm_\d+a?)\.cubin", listing("-lelf")))
    ptx = {f"compute_{number}" for number in re.findall(r"\.sm_(\d+a?)\.ptx", listing("-lptx"))}
    return sass, ptx


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


def kernel_name(mangled: str) -> str:
    return next((name for name in KERNELS if name in mangled), mangled)


def short_name(mangled: str) -> str:
    """forward_kernel<float, vector> from the mangled name (template arguments: accumulator, 16-byte access)."""
    acc = "double" if "IdL" in mangled or "IdEE" in mangled else "float"
    vector = "vector" if "Lb1E" in mangled else ("scalar" if "Lb0E" in mangled else "")
    return f"{kernel_name(mangled)}<{acc}{', ' + vector if vector else ''}>"


def max_dynamic_shared(kernel: str, limit: int) -> int:
    """The most dynamic shared memory a launch of ``kernel`` can ask for where a block may use ``limit`` bytes."""
    return limit if kernel in BAND_KERNELS else 0


def shared_need(shape, options: LossOptions, acc: torch.dtype) -> int:
    plan = native.cuda_launch_plan(shape, options, acc)
    return max(plan["forward"]["shared_bytes"], plan["backward"]["shared_bytes"])


def preset_lines() -> list[str]:
    """The presets' largest dynamic shared memory (d <= 3, both modes, D of the usual encoders)."""
    lines = []
    for name, (frames, tokens) in PRESETS.items():
        needs = {acc: max(shared_need((1, frames, tokens, dim), LossOptions(neighbors=d, neighbor_mode=mode), acc)
                          for dim in DIMS for d in (1, 2, 3) for mode in ("adjacent", "cumulative"))
                 for acc in ACC_DTYPES}
        lines.append(f"  {name} (F={frames}, d <= 3): at most {needs[torch.float32]} bytes of dynamic shared memory "
                     f"in fp32, {needs[torch.float64]} in fp64")
    return lines


def widest_full_band(limit: int, acc: torch.dtype, dim: int = 2048) -> int:
    """The most frames the kernels accept with every frame a neighbour of every other (cumulative d = F - 1)."""
    frames = 1
    while native.cuda_shape_unsupported_reason((1, frames + 1, 1, dim), LossOptions(
            neighbors=frames, neighbor_mode="cumulative"), acc, limit) is None:
        frames += 1
    return frames


def check_row(arch: str, function: str, fields: dict[str, int]) -> tuple[int, int, int | None, list[str]]:
    """One kernel's cuobjdump resource row -> (static shared bytes, most dynamic shared bytes, the arch's per-block
    limit or None, what is wrong with it)."""
    limit = gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN.get(arch)
    if limit is None:
        return 0, 0, None, [f"{arch}: no per-block shared memory limit in crepa_kernels.gpu_limits"]
    static = fields.get("SHARED", 0) - gpu_limits.RESERVED_SHARED_BYTES_IN_CUBIN[arch]
    dynamic = max_dynamic_shared(kernel_name(function), limit)
    failures = [f"{arch} {short_name(function)}: {key}={fields[key]}" for key in FORBIDDEN if fields.get(key)]
    if static + dynamic > limit:
        failures.append(f"{arch} {short_name(function)}: {static} bytes of static shared memory + up to {dynamic} "
                        f"dynamic > {limit}")
    return static, dynamic, limit, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rebuild", action="store_true", help="build a fresh FORCE_CUDA=1 extension")
    args = parser.parse_args()
    cuobjdump = find_cuobjdump()
    sass_required, ptx_required = required_code()

    library = None if args.rebuild else installed_extension()
    with tempfile.TemporaryDirectory() as temporary:
        if library is None or not all(a >= b for a, b in zip(embedded_code(cuobjdump, library),
                                                              (sass_required, ptx_required))):
            if library:
                print(f"check_cuda_build: {library} lacks code for {build_config.CUDA_ARCHS}, rebuilding", flush=True)
            library = build_extension(Path(temporary))
        sass, ptx = embedded_code(cuobjdump, library)
        rows = resource_usage(cuobjdump, library)
    print(f"check_cuda_build: {library}\n  SASS {sorted(sass)}, PTX {sorted(ptx)}")
    failures = [f"no SASS for {arch}" for arch in sorted(sass_required - sass)]
    failures += [f"no PTX for {arch}" for arch in sorted(ptx_required - ptx)]
    print(f"{'arch':7} {'kernel':38} {'REG':>4} {'STACK':>6} {'LOCAL':>6} {'static':>7} {'+ max dynamic':>14} "
          f"{'limit':>7}")
    for arch, function, fields in sorted(rows, key=lambda row: (int(row[0][3:]), short_name(row[1]))):
        static, dynamic, limit, row_failures = check_row(arch, function, fields)
        if limit is not None:
            print(f"{arch:7} {short_name(function):38} {fields.get('REG', 0):4} {fields.get('STACK', 0):6} "
                  f"{fields.get('LOCAL', 0):6} {static:7} {dynamic:14} {limit:7}")
        failures += row_failures
    for arch in sorted(sass_required):
        found = {kernel_name(function) for a, function, _ in rows if a == arch}
        failures += [f"{arch}: no {name}" for name in KERNELS if name not in found]
    print("check_cuda_build: the benchmark presets' shared memory\n" + "\n".join(preset_lines()))
    for arch in sorted(sass_required & set(gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN), key=lambda a: int(a[3:])):
        limit = gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[arch]
        widest = ", ".join(f"F={widest_full_band(limit, acc)} in {str(acc).removeprefix('torch.')}" for acc in ACC_DTYPES)
        print(f"  {arch} ({limit} bytes per block): every frame a neighbour of every other fits up to {widest}")
    if failures:
        print("check_cuda_build: FAILED\n  " + "\n  ".join(failures))
        return 1
    print(f"check_cuda_build: OK, {len(rows)} kernels for {', '.join(sorted(sass, key=lambda a: int(a[3:])))} + PTX {', '.join(sorted(ptx))}: "
          "no stack frame or local memory, shared memory within every limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
