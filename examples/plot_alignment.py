"""Plot the alignment diagnostics of a REPA* run next to a CREPA run.

    python examples/plot_alignment.py                                   # two short trainer runs, then the plot
    python examples/plot_alignment.py --logs repa.jsonl crepa.jsonl     # plot existing logs

The logs are the JSON lines that examples/train_dit.py --diagnostics-json writes, one record per line:
    {"step", "neighbors", "cknna", "cross_frame_similarity": [[F x F]], "smoothness_proj", "smoothness_target",
     "align_loss"}
The figure shows CKNNA over steps, temporal smoothness over steps, the same-frame and adjacent-frame mean cosine
(the diagonal and first off-diagonals of the similarity matrix) over steps, the F x F similarity matrix at the last
logged step of each run (one colour scale) and its diagonals' means against the frame offset. train_dit.py logs
every point on one fixed held-out batch at one noise level, so the curves move only as the model does; each series
is drawn as faint raw points under a trailing mean over --smooth logged points.
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
TRAINER = REPO / "examples" / "train_dit.py"
REQUIRED_KEYS = ("step", "neighbors", "cknna", "cross_frame_similarity", "smoothness_proj", "smoothness_target")
# About 40 s per run on this 2-core CPU with OMP_NUM_THREADS=1 (the backend does not change the diagnostics, and the
# reference needs no compilation); replaced by --trainer-args. lr and lambda are above the trainer's defaults (1e-3,
# 0.5) so that the tiny model gets past aligning to the targets' mean direction within the budget
# (docs/diagnostics.md).
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


def offset_profile(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets k - f = -(F-1) .. F-1 and the mean of S[f, k] over the pairs at each offset."""
    frames = matrix.shape[0]
    offsets = np.arange(1 - frames, frames)
    return offsets, np.array([np.mean(np.diagonal(matrix, offset)) for offset in offsets])


def render(runs: list[list[dict]], out: str | Path, note: str = "", smooth: int = 1) -> Path:
    """Draw the figure for some runs (each a list of records from load_log) into the PNG ``out``; line plots show a
    trailing mean over ``smooth`` logged points over the faint raw values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # sized so that the text stays legible when the PNG is shown ~900 px wide
    figure = plt.figure(figsize=(4 * max(3, len(runs) + 1), 7.5), layout="constrained")
    top, bottom = figure.subfigures(2, 1, height_ratios=[1, 1])
    cknna_axis, smooth_axis, band_axis = top.subplots(1, 3)

    def curve(axis, steps, values, label, **style):
        if smooth > 1:
            axis.plot(steps, values, alpha=0.25, linewidth=0.8, **style)
        axis.plot(steps, _trailing_mean(values, smooth), label=label, linewidth=1.8, **style)

    for index, records in enumerate(runs):
        label, color = run_label(records), colors[index % len(colors)]
        curve(cknna_axis, *_series(records, "cknna"), label, color=color)
        curve(smooth_axis, *_series(records, "smoothness_proj"), f"{label}", color=color)
        bands = np.array([_band_means(np.asarray(r["cross_frame_similarity"])) for r in records])
        steps = [record["step"] for record in records]
        curve(band_axis, steps, bands[:, 0], f"{label}: k = f", color=color)
        curve(band_axis, steps, bands[:, 1], f"{label}: |k - f| = 1", color=color, linestyle="--")
    # the target features come from a frozen encoder: one reference curve (from the first run) is enough
    curve(smooth_axis, *_series(runs[0], "smoothness_target"), "target features (REPA*'s optimum)", color="black",
          linestyle=":")

    cknna_axis.set(title="CKNNA(projected states, targets)", xlabel="step", ylabel="CKNNA, topk = 10")
    smooth_axis.set(title="temporal smoothness", xlabel="step", ylabel="mean cos(pooled frame f, pooled frame f+1)")
    band_axis.set(title="S[f, k] bands", xlabel="step", ylabel="mean cos(projected f, target k)")
    for axis in (cknna_axis, smooth_axis, band_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)

    # The last logged S of every run on one colour scale, so the runs' band structures compare directly, then the
    # mean of each matrix's diagonals against the offset k - f (the numbers the colours stand for).
    last = [np.asarray(records[-1]["cross_frame_similarity"]) for records in runs]
    low, high = min(matrix.min() for matrix in last), max(matrix.max() for matrix in last)
    axes = np.atleast_1d(bottom.subplots(1, len(runs) + 1))
    for axis, records, matrix in zip(axes, runs, last):
        image = axis.imshow(matrix, cmap="viridis", vmin=low, vmax=high)
        axis.set(title=f"{run_label(records)}: S[f, k], step {records[-1]['step']}", xlabel="target frame k",
                 ylabel="projected frame f")
    bottom.colorbar(image, ax=axes[:-1], shrink=0.8, format="%.2f")
    profile_axis = axes[-1]
    for index, (records, matrix) in enumerate(zip(runs, last)):
        profile_axis.plot(*offset_profile(matrix), marker="o", color=colors[index % len(colors)],
                          label=run_label(records).split(" ")[0])
    profile_axis.set(title="S[f, k] by offset, last logged step", xlabel="k - f",
                     ylabel="mean cos(projected f, target k)")
    profile_axis.grid(alpha=0.3)
    profile_axis.legend(fontsize=8, loc="upper left")
    for axis in [cknna_axis, smooth_axis, band_axis, *axes]:
        axis.title.set_fontsize(10)
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
        note = args.note if args.note is not None else (
            f"train_dit.py {args.trainer_args} (synthetic data; diagnostics on a fixed held-out batch)")
        print("wrote", render([load_log(path) for path in logs], args.out, note, args.smooth))


if __name__ == "__main__":
    main()
