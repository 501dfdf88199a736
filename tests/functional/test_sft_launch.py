"""Launch paths of the SFT entry script: W&B offline, time limit, and trainer.devices=2 on one node."""

from __future__ import annotations

import csv

import pytest
import torch

from examples.nlp.gpt.train_gpt_sft import main as sft_main
from nemo_aligner.checkpoint.nemo_file import open_nemo, read_torch_dist_tensors
from nemo_aligner.checkpoint.trainer_checkpoint import list_checkpoints, read_trainer_state
from tests.functional.sft_runs import FAST_SFT, run_sft_subprocess, sft_config


def test_wandb_offline_logger_records_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = sft_config(
        tmp_path,
        *FAST_SFT,
        "trainer.sft.max_steps=2",
        "exp_manager.create_wandb_logger=true",
        "exp_manager.wandb_logger_kwargs.project=sft_test",
        "exp_manager.wandb_logger_kwargs.name=tiny",
        "exp_manager.wandb_logger_kwargs.offline=true",
    )
    sft_main(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_time_limit_saves_and_stops(tmp_path):
    cfg = sft_config(tmp_path, *FAST_SFT, "trainer.sft.save_interval=100", "exp_manager.max_time_per_run=00:00:00:00")
    sft_main(cfg)
    [checkpoint] = list_checkpoints(tmp_path / "checkpoints")
    assert read_trainer_state(checkpoint)["step"] == 1  # stopped after the first step, with a checkpoint


@pytest.mark.slow
@pytest.mark.distributed
def test_devices_2_on_one_node_matches_one_process(tmp_path):
    """Lightning starts the second process itself; DP=2 gives the single-process weights (fp32 rounding)."""
    steps = ["trainer.sft.max_steps=2", "trainer.sft.val_check_interval=2", "trainer.sft.save_interval=2"]
    two = run_sft_subprocess(tmp_path / "two", *FAST_SFT, *steps, "trainer.devices=2", "trainer.accelerator=cpu")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_sft_subprocess(tmp_path / "one", *FAST_SFT, *steps)
    assert one.returncode == 0, one.stderr[-3000:]

    def weights(log_dir):
        with open_nemo(log_dir / "checkpoints" / "megatron_gpt_sft.nemo") as unpacked:
            return read_torch_dist_tensors(unpacked / "model_weights")

    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=0), key
    with open(tmp_path / "two" / "csv" / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f) if r.get("train/loss")] == ["1", "2"]
