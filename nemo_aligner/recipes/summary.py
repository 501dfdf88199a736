"""What a run leaves the user at its end: the console log kept in the results directory, PNG plots of the logged
metrics, and a summary (steps, wall time, final validation metrics, the held-out evaluation table, where the
``.nemo``, logs and plots are). Global rank 0 only."""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from pathlib import Path
from typing import Any

from nemo_aligner.utils.config import WARNINGS_LOGGER
from nemo_aligner.utils.distributed import is_global_rank_zero

logger = logging.getLogger(__name__)

CONSOLE_LOG = "console.log"
PLOTS_DIR = "plots"


def keep_console_log(log_dir: Path) -> Path | None:
    """Copy every ``nemo_aligner`` log line (the summary included) to ``<log_dir>/console.log`` (appended: a
    resumed run continues the file). The progress bar stays on the terminal only. Lines are held in memory until
    :func:`start_console_log` (training starts), so a run stopped by bad input writes nothing to its directory."""
    if not is_global_rank_zero():
        return None
    path = Path(log_dir) / CONSOLE_LOG
    loggers = [logging.getLogger("nemo_aligner"), logging.getLogger(WARNINGS_LOGGER)]  # Python warnings too
    for each in loggers:
        for handler in list(each.handlers):  # an earlier run in this process wrote elsewhere
            if getattr(handler, "nemo_aligner_console_log", False):
                each.removeHandler(handler)
                handler.close()
    target = logging.FileHandler(path, encoding="utf-8", delay=True)
    target.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    # flushLevel above CRITICAL: nothing is written before start_console_log; flushOnClose=False: nor at exit.
    handler = logging.handlers.MemoryHandler(10_000, logging.CRITICAL + 1, target, flushOnClose=False)
    handler.nemo_aligner_console_log = True
    for each in loggers:
        each.addHandler(handler)
    return path


def start_console_log() -> None:
    """Training starts: write the held lines of :func:`keep_console_log` and every later one as it comes."""
    for handler in logging.getLogger("nemo_aligner").handlers:
        if getattr(handler, "nemo_aligner_console_log", False):
            handler.flushLevel = logging.NOTSET
            handler.flush()


def draw_plots(log_dir: Path) -> Path | None:
    """``<log_dir>/plots/overview.png`` and one PNG per panel; skipped with one line when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.info("Plots skipped: matplotlib is not installed (pip install matplotlib; then scripts/plot_metrics.py)")
        return None
    from nemo_aligner.utils.plots import plot_run

    try:
        plot_run(Path(log_dir))
    except (FileNotFoundError, ValueError) as err:  # no CSV/TensorBoard logger, nothing logged
        logger.info("Plots skipped: %s", err)
        return None
    return Path(log_dir) / PLOTS_DIR / "overview.png"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def summary_text(
    name: str,
    loop,
    log_dir: Path,
    nemo_path: Path | None,
    wall_seconds: float,
    plots: Path | None,
) -> str:
    """The end-of-run summary (what :func:`finish_run` logs)."""
    from nemo_aligner.evaluation import REPORT_FILE, format_table

    lines = [f"Run summary ({name}): step {loop.step}/{loop.max_steps}"]
    if hasattr(loop, "max_iterations"):
        lines[0] += f", iteration {min(loop.iteration + 1, loop.max_iterations)}/{loop.max_iterations}"
    lines[0] += f", wall time {_duration(wall_seconds)}"
    if loop.step < loop.max_steps:
        lines[0] += " (stopped before the end: run the same command again to resume)"
    final = loop.last_val_metrics
    if final:
        lines.append("  final validation: " + ", ".join(f"{k}={_number(v)}" for k, v in final.items()))
    report = Path(log_dir) / REPORT_FILE
    if report.is_file():
        table = format_table(json.loads(report.read_text(encoding="utf-8")))
        lines += ["  " + line for line in table.splitlines()]
    if nemo_path is not None:
        lines.append(f"  model:      {nemo_path}" + ("" if Path(nemo_path).exists() else " (not written yet)"))
    lines.append(f"  logs:       {log_dir}/ ({CONSOLE_LOG}, csv/metrics.csv, tensorboard/)")
    if report.is_file():
        lines.append(f"  evaluation: {report}")
    if plots is not None:
        lines.append(f"  plots:      {plots}")
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def finish_run(name: str, loop, log_dir: Path, nemo_path: Path | None, started: float) -> str | None:
    """Plots, then the summary logged (and returned) on global rank 0; ``started`` is a ``time.monotonic()``."""
    if not is_global_rank_zero():
        return None
    plots = draw_plots(log_dir)
    text = summary_text(name, loop, Path(log_dir), nemo_path, time.monotonic() - started, plots)
    logger.info("%s", text)
    return text
