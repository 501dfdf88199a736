"""Phase timers: nested phases each get their own wall time; popping hands them over once."""

from __future__ import annotations

import time

from nemo_aligner.utils.timers import PhaseTimers


def test_nested_phases_accumulate_and_pop_resets():
    timers = PhaseTimers()
    for _ in range(2):
        with timers("rollout"):
            time.sleep(0.02)
            with timers("reference"):
                time.sleep(0.03)
    metrics = timers.pop_metrics()
    assert set(metrics) == {"timers/rollout_s", "timers/reference_s"}
    assert metrics["timers/reference_s"] >= 0.06
    assert metrics["timers/rollout_s"] >= metrics["timers/reference_s"] + 0.04
    assert timers.pop_metrics() == {}


def test_a_phase_that_raises_is_still_timed():
    timers = PhaseTimers()
    try:
        with timers("train"):
            time.sleep(0.01)
            raise RuntimeError("step failed")
    except RuntimeError:
        pass
    assert timers.pop_metrics()["timers/train_s"] >= 0.01
