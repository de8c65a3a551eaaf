"""Mutation testing: does the suite catch small, realistic bugs? (`make mutate`; not run in CI: too slow.)

For each mutant of tools/mutants.py, one at a time, in a scratch copy of the tree (never the checkout itself):
apply it, run only the tests covering its file (pytest -x -m "not slow"), and record killed (a test failed, named)
or survived, with the time. C++ mutants rebuild the CPU-only extension in place inside the scratch copy, and the
run checks that the crepa_kernels._C it loads is that scratch build and differs from the unmutated one: an
editable install's prebuilt _C, or a stale one, would otherwise test the unmutated kernels.

    python tools/mutate.py                       # every mutant; a table on stdout
    python tools/mutate.py --only 'cpu-*'        # a subset (fnmatch patterns on the names)
    python tools/mutate.py --doc docs/testing.md # also writes the result table into that file
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import COVERING_TESTS, MUTANTS, Mutant  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC_BEGIN, DOC_END = "<!-- mutate:begin -->", "<!-- mutate:end -->"
FAILED_LINE = re.compile(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", re.MULTILINE)


@dataclass
class Result:
    name: str
    path: str
    status: str  # "killed", "survived", or "invalid" (did not build / the wrong extension loaded)
    killer: str  # the first failing test, or why the mutant is invalid
    seconds: float


def check_applies(mutant: Mutant, root: Path = ROOT) -> None:
    """Raises unless the mutant's original text occurs exactly once in its file and the mutant changes it."""
    text = (root / mutant.path).read_text()
    count = text.count(mutant.original)
    if count != 1:
        raise ValueError(f"mutant {mutant.name}: its original text occurs {count} times in {mutant.path}, expected 1")
    if mutant.replacement == mutant.original:
        raise ValueError(f"mutant {mutant.name}: the replacement equals the original")
    if mutant.path not in COVERING_TESTS:
        raise ValueError(f"mutant {mutant.name}: no covering tests listed for {mutant.path}")


def tracked_files(root: Path) -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root, check=True, capture_output=True, text=True).stdout
    return [name for name in listed.split("\0") if name and (root / name).is_file()]


def make_scratch(root: Path) -> Path:
    """A copy of the working tree's files that git tracks or would (uncommitted edits included), plus its built
    extension."""
    scratch = Path(tempfile.mkdtemp(prefix="crepa-mutate-"))
    for name in tracked_files(root):
        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, scratch / name)
    for built in (root / "crepa_kernels").glob("_C*.so"):
        shutil.copy2(built, scratch / "crepa_kernels" / built.name)
    return scratch


# C++ files the CPU-only crepa_kernels._C does not compile: their mutants are built by the tests themselves, by the
# cuda_emulated backend's JIT build (in the scratch copy's TORCH_EXTENSIONS_DIR; ninja rebuilds what a changed file
# reaches) and by the sanitizer harness (cached per content of its sources).
EMULATED_ONLY = ("csrc/crepa_cuda_kernels.cu", "csrc/crepa_cuda.cpp", "csrc/crepa_cuda_portability.h")


def rebuilds_cpu_extension(mutant: Mutant) -> bool:
    return mutant.path.startswith("csrc/") and mutant.path not in EMULATED_ONLY


def hip_cpu_root() -> str | None:
    """The HIP CPU Runtime the checkout finds: a scratch copy elsewhere would not find it beside itself."""
    sys.path.insert(0, str(ROOT / "csrc"))
    try:
        import build_config
    finally:
        sys.path.pop(0)
    root = build_config.hip_cpu_root(ROOT / "csrc")
    return str(root) if root else None


def test_env(scratch: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(scratch), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               MAX_JOBS="1", CUDA_HOME="/nonexistent", PYTHONDONTWRITEBYTECODE="1",
               TORCH_EXTENSIONS_DIR=str(scratch / ".torch_ext"))
    if hip_cpu_root():
        env["HIP_CPU_ROOT"] = hip_cpu_root()
    env.pop("CREPA_KERNELS_BACKEND", None)
    return env


