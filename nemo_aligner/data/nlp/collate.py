"""Batching SFT dataset items: right padding, filler samples and micro-batch splitting.

A batch is ``{"input_ids": Long[B, S], "loss_mask": Float[B, S], "lengths": Long[B], "prompt_lengths": Long[B],
"sample_index": Long[B]}``, padded on the right with the pad id (input ids) and 0 (loss mask) to the longest
sample, optionally rounded up to a multiple. Fillers (``sample_index == -1``) are all-masked one-token samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from nemo_aligner.tokenizers import Tokenizer


def resolve_pad_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id when it has none (NeMo pads SFT batches with EOS)."""
    pad_id = tokenizer.pad_id
    if pad_id is not None and pad_id >= 0:
        return pad_id
    if tokenizer.eos_id is None or tokenizer.eos_id < 0:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return tokenizer.eos_id


def filler_item(pad_id: int) -> dict[str, Any]:
    """An all-masked one-token item that pads a partial global batch and contributes nothing to any loss."""
    return {
        "input_ids": torch.tensor([pad_id], dtype=torch.long),
        "loss_mask": torch.zeros(1, dtype=torch.long),
        "prompt_length": 1,
        "sample_index": -1,
    }


def padded_length(length: int, multiple_of: int | None, max_length: int | None) -> int:
    """``length`` rounded up to ``multiple_of`` (when set), but never past ``max_length`` (when set)."""
    if multiple_of:
        length = math.ceil(length / multiple_of) * multiple_of
    return min(length, max_length) if max_length else length


class SFTCollate:
    """Right-pads dataset items into a batch (a class rather than a closure so DataLoader workers can pickle it).

    ``max_length`` caps the rounding to ``pad_length_to_multiple_of`` (samples are never longer than it), as NeMo
    caps it at ``max_seq_length``.
    """

    def __init__(self, pad_id: int, pad_length_to_multiple_of: int | None = None, max_length: int | None = None):
        if pad_length_to_multiple_of is not None and pad_length_to_multiple_of <= 0:
            raise ValueError(f"pad_length_to_multiple_of must be positive, got {pad_length_to_multiple_of}")
        self.pad_id = pad_id
        self.pad_length_to_multiple_of = pad_length_to_multiple_of
        self.max_length = max_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(item["input_ids"]) for item in items], dtype=torch.long)
        width = padded_length(int(lengths.max()), self.pad_length_to_multiple_of, self.max_length)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros((len(items), width), dtype=torch.float32)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
            loss_mask[row, :n] = torch.as_tensor(item["loss_mask"], dtype=torch.float32)
        return {
            "input_ids": input_ids,
            "loss_mask": loss_mask,
            "lengths": lengths,
            "prompt_lengths": torch.tensor([item["prompt_length"] for item in items], dtype=torch.long),
            "sample_index": torch.tensor([item["sample_index"] for item in items], dtype=torch.long),
        }
