"""SFT runs killed (SIGKILL), preempted (SIGTERM) or killed mid-save resume to the uninterrupted result, bit for bit."""

from __future__ import annotations

import signal

import pytest
import torch

from nemo_aligner.checkpoint.nemo_file import open_nemo, read_torch_dist_tensors
from nemo_aligner.checkpoint.trainer_checkpoint import list_checkpoints, read_trainer_state
from tests.functional.sft_runs import FAST_SFT, run_sft_subprocess

pytestmark = pytest.mark.slow


def final_weights(log_dir) -> dict[str, torch.Tensor]:
    with open_nemo(log_dir / "checkpoints" / "megatron_gpt_sft.nemo") as unpacked:
        return read_torch_dist_tensors(unpacked / "model_weights")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("uninterrupted")
    result = run_sft_subprocess(log_dir, *FAST_SFT)
    assert result.returncode == 0, result.stderr[-3000:]
    return final_weights(log_dir)


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path, uninterrupted):
    killed = run_sft_subprocess(tmp_path, *FAST_SFT, env={"NEMO_ALIGNER_KILL_AT": "after_step:5"})
    assert killed.returncode == -signal.SIGKILL
    assert [read_trainer_state(p)["step"] for p in list_checkpoints(tmp_path / "checkpoints")] == [3]
    resumed = run_sft_subprocess(tmp_path, *FAST_SFT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    assert_same_weights(final_weights(tmp_path), uninterrupted)


def test_checkpoint_of_a_killed_save_is_never_picked(tmp_path, uninterrupted):
    # The second save (step 6) dies after the weights were written but before the checkpoint completed.
    killed = run_sft_subprocess(tmp_path, *FAST_SFT, env={"NEMO_ALIGNER_KILL_AT": "inside_save:2"})
    assert killed.returncode == -signal.SIGKILL
    checkpoint_dir = tmp_path / "checkpoints"
    assert any(p.name.startswith(".") for p in checkpoint_dir.iterdir())  # the partial save is on disk
    assert [read_trainer_state(p)["step"] for p in list_checkpoints(checkpoint_dir)] == [3]
    resumed = run_sft_subprocess(tmp_path, *FAST_SFT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not any(p.name.startswith(".") for p in checkpoint_dir.iterdir())  # leftovers cleaned up
    assert_same_weights(final_weights(tmp_path), uninterrupted)


def test_sigterm_saves_then_resume_continues(tmp_path, uninterrupted):
    preempted = run_sft_subprocess(
        tmp_path, *FAST_SFT, env={"NEMO_ALIGNER_KILL_AT": "after_step:4", "NEMO_ALIGNER_KILL_SIGNAL": "TERM"}
    )
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    steps = [read_trainer_state(p)["step"] for p in list_checkpoints(tmp_path / "checkpoints")]
    assert steps[-1] == 4  # saved at the step the signal arrived, not at the next save_interval
    resumed = run_sft_subprocess(tmp_path, *FAST_SFT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path), uninterrupted)
