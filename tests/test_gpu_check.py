"""benchmarks/gpu_check.py without a GPU: it refuses in one line, and its report (projection beside measurement,
flags) is right on synthetic inputs. Nothing here pretends to be a GPU run: the numbers below are made up to
exercise each flag."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402

MB = 10**6


def test_without_a_gpu_it_exits_non_zero_with_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # hides any GPU, so this holds on a GPU machine too
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--output-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no GPU to check: "), done.stderr
    assert not list(tmp_path.iterdir())  # no report of a run that did not happen


def synthetic_stats(median_ms, percent_of_copy, vs_compile):
    return {"median_ms": median_ms, "round_medians_ms": [median_ms * 0.9, median_ms, median_ms * 1.2],
            "pct_of_copy_bandwidth": percent_of_copy, "speedup_vs_compile": vs_compile}


def synthetic_bench():
    """Made-up benchmark JSON in bench_loss.py's format: one case, an H100 with 2000 GB/s of copy bandwidth."""
    min_bytes = {"fwd": 54 * MB, "bwd": 81 * MB, "fwd+bwd": 135 * MB}

    def record(fwd_ms, bwd_ms, percent, vs_compile):
        return {"passes": {"fwd": synthetic_stats(fwd_ms, percent, vs_compile),
                           "bwd": synthetic_stats(bwd_ms, percent, vs_compile),
                           "fwd+bwd": synthetic_stats(fwd_ms + bwd_ms, percent, vs_compile)}}

    case = {"preset": "cogvideox-5b", "dim": 768, "dtype": "bf16", "mode": "adjacent", "neighbors": 1}
    return {"machine": {"gpu": {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}},
            "copy_bandwidth": {"gbps": 2000.0}, "recompiles_during_timing": 0,
            "results": [{"case": case, "min_bytes": min_bytes, "implementations": {
                "compile": record(0.2, 0.3, 25.0, 1.0),
                "triton": record(0.04, 0.06, 70.0, 5.0),  # fine: no flag
                "cuda": record(0.01, 0.2, 30.0, 0.9),  # fwd faster than bytes at peak; below 50% of copy; slower
                "reference": {"error": "AssertionError: grad_proj differs from the reference by 0.5"},
            }}]}


def synthetic_tests(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok" time="0.5"/>'
        '<testcase classname="tests.test_a" name="test_bad" time="1.0"><failure message="assert 1 == 2">tb'
        '</failure></testcase>'
        '<testcase classname="tests.test_b" name="test_skip" time="0"><skipped message="needs a CUDA device"/>'
        '</testcase></testsuite></testsuites>')
    return gpu_check.summarize_junit(xml)


def test_junit_summary(tmp_path):
    cases = synthetic_tests(tmp_path)["cases"]
    assert [(c["id"], c["outcome"]) for c in cases] == [
        ("tests.test_a::test_ok", "passed"), ("tests.test_a::test_bad", "failed"),
        ("tests.test_b::test_skip", "skipped")]
    assert cases[1]["message"] == "assert 1 == 2"


def test_report_puts_the_projection_beside_the_measurement_and_flags_every_problem(tmp_path):
    report = gpu_check.build_report(synthetic_tests(tmp_path), synthetic_bench(), "2026-01-01T00:00:00+00:00")
    rows = {(r["implementation"], r.get("pass")): r for r in report["projection"]}
    triton = rows[("triton", "fwd")]
    assert triton["bytes"] == 54 * MB
    assert triton["at_copy_ms"] == pytest.approx(54 * MB / 2000e9 * 1e3)  # 0.027 ms
    assert triton["at_peak_ms"] == pytest.approx(54 * MB / 3.35e12 * 1e3)  # H100: 3.35 TB/s
    assert triton["round_range_ms"] == pytest.approx([0.036, 0.048])
    flags = report["flags"]
    assert not [f for f in flags if "triton" in f], flags
    expected = ["test failed: tests.test_a::test_bad: assert 1 == 2",
                "test skipped on a GPU machine: tests.test_b::test_skip",
                "mismatch or failure: reference on cogvideox-5b D=768 bf16 adj d=1: AssertionError",
                "faster than its bytes at peak bandwidth (0.010 ms < 0.016 ms): cuda on cogvideox-5b D=768 bf16 adj "
                "d=1 fwd",
                "shortfall: cuda on cogvideox-5b D=768 bf16 adj d=1 bwd: 0.200 ms against 0.041 ms at copy bandwidth "
                "(30% of copy, expected >= 50%)",
                "shortfall: cuda on cogvideox-5b D=768 bf16 adj d=1: slower than torch.compile (0.90x)"]
    for text in expected:
        assert any(flag.startswith(text) for flag in flags), (text, flags)
    assert len(flags) == 2 + 1 + 1 + 3 + 1  # the shortfall below 50% of copy is flagged for each pass

    markdown = gpu_check.render_markdown(report)
    assert "GPU: NVIDIA H100 80GB HBM3 (capability 9.0)" in markdown and "1 failed, 1 passed, 1 skipped" in markdown
    assert "| cogvideox-5b D=768 bf16 adj d=1 | triton | fwd | 54 | 0.040 (0.036-0.048) | 0.027 | 0.016 | 70% | 5.00x |" \
        in markdown
    assert all(f"- {flag}" in markdown for flag in flags)


def test_report_without_benchmark_results_is_flagged():
    report = gpu_check.build_report({"cases": []}, None, "2026-01-01T00:00:00+00:00")
    assert report["flags"] == ["tests: no GPU test was collected",
                               "benchmark: no results (it failed before writing its JSON)"]
    assert "None." not in gpu_check.render_markdown(report)


def test_the_plugin_keeps_only_tests_that_need_a_gpu(tmp_path):
    """Collects the real test suite through the plugin: every test it keeps is marked gpu or skips naming CUDA."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", str(BENCHMARKS.parent / "tests"), "-p", "gpu_check",
                           "--collect-only", "-q"], env=env, capture_output=True, text=True, timeout=300,
                          cwd=BENCHMARKS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    kept = [line for line in done.stdout.splitlines() if "::" in line]
    assert any("test_gpu_presets.py::test_backend_matches_reference_at_preset" in line for line in kept)
    assert any("test_compile_autocast.py::test_cuda_graph_capture_and_replay" in line for line in kept)
    assert not any("test_reference.py" in line or "test_reference_in_chunks" in line for line in kept)
