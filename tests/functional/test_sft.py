"""SFT end to end on the embedded default (in-process), and bad data/config rejected before any training."""

from __future__ import annotations

import csv
import json

import pytest

from examples.nlp.gpt.train_gpt_sft import main as sft_main
from nemo_aligner.data.nlp.jsonl import DataError
from nemo_aligner.utils.config_validation import ConfigError
from tests.functional.sft_runs import FAST_SFT, sft_config


def read_metrics(log_dir) -> list[dict]:
    with open(log_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sft_on_the_embedded_default_lowers_validation_loss(tmp_path):
    cfg = sft_config(tmp_path, "trainer.sft.max_steps=60", "trainer.sft.val_check_interval=30")
    sft_main(cfg)
    rows = read_metrics(tmp_path)
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    first_train = float(next(r["train/loss"] for r in rows if r.get("train/loss")))
    # A fresh model scores answers near uniformly (log 640 = 6.46 nats/token); 60 steps learn the format.
    assert first_train > 5.5
    assert len(val) == 2 and val[1] < val[0] < first_train
    assert val[1] < 0.5 * first_train
    assert (tmp_path / "checkpoints" / "megatron_gpt_sft.nemo").is_file()


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD_CHAT = json.dumps(
    {
        "system": "",
        "mask": "User",
        "conversations": [{"from": "User", "value": "add 1 and 2"}, {"from": "Assistant", "value": "3"}],
    }
)


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([GOOD_CHAT] * 10 + ["{not json"], r"bad\.jsonl:11"),
        ([GOOD_CHAT] * 10 + [json.dumps({"system": "", "mask": "User"})], r"bad\.jsonl:11.*conversations"),
        ([], r"bad\.jsonl.*empty"),
        ([GOOD_CHAT] * 3, r"bad\.jsonl.*3.*global batch"),
    ],
    ids=["malformed_json", "missing_key", "empty_file", "shorter_than_global_batch"],
)
def test_bad_training_data_fails_before_training_naming_file_and_line(tmp_path, lines, expected):
    bad = _jsonl(tmp_path / "bad.jsonl", lines)
    cfg = sft_config(tmp_path / "run", *FAST_SFT, f"model.data.train_ds.file_path={bad}")
    with pytest.raises(DataError, match=expected):
        sft_main(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.data.train_ds.global_batch_size=10", r"model\.data\.train_ds\.global_batch_size: 10 is not divisible"),
        ("model.tensor_model_parallel_size=3", r"model\.tensor_model_parallel_size"),
        ("trainer.sft.max_steps=ten", r"trainer\.sft\.max_steps: must be an integer"),
        ("model.data.validation_ds.file_path=/nonexistent.jsonl", r"validation_ds\.file_path: file not found"),
        ("model.optim.name=sgd", r"model\.optim\.name: 'sgd' is not one of"),
    ],
    ids=["gbs_not_divisible", "tp_does_not_fit", "wrong_type", "missing_file", "unknown_optimizer"],
)
def test_bad_config_fails_before_any_model_is_built(tmp_path, override, expected):
    cfg = sft_config(tmp_path, *FAST_SFT, "model.data.train_ds.micro_batch_size=4", override)
    with pytest.raises(ConfigError, match=expected):
        sft_main(cfg)


def test_all_config_problems_are_reported_together(tmp_path):
    cfg = sft_config(tmp_path, *FAST_SFT, "model.data.train_ds.global_batch_size=10", "model.optim.name=sgd")
    # The validation batch sizes follow the training ones, so they are wrong too: 3 problems in one message.
    with pytest.raises(ConfigError, match=r"3 config problem") as info:
        sft_main(cfg)
    assert "global_batch_size" in str(info.value) and "optim.name" in str(info.value)


def test_lengths_beyond_the_context_are_clamped_with_a_warning(tmp_path, caplog):
    cfg = sft_config(tmp_path, *FAST_SFT, "trainer.sft.max_steps=1", "model.data.train_ds.max_seq_length=4096")
    sft_main(cfg)
    assert cfg.model.data.train_ds.max_seq_length == 128
    assert any("exceeds the model context" in r.message for r in caplog.records)
