"""Ahead-of-time compile check of the Triton kernels for real GPUs, with no GPU needed.

Compiles every specialisation the dispatcher launches for the cases below with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for sm_80, sm_86, sm_89 and sm_90, prints one
line per distinct kernel (arch, kernel, constexprs, warps and stages, registers, spills, stack, shared memory,
approximate instructions) and exits non-zero on any register spill or stack frame (local memory), any kernel needing
more shared memory per block than the architecture allows, any approximate or flush-to-zero floating-point
instruction in the PTX, or any compile error.

The cases cover what real calls specialise on: the frame windows the tiling makes (16 frames, 32 frames in one
window, in halo mode and in shifted mode), every input dtype and the mixed pairs, the target gradient on and off,
N divisible by 16 and not, the usual widths D. Neighbour ranges reach the kernels as runtime arguments marked
do_not_specialize, so they change the specialisation only through the tiling (FRAMES, SHIFTED); eps and the
coefficient table as tensors (pointer arguments, built on the meta device here), so the weights never do.

The token relation distillation kernels (crepa_kernels/ops/relation_triton.py: loss and gradient, RelationCase)
are compiled too, on VideoREPA's full-resolution sample: bf16 with every pair rule, fp16, fp32 and the fp32
projector with bf16 features, with the proj gradient alone and with both.

The launches come from crepa_kernels.ops.triton_loss.forward_launch / backward_launches on meta tensors, with the
launch configuration the dispatcher picks for each architecture (the shifted tiling's differs below sm_90), and the
signature, constexprs and divisibility attributes from Triton's own JIT binder, so the check compiles exactly
what the dispatcher would launch on contiguous inputs. Cases that share a specialisation compile once; results
are cached by specialisation (source hash, options, arch, Triton version) in ~/.cache/crepa_kernels, and the
distinct kernels compile in a process pool.

Registers and spills: triton 3.8 has CompiledKernel.n_regs / n_spills, but fills them only when it loads the
binary on a device (CompiledKernel._init_handles -> driver.utils.load_binary). Without a GPU they are read from
the `ptxas -v` log of the same ptxas run that produced the cubin (knobs.nvidia.dump_ptxas_log).

Usage: python tools/compile_triton.py [--quick] [--json] [--jobs N] [--no-cache]
"""
from __future__ import annotations

import os
import sys

# The interpreter replaces @triton.jit kernels by Python functions that cannot be compiled.
if os.environ.pop("TRITON_INTERPRET", "0") not in ("0", ""):
    print("compile_triton: ignoring TRITON_INTERPRET=1 (this script compiles for real GPUs)", file=sys.stderr)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from crepa_kernels import gpu_limits  # noqa: E402
from crepa_kernels.ops import triton_loss  # noqa: E402
from crepa_kernels.spec import LossOptions, band_offsets  # noqa: E402

# Maximum shared memory per thread block with the opt-in, in bytes (crepa_kernels/gpu_limits.py: the SM's capacity
# less the 1 KB reserved per block; CUDA Programming Guide, Ampere / Ada / Hopper tuning guides). Triton's
# metadata.shared counts what the kernel allocates, without that reservation.
ARCHS = (80, 86, 89, 90)
SHARED_LIMITS = {arch: gpu_limits.SHARED_BYTES_PER_BLOCK_OPTIN[f"sm_{arch}"] for arch in ARCHS}
DIMS = (768, 1024, 1152, 1536)
TOKENS = (1350, 3600)  # N not divisible by 16 (CogVideoX), and divisible (HunyuanVideo)
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
# (proj, target) dtypes: each 16-bit dtype alone, fp32, the mixed pairs of autocast or a frozen bf16 encoder
# (the README's fp32 projector with bf16 features), fp64 (gradcheck)
DTYPES = ((BF16, BF16), (FP16, FP16), (FP32, FP32), (FP32, BF16), (BF16, FP32), (FP64, FP64))
# (F, options): every frame tiling: one 16-frame window, one 32-frame window, halo mode (d = 1; the widest
# halo, 9), shifted mode (one and two windows away)
FRAME_CASES = (
    (13, dict(neighbors=1)),
    (21, dict(neighbors=2, neighbor_mode="cumulative")),
    (49, dict(neighbors=1)),
    (33, dict(neighbors=9, neighbor_mode="cumulative")),
    (61, dict(neighbors=25, neighbor_mode="cumulative", normalize_weights=True)),
    (61, dict(neighbors=57)),
)
# approximate or flush-to-zero floating-point instructions: none may reach the result (issue 12, defect 5)
APPROXIMATE = re.compile(r"\b[a-z0-9]+\.(?:approx|full)\.[a-z0-9.]*|\b[a-z0-9]+\.ftz\.[a-z0-9.]*")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crepa_kernels" / \
    f"compile_triton-{triton.__version__}-stack.json"  # entries with stack_bytes


