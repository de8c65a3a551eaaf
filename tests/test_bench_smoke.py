"""benchmarks/bench_loss.py on a tiny shape: it runs, its timings are interleaved, and its JSON holds every field
with consistent numbers."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_loss  # noqa: E402
from measure import Timer  # noqa: E402
from report import readme_table  # noqa: E402
from rounds import Slot, run_rounds, steps_per_round  # noqa: E402
from traffic import eager_bytes_estimate, minimum_bytes  # noqa: E402

SHAPE = dict(batch=2, frames=3, tokens=256, dim=96)  # 2 x 196 KB fp32 inputs: RSS growth is above page noise
TINY = ["--batch", "2", "--frames", "3", "--tokens", "256", "--dim", "96", "--dtype", "fp32",
        "--neighbors", "1", "--mode", "adjacent", "--min-reps", "3", "--max-reps", "5", "--budget", "0.01",
        "--copy-mb", "16", "--threads", "1", "--rounds", "3"]  # one thread: small ops on a busy machine wait on OpenMP
ROUNDS = 3


def expected_min_bytes(batch, frames, tokens, dim, element_size=4):
    tensor = batch * frames * tokens * dim * element_size
    loss = batch * frames * 4
    forward = 2 * tensor + loss
    backward = 2 * tensor + loss + tensor  # reads both inputs and grad_L, writes grad_proj (target frozen)
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}


def check_pass_statistics(stats, min_bytes, reps_range):
    assert stats["min_ms"] <= stats["q1_ms"] <= stats["median_ms"] <= stats["q3_ms"] <= stats["max_ms"]
    assert stats["min_ms"] > 0
    assert reps_range[0] <= stats["reps"] <= reps_range[1]
    assert stats["gbps"] == pytest.approx(min_bytes / (stats["median_ms"] / 1e3) / 1e9)
    rounds = stats["round_medians_ms"]
    assert len(rounds) == ROUNDS and all(stats["min_ms"] <= ms <= stats["max_ms"] for ms in rounds)
    assert stats["round_spread_pct"] == pytest.approx(100 * (max(rounds) - min(rounds)) / statistics.median(rounds))
    low, high = stats["pct_of_copy_bandwidth_range"]
    assert 0 < low <= stats["pct_of_copy_bandwidth"] <= high


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory):
    """The real command line, as `make bench ARGS=...` runs it, with every usable implementation."""
    path = tmp_path_factory.mktemp("bench") / "out.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_loss.py"), *TINY, "--json", str(path), "--plot",
                          "--markdown"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(path.read_text()), run.stdout, path


def test_report_describes_machine_versions_and_options(cli_report):
    report, _, _ = cli_report
    for key in ("timestamp", "command", "device", "machine", "versions", "options", "methodology", "copy_bandwidth",
                "memory_probe", "backends", "implementations_run", "skipped", "results"):
        assert key in report, key
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cpu_count"] >= 1 and machine["memory_bytes"] > 0
    assert machine["torch_threads"] == 1 and "gpu" in machine
    assert report["versions"]["torch"] == torch.__version__
    assert {"python", "triton", "crepa_kernels"} <= set(report["versions"])
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    copy = report["copy_bandwidth"]
    assert copy["gbps"] > 0 and len(copy["round_gbps"]) == ROUNDS and min(copy["round_gbps"]) > 0
    assert copy["bytes"] == 2 * 16 * 2**20
    assert report["recompiles_during_timing"] == 0
    assert len(report["machine"]["load_average_end"]) == 3
    # every backend is either run or skipped with its reason
    for name in bench_loss.IMPLEMENTATIONS:
        assert (name in report["implementations_run"]) != (name in report["skipped"]), name
    assert {"eager", "compile", "reference"} <= set(report["implementations_run"])


def test_every_implementation_has_every_measurement(cli_report):
    report, _, _ = cli_report
    (result,) = report["results"]
    case = result["case"]
    assert (case["batch"], case["frames"], case["tokens"], case["dim"]) == tuple(SHAPE.values())
    assert (case["dtype"], case["neighbors"], case["mode"], case["target_grad"]) == ("fp32", 1, "adjacent", False)
    assert result["min_bytes"] == expected_min_bytes(**SHAPE)
    records = result["implementations"]
    assert list(records) == report["implementations_run"]
    for name, record in records.items():
        assert "error" not in record, (name, record)
        assert record["first_call_s"] > 0
        passes = record["passes"]
        assert set(passes) == {"fwd", "bwd", "fwd+bwd"}
        assert record["steps_per_round"] == 1  # --min-reps 3 over 3 rounds, --max-reps 5
        for pass_name, stats in passes.items():
            check_pass_statistics(stats, result["min_bytes"][pass_name], (3, 5))
            for baseline in ("eager", "compile"):
                # ratios are paired within each round, then summarised
                base = records[baseline]["passes"][pass_name]["round_medians_ms"]
                ratios = [b / t for b, t in zip(base, stats["round_medians_ms"])]
                assert stats[f"speedup_vs_{baseline}"] == pytest.approx(statistics.median(ratios))
                assert stats[f"speedup_vs_{baseline}_range"] == pytest.approx([min(ratios), max(ratios)])
        # fwd+bwd is per step fwd + bwd, so its extremes bound theirs
        assert passes["fwd+bwd"]["min_ms"] >= passes["fwd"]["min_ms"] + passes["bwd"]["min_ms"] - 1e-9
        assert passes["fwd+bwd"]["max_ms"] <= passes["fwd"]["max_ms"] + passes["bwd"]["max_ms"] + 1e-9
        if report["memory_probe"] is not None:
            # the peak of a training step includes the gradient it returns
            assert record["memory"]["peak_bytes"] >= result["grad_bytes"], name
            assert record["memory"]["held_bytes"] <= record["memory"]["peak_bytes"], name
    assert records["eager"]["passes"]["fwd"]["speedup_vs_eager"] == 1.0
    assert records["compile"]["compile_s"] >= 0


def test_memory_probe_measures_a_known_allocation(cli_report):
    report, _, _ = cli_report
    probe = report["memory_probe"]
    if probe is None:
        pytest.skip(f"memory not measurable here: {report['memory_method_unavailable']}")
    assert probe["measured_held_bytes"] == pytest.approx(probe["allocated_bytes"], rel=0.05)


def test_stdout_table_and_plot(cli_report):
    report, stdout, path = cli_report
    for name in report["implementations_run"]:
        assert f"\n  {name}" in stdout
    for column in ("median ms", "IQR ms", "rounds ms", "GB/s", "%copy", "vs eager", "vs compile", "held MB",
                   "peak MB"):
        assert column in stdout
    assert "summary" in stdout and str(path) in stdout
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_baselines_speedups_are_absent(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert bench_loss.main([*TINY, "--backends", "reference", "--json", str(path)]) == 0
    (result,) = json.loads(path.read_text())["results"]
    stats = result["implementations"]["reference"]["passes"]["fwd"]
    assert stats["speedup_vs_eager"] is None and stats["speedup_vs_compile"] is None
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  reference")]
    assert row.split()[7:9] == ["-", "-"]  # the vs eager and vs compile columns


def test_a_baseline_that_disagrees_with_the_package_is_reported_not_timed(tmp_path, monkeypatch):
    correct = bench_loss.crepa_loss
    monkeypatch.setattr(bench_loss, "crepa_loss", lambda *args, **kwargs: 1.01 * correct(*args, **kwargs))
    path = tmp_path / "out.json"
    assert bench_loss.main([*TINY, "--backends", "eager", "reference", "--json", str(path)]) == 1
    records = json.loads(path.read_text())["results"][0]["implementations"]
    assert "disagrees" in records["eager"]["error"] and "passes" not in records["eager"]
    assert "passes" in records["reference"]


def test_traffic_model():
    shape = (2, 3, 5, 7)
    assert minimum_bytes(shape, torch.float32, torch.float32, target_grad=False) == expected_min_bytes(*shape)
    mixed = minimum_bytes(shape, torch.bfloat16, torch.float32, target_grad=True)
    elements = 2 * 3 * 5 * 7
    assert mixed["bwd"] == elements * (2 + 4) + 2 * 3 * 4 + elements * (2 + 4)
    # the eager formulation cannot move less than the minimum, and more neighbours cost it more
    adjacent = eager_bytes_estimate((1, 13, 64, 96), torch.float32, False, neighbors=1, mode="adjacent")
    cumulative = eager_bytes_estimate((1, 13, 64, 96), torch.float32, False, neighbors=2, mode="cumulative")
    floor = minimum_bytes((1, 13, 64, 96), torch.float32, torch.float32, target_grad=False)
    for pass_name in ("fwd", "bwd", "fwd+bwd"):
        assert adjacent[pass_name] > 3 * floor[pass_name]
        assert cumulative[pass_name] > adjacent[pass_name]


def test_projection_table_covers_every_preset():
    table = bench_loss.projection_table(dims=(768,), dtypes=("bf16",))
    rows = table.splitlines()
    assert len(rows) == 2 + len(bench_loss.PRESETS)
    for name in bench_loss.PRESETS:
        assert f"| {name} | 768 | bf16 |" in table


def test_render_a_saved_run_as_markdown(cli_report, capsys):
    report, _, path = cli_report
    assert bench_loss.main(["--render", str(path)]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| cogvideox-5b*")]
    assert [row.split(" | ")[1].split(" (")[0] for row in rows] == report["implementations_run"]


def test_every_round_times_every_slot_in_a_new_order():
    calls = []
    slots = [Slot(f"0:{name}", lambda name=name: calls.append(name), lambda _: None, steps)
             for name, steps in (("a", 1), ("b", 2), ("c", 1), ("d", 3))]
    schedule = run_rounds(slots, 6, Timer(torch.device("cpu")), seed=0, progress=lambda _: None)
    labels = [slot.label for slot in slots]
    assert len(schedule) == 6 and all(sorted(order) == labels for order in schedule)
    assert len({tuple(order) for order in schedule}) > 1  # not one fixed order
    # each slot ran its steps together, in the order of the schedule
    assert calls == [label[2:] for order in schedule for label in order
                     for _ in range(next(s.steps_per_round for s in slots if s.label == label))]
    for slot in slots:
        assert len(slot.round_medians) == 6 and len(slot.fwd) == 6 * slot.steps_per_round


def test_a_slot_that_raises_keeps_its_error_and_leaves_the_rounds():
    def broken():
        raise RuntimeError("boom")

    good = Slot("0:good", lambda: None, lambda _: None, 1)
    bad = Slot("0:bad", broken, lambda _: None, 1)
    schedule = run_rounds([good, bad], 3, Timer(torch.device("cpu")), seed=1, progress=lambda _: None)
    assert bad.error == "RuntimeError: boom" and sum(order.count("0:bad") for order in schedule) == 1
    assert len(good.round_medians) == 3


def test_steps_per_round_spends_the_budget_within_the_bounds():
    assert steps_per_round(0.01, budget=1.0, rounds=5, min_reps=5, max_reps=50) == 10  # 50 steps of 10 ms
    assert steps_per_round(0.001, budget=1.0, rounds=5, min_reps=5, max_reps=50) == 10  # capped by max_reps
    assert steps_per_round(2.0, budget=1.0, rounds=5, min_reps=5, max_reps=50) == 1  # at least one per round
    assert steps_per_round(2.0, budget=1.0, rounds=2, min_reps=5, max_reps=50) == 3  # at least min_reps in all


def test_ratios_are_paired_within_rounds():
    """A load spike in one round slows every implementation timed in it; pairing cancels it, a ratio of
    medians over all rounds would not."""
    def record(round_ms):
        stats = {"median_ms": statistics.median(round_ms), "round_medians_ms": round_ms}
        return {"passes": {name: dict(stats) for name in ("fwd", "bwd", "fwd+bwd")}}

    result = {"min_bytes": {"fwd": 10**9, "bwd": 10**9, "fwd+bwd": 2 * 10**9},
              "implementations": {"eager": record([10.0, 30.0, 20.0]), "compile": record([4.0, 12.0, 8.0]),
                                  "cpu": record([1.0, 3.0, 8.0])}}
    bench_loss.add_derived_numbers(result, copy_round_gbps=[200.0, 100.0, 100.0])
    stats = result["implementations"]["cpu"]["passes"]["fwd"]
    assert stats["speedup_vs_eager"] == pytest.approx(10.0)  # rounds: 10, 10, 2.5; medians alone: 20 / 3
    assert stats["speedup_vs_eager_range"] == pytest.approx([2.5, 10.0])
    assert stats["speedup_vs_compile"] == pytest.approx(4.0)
    # 1 GB in 1, 3, 8 ms: 1000, 333, 125 GB/s against 200, 100, 100 GB/s of copy in the same rounds
    assert stats["pct_of_copy_bandwidth"] == pytest.approx(100 * 1000 / 3 / 100)
    assert stats["pct_of_copy_bandwidth_range"] == pytest.approx([125.0, 500.0])


def test_readme_table_has_a_row_per_case(cli_report):
    report, stdout, _ = cli_report
    table = readme_table(report)
    assert table in stdout  # --markdown prints it
    backends = [name for name in report["implementations_run"] if name not in ("eager", "compile", "reference")]
    assert backends, "no fused backend ran"
    headers = [line for line in table.splitlines() if line.startswith("| case |")]
    assert [header.split(" | ")[3] for header in headers] == [f"`{name}` backend" for name in backends]
    rows = [line for line in table.splitlines() if line.startswith("| cogvideox-5b*")]
    assert len(rows) == len(backends) * len(report["results"]) and all("**" in row for row in rows)


def test_bench_forms_times_the_three_forms_interleaved():
    """benchmarks/bench_forms.py: one sample per form per round, and each form computes the same gradient."""
    import bench_forms

    proj, target = (torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(seed)) for seed in (0, 1))
    proj.requires_grad_(True)
    calls = bench_forms.forms(proj, target, "reference", neighbors=1)
    grads = [torch.autograd.grad(call(), proj)[0] for call in calls.values()]
    for grad in grads[1:]:
        assert torch.equal(grad, grads[0])
    samples = bench_forms.time_rounds(calls, proj, rounds=3, warmup=1)
    assert set(samples) == {"functional", "module", "Function.apply"}
    assert all(len(times) == 3 and min(times) > 0 for times in samples.values())
    assert proj.grad is None  # gradients are returned, not accumulated: no extra add inside the timing
    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_forms.py"), "--backend", "reference", "--tokens",
                          "5", "--dim", "7", "--rounds", "2", "--warmup", "0"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Function.apply" in run.stdout and "x the functional form" in run.stdout
