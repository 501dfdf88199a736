"""A test hook that kills the process at a named point, to prove that runs resume exactly.

Set ``NEMO_ALIGNER_KILL_AT=<point>[:<n>]`` and the process SIGKILLs itself the n-th time (default: first)
it reaches ``kill_point(<point>)``; the trainer passes its step for ``after_step``, so ``after_step:3`` dies
right after the optimizer step 3 finished. Points: ``after_step``, ``inside_save`` (weights written, checkpoint
not yet complete), ``after_save``, ``rollout`` (SPIN/Self-Rewarding generation), ``before_iteration_end``.
``NEMO_ALIGNER_KILL_SIGNAL=TERM`` sends SIGTERM instead (a preemption: the run saves and exits cleanly).
Without the variable this is a no-op.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV_VAR = "NEMO_ALIGNER_KILL_AT"
SIGNAL_ENV_VAR = "NEMO_ALIGNER_KILL_SIGNAL"
_hits: Counter[str] = Counter()


def kill_point(name: str, value: int | None = None) -> None:
    """SIGKILL this process if ``NEMO_ALIGNER_KILL_AT`` names this point (and this value or hit count)."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    point, _, wanted = spec.partition(":")
    if point != name:
        return
    _hits[name] += 1
    current = value if value is not None else _hits[name]
    if current == (int(wanted) if wanted else 1):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get(SIGNAL_ENV_VAR, "KILL")))