@dataclass
class Result:
    arch: int
    kernel: str
    dtypes: str
    cases: int  # how many (dtype, D, N, F, options, target grad) cases launch this specialisation
    constexprs: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int  # the stack frame per thread: local memory, as spills cost
    shared_bytes: int
    shared_limit: int
    approximate: list  # distinct approximate / ftz instructions in the PTX


@dataclass(frozen=True)
class Case:
    proj_dtype: torch.dtype
    target_dtype: torch.dtype
    dim: int
    num_tokens: int
    num_frames: int
    options: tuple  # sorted LossOptions keywords


def cases(dtypes=DTYPES, dims=DIMS, tokens=TOKENS, frame_cases=FRAME_CASES):
    for (proj_dtype, target_dtype), dim, num_tokens, (num_frames, options) in itertools.product(
            dtypes, dims, tokens, frame_cases):
        yield Case(proj_dtype, target_dtype, dim, num_tokens, num_frames, tuple(sorted(options.items())))


# ---- token_relation_loss (crepa_kernels/ops/relation_triton.py): its loss and gradient kernels
@dataclass(frozen=True)
class RelationCase:
    proj_dtype: torch.dtype
    target_dtype: torch.dtype
    dim: int
    pairs: str


# every pair rule in bf16; the other dtypes (fp16, fp32, the fp32 projector with bf16 features) with "all"
RELATION_DTYPES = ((FP16, FP16), (FP32, FP32), (FP32, BF16))


def relation_cases():
    for pairs in ("all", "spatial", "temporal"):
        yield RelationCase(BF16, BF16, 1024, pairs)
    for proj_dtype, target_dtype in RELATION_DTYPES:
        yield RelationCase(proj_dtype, target_dtype, 1024, "all")


def relation_launches(case: RelationCase):
    """(name, launch): the loss kernel and the gradient kernel with the proj gradient alone and with both, on
    VideoREPA's full-resolution sample (F=24, N=1350)."""
    from crepa_kernels.ops import relation_triton
    from crepa_kernels.relation_spec import RelationOptions

    meta = dict(device="meta")
    batch, frames, tokens_per_frame = 1, 24, 1350
    tokens = frames * tokens_per_frame
    p = torch.empty((batch, tokens, case.dim), dtype=case.proj_dtype, **meta)
    y = torch.empty((batch, tokens, case.dim), dtype=case.target_dtype, **meta)
    acc = FP64 if FP64 in (case.proj_dtype, case.target_dtype) else FP32
    norms = torch.empty((batch, tokens), dtype=acc, **meta)
    weight = torch.empty((tokens,), dtype=acc, **meta)
    frame_weight = torch.empty((batch, frames), dtype=acc, **meta)
    scalars = torch.empty((2,), dtype=FP64, **meta)
    options = RelationOptions(pairs=case.pairs, margin=0.1)
    yield "relation_loss", relation_triton.loss_launch(p, y, norms, norms, weight, norms, scalars, options,
                                                       tokens_per_frame)
    for both in (False, True):
        grad = torch.empty((batch, tokens, case.dim), dtype=acc, **meta)
        yield "relation_grad", relation_triton.grad_launch(p, y, norms, norms, weight, frame_weight, grad,
                                                           grad if both else None, scalars, options,
                                                           tokens_per_frame)


