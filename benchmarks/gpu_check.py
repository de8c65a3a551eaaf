"""One command for the first person with a GPU (`make gpu-check`): the GPU tests, then the benchmark on the presets,
then one JSON and one markdown report that put each measured time beside the bytes-moved projection and flag
every failure, mismatch and shortfall.

    python benchmarks/gpu_check.py                        # writes gpu_check_results/gpu_check.{json,md}
    python benchmarks/gpu_check.py --skip-tests           # the benchmark and the report only
    python benchmarks/gpu_check.py --bench-args "--preset wan2.1 --dim 1536" --pytest-args "-x"

Exit status: 0 when nothing is flagged, 1 when something is (the report says what), 2 when it cannot run here
(no CUDA device: one line on stderr saying why).

Tests run: every test carrying the `gpu` marker, plus any test whose skip condition names CUDA (a few GPU tests
predate the marker). On a machine with a GPU none of them should skip: a skip is flagged too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
# A fused backend below this share of the copy bandwidth measured in the same run is flagged: a memory-bound
# kernel that reads each input once should come close to a copy.
MIN_SHARE_OF_COPY = 0.5
FUSED_BACKENDS = ("triton", "cuda")


# ---------------------------------------------------------------------------------------------------- pytest plugin

def _needs_a_gpu(item) -> bool:
    if item.get_closest_marker("gpu") is not None:
        return True
    return any("cuda" in str(mark.kwargs.get("reason", "")).lower() for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    """Loaded with `-p gpu_check`: keeps only the tests that need a GPU."""
    kept = [item for item in items if _needs_a_gpu(item)]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


# ---------------------------------------------------------------------------------------------------- running

def gpu_unavailable_reason() -> str | None:
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return None


def run_tests(out_dir: Path, pytest_args: list[str]) -> dict:
    junit = out_dir / "gpu_tests.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(BENCHMARKS), str(REPO),
                                                                    os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "pytest", str(REPO / "tests"), "-p", "gpu_check", "-q", "-rs",
               f"--junitxml={junit}", *pytest_args]
    done = subprocess.run(command, cwd=REPO, env=env)
    summary = summarize_junit(junit) if junit.exists() else {"cases": [], "error": "pytest wrote no report"}
    summary.update(command=command, returncode=done.returncode)
    return summary


def summarize_junit(path: Path) -> dict:
    """Each test case of a JUnit XML file: node id, outcome (passed, failed, error, skipped), message, seconds."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (found.get("message") or "").strip()
                break
        cases.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "message": message[:500], "seconds": float(case.get("time") or 0.0)})
    return {"cases": cases}


def run_benchmark(out_dir: Path, bench_args: list[str]) -> dict | None:
    path = out_dir / "bench.json"
    command = [sys.executable, str(BENCHMARKS / "bench_loss.py"), "--device", "cuda", "--json", str(path),
               "--markdown", *bench_args]
    subprocess.run(command, cwd=REPO)
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------------- report

def projection_rows(bench: dict) -> list[dict]:
    """Per case, implementation and pass: the measured median beside the time the pass's minimum bytes take at
    the copy bandwidth measured in the same run, and at the GPU's peak bandwidth when it is a known one."""
    from traffic import GPU_BANDWIDTH_TBPS

    gpu_name = ((bench.get("machine") or {}).get("gpu") or {}).get("name", "")
    peak = next((tbps for name, tbps in GPU_BANDWIDTH_TBPS.items() if name in gpu_name), None)
    copy_gbps = bench["copy_bandwidth"]["gbps"]
    rows = []
    for result in bench["results"]:
        case = result["case"]
        label = f"{case['preset']} D={case['dim']} {case['dtype']} {case['mode'][:3]} d={case['neighbors']}"
        for name, record in result["implementations"].items():
            if "error" in record:
                rows.append({"case": label, "implementation": name, "error": record["error"]})
                continue
            for pass_name, stats in record["passes"].items():
                moved = result["min_bytes"][pass_name]
                rows.append({
                    "case": label, "implementation": name, "pass": pass_name, "bytes": moved,
                    "measured_ms": stats["median_ms"],
                    "round_range_ms": [min(stats["round_medians_ms"]), max(stats["round_medians_ms"])],
                    "at_copy_ms": moved / copy_gbps / 1e6,
                    "at_peak_ms": moved / (peak * 1e12) * 1e3 if peak else None,
                    "share_of_copy": stats.get("pct_of_copy_bandwidth", 0.0) / 100,
                    "speedup_vs_compile": stats.get("speedup_vs_compile"),
                })
    return rows


