"""Plot the alignment diagnostics of a REPA* run next to a CREPA run.

    python benchmarks/plot_alignment.py                                   # two short trainer runs, then the plot
    python benchmarks/plot_alignment.py --logs repa.jsonl crepa.jsonl     # plot existing logs

The logs are the JSON lines that benchmarks/train_dit.py --diagnostics-json writes, one record per line:
    {"step", "neighbors", "cknna", "cross_frame_similarity": [[F x F]], "smoothness_proj", "smoothness_target",
     "align_loss"}
The figure shows CKNNA over steps, temporal smoothness over steps, the same-frame and adjacent-frame mean cosine
(the diagonal and first off-diagonals of the similarity matrix) over steps, and the F x F similarity matrix at the
first and last logged step of each run. Every logged point is one training batch at random noise levels, so the
curves are noisy: each series is drawn as faint raw points under a trailing mean over --smooth logged points.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "benchmarks" / "train_dit.py"
REQUIRED_KEYS = ("step", "neighbors", "cknna", "cross_frame_similarity", "smoothness_proj", "smoothness_target")
# About a minute per run on this 2-core CPU (the backend does not change the diagnostics, and the reference needs no
# compilation); replaced by --trainer-args. lr and lambda are above the trainer's defaults (1e-3, 0.5) so that the
# tiny model gets past aligning to the targets' mean direction within the budget (docs/diagnostics.md).
DEFAULT_TRAINER_ARGS = "--steps 1000 --lr 3e-3 --loss-weight 2 --no-lockstep --backend reference"


def load_log(path: str | Path) -> list[dict]:
    """The records of one JSON-lines diagnostics log, sorted by step."""
    records = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [key for key in REQUIRED_KEYS if key not in record]
            if missing:
                raise ValueError(f"{path}:{number}: record lacks {missing}")
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return sorted(records, key=lambda record: record["step"])


def run_label(records: list[dict]) -> str:
    neighbors = records[0]["neighbors"]
    return "REPA* (neighbors=0)" if neighbors == 0 else f"CREPA (neighbors={neighbors})"


def _series(records, key):
    return [record["step"] for record in records], [record[key] for record in records]


def _trailing_mean(values, window: int) -> np.ndarray:
    """Mean of each value and the window - 1 before it (fewer at the start)."""
    values = np.asarray(values, dtype=float)
    sums = np.cumsum(np.concatenate([[0.0], values]))
    starts = np.maximum(np.arange(1, values.size + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, values.size + 1) - starts)


def _band_means(matrix: np.ndarray) -> tuple[float, float]:
    """Mean of the diagonal (same frame) and of the first off-diagonals (adjacent frames, NaN when F = 1)."""
    adjacent = np.concatenate([np.diagonal(matrix, 1), np.diagonal(matrix, -1)])
    return float(np.mean(np.diagonal(matrix))), float(np.mean(adjacent)) if adjacent.size else float("nan")


def render(runs: list[list[dict]], out: str | Path, note: str = "", smooth: int = 1) -> Path:
    """Draw the figure for some runs (each a list of records from load_log) into the PNG ``out``; line plots show a
    trailing mean over ``smooth`` logged points over the faint raw values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure = plt.figure(figsize=(4 * max(3, 2 * len(runs)), 8.5), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[1, 1.1])
    cknna_axis, smooth_axis, band_axis = top.subplots(1, 3)

    def curve(axis, steps, values, label, **style):
        if smooth > 1:
            axis.plot(steps, values, alpha=0.25, linewidth=0.8, **style)
        axis.plot(steps, _trailing_mean(values, smooth), label=label, linewidth=1.8, **style)

    for index, records in enumerate(runs):
        label, color = run_label(records), colors[index % len(colors)]
        curve(cknna_axis, *_series(records, "cknna"), label, color=color)
        curve(smooth_axis, *_series(records, "smoothness_proj"), f"{label}: projected states", color=color)
        bands = np.array([_band_means(np.asarray(r["cross_frame_similarity"])) for r in records])
        steps = [record["step"] for record in records]
        curve(band_axis, steps, bands[:, 0], f"{label}: same frame", color=color)
        curve(band_axis, steps, bands[:, 1], f"{label}: adjacent frames", color=color, linestyle="--")
    # the target features come from a frozen encoder: one reference curve (from the first run) is enough
    curve(smooth_axis, *_series(runs[0], "smoothness_target"), "target features", color="black", linestyle=":")

    averaged = f" (trailing mean of {smooth} logged points)" if smooth > 1 else ""
    cknna_axis.set(title="CKNNA(projected states, targets)" + averaged, xlabel="step", ylabel="CKNNA, topk = 10")
    smooth_axis.set(title="temporal smoothness" + averaged, xlabel="step",
                    ylabel="mean cos(pooled frame f, pooled frame f+1)")
    band_axis.set(title="cross-frame similarity bands" + averaged, xlabel="step",
                  ylabel="mean cos(proj frame f, target frame k)")
    for axis in (cknna_axis, smooth_axis, band_axis):
        axis.title.set_fontsize(10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)

    # Each matrix gets its own colour scale: the band structure within a matrix is the point, and the level of the
    # whole matrix moves a lot during training (the band panel above compares levels across runs).
    snapshots = [(records, record) for records in runs for record in (records[0], records[-1])]
    heat_axes = np.atleast_1d(bottom.subplots(1, len(snapshots)))
    for axis, (records, record) in zip(heat_axes, snapshots):
        matrix = np.asarray(record["cross_frame_similarity"])
        image = axis.imshow(matrix, cmap="viridis")
        bottom.colorbar(image, ax=axis, shrink=0.7, format="%.3g")
        axis.set(title=f"{run_label(records)}\nS[f, k] at step {record['step']}", xlabel="target frame k",
                 ylabel="projected frame f")
        if matrix.shape[0] <= 8:
            middle = (matrix.min() + matrix.max()) / 2
            for (row, column), value in np.ndenumerate(matrix):
                axis.text(column, row, f"{value:.3f}", ha="center", va="center", fontsize=6,
                          color="black" if value > middle else "white")
    if note:
        figure.suptitle(note, fontsize=9)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _trainer_supports_diagnostics() -> bool:
    return TRAINER.exists() and "--diagnostics-json" in TRAINER.read_text()


