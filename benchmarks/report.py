"""The benchmark's output: the text tables on stdout, a markdown table for the docs, and the plot."""
from __future__ import annotations

import math
from pathlib import Path

from cases import BASELINES, PASSES, Case


def _mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _round_range(stats: dict, digits=1) -> str:
    """Smallest to largest round median."""
    rounds = stats["round_medians_ms"]
    return f"{min(rounds):.{digits}f}-{max(rounds):.{digits}f}"


def format_case(result: dict) -> str:
    case = Case(**result["case"])
    traffic = result["min_bytes"]
    lines = [
        case.label(),
        f"  inputs {_mb(result['input_bytes'])} MB, gradients {_mb(result['grad_bytes'])} MB; minimum traffic "
        f"fwd {_mb(traffic['fwd'])} MB, bwd {_mb(traffic['bwd'])} MB",
    ]
    header = (f"  {'implementation':<24}{'pass':<9}{'median ms':>11}{'IQR ms':>21}{'rounds ms':>21}{'GB/s':>9}"
              f"{'%copy':>7}{'vs eager':>10}{'vs compile':>11}{'held MB':>9}{'peak MB':>9}")
    lines += [header, "  " + "-" * (len(header) - 2)]
    for name, record in result["implementations"].items():
        title = name
        if "compile_s" in record:
            title += f" ({record['compile_s']:.1f}s{', cached' if record['compile_cache_hits'] else ''})"
        if "error" in record:
            lines.append(f"  {title:<24}FAILED: {record['error']}")
            continue
        memory = record.get("memory") or {}
        for i, pass_name in enumerate(PASSES):
            stats = record["passes"][pass_name]
            spread = f"{stats['q1_ms']:.3f}-{stats['q3_ms']:.3f}"
            percent = stats["pct_of_copy_bandwidth"]
            row = (f"  {title if i == 0 else '':<24}{pass_name:<9}{stats['median_ms']:>11.3f}{spread:>21}"
                   f"{_round_range(stats, 3):>21}{stats['gbps']:>9.2f}{'-' if percent is None else f'{percent:.0f}%':>7}"
                   f"{_ratio(stats['speedup_vs_eager']):>10}{_ratio(stats['speedup_vs_compile']):>11}")
            if i == 0:
                row += f"{_mb(memory.get('held_bytes')):>9}{_mb(memory.get('peak_bytes')):>9}"
            lines.append(row)
    return "\n".join(lines)


def format_summary(results: list[dict]) -> str:
    """Forward+backward of the fastest package backend per case against both baselines (ratios per round)."""
    header = (f"{'case':<44}{'eager ms':>10}{'compile ms':>12}{'best backend':>14}{'ms':>10}{'vs eager':>10}"
              f"{'vs compile':>11}{'peak MB':>9}{'eager peak':>11}")
    lines = ["summary (forward+backward medians)", header, "-" * len(header)]
    for result in results:
        records = result["implementations"]
        backends = [n for n in records if n not in BASELINES and _total(records, n) is not None]
        best = min(backends, key=lambda n: _total(records, n)["median_ms"]) if backends else None
        stats = _total(records, best) if best else None
        eager, compiled = _total(records, "eager"), _total(records, "compile")
        eager_peak = (records.get("eager", {}).get("memory") or {}).get("peak_bytes")
        best_peak = (records.get(best, {}).get("memory") or {}).get("peak_bytes") if best else None
        lines.append(
            f"{Case(**result['case']).short_label():<44}{_num(eager and eager['median_ms']):>10}"
            f"{_num(compiled and compiled['median_ms']):>12}{best or '-':>14}{_num(stats and stats['median_ms']):>10}"
            f"{_ratio(stats and stats['speedup_vs_eager']):>10}{_ratio(stats and stats['speedup_vs_compile']):>11}"
            f"{_mb(best_peak):>9}{_mb(eager_peak):>11}")
    return "\n".join(lines)