def flags_for(tests: dict | None, bench: dict | None, rows: list[dict]) -> list[str]:
    """Everything a GPU owner should look at, one line each."""
    flags = []
    if tests is not None:
        for case in tests.get("cases", []):
            if case["outcome"] in ("failed", "error"):
                flags.append(f"test {case['outcome']}: {case['id']}: {case['message'].splitlines()[0] if case['message'] else ''}")
            elif case["outcome"] == "skipped":
                flags.append(f"test skipped on a GPU machine: {case['id']}: {case['message']}")
        if "error" in tests:
            flags.append(f"tests: {tests['error']}")
        elif not tests.get("cases"):
            flags.append("tests: no GPU test was collected")
    if bench is None:
        flags.append("benchmark: no results (it failed before writing its JSON)")
        return flags
    if bench.get("recompiles_during_timing"):
        flags.append(f"benchmark: torch.compile recompiled {bench['recompiles_during_timing']} graphs while timing")
    for row in rows:
        where = f"{row['implementation']} on {row['case']}"
        if "error" in row:
            flags.append(f"mismatch or failure: {where}: {row['error']}")
            continue
        if row["implementation"] not in FUSED_BACKENDS:
            continue
        if row["at_peak_ms"] is not None and row["measured_ms"] < row["at_peak_ms"]:
            flags.append(f"faster than its bytes at peak bandwidth ({row['measured_ms']:.3f} ms < "
                         f"{row['at_peak_ms']:.3f} ms): {where} {row['pass']}: the byte count or the timing is wrong")
        if row["share_of_copy"] < MIN_SHARE_OF_COPY:
            flags.append(f"shortfall: {where} {row['pass']}: {row['measured_ms']:.3f} ms against "
                         f"{row['at_copy_ms']:.3f} ms at copy bandwidth ({100 * row['share_of_copy']:.0f}% of copy, "
                         f"expected >= {100 * MIN_SHARE_OF_COPY:.0f}%)")
        if row["pass"] == "fwd+bwd" and row["speedup_vs_compile"] is not None and row["speedup_vs_compile"] < 1:
            flags.append(f"shortfall: {where}: slower than torch.compile ({row['speedup_vs_compile']:.2f}x)")
    return flags


def build_report(tests: dict | None, bench: dict | None, started: str) -> dict:
    rows = projection_rows(bench) if bench else []
    return {"timestamp": started, "gpu": (bench or {}).get("machine", {}).get("gpu"),
            "copy_bandwidth_gbps": bench["copy_bandwidth"]["gbps"] if bench else None,
            "tests": tests, "benchmark": bench, "projection": rows, "flags": flags_for(tests, bench, rows)}


def render_markdown(report: dict) -> str:
    gpu = report["gpu"] or {}
    lines = [f"# gpu-check {report['timestamp']}", "",
             f"GPU: {gpu.get('name', 'unknown')} (capability {gpu.get('capability', '?')}); copy bandwidth measured "
             f"in the run: " + (f"{report['copy_bandwidth_gbps']:.0f} GB/s" if report["copy_bandwidth_gbps"]
                                else "-"), ""]
    lines += ["## Flags", ""] + ([f"- {flag}" for flag in report["flags"]] or ["None."]) + [""]
    tests = report["tests"]
    if tests is not None:
        outcomes = {}
        for case in tests.get("cases", []):
            outcomes[case["outcome"]] = outcomes.get(case["outcome"], 0) + 1
        lines += ["## GPU tests", "", ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
                  or "none collected", ""]
    lines += ["## Measured against the bytes-moved projection", "",
              "Projection: the pass's minimum bytes (inputs read once, outputs written once) over the copy bandwidth "
              "measured in the same run, and over the GPU's peak bandwidth where it is known. Measured: median of "
              "the interleaved rounds (smallest-largest round median in brackets).", "",
              "| case | implementation | pass | MB | measured ms | at copy bandwidth ms | at peak ms | % of copy | "
              "vs compile |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["projection"]:
        if "error" in row:
            lines.append(f"| {row['case']} | {row['implementation']} | failed: {row['error']} | | | | | | |")
            continue
        low, high = row["round_range_ms"]
        peak = "-" if row["at_peak_ms"] is None else f"{row['at_peak_ms']:.3f}"
        ratio = "-" if row["speedup_vs_compile"] is None else f"{row['speedup_vs_compile']:.2f}x"
        lines.append(f"| {row['case']} | {row['implementation']} | {row['pass']} | {row['bytes'] / 1e6:.0f} | "
                     f"{row['measured_ms']:.3f} ({low:.3f}-{high:.3f}) | {row['at_copy_ms']:.3f} | {peak} | "
                     f"{100 * row['share_of_copy']:.0f}% | {ratio} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=REPO / "gpu_check_results")
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark and the report")
    parser.add_argument("--pytest-args", type=shlex.split, default=[], help="one string, passed on to pytest")
    parser.add_argument("--bench-args", type=shlex.split, default=[],
                        help="one string, passed on to bench_loss.py (default: its CUDA sweep over the presets)")
    args = parser.parse_args(argv)
    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"gpu-check: no GPU to check: {reason}", file=sys.stderr)
        return 2
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tests = None if args.skip_tests else run_tests(args.output_dir, args.pytest_args)
    bench = run_benchmark(args.output_dir, args.bench_args)
    report = build_report(tests, bench, started)
    (args.output_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (args.output_dir / "gpu_check.md").write_text(render_markdown(report))
    print(f"\ngpu-check: {len(report['flags'])} flags; report in {args.output_dir / 'gpu_check.md'} and "
          f"{args.output_dir / 'gpu_check.json'}")
    return 1 if report["flags"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCHMARKS))
    sys.exit(main())
