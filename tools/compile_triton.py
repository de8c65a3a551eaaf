"""Ahead-of-time compile check of the Triton kernels for real GPUs, with no GPU needed.

Compiles every specialisation the dispatcher can launch for the usual widths D with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, prints one line per kernel (arch, dtype, D,
constexprs, registers, spills, shared memory) and exits non-zero on any register spill or compile error.

The launches come from crepa_kernels.ops.triton_loss.forward_launch / backward_launch on meta tensors, and the
signature, constexprs and divisibility attributes from Triton's own JIT binder, so the check compiles exactly
what the dispatcher would launch on contiguous inputs.

Registers and spills: triton 3.8 has CompiledKernel.n_regs / n_spills, but fills them only when it loads the
binary on a device (CompiledKernel._init_handles -> driver.utils.load_binary). Without a GPU they are read from
the `ptxas -v` log of the same ptxas run that produced the cubin (knobs.nvidia.dump_ptxas_log).

Usage: python tools/compile_triton.py [--quick] [--json]
"""
from __future__ import annotations

import os
import sys

# The interpreter replaces @triton.jit kernels by Python functions that cannot be compiled.
if os.environ.pop("TRITON_INTERPRET", "0") not in ("0", ""):
    print("compile_triton: ignoring TRITON_INTERPRET=1 (this script compiles for real GPUs)", file=sys.stderr)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from crepa_kernels.ops import triton_loss  # noqa: E402
from crepa_kernels.spec import LossOptions  # noqa: E402

ARCHS = (80, 90)
DIMS = (768, 1024, 1152, 1536)
DTYPES = (torch.bfloat16, torch.float32)
# F = 13 (CogVideoX) takes the single 16-frame window, F = 21 the 32-frame window, F = 49 the tiled path.
# Neighbour mode, d, tau and normalize_weights are runtime arguments, so they add no specialisation.
FRAME_COUNTS = (13, 21, 49)
# fp64 exists for gradcheck, not speed: checked for the single-window case only, to keep the run short.
EXTRA_CASES = ((torch.float64, 13),)


@dataclass
class Result:
    arch: int
    kernel: str
    dtype: str
    dim: int
    frames: int
    constexprs: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int


def _launches(dim: int, num_frames: int, dtype: torch.dtype):
    """The forward launch and both backward launches (with and without the target gradient) for this case."""
    options = LossOptions(neighbors=1)
    meta = dict(device="meta")
    proj = torch.empty(1, num_frames, 1350, dim, dtype=dtype, **meta)
    target = torch.empty_like(proj)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = triton_loss.stats_shapes(proj, target, options)
    norms = torch.empty(shapes["norms"], dtype=stat_dtype, **meta)
    band = torch.empty(shapes["band"], dtype=stat_dtype, **meta)
    partial = torch.empty(shapes["partial"], dtype=stat_dtype, **meta)
    grad_loss = torch.empty(1, num_frames, dtype=stat_dtype, **meta)
    yield "forward", triton_loss.forward_launch(proj, target, options, norms, band, partial)
    for target_grad in (True, False):
        grad_target = torch.empty_like(target) if target_grad else None
        yield "backward", triton_loss.backward_launch(grad_loss, proj, target, norms, band, options,
                                                      torch.empty_like(proj), grad_target)


def _ptxas_number(pattern: str, log: str) -> int:
    values = [int(value) for value in re.findall(pattern, log)]
    return max(values) if values else 0


def specialise(launch: triton_loss.Launch, arch: int):
    """What the JIT would compile for this launch on sm_<arch>: (source, options, cache key, named constexprs)."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound_args, specialization,
                                                              options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    named = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()
             if kernel.arg_names[path[0]].isupper()}
    return source, target, options, (arch, source.hash(), repr(sorted(options.__dict__.items()))), named


def compile_source(source, target, options):
    """Compiles for a GPU; returns (compiled kernel, ptxas -v log)."""
    log = io.StringIO()
    # always_compile: a cache hit would skip ptxas and leave no log to read
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        compiled = triton.compile(source, target=target, options=options.__dict__)
    if "Used" not in log.getvalue():
        raise RuntimeError(f"no ptxas -v report for {source.name}:\n{log.getvalue()}")
    return compiled, log.getvalue()


def run(archs=ARCHS, dims=DIMS, dtypes=DTYPES, frame_counts=FRAME_COUNTS, extra_cases=EXTRA_CASES, echo=True):
    """One line per (arch, kernel, dtype, D, F) case; cases that share a specialisation compile once."""
    results, compiled_by_key = [], {}
    cases = list(itertools.product(dtypes, frame_counts)) + list(extra_cases)
    for arch, (dtype, num_frames), dim in itertools.product(archs, cases, dims):
        for name, launch in _launches(dim, num_frames, dtype):
            source, target, options, key, constexprs = specialise(launch, arch)
            if key not in compiled_by_key:
                compiled_by_key[key] = compile_source(source, target, options)
            compiled, log = compiled_by_key[key]
            result = Result(
                arch=arch, kernel=name, dtype=str(dtype).removeprefix("torch."), dim=dim, frames=num_frames,
                constexprs=" ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(constexprs.items())),
                registers=_ptxas_number(r"Used (\d+) registers", log),
                spill_stores=_ptxas_number(r"(\d+) bytes spill stores", log),
                spill_loads=_ptxas_number(r"(\d+) bytes spill loads", log),
                shared_bytes=compiled.metadata.shared,
            )
            results.append(result)
            if echo:
                print(f"sm_{arch} {name:8s} {result.dtype:8s} D={dim:5d} F={num_frames:2d} {result.constexprs} "
                      f"regs={result.registers} spills={result.spill_stores}/{result.spill_loads} "
                      f"smem={result.shared_bytes}", flush=True)
    return results, len(compiled_by_key)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sm_90 only, D=768 and 1536, F=13 (for the tests)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    args = parser.parse_args()
    if args.quick:
        results, compiled = run(archs=(90,), dims=(768, 1536), frame_counts=(13,), extra_cases=(), echo=not args.json)
    else:
        results, compiled = run(echo=not args.json)
    spilling = [r for r in results if r.spill_stores or r.spill_loads]
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    print(f"{len(results)} cases, {compiled} distinct kernels compiled, {len(spilling)} cases with register spills",
          file=sys.stderr)
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
