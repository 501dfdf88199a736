"""The training pairs of an iterative run (SPIN, Self-Rewarding), rebuilt from each iteration's rollout, and the
sampler that draws them.

Both datasets are indexed like the SFT dataset whose prompts the rollout answered (index i: prompt i), so the
sampler, the reference tables and resumed runs all name a pair by its prompt's index.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from nemo_aligner.data.nlp.dpo_dataset import DPOCollate, filler_pair_item
from nemo_aligner.data.nlp.samplers import FILLER_INDEX, GlobalBatchSampler

RESPONSE, META, SFT, BAD, BAD_END = "response", "meta", "sft", "bad", "bad_end"
"""Kinds of training slot: a judged response pair, a meta-judge pair, an SFT pair, a bad sample, a bad end."""
TRAINED_KINDS = (RESPONSE, META, SFT)
"""Slots that train; bad samples and bad ends are masked (kept in the batch, counted)."""


def pair_item(
    index: int,
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    chosen_reward: float,
    rejected_reward: float,
    valid: bool,
) -> dict[str, Any]:
    """One (prompt + chosen, prompt + rejected) item as ``DPOCollate`` takes it."""
    return {
        "chosen_ids": torch.tensor(prompt + chosen),
        "rejected_ids": torch.tensor(prompt + rejected),
        "prompt_length": len(prompt),
        "chosen_length": len(prompt) + len(chosen),
        "rejected_length": len(prompt) + len(rejected),
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "sample_index": index,
        "valid": valid,
    }


class SPINPairsDataset(Dataset):
    """Pairs (prompt + actual, prompt + generated) of one iteration, indexed like the SFT dataset.

    Index ``N + i`` is prompt i's pair with iteration t-1's generation (``mix_previous_generations``); when that
    iteration did not generate for prompt i, the pair is masked out.
    """

    def __init__(self, sft_dataset, pad_id: int):
        self.sft_dataset = sft_dataset
        self.pad_id = pad_id
        self.generated: dict[int, tuple[list[int], bool]] = {}

    def __len__(self) -> int:
        return len(self.sft_dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index == FILLER_INDEX:
            return filler_pair_item(self.pad_id)
        prompt, actual = self.sft_dataset.prompt_and_answer(index % len(self.sft_dataset))
        generated, valid = self.generated.get(index, (list(actual), False))
        return pair_item(index, list(prompt), list(actual), list(generated), 1.0, 0.0, valid)


class SPINBatchSampler(GlobalBatchSampler):
    """The training sampler; with ``mix_previous`` each drawn prompt i also brings its pair with the previous
    iteration's generation (index N + i), so iteration t trains on the generations of t and t-1 (Chen et al.)
    with the same number of steps."""

    mix_previous = False

    def __iter__(self) -> Iterator[list[int]]:
        size = self.total_samples
        for share in super().__iter__():
            yield share + [i + size if i != FILLER_INDEX else i for i in share] if self.mix_previous else share


class SelfRewardingPairsDataset(torch.utils.data.Dataset):
    """The iteration's training slots indexed like the SFT dataset (``generated``: sample index -> slot)."""

    def __init__(self, sft_dataset, pad_id: int):
        self.sft_dataset = sft_dataset
        self.pad_id = pad_id
        self.generated: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.sft_dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index == FILLER_INDEX:
            return filler_pair_item(self.pad_id)
        slot = self.generated[index]
        prompt = slot["prompt"]
        chosen, rejected = slot["chosen"] or [self.pad_id], slot["rejected"] or [self.pad_id]
        valid = slot["kind"] in TRAINED_KINDS
        return pair_item(index, prompt, chosen, rejected, slot["chosen_reward"], slot["rejected_reward"], valid)


def pairs_loader_over_prompts(prompts_loader: DataLoader, pairs_cls=SPINPairsDataset) -> DataLoader:
    """A loader of ``pairs_cls`` over the SFT dataset of ``prompts_loader``, drawn with the same sampler settings.

    NeMo-Aligner's SPIN and Self-Rewarding scripts hand the trainer a loader of SFT samples; the loop trains on the
    pairs an iteration's rollout makes of those samples, as the recipes build them (``recipes/spin.py``).
    """
    sft_dataset, given = prompts_loader.dataset, prompts_loader.batch_sampler
    sampler = SPINBatchSampler(
        len(sft_dataset),
        given.global_batch_size,
        data_parallel_rank=given.data_parallel_rank,
        data_parallel_size=given.data_parallel_size,
        consumed_samples=given.consumed_samples,
        seed=given.seed,
        shuffle=given.shuffle,
        drop_last=given.drop_last,
    )
    pairs = pairs_cls(sft_dataset, sft_dataset.pad_id)
    return DataLoader(pairs, batch_sampler=sampler, collate_fn=DPOCollate(sft_dataset.pad_id))
