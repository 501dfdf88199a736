"""Same seed, same config => identical metrics on CPU: across two runs and across a kill and resume."""

from __future__ import annotations

import pytest

from scripts.fault_campaign import metrics_rows, read_trace

pytestmark = pytest.mark.slow


def test_two_runs_and_a_killed_then_resumed_run_log_identical_metrics(sft_runs):
    first = metrics_rows(sft_runs["first"])
    # 8 training rows plus validation at steps 3, 6 and 8 (val_check_interval=3 and the last step).
    assert [int(r["step"]) for r in first if "train/loss" in r] == list(range(1, 9))
    assert [int(r["step"]) for r in first if "val/loss" in r] == [3, 6, 8]
    assert metrics_rows(sft_runs["second"]) == first
    assert metrics_rows(sft_runs["killed"]) == first  # rows are compared as logged: exact float text
    assert read_trace(sft_runs["second"]) == read_trace(sft_runs["first"])
