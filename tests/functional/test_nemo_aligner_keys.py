"""The NeMo-Aligner keys implemented here change what a run does: LoRA SFT (``model.peft``), ``trainer.max_time``
and ``exp_manager.resume_from_checkpoint``."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch

from examples.nlp.gpt.train_gpt_sft import main as sft_main
from nemo_aligner.checkpoint.nemo_file import open_nemo, read_torch_dist_tensors
from nemo_aligner.checkpoint.trainer_checkpoint import list_checkpoints, read_trainer_state
from tests.functional.sft_runs import sft_config

pytestmark = pytest.mark.slow

SHORT_SFT = [
    "trainer.sft.max_steps=4",
    "trainer.sft.val_check_interval=2",
    "trainer.sft.limit_val_batches=1",
    "model.data.train_ds.global_batch_size=4",
    "model.data.train_ds.micro_batch_size=2",
    "model.optim.sched.warmup_steps=1",
]


def nemo_weights(path) -> dict[str, torch.Tensor]:
    with open_nemo(path) as unpacked:
        return read_torch_dist_tensors(unpacked / "model_weights")


def train_steps(log_dir) -> list[int]:
    with open(log_dir / "csv" / "metrics.csv") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get("train/loss")]


def test_lora_sft_trains_the_adapters_only_and_writes_the_merged_model(tmp_path, nemo_fixtures_dir):
    base_path = nemo_fixtures_dir / "tiny_gpt_rms_swiglu_rope_gqa.nemo"  # context 64: short plain samples
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"input": f"{i} plus {i} is", "output": f" {2 * i}"}) + "\n" for i in range(16)))
    log_dir = tmp_path / "run"
    overrides = [
        f"model.restore_from_path={base_path}",
        "model.peft.peft_scheme=lora",
        "model.peft.lora_tuning.adapter_dim=4",
        "model.peft.lora_tuning.alpha=8",
        "model.optim.lr=1e-2",
        "model.data.chat=false",
        f"model.data.train_ds.file_path={data}",
        f"model.data.validation_ds.file_path={data}",
        *SHORT_SFT,
        "trainer.sft.max_steps=3",
        "trainer.sft.val_check_interval=3",
    ]
    sft_main(sft_config(log_dir, *overrides))

    base = nemo_weights(base_path)
    merged = nemo_weights(log_dir / "checkpoints" / "megatron_gpt_sft.nemo")
    adapters = read_torch_dist_tensors(log_dir / "checkpoints" / "megatron_gpt_sft.lora")  # exported beside it
    assert merged.keys() == base.keys()
    qkv = "model.decoder.layers.self_attention.linear_qkv.weight"
    for key in base:
        if key != qkv:
            assert torch.equal(merged[key], base[key]), key  # frozen: bit for bit the starting model's
    for layer in range(base[qkv].shape[0]):
        prefix = f"model.decoder.layers.{layer}.self_attention.linear_qkv.adapter"
        lora_a, lora_b = adapters[f"{prefix}.lora_a.weight"], adapters[f"{prefix}.lora_b.weight"]
        assert lora_b.abs().max() > 0  # B starts at zero (row_init_method: zero): it trained
        expected = base[qkv][layer] + (8 / 4) * (lora_b @ lora_a)  # W + (alpha / r) B A
        torch.testing.assert_close(merged[qkv][layer], expected, rtol=0, atol=1e-6)


def test_max_time_stops_and_saves_and_resume_from_checkpoint_continues_that_run(tmp_path, caplog):
    """``trainer.max_time`` (0: stop after the first step) ends the run with a checkpoint; another run directory
    given that checkpoint as ``exp_manager.resume_from_checkpoint`` continues it to the weights of an
    uninterrupted run, bit for bit."""
    stopped = tmp_path / "stopped"
    sft_main(sft_config(stopped, *SHORT_SFT, "trainer.max_time=00:00:00:00"))
    assert train_steps(stopped) == [1]
    (checkpoint,) = list_checkpoints(stopped / "checkpoints")
    assert read_trainer_state(checkpoint)["step"] == 1
    assert not (stopped / "checkpoints" / "megatron_gpt_sft.nemo").exists()  # stopped, not finished

    resumed = tmp_path / "resumed"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nemo_aligner"):
        # quoted: the checkpoint's name holds "="
        sft_main(sft_config(resumed, *SHORT_SFT, f"exp_manager.resume_from_checkpoint='{checkpoint}'"))
    assert any("Resumed at step 1" in r.getMessage() for r in caplog.records)
    assert train_steps(resumed) == [2, 3, 4]
    # NeMo-Aligner's bookkeeping metrics: samples so far (global batch 4), epoch, wall-clock seconds
    with open(resumed / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r.get("train/loss")]
    assert [float(r["train/consumed_samples"]) for r in train] == [8.0, 12.0, 16.0]
    assert all(float(r["train/epoch"]) == 0 and float(r["train/step_time"]) > 0 for r in train)
    assert [float(r["val/validation_step_time"]) > 0 for r in rows if r.get("val/loss")] == [True, True]

    uninterrupted = tmp_path / "uninterrupted"
    sft_main(sft_config(uninterrupted, *SHORT_SFT))
    expected = nemo_weights(uninterrupted / "checkpoints" / "megatron_gpt_sft.nemo")
    got = nemo_weights(resumed / "checkpoints" / "megatron_gpt_sft.nemo")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_resume_from_checkpoint_that_is_not_a_checkpoint_is_a_config_error(tmp_path):
    from nemo_aligner.utils.config_validation import ConfigError

    with pytest.raises(ConfigError, match=r"exp_manager\.resume_from_checkpoint: .*not a complete trainer checkpoint"):
        sft_main(sft_config(tmp_path / "run", *SHORT_SFT, f"exp_manager.resume_from_checkpoint={tmp_path}"))
    assert not (tmp_path / "run").exists()  # reported before anything was written
