"""A test hook that kills the process at a named point, to prove that runs resume exactly.

Set ``NEMO_ALIGNER_KILL_AT=<point>[:<n>]`` and the process SIGKILLs itself the n-th time (default: first)
it reaches ``kill_point(<point>)``; the trainer passes its step for ``after_step``, so ``after_step:3`` dies
right after the optimizer step 3 finished. Points, in the order a step meets them:

* ``reference_logprobs``: DPO, per batch of the reference log-prob precomputation;
* ``rollout``: SPIN/Self-Rewarding, per generation batch;
* ``after_backward``: gradients reduced, optimizer not yet stepped;
* ``after_optimizer_step``: weights updated, ``step``/``consumed_samples`` not yet advanced;
* ``after_step``: the step is counted (value: the step);
* ``validation``: per validation batch;
* ``inside_save``: a trainer checkpoint's weights written, no ``COMPLETE`` marker yet;
* ``before_rename``: marker written, the checkpoint still under its ``.partial`` name;
* ``before_prune``: the checkpoint in place, older ones not yet deleted (``save_top_k``);
* ``after_save``: the save finished on every rank;
* ``nemo_export``: a ``.nemo`` file's weights written, the archive not yet packed and moved into place;
* ``before_iteration_end``: SPIN/Self-Rewarding, between an iteration's last step and its end-of-iteration save.

``NEMO_ALIGNER_KILL_SIGNAL=TERM`` sends SIGTERM instead (a preemption: the run saves and exits cleanly).
Without the variable this is a no-op. ``scripts/fault_campaign.py`` kills at each of them and checks the resume.
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