def launches(case: Case, arch: int):
    """(name, launch) for the forward and both backwards (target gradient on and off), as the dispatcher would
    launch them on an sm_<arch> GPU."""
    if isinstance(case, RelationCase):
        yield from relation_launches(case)
        return
    capability = divmod(arch, 10)
    options = LossOptions(**dict(case.options))
    meta = dict(device="meta")
    shape = (1, case.num_frames, case.num_tokens, case.dim)
    proj = torch.empty(shape, dtype=case.proj_dtype, **meta)
    target = torch.empty(shape, dtype=case.target_dtype, **meta)
    stat_dtype = FP64 if FP64 in (case.proj_dtype, case.target_dtype) else FP32
    slot_offsets = band_offsets(options, case.num_frames)
    shapes = triton_loss.stats_shapes(proj, target, slot_offsets)
    norms, band, partial = (torch.empty(shapes[k], dtype=stat_dtype, **meta) for k in ("norms", "band", "partial"))
    coefficients = torch.empty((case.num_frames, len(slot_offsets)), dtype=stat_dtype, **meta)
    grad_loss = torch.empty(shape[:2], dtype=stat_dtype, **meta)
    eps = torch.empty((), dtype=FP64, **meta)
    yield "forward", triton_loss.forward_launch(proj, target, coefficients, slot_offsets, norms, band, partial, eps,
                                                capability)
    for target_grad in (True, False):
        grad_target = torch.empty_like(target) if target_grad else None
        for launch in triton_loss.backward_launches(grad_loss, proj, target, coefficients, slot_offsets, norms, band,
                                                    torch.empty_like(proj), grad_target, eps, capability):
            yield "backward", launch


def specialise(launch: triton_loss.Launch, arch: int):
    """What the JIT would compile for this launch on sm_<arch>: (source, target, options, key, named constexprs)."""
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
    named.update(num_warps=options.num_warps, num_stages=options.num_stages)  # they too set registers and smem
    options_text = repr(sorted(options.__dict__.items()))
    key = hashlib.sha256(f"{arch}|{source.hash()}|{options_text}".encode()).hexdigest()
    return source, target, options, key, named


def _ptxas_number(pattern: str, log: str) -> int:
    values = [int(value) for value in re.findall(pattern, log)]
    return max(values) if values else 0


def compile_source(source, target, options) -> dict:
    """Compiles for a GPU; returns what the checks read: registers, spills, shared memory, approximate maths."""
    log = io.StringIO()
    # always_compile: a cache hit would skip ptxas and leave no log to read
    with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True
        compiled = triton.compile(source, target=target, options=options.__dict__)
    log = log.getvalue()
    if "Used" not in log:
        raise RuntimeError(f"no ptxas -v report for {source.name}:\n{log}")
    return dict(registers=_ptxas_number(r"Used (\d+) registers", log),
                spill_stores=_ptxas_number(r"(\d+) bytes spill stores", log),
                spill_loads=_ptxas_number(r"(\d+) bytes spill loads", log),
                stack_bytes=_ptxas_number(r"(\d+) bytes stack frame", log),
                shared_bytes=compiled.metadata.shared,
                approximate=sorted(set(APPROXIMATE.findall(compiled.asm["ptx"]))))


def _compile_job(job) -> tuple[str, dict]:
    """In a worker process: rebuild the launch of (case, launch index, arch) and compile it."""
    case, index, arch = job
    _, launch = list(launches(case, arch))[index]
    source, target, options, key, _ = specialise(launch, arch)
    return key, compile_source(source, target, options)


def _load_cache(use: bool) -> dict:
    if not use or not CACHE.exists():
        return {}
    try:
        return json.loads(CACHE.read_text())
    except ValueError:
        return {}


