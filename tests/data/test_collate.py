"""Collate: right padding with the pad id, rounding to a multiple, fillers, length-bucketed micro batches."""

from __future__ import annotations

import pytest
import torch

from nemo_aligner.data.nlp.collate import SFTCollate, filler_item, resolve_pad_id
from nemo_aligner.tokenizers import ByteLevelTokenizer
from nemo_aligner.utils.batching import length_bucketed_micro_batches
from nemo_aligner.utils.distributed import initialize_distributed

PAD = 1


def item(ids: list[int], mask: list[int], index: int) -> dict:
    return {
        "input_ids": torch.tensor(ids),
        "loss_mask": torch.tensor(mask),
        "prompt_length": mask.index(1),
        "sample_index": index,
    }


ITEMS = [item([5, 6, 7], [0, 1, 1], 3), item([8, 9, 10, 11, 12], [0, 0, 1, 1, 1], 0), filler_item(PAD)]


@pytest.mark.parametrize("multiple_of,max_length,width", [(None, None, 5), (4, None, 8), (4, 6, 6), (1, None, 5)])
def test_padding(multiple_of, max_length, width):
    batch = SFTCollate(PAD, multiple_of, max_length)(ITEMS)
    pad = lambda row, n: row + [PAD] * (n - len(row))  # noqa: E731
    assert batch["input_ids"].tolist() == [pad([5, 6, 7], width), pad([8, 9, 10, 11, 12], width), pad([PAD], width)]
    assert batch["loss_mask"].tolist() == [
        [0, 1, 1] + [0] * (width - 3),
        [0, 0, 1, 1, 1] + [0] * (width - 5),
        [0] * width,
    ]
    assert batch["input_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.float32
    assert batch["lengths"].tolist() == [3, 5, 1]
    assert batch["prompt_lengths"].tolist() == [1, 2, 1]
    assert batch["sample_index"].tolist() == [3, 0, -1]


def test_pad_id_falls_back_to_eos():
    class NoPad(ByteLevelTokenizer):
        @property
        def pad_id(self) -> None:
            return None

    assert resolve_pad_id(ByteLevelTokenizer()) == 1
    assert resolve_pad_id(NoPad()) == 0


def test_collated_batches_cut_into_length_buckets_each_trimmed_to_its_longest():
    initialize_distributed()  # one process: no pipeline, so micro batches are trimmed
    batch = SFTCollate(PAD)([*ITEMS, filler_item(PAD)])  # lengths 3, 5, 1, 1
    keys = ("input_ids", "loss_mask")
    (short, long), order = length_bucketed_micro_batches(batch, 2, batch["lengths"], keys)
    assert order.tolist() == [2, 3, 0, 1]  # stable sort by length: the two fillers first
    assert short["input_ids"].shape == (2, 1) and long["input_ids"].shape == (2, 5)
    assert short["sample_index"].tolist() == [-1, -1] and long["sample_index"].tolist() == [3, 0]
    rounded, _ = length_bucketed_micro_batches(batch, 2, batch["lengths"], keys, multiple_of=4)
    assert [m["input_ids"].shape[1] for m in rounded] == [4, 5]  # rounded up to 4, never past the batch's width
    with pytest.raises(ValueError, match="do not split"):
        length_bucketed_micro_batches(batch, 3, batch["lengths"], keys)
