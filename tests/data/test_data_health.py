"""Data that cannot teach or cannot be encoded (issue 16): identical preference pairs and lone surrogates."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf

from nemo_aligner.data.nlp.dpo_builders import build_dpo_dataset
from nemo_aligner.data.nlp.dpo_dataset import DPOCollate
from nemo_aligner.data.nlp.jsonl import DataError, read_jsonl
from tests.data.test_dpo_dataset import LINE


def test_identical_pairs_are_reported_per_file_and_excluded_from_the_loss(write_jsonl, tokenizer, caplog):
    same = {**LINE, "rejected_response": LINE["chosen_response"]}
    path = write_jsonl([LINE, same, LINE, same, LINE])
    with caplog.at_level(logging.WARNING):
        dataset = build_dpo_dataset(OmegaConf.create({"seq_length": 128}), path, tokenizer)
    assert dataset.identical_lines == [(str(path), 2), (str(path), 4)]
    assert f"2 pairs of {path} have identical chosen and rejected responses" in caplog.text
    assert f"{path}:2, {path}:4" in caplog.text
    batch = DPOCollate(pad_id=1)([dataset[i] for i in range(5)])
    assert batch["valid"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]  # the loss weighs each pair by valid


def test_lone_surrogates_are_reported_with_file_line_key_and_position(write_jsonl):
    path = write_jsonl(['{"a": "ok"}', '{"a": "x\\ud800y", "b": ["fine", "\\udfff"]}'])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert f"{path}:2: 'a': character 2 is a lone surrogate" in message
    assert f"{path}:2: 'b[1]': character 1 is a lone surrogate" in message
    assert read_jsonl(write_jsonl(['{"a": "\\ud83d\\ude00 paired"}']))[0].data["a"] == "\U0001f600 paired"
