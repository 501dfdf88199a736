"""Session-wide runs of the fault campaign's tiny jobs, shared by the fault-sample and determinism tests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scripts.fault_campaign import SFT, kill_and_resume, run_job

# Killed mid-step (before the optimizer step of step 2), inside the second checkpoint save (weights written, no
# COMPLETE marker) and inside the final .nemo export, each time resumed by the next run.
SFT_KILL_CHAIN = "after_backward:2,inside_save:2,nemo_export"


@pytest.fixture(scope="session")
def sft_runs(tmp_path_factory) -> dict:
    """Two uninterrupted SFT runs and one killed along ``SFT_KILL_CHAIN`` then resumed (two processes at a time).

    Returns ``{"first": dir, "second": dir, "killed": dir, "outcome": kill_and_resume's report}``.
    """
    work = tmp_path_factory.mktemp("fault_sft")
    with ThreadPoolExecutor(max_workers=2) as pool:
        killed = pool.submit(kill_and_resume, SFT, SFT_KILL_CHAIN, work / "killed", None)
        first = pool.submit(run_job, SFT, work / "first", None)
        second = pool.submit(run_job, SFT, work / "second", None)
        for run in (first, second):
            assert run.result().returncode == 0, run.result().stderr[-3000:]
        outcome = killed.result()
    return {"first": work / "first", "second": work / "second", "killed": Path(outcome["log_dir"]), "outcome": outcome}