def run_trainer(neighbors: int, log: Path, every: int, trainer_args: str) -> None:
    command = [
        sys.executable, str(TRAINER), *shlex.split(trainer_args),
        "--neighbors", str(neighbors), "--diagnostics-every", str(every), "--diagnostics-json", str(log),
    ]
    print("running:", shlex.join(command), flush=True)
    log.unlink(missing_ok=True)  # the trainer appends
    subprocess.run(command, check=True, cwd=REPO)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", nargs="+", metavar="JSONL", help="plot these logs instead of running the trainer")
    parser.add_argument("--out", default=str(REPO / "docs" / "alignment.png"), help="output PNG")
    parser.add_argument("--neighbors", type=int, default=1, help="d of the CREPA run (the REPA* run uses 0)")
    parser.add_argument("--diagnostics-every", type=int, default=25, help="log every K steps")
    parser.add_argument("--trainer-args", default=DEFAULT_TRAINER_ARGS,
                        help=f"extra arguments for both trainer runs (default: {DEFAULT_TRAINER_ARGS!r})")
    parser.add_argument("--log-dir", help="keep the trainer logs here (default: a temporary directory)")
    parser.add_argument("--note", default=None, help="figure title saying what was run")
    parser.add_argument("--smooth", type=int, default=5, help="trailing mean over this many logged points (1: none)")
    args = parser.parse_args(argv)

    if args.logs:
        logs = [Path(path) for path in args.logs]
        note = args.note if args.note is not None else "logs: " + ", ".join(path.name for path in logs)
        print("wrote", render([load_log(path) for path in logs], args.out, note, args.smooth))
        return

    if not _trainer_supports_diagnostics():
        parser.error(f"{TRAINER} with --diagnostics-json not found; pass --logs instead")
    with tempfile.TemporaryDirectory() as scratch:
        log_dir = Path(args.log_dir or scratch)
        log_dir.mkdir(parents=True, exist_ok=True)
        logs = [log_dir / "repa.jsonl", log_dir / f"crepa_d{args.neighbors}.jsonl"]
        for neighbors, log in zip((0, args.neighbors), logs):
            run_trainer(neighbors, log, args.diagnostics_every, args.trainer_args)
        note = args.note if args.note is not None else f"train_dit.py {args.trainer_args} (synthetic data)"
        print("wrote", render([load_log(path) for path in logs], args.out, note, args.smooth))


if __name__ == "__main__":
    main()