def extension_files(scratch: Path) -> list[Path]:
    return sorted((scratch / "crepa_kernels").glob("_C*.so"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_extension(scratch: Path) -> str | None:
    """CPU-only in-place build of crepa_kernels._C in the scratch copy; None, or why it failed."""
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=scratch, env=test_env(scratch),
                           capture_output=True, text=True)
    if build.returncode != 0:
        return "build failed: " + (build.stderr or build.stdout).strip().splitlines()[-1][:200]
    return None


def loaded_extension(scratch: Path) -> str:
    """The file of the crepa_kernels._C that the tests would load from the scratch copy."""
    probe = ("from crepa_kernels.ops import native; import crepa_kernels._C as c; "
             "assert native._load() is c, native._extension.error; print(c.__file__)")
    run = subprocess.run([sys.executable, "-c", probe], cwd=scratch, env=test_env(scratch), capture_output=True,
                         text=True)
    if run.returncode != 0:
        raise RuntimeError(f"the scratch extension does not load: {run.stderr.strip()[-300:]}")
    return run.stdout.strip()


def check_scratch_extension(scratch: Path, pristine: dict[str, str], mutated: bool) -> str | None:
    """None if the loaded _C is the scratch copy's and (for a C++ mutant) a fresh build of it; else the problem."""
    loaded = Path(loaded_extension(scratch)).resolve()
    if scratch.resolve() not in loaded.parents:
        return f"loaded {loaded}, not the scratch copy's extension"
    changed = digest(loaded) != pristine[loaded.name]
    if mutated and not changed:
        return "the rebuilt extension is identical to the unmutated one"
    if not mutated and changed:
        return "the scratch extension is not the unmutated build"
    return None


def run_tests(scratch: Path, selection: list[str], timeout: float) -> tuple[bool, str]:
    """(passed, first failing test or reason)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-rfE",
               *selection]
    try:
        run = subprocess.run(command, cwd=scratch, env=test_env(scratch), capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout:.0f} s"
    if run.returncode == 0:
        return True, ""
    if run.returncode == 5:
        raise RuntimeError(f"no tests collected by {selection}")
    match = FAILED_LINE.search(run.stdout)
    return False, match.group(2) if match else f"pytest exit code {run.returncode}"


def run_mutant(mutant: Mutant, scratch: Path, pristine: dict[str, str], timeout: float) -> Result:
    start = time.monotonic()
    source = scratch / mutant.path
    original_text = source.read_text()
    is_cpp = rebuilds_cpu_extension(mutant)
    saved = {path.name: path.read_bytes() for path in extension_files(scratch)} if is_cpp else {}
    try:
        source.write_text(original_text.replace(mutant.original, mutant.replacement, 1))
        if is_cpp:
            problem = build_extension(scratch) or check_scratch_extension(scratch, pristine, mutated=True)
            if problem:
                return Result(mutant.name, mutant.path, "invalid", problem, time.monotonic() - start)
        passed, killer = run_tests(scratch, COVERING_TESTS[mutant.path], timeout)
        return Result(mutant.name, mutant.path, "survived" if passed else "killed", killer, time.monotonic() - start)
    finally:
        source.write_text(original_text)
        for name, content in saved.items():  # the unmutated build back, without rebuilding
            (scratch / "crepa_kernels" / name).write_bytes(content)


def markdown(results: list[Result], command: str, wall: float) -> str:
    killed = sum(r.status == "killed" for r in results)
    valid = sum(r.status != "invalid" for r in results)
    lines = [
        f"`{command}`: **{killed} of {valid} mutants killed ({100 * killed / max(valid, 1):.0f}%)**, "
        f"{wall / 60:.0f} min of mutant runs in all.",
        "",
        "| mutant | file | result | first failing test | s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| `{r.name}` | `{r.path}` | {r.status} | {r.killer and f'`{r.killer}`'} | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def write_doc(path: Path, table: str) -> None:
    text = path.read_text()
    begin, end = text.index(DOC_BEGIN) + len(DOC_BEGIN), text.index(DOC_END)
    path.write_text(text[:begin] + "\n" + table + text[end:])


def report_from(files: list[Path], doc: Path | None) -> int:
    """The table of earlier runs' results, in the order of MUTANTS; mutants no run covered are listed as missing."""
    found = {}
    for path in files:
        found.update({r["name"]: Result(**r) for r in json.loads(path.read_text())})
    results = [found[m.name] for m in MUTANTS if m.name in found]
    missing = [m.name for m in MUTANTS if m.name not in found]
    command = "make mutate" + (f" (merged from {len(files)} runs)" if len(files) > 1 else "")
    table = markdown(results, command, sum(r.seconds for r in results))
    if missing:
        table += f"\nNot run: {', '.join(missing)}\n"
    print(table)
    if doc:
        write_doc(doc, table)
    return 0 if all(r.status == "killed" for r in results) and not missing else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=["*"], help="fnmatch patterns of mutant names")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant's tests")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not first check that the unmutated tree passes each test selection")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--doc", type=Path, help=f"write the table between {DOC_BEGIN} and {DOC_END} of this file")
    parser.add_argument("--keep-scratch", action="store_true")
    parser.add_argument("--table-from", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: the table of these --json results (a later file wins for a mutant)")
    args = parser.parse_args()
    if args.table_from:
        return report_from(args.table_from, args.doc)

    selected = [m for m in MUTANTS if any(fnmatch.fnmatch(m.name, pattern) for pattern in args.only)]
    for mutant in MUTANTS:
        check_applies(mutant)
    if not selected:
        parser.error(f"no mutant matches {args.only}")
    started = time.monotonic()
    scratch = make_scratch(ROOT)
    print(f"scratch copy: {scratch}", flush=True)
    try:
        if not extension_files(scratch) or any(rebuilds_cpu_extension(m) for m in selected):
            # the unmutated CPU-only build: what every mutant's tests load, and what a C++ mutant's build must differ from
            problem = build_extension(scratch)
            if problem:
                raise RuntimeError(problem)
        pristine = {path.name: digest(path) for path in extension_files(scratch)}
        problem = check_scratch_extension(scratch, pristine, mutated=False)
        if problem:
            raise RuntimeError(problem)
        if not args.skip_baseline:
            for path in sorted({m.path for m in selected}):
                passed, failure = run_tests(scratch, COVERING_TESTS[path], args.timeout)
                if not passed:
                    raise RuntimeError(f"the unmutated tree fails {COVERING_TESTS[path]}: {failure}")
                print(f"baseline ok: {' '.join(COVERING_TESTS[path])}", flush=True)
        results = []
        for mutant in selected:
            result = run_mutant(mutant, scratch, pristine, args.timeout)
            results.append(result)
            print(f"{result.status:8} {result.seconds:5.0f} s  {mutant.name:32} {result.killer}", flush=True)
            if args.json:  # after every mutant, so an interrupted run keeps what it found
                args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    finally:
        if args.keep_scratch:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    command = "make mutate" + (f" ARGS=\"--only {' '.join(args.only)}\"" if args.only != ["*"] else "")
    wall = time.monotonic() - started
    table = markdown(results, command, wall)
    print(table)
    if args.doc:
        write_doc(args.doc, table)
    return 0 if all(r.status == "killed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
