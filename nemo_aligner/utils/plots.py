"""Plot a training run's logged metrics as PNG files: losses, accuracy, rewards, lengths, judge health, held-out
evaluation. Every run draws them at its end (``RUN_DIR/plots/``, when matplotlib is installed); the script redraws
them for any run directory.

Usage::

    python scripts/plot_metrics.py RUN_DIR [--out DIR] [--metrics loss,acc]

``RUN_DIR`` is a run's experiment directory (``exp_manager.explicit_log_dir``, e.g. ``results/megatron_gpt_dpo``).
Metrics come from ``RUN_DIR/csv/metrics.csv`` (the CSV logger), else from the TensorBoard event files under
``RUN_DIR/tensorboard/``. By default every panel below whose metrics the run logged is drawn (SFT: loss and
lr; DPO: losses, accuracy, rewards; SPIN: also the rollout statistics of each iteration; Self-Rewarding: also
lengths, generated rewards, judge health and the judge's score histogram). ``--metrics a,b`` draws one panel per
named metric instead (``loss`` means ``train/loss`` and ``val/loss``). Steps where an iteration's rollout
statistics were logged (SPIN, Self-Rewarding) are marked with dotted vertical lines.

Output (default ``RUN_DIR/plots/``): one PNG per panel, ``overview.png`` with all panels, and ``plots.json``
listing each panel's file, the exact (step, value) series drawn in it, and the iteration markers. A step logged
twice (a resumed run repeats the steps after its last checkpoint) keeps its last value.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

Series = dict[str, list[tuple[int, float]]]

# (panel name, title, metric names without the train/ or val/ prefix)
PANELS = [
    ("loss", "Loss", ["loss", "preference_loss"]),
    ("sft_loss", "SFT term (NLL of the chosen responses)", ["sft_loss"]),
    ("accuracy", "Preference accuracy", ["acc"]),
    (
        "evaluation",
        "Held-out generation evaluation (trainer.<algorithm>.evaluation)",
        ["exact_match", "unfinished_fraction"],  # val/judge_unparseable_fraction: in "judge_health"
    ),
    ("evaluation_judge", "Self-judged score of held-out responses", ["judge_score"]),
    (
        "rewards",
        "Implicit rewards (policy minus reference log-prob)",
        [
            "rewards_chosen_mean",
            "rewards_rejected_mean",
            "rewards_actual_mean",
            "rewards_generated_mean",
            "rewards_all_mean",
        ],
    ),
    ("lr", "Learning rate", ["lr"]),
    ("grad_norm", "Gradient norm", ["grad_norm"]),
    (
        "lengths",
        "Response lengths (tokens)",
        [
            "chosen_lengths",
            "reject_lengths",
            "avg_generated_lengths",
            "rollout_generated_length_mean",
            "response_length",
        ],
    ),
    ("rollout", "Rollout (per iteration)", ["rollout_identical_fraction", "rollout_unfinished_fraction"]),
    ("judge_rewards", "Judge scores of the pairs", ["chosen_generated_rewards", "rejected_generated_rewards"]),
    (
        "judge_health",
        "Judge health",
        [
            "judge_unparseable_fraction",
            "judge_all_equal_rate",
            "bad_samples_per_GBS",
            "bad_ends_per_GBS",
            "meta_pairs_per_GBS",
            "meta_candidates",
        ],
    ),
]
SCORE_HISTOGRAM = re.compile(r"^train/judge_score_hist_(\d+)$")
ITERATION_MARKERS = ("train/rollout_identical_fraction", "train/judge_unparseable_fraction")
PREFIXES = ("train/", "val/")


# ------------------------------------------------------------------ reading
def read_csv(path: Path) -> Series:
    """Every numeric column of a Lightning ``metrics.csv`` as (step, value) pairs, sorted by step."""
    series: dict[str, dict[int, float]] = {}
    with open(path, newline="", encoding="utf-8") as file:
        for line, row in enumerate(csv.DictReader(file), start=2):
            if not row.get("step"):
                raise ValueError(f"{path}:{line}: no 'step' value")
            step = int(float(row["step"]))
            for name, value in row.items():
                if name != "step" and value not in (None, ""):
                    series.setdefault(name, {})[step] = float(value)
    return {name: sorted(values.items()) for name, values in series.items()}


def read_tensorboard(directory: Path) -> Series:
    """Every scalar of the TensorBoard event files in ``directory`` as (step, value) pairs, sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for events in sorted(directory.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                series.setdefault(tag, {})[int(event.step)] = float(event.value)
    return {name: sorted(values.items()) for name, values in series.items()}


def load_series(run_dir: Path) -> Series:
    """The run's metrics: from ``csv/metrics.csv`` when present, else from TensorBoard events."""
    csv_file = run_dir / "csv" / "metrics.csv"
    if csv_file.is_file():
        return read_csv(csv_file)
    tensorboard_dir = run_dir / "tensorboard"
    if tensorboard_dir.is_dir():
        return read_tensorboard(tensorboard_dir)
    raise FileNotFoundError(f"{run_dir}: no csv/metrics.csv and no tensorboard/ directory; is it a run directory?")


# ------------------------------------------------------------------ choosing panels
def _with_prefixes(names: Iterable[str]) -> list[str]:
    return [f"{prefix}{name}" for name in names for prefix in PREFIXES]


def choose_panels(series: Series, metrics: list[str] | None = None) -> list[tuple[str, str, list[str]]]:
    """(panel name, title, logged metric names) of the panels to draw; ValueError for an unknown ``--metrics``."""
    if metrics:
        panels = []
        for metric in metrics:
            names = [n for n in [metric, *_with_prefixes([metric])] if n in series]
            if not names:
                raise ValueError(f"--metrics {metric}: not logged by this run; logged: {', '.join(sorted(series))}")
            panels.append((re.sub(r"[^A-Za-z0-9_.-]", "_", metric), metric, names))
        return panels
    panels = [(name, title, [n for n in _with_prefixes(members) if n in series]) for name, title, members in PANELS]
    histogram = sorted((n for n in series if SCORE_HISTOGRAM.match(n)), key=lambda n: int(SCORE_HISTOGRAM.match(n)[1]))
    panels.append(("judge_score_histogram", "Judge score histogram (share of scores per level)", histogram))
    return [panel for panel in panels if panel[2]]


# ------------------------------------------------------------------ drawing
def _draw(ax, title: str, names: list[str], series: Series, markers: list[int]) -> None:
    for name in names:
        steps, values = zip(*series[name])
        single = len(steps) == 1
        ax.plot(steps, values, marker="o" if single or name.startswith("val/") else None, label=name)
    for step in markers:
        ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _drawn_series(ax) -> dict[str, dict[str, list[float]]]:
    """What the axes actually show: each line's label and data (what plots.json records)."""
    return {
        line.get_label(): {"step": [int(s) for s in line.get_xdata()], "value": [float(v) for v in line.get_ydata()]}
        for line in ax.get_lines()
        if not line.get_label().startswith("_")  # iteration markers are unlabelled
    }


def plot_run(run_dir: Path, out_dir: Path | None = None, metrics: list[str] | None = None) -> dict:
    """Draw the run's panels into ``out_dir`` (default ``run_dir/plots``); returns what ``plots.json`` holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image  # matplotlib's own image library

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    series = load_series(run_dir)
    panels = choose_panels(series, metrics)
    if not panels:
        raise ValueError(f"{run_dir}: none of the known metrics was logged; pick some with --metrics")
    markers = sorted({step for name in ITERATION_MARKERS for step, _ in series.get(name, [])})
    out_dir.mkdir(parents=True, exist_ok=True)

    # One figure, drawn once: overview.png is the whole of it, and each panel's own file is cut out of the same
    # pixels (drawing every panel again in a figure of its own took twice as long: ~0.7 s at a run's end).
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False, dpi=100)
    plotted = {}
    for ax, (name, title, names) in zip(axes.flat, panels):
        _draw(ax, title, names, series, markers)
        plotted[name] = {"file": f"{name}.png", "title": title, "series": _drawn_series(ax)}
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.canvas.draw()
    pixels = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
    pixels.save(out_dir / "overview.png")
    renderer = fig.canvas.get_renderer()
    for ax, name in zip(axes.flat, plotted):
        box = ax.get_tightbbox(renderer).padded(6)  # display pixels, origin at the bottom left
        left, right = max(0, math.floor(box.x0)), min(pixels.width, math.ceil(box.x1))
        top, bottom = max(0, pixels.height - math.ceil(box.y1)), min(pixels.height, pixels.height - math.floor(box.y0))
        pixels.crop((left, top, right, bottom)).save(out_dir / f"{name}.png")
    plt.close(fig)

    summary = {"run_dir": str(run_dir), "overview": "overview.png", "iteration_markers": markers, "panels": plotted}
    (out_dir / "plots.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run's experiment directory (exp_manager.explicit_log_dir)")
    parser.add_argument("--out", type=Path, help="where to write the PNG files (default: RUN_DIR/plots)")
    parser.add_argument("--metrics", help="comma-separated metric names, one panel each (default: the key curves)")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        summary = plot_run(args.run_dir, args.out, metrics)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"plot_metrics: error: {err}") from None
    out_dir = args.out or args.run_dir / "plots"
    print(f"wrote {len(summary['panels'])} panels and overview.png to {out_dir}")


if __name__ == "__main__":
    main()
