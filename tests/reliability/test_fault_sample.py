"""A fixed sample of the fault campaign (scripts/fault_campaign.py runs all kill points by hand): SFT killed
mid-step, mid-save and mid-export, SPIN killed in its rollout and between iterations; each resumed run ends with
the uninterrupted run's weights bit for bit and trained on the same samples in the same order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from scripts.fault_campaign import SFT, SPIN, check_result, kill_and_resume, load_reference, reference_run
from tests.reliability.conftest import SFT_KILL_CHAIN

pytestmark = pytest.mark.slow


def assert_survived(outcome: dict, checked: dict, kills: int) -> None:
    assert outcome["problems"] == [], (outcome["problems"], outcome.get("stderr"))
    assert checked["found"] == [], checked["found"]
    assert checked["max_abs_weight_deviation"] == 0.0
    # Each kill lost the steps since the last checkpoint (or at least the step it hit): they were run again.
    assert checked["steps_replayed"] >= kills


def test_sft_killed_mid_step_mid_save_and_mid_export_resumes_exactly(sft_runs):
    reference = load_reference(SFT, sft_runs["first"])
    assert [r["step"] for r in reference.history] == list(range(1, 9))
    checked = check_result(SFT, sft_runs["killed"], reference)
    assert_survived(sft_runs["outcome"], checked, kills=len(SFT_KILL_CHAIN.split(",")))


def test_spin_killed_in_rollout_and_between_iterations_resumes_exactly(tmp_path, tiny_sft_model):
    chain = "rollout:2,before_iteration_end"
    with ThreadPoolExecutor(max_workers=2) as pool:
        reference = pool.submit(reference_run, SPIN, tmp_path / "uninterrupted", tiny_sft_model)
        outcome = pool.submit(kill_and_resume, SPIN, chain, tmp_path / "killed", tiny_sft_model).result()
        checked = check_result(SPIN, tmp_path / "killed", reference.result())
    assert {r["iteration"] for r in reference.result().history} == {0, 1}
    assert_survived(outcome, checked, kills=1)  # the rollout kill replays no step; the iteration-end one does