def run(archs=ARCHS, case_list=None, jobs=2, use_cache=True, echo=True):
    """One Result per distinct (arch, kernel specialisation), with how many cases launch it."""
    case_list = list(cases()) + list(relation_cases()) if case_list is None else case_list
    distinct = {}  # key -> [arch, name, dtypes, constexprs, job, count]
    for case, arch in itertools.product(case_list, archs):
        for index, (name, launch) in enumerate(launches(case, arch)):
            _, _, _, key, constexprs = specialise(launch, arch)
            if key in distinct:
                distinct[key][5] += 1
                continue
            text = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(constexprs.items()))
            dtypes = f"{str(case.proj_dtype)[6:]}/{str(case.target_dtype)[6:]}"
            distinct[key] = [arch, name, dtypes, text, (case, index, arch), 1]
    cache = _load_cache(use_cache)
    todo = [entry[4] for key, entry in distinct.items() if key not in cache]
    if todo:
        if jobs > 1 and len(todo) > 1:
            with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
                cache.update(pool.map(_compile_job, todo, chunksize=1))
        else:
            cache.update(map(_compile_job, todo))
        if use_cache:
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            CACHE.write_text(json.dumps(cache))
    results = []
    for key, (arch, name, dtypes, constexprs, _, count) in sorted(distinct.items(), key=lambda item: item[1][:4]):
        result = Result(arch=arch, kernel=name, dtypes=dtypes, cases=count, constexprs=constexprs,
                        shared_limit=SHARED_LIMITS[arch], **cache[key])
        results.append(result)
        if echo:
            print(f"sm_{arch} {name:8s} {dtypes:17s} {constexprs} regs={result.registers} "
                  f"spills={result.spill_stores}/{result.spill_loads} stack={result.stack_bytes} "
                  f"smem={result.shared_bytes}/{result.shared_limit}"
                  f"{' approx=' + ','.join(result.approximate) if result.approximate else ''} ({count} cases)",
                  flush=True)
    return results, len(todo)


def failures(results) -> list[str]:
    problems = []
    for r in results:
        where = f"sm_{r.arch} {r.kernel} {r.dtypes} {r.constexprs}"
        if r.spill_stores or r.spill_loads or r.stack_bytes:
            problems.append(f"{where}: spills {r.spill_stores}/{r.spill_loads} bytes, {r.stack_bytes}-byte stack")
        if r.shared_bytes > r.shared_limit:
            problems.append(f"{where}: {r.shared_bytes} bytes of shared memory > {r.shared_limit}")
        approximate = set(r.approximate)
        if approximate:
            problems.append(f"{where}: approximate maths in the PTX: {', '.join(sorted(approximate))}")
    return problems


# for the tests: sm_90, the HunyuanVideo shape, bf16 and the README's fp32 projector with bf16 features, one
# 16-frame window and the shifted mode
QUICK = dict(archs=(90,), case_list=list(cases(dtypes=((BF16, BF16), (FP32, BF16)), dims=(1536,), tokens=(3600,),
                                              frame_cases=(FRAME_CASES[0], FRAME_CASES[-1]))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="sm_90, D=1536, N=3600, bf16 and fp32/bf16, F=13 and F=61 d=57 (for the tests)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    parser.add_argument("--jobs", type=int, default=2, help="compile in this many processes (default 2)")
    parser.add_argument("--no-cache", action="store_true", help=f"ignore and do not write {CACHE}")
    args = parser.parse_args()
    chosen = QUICK if args.quick else {}
    results, compiled = run(**chosen, jobs=args.jobs, use_cache=not args.no_cache, echo=not args.json)
    problems = failures(results)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    for problem in problems:
        print(f"compile_triton: {problem}", file=sys.stderr)
    print(f"{sum(r.cases for r in results)} launches, {len(results)} distinct kernels ({compiled} compiled now, the "
          f"rest cached), {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
