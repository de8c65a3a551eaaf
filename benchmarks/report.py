"""The benchmark's output: the text tables on stdout, a markdown table for the docs, and the plot."""
from __future__ import annotations

import math
from pathlib import Path

from cases import BASELINES, PASSES, Case


def _mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_case(result: dict) -> str:
    case = Case(**result["case"])
    traffic = result["min_bytes"]
    lines = [
        case.label(),
        f"  inputs {_mb(result['input_bytes'])} MB, gradients {_mb(result['grad_bytes'])} MB; minimum traffic "
        f"fwd {_mb(traffic['fwd'])} MB, bwd {_mb(traffic['bwd'])} MB",
    ]
    header = (f"  {'implementation':<24}{'pass':<9}{'median ms':>11}{'IQR ms':>21}{'GB/s':>9}{'%copy':>7}"
              f"{'vs eager':>10}{'vs compile':>11}{'held MB':>9}{'peak MB':>9}")
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
                   f"{stats['gbps']:>9.2f}{'-' if percent is None else f'{percent:.0f}%':>7}"
                   f"{_ratio(stats['speedup_vs_eager']):>10}{_ratio(stats['speedup_vs_compile']):>11}")
            if i == 0:
                row += f"{_mb(memory.get('held_bytes')):>9}{_mb(memory.get('peak_bytes')):>9}"
            lines.append(row)
    return "\n".join(lines)


def format_summary(results: list[dict]) -> str:
    """Forward+backward of the fastest package backend per case against both baselines."""
    header = (f"{'case':<44}{'eager ms':>10}{'compile ms':>12}{'best backend':>14}{'ms':>10}{'vs eager':>10}"
              f"{'vs compile':>11}{'peak MB':>9}{'eager peak':>11}")
    lines = ["summary (forward+backward medians)", header, "-" * len(header)]
    for result in results:
        records = result["implementations"]

        def median(name):
            passes = records.get(name, {}).get("passes")
            return passes["fwd+bwd"]["median_ms"] if passes else None

        backends = [n for n in records if n not in BASELINES and median(n) is not None]
        eager, compiled = median("eager"), median("compile")
        best = min(backends, key=median) if backends else None
        best_ms = median(best) if best else None
        eager_peak = (records.get("eager", {}).get("memory") or {}).get("peak_bytes")
        best_peak = (records.get(best, {}).get("memory") or {}).get("peak_bytes") if best else None
        lines.append(
            f"{Case(**result['case']).short_label():<44}{_num(eager):>10}{_num(compiled):>12}{best or '-':>14}"
            f"{_num(best_ms):>10}{_ratio(eager / best_ms if eager and best_ms else None):>10}"
            f"{_ratio(compiled / best_ms if compiled and best_ms else None):>11}{_mb(best_peak):>9}"
            f"{_mb(eager_peak):>11}")
    return "\n".join(lines)


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
        f"copy bandwidth {copy['gbps']:.2f} GB/s (copy_ of {_mb(copy['bytes'] // 2)} MB: read + write)",
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


def markdown_results(report: dict) -> str:
    """The measured results as one markdown table (for docs/benchmarks.md), with the machine it ran on."""
    machine, copy = report["machine"], report["copy_bandwidth"]
    load = machine.get("load_average")
    lines = [
        f"Measured {report['timestamp']} on {report['device']}: {machine['cpu_model']}, {machine['cpu_count']} cores, "
        f"{machine['torch_threads']} torch threads" + (f", GPU {machine['gpu']['name']}" if machine["gpu"] else "")
        + (f"; load average {load[0]:.1f} at the start" if load else "")
        + f"; copy bandwidth {copy['gbps']:.2f} GB/s. torch {report['versions']['torch']}.",
        "",
        "| case | implementation | fwd ms | bwd ms | fwd+bwd ms (IQR) | fwd+bwd GB/s | % copy | vs eager | "
        "vs compile | held MB | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in report["results"]:
        label = Case(**result["case"]).short_label()
        for name, record in result["implementations"].items():
            if "error" in record:
                lines.append(f"| {label} | {name} | failed: {record['error']} |" + " |" * 8)
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
                f"{total['median_ms']:.1f} ({total['q1_ms']:.1f}-{total['q3_ms']:.1f}) | {total['gbps']:.2f} | "
                f"{'-' if percent is None else f'{percent:.0f}%'} | {_ratio(total['speedup_vs_eager'])} | "
                f"{_ratio(total['speedup_vs_compile'])} | {_mb(memory.get('held_bytes'))} | "
                f"{_mb(memory.get('peak_bytes'))} |")
    return "\n".join(lines)


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
