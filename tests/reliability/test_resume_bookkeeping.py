"""Resume bookkeeping the fault campaign relies on: metrics.csv cut back to its checkpoint, leftovers of killed
saves removed, and the campaign's own check that detects skipped or repeated data."""

from __future__ import annotations

import csv
import json

from nemo_aligner.checkpoint.trainer_checkpoint import (
    COMPLETE_MARKER,
    TRAINER_STATE_FILE,
    list_checkpoints,
    remove_partial_checkpoints,
)
from nemo_aligner.utils.exp_manager import ResumableCSVLogger
from scripts.fault_campaign import effective_history


def test_csv_logger_counts_flushed_rows_and_truncates_to_a_count(tmp_path):
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="", version="csv")
    for step in (1, 2, 3):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    assert logger.flush() == 3
    logger.log_metrics({"val/loss": 9.0}, step=3)
    assert logger.flush() == 4
    resumed = ResumableCSVLogger(save_dir=str(tmp_path), name="", version="csv")
    resumed.truncate(2)
    resumed.log_metrics({"train/loss": 30.0}, step=3)
    assert resumed.flush() == 3
    with (tmp_path / "csv" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    expected = [("1", "1.0", ""), ("2", "2.0", ""), ("3", "30.0", "")]
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows] == expected


def test_truncate_keeps_everything_for_a_checkpoint_without_a_count_and_nothing_for_a_fresh_start(tmp_path):
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="", version="csv")
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.flush()
    ResumableCSVLogger(save_dir=str(tmp_path), name="", version="csv").truncate(None)
    assert len((tmp_path / "csv" / "metrics.csv").read_text().splitlines()) == 2
    ResumableCSVLogger(save_dir=str(tmp_path), name="", version="csv").truncate(0)
    assert not (tmp_path / "csv" / "metrics.csv").exists()


def test_leftovers_of_killed_checkpoint_saves_and_nemo_exports_are_removed(tmp_path):
    keep = tmp_path / "step=3"
    keep.mkdir()
    (tmp_path / "model.nemo").write_text("kept")
    (tmp_path / ".step=6.partial-1234abcd").mkdir()
    (tmp_path / ".model.nemo.0123456789abcdef.tmp").mkdir()  # staging directory of a killed export
    (tmp_path / ".model.nemo.fedcba9876543210.tmp").write_text("half a tar")  # its half-written archive
    remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.nemo", "step=3"]


def fake_checkpoint(directory, name: str, **state) -> None:
    (directory / name).mkdir()
    (directory / name / TRAINER_STATE_FILE).write_text(json.dumps(state))
    (directory / name / COMPLETE_MARKER).write_text("ok\n")


def test_the_start_of_an_iteration_is_later_than_the_last_step_of_the_previous_one(tmp_path):
    # SPIN at step 3: the after-step save of iteration 0, then the iteration-end save that starts iteration 1
    # (consumed_samples reset to 0, so its default name sorts first).
    fake_checkpoint(tmp_path, "step=3-consumed_samples=48", step=3, iteration=0, consumed_samples=48)
    fake_checkpoint(tmp_path, "step=3-consumed_samples=0", step=3, iteration=1, consumed_samples=0)
    fake_checkpoint(tmp_path, "step=2-consumed_samples=32", step=2, iteration=0, consumed_samples=32)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step=2-consumed_samples=32", "step=3-consumed_samples=48", "step=3-consumed_samples=0"]


def record(step: int, indices: list[int]) -> dict:
    return {"step": step, "iteration": 0, "consumed_samples": 2 * (step - 1), "indices": indices}


def test_effective_history_rolls_back_replayed_steps_and_exposes_skips_and_repeats():
    clean = [record(1, [0, 1]), record(2, [2, 3]), record(3, [4, 5])]
    # Killed after step 3, resumed from the step-1 checkpoint: steps 2 and 3 run again with the same data.
    assert effective_history([*clean, *clean[1:]]) == clean
    # A resume that skipped a step, or that trained on step 2's samples again, is not the clean history.
    assert effective_history([*clean[:2], record(4, [6, 7])]) != clean
    assert effective_history([*clean[:2], record(3, [2, 3])]) != clean