def _total(records: dict, name: str) -> dict | None:
    """The fwd+bwd statistics of an implementation, or None when it did not run or failed."""
    passes = records.get(name, {}).get("passes")
    return passes["fwd+bwd"] if passes else None


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_header(report: dict) -> str:
    machine, copy = report["machine"], report["copy_bandwidth"]
    gpu = machine["gpu"]["name"] if machine["gpu"] else "none"
    lines = [
        f"crepa_kernels {report['versions']['crepa_kernels']}  torch {report['versions']['torch']}  "
        f"triton {report['versions']['triton']}  python {report['versions']['python']}",
        f"device {report['device']}: CPU {machine['cpu_model']} ({machine['cpu_count']} cores, "
        f"{machine['torch_threads']} torch threads, {_mb(machine['memory_bytes'])} MB RAM), GPU {gpu}",
        f"copy bandwidth {copy['gbps']:.2f} GB/s (copy_ of {_mb(copy['bytes'] // 2)} MB: read + write; rounds "
        f"{min(copy['round_gbps']):.2f}-{max(copy['round_gbps']):.2f})",
        f"{len(report['schedule'])} interleaved rounds; load average {_load(machine)}",
    ]
    probe = report["memory_probe"]
    if report["memory_method_unavailable"]:
        lines.append(f"memory: not measured ({report['memory_method_unavailable']})")
    elif probe:
        lines.append(f"memory probe: a {_mb(probe['allocated_bytes'])} MB tensor measured as "
                     f"{_mb(probe['measured_held_bytes'])} MB held")
    for name, reason in report["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


def _load(machine: dict) -> str:
    start, end = machine.get("load_average"), machine.get("load_average_end")
    if not start:
        return "unknown"
    return f"{start[0]:.1f} at the start" + (f", {end[0]:.1f} at the end" if end else "")


def _run_line(report: dict) -> str:
    machine, copy = report["machine"], report["copy_bandwidth"]
    return (f"Measured {report['timestamp']} on {report['device']}: {machine['cpu_model']}, {machine['cpu_count']} "
            f"cores, {machine['torch_threads']} torch threads"
            + (f", GPU {machine['gpu']['name']}" if machine["gpu"] else "")
            + f"; load average {_load(machine)}; copy bandwidth {copy['gbps']:.2f} GB/s "
            f"(rounds {min(copy['round_gbps']):.2f}-{max(copy['round_gbps']):.2f}); {len(report['schedule'])} "
            f"interleaved rounds. torch {report['versions']['torch']}.")


def markdown_results(report: dict) -> str:
    """The measured results as one markdown table (for docs/benchmarks.md), with the machine it ran on."""
    lines = [
        _run_line(report),
        "",
        "| case | implementation | fwd ms | bwd ms | fwd+bwd ms (IQR) | round medians ms | fwd+bwd GB/s | % copy | "
        "vs eager | vs compile | held MB | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        label = Case(**result["case"]).short_label()
        for name, record in result["implementations"].items():
            if "error" in record:
                lines.append(f"| {label} | {name} | failed: {record['error']} |" + " |" * 9)
                continue
            passes, memory = record["passes"], record.get("memory") or {}
            total = passes["fwd+bwd"]
            percent = total["pct_of_copy_bandwidth"]
            title = name
            if "compile_s" in record:
                cached = ", cache hit" if record.get("compile_cache_hits") else ""
                title += f" ({record['compile_s']:.1f} s to compile{cached})"
            lines.append(
                f"| {label} | {title} | {passes['fwd']['median_ms']:.1f} | {passes['bwd']['median_ms']:.1f} | "
                f"{total['median_ms']:.1f} ({total['q1_ms']:.1f}-{total['q3_ms']:.1f}) | {_round_range(total)} | "
                f"{total['gbps']:.2f} | {'-' if percent is None else f'{percent:.0f}%'} | "
                f"{_ratio(total['speedup_vs_eager'])} | {_ratio(total['speedup_vs_compile'])} | "
                f"{_mb(memory.get('held_bytes'))} | {_mb(memory.get('peak_bytes'))} |")
    return "\n".join(lines)


def _with_range(value, bounds, digits: int, suffix: str) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{suffix} ({bounds[0]:.{digits}f}-{bounds[1]:.{digits}f})"


def _percent_of_copy(percent, bounds) -> str:
    return "-" if percent is None else f"{percent:.0f}%; {bounds[0]:.0f}-{bounds[1]:.0f}%"


def readme_table(report: dict) -> str:
    """The README's Performance table: per case, eager, torch.compile and each package backend (the reference,
    which is the eager formulation, left out) over forward + backward. Ranges in brackets are the smallest and
    largest round (for times: round medians; for ratios and % of copy: the per-round values)."""
    names = [n for n in report["implementations_run"] if n not in BASELINES and n != "reference"]
    blocks = [_run_line(report)]
    for name in names:
        lines = [
            "",
            f"| case | eager | `torch.compile(eager)` | `{name}` backend | vs eager | vs compile | "
            f"`{name}` GB/s (% of copy) | held between fwd and bwd: eager / `{name}` |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for result in report["results"]:
            records = result["implementations"]
            stats = _total(records, name)
            if stats is None:
                lines.append(f"| {Case(**result['case']).short_label()} | failed: "
                             f"{records.get(name, {}).get('error', 'not run')} |" + " |" * 6)
                continue

            def median(other):
                other_stats = _total(records, other)
                return "-" if other_stats is None else f"{other_stats['median_ms']:.1f} ms"

            def held(other):
                return _mb((records.get(other, {}).get("memory") or {}).get("held_bytes"))

            rounds = stats["round_medians_ms"]
            percent = stats["pct_of_copy_bandwidth"]
            lines.append(
                f"| {Case(**result['case']).short_label()} | {median('eager')} | {median('compile')} | "
                f"**{stats['median_ms']:.1f} ms** ({min(rounds):.1f}-{max(rounds):.1f}) | "
                f"{_with_range(stats['speedup_vs_eager'], stats['speedup_vs_eager_range'], 1, 'x')} | "
                f"{_with_range(stats['speedup_vs_compile'], stats['speedup_vs_compile_range'], 2, 'x')} | "
                f"{stats['gbps']:.1f} ({_percent_of_copy(percent, stats['pct_of_copy_bandwidth_range'])}) | "
                f"{held('eager')} MB / {held(name)} MB |")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def save_plot(results: list[dict], path: Path) -> str:
    """Horizontal bars of the median time per implementation, one panel per pass, one group per case."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return "--plot: matplotlib is not installed (pip install matplotlib); no plot written"
    names = list(dict.fromkeys(n for r in results for n, record in r["implementations"].items() if "passes" in record))
    if not names:
        return "--plot: no implementation produced a time; no plot written"
    labels = [Case(**r["case"]).short_label() for r in results]

    def median(result, name, pass_name):
        return result["implementations"].get(name, {}).get("passes", {}).get(pass_name, {}).get("median_ms")

    figure, axes = plt.subplots(1, len(PASSES), sharey=True, squeeze=False,
                                figsize=(5 * len(PASSES) + 2, 1 + 0.35 * len(results) * (len(names) + 1)))
    height = 0.8 / len(names)
    for axis, pass_name in zip(axes[0], PASSES):
        times = [t for r in results for n in names if (t := median(r, n, pass_name))]
        left = 10 ** math.floor(math.log10(min(times)))  # bars on a log axis start at a round decade
        for i, name in enumerate(names):
            for c, result in enumerate(results):
                value = median(result, name, pass_name)
                if value is None:
                    continue
                y = c + i * height
                axis.barh(y, value - left, left=left, height=height, color=f"C{i}", label=name if c == 0 else None)
                axis.text(value, y, f" {value:.0f}" if value >= 100 else f" {value:.3g}", va="center", fontsize=7)
        axis.set_xscale("log")
        axis.set_xlim(left, max(times) * 4)
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_xlabel("median time, ms (log scale)")
        axis.set_title(pass_name)
        axis.grid(axis="x", which="major", alpha=0.3)
    axes[0][0].set_yticks([c + 0.4 - height / 2 for c in range(len(results))], labels, fontsize=8)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"plot: {path}"
