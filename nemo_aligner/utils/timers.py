"""Wall time per phase of an iteration (rollout, judging, reference scoring, training), logged as ``timers/*_s``."""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Iterator

EVENTS_FILE_ENV = "NEMO_ALIGNER_EVENTS_FILE"
"""Environment variable naming a file that :func:`mark_event` appends ``<event> <unix time> <peak RSS MiB so far>``
lines to (read by ``benchmarks/whole_process.py`` to time start-up, process start to the first training step, and to
say where the memory goes)."""
_marked: set[str] = set()


def mark_event(event: str) -> None:
    """Record the first time this process reaches ``event`` when ``$NEMO_ALIGNER_EVENTS_FILE`` is set (no-op
    otherwise)."""
    path = os.environ.get(EVENTS_FILE_ENV)
    if not path or event in _marked:
        return
    _marked.add(event)
    import resource

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{event} {time.time():.6f} {peak_mb:.1f}\n")


class PhaseTimers:
    """Accumulates wall seconds per named phase until :meth:`pop_metrics` hands them to the logger.

    Phases may nest (SPIN's ``rollout_s`` includes its ``reference_s``; Self-Rewarding's also ``judging_s``), so
    each number answers "how long did this take", and the docs say which ones contain which.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def pop_metrics(self) -> dict[str, float]:
        """``{"timers/<phase>_s": seconds}`` accumulated since the last call; resets the counters."""
        metrics = {f"timers/{phase}_s": seconds for phase, seconds in self.seconds.items()}
        self.seconds.clear()
        return metrics


class RunTimer:
    """``max_time_per_run`` ("DD:HH:MM:SS", or None): tells the loop when to save and stop."""

    def __init__(self, max_time: str | None):
        self.limit = _parse_duration(max_time) if max_time else None
        self.start = time.monotonic()

    def is_finished(self) -> bool:
        return self.limit is not None and time.monotonic() - self.start >= self.limit


def _parse_duration(value: str) -> float:
    parts = [float(p) for p in str(value).split(":")]
    if not 1 <= len(parts) <= 4:
        raise ValueError(f"exp_manager.max_time_per_run must look like DD:HH:MM:SS, got {value!r}")
    seconds = 0.0
    for part, unit in zip(reversed(parts), (1, 60, 3600, 86400)):
        seconds += part * unit
    return seconds
