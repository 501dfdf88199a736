"""From the model.data config to a DataLoader: one collated rank share per step, fillers all masked."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from nemo_aligner.data.nlp.builders import (
    build_collate,
    build_dataloader,
    build_sft_dataset,
    build_train_sampler,
    build_validation_sampler,
)

CONFIG = """
chat: false
num_workers: 0
train_ds:
  max_seq_length: 32
  shuffle: true
  drop_last: false
  pad_length_to_multiple_of: 8
validation_ds:
  max_seq_length: 32
  drop_last: false
"""


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_yields_rank_shares(write_jsonl, tokenizer, num_workers):
    path = write_jsonl([{"input": "q" * i, "output": "a"} for i in range(1, 11)])
    cfg = OmegaConf.create(CONFIG)
    cfg.num_workers = num_workers
    cfg.train_ds.file_path = cfg.validation_ds.file_path = str(path)
    dataset = build_sft_dataset(cfg, cfg.train_ds, tokenizer, seed=1)
    collate = build_collate(cfg.train_ds, tokenizer)
    seen = []
    for rank in range(2):
        sampler = build_train_sampler(
            cfg.train_ds, dataset, 4, data_parallel_rank=rank, data_parallel_size=2, seed=1, consumed_samples=0
        )
        batches = list(build_dataloader(dataset, sampler, collate, cfg))
        assert len(batches) == sampler.steps_per_epoch == 3
        for batch in batches:
            assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] % 8 == 0
            fillers = batch["sample_index"] == -1
            assert batch["loss_mask"][fillers].sum() == 0
            assert (batch["loss_mask"][~fillers].sum(dim=1) == 3).all()  # " a" and EOS
            seen += batch["sample_index"][~fillers].tolist()
    assert sorted(seen) == list(range(10))

    val_sampler = build_validation_sampler(cfg.validation_ds, dataset, 4, data_parallel_rank=0, data_parallel_size=1)
    val_batches = list(build_dataloader(dataset, val_sampler, build_collate(cfg.validation_ds, tokenizer), cfg))
    assert torch.cat([b["sample_index"] for b in val_batches]).tolist() == [*range(10), -1, -1]


def test_embedded_chat_and_plain_files_give_the_same_prompts(tokenizer):
    embedded = pytest.importorskip("nemo_aligner.data.embedded")
    chat_cfg = OmegaConf.create({"chat": True, "chat_prompt_tokens": embedded.CHAT_PROMPT_TOKENS})
    chat = build_sft_dataset(
        chat_cfg,
        {"file_path": str(embedded.EMBEDDED_DIR / "chat_validation.jsonl"), "max_seq_length": 256},
        tokenizer,
        0,
    )
    plain_split = {
        "file_path": str(embedded.EMBEDDED_DIR / "sft_validation.jsonl"),
        "max_seq_length": 256,
        "prompt_template": embedded.SFT_PROMPT_TEMPLATE,
    }
    plain = build_sft_dataset({}, plain_split, tokenizer, 0)
    assert len(chat) == len(plain) > 0
    end_of_turn = tokenizer.text_to_ids(embedded.END_OF_TURN)
    for i in range(len(chat)):
        (chat_prompt, chat_answer), (plain_prompt, plain_answer) = chat.prompt_and_answer(i), plain.prompt_and_answer(i)
        assert chat_prompt == plain_prompt
        assert chat_answer == plain_answer[:-1] + end_of_turn and plain_answer[-1] == tokenizer.eos_id
