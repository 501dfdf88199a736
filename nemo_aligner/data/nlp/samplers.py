"""Batch samplers for data-parallel training and validation.

Each iteration yields, per optimizer step, THIS rank's share of one global batch: ``global_batch_size / dp_size``
dataset indices, which the trainer cuts into micro batches. Layout of one global batch of size G over D ranks
(``L = G / D``)::

    global batch positions   0 ........ L-1 | L ....... 2L-1 | ... | (D-1)L ..... G-1
    data-parallel rank       0              | 1              | ... | D-1

so concatenating the ranks' shares in rank order gives the global batch, and rank 0's micro batches followed by
rank 1's, ... are the micro batches a single process (D=1) would run, in the same order. The union over ranks
is therefore exactly what one process sees, whatever D.

Epoch ``e`` visits the samples in the order ``torch.randperm(N, generator=torch.Generator().manual_seed(seed +
e))`` (``0..N-1`` without shuffling), cut into consecutive global batches. ``drop_last=True`` drops the final
partial global batch; ``drop_last=False`` fills it up to G with ``-1`` (filler items: all-masked one-token
samples), fillers last, so every rank runs the same number of micro batches and fillers add nothing to the loss.
Unlike NeMo's random sampler, which gives each rank a fixed bucket of the data, the shuffle is global, so
results do not depend on D.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

FILLER_INDEX = -1


class GlobalBatchSampler:
    """Training sampler: a seeded shuffle per epoch, resumable from ``consumed_samples``.

    ``consumed_samples`` counts G per step taken (fillers included), like the trainer's counter; it determines
    the epoch and the step within it, so a run restarted with the checkpoint's value continues with exactly the
    batches it would have seen, even mid-epoch. Iterating yields the rest of the current epoch and advances
    ``consumed_samples`` by G per batch handed out; a trainer that stops early (or whose DataLoader prefetched)
    sets ``sampler.consumed_samples`` to its own count before iterating again.
    """

    def __init__(
        self,
        total_samples: int,
        global_batch_size: int,
        *,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        consumed_samples: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if global_batch_size <= 0 or global_batch_size % data_parallel_size:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a positive multiple of the data-parallel size "
                f"({data_parallel_size})"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} is outside [0, {data_parallel_size})")
        if consumed_samples < 0 or consumed_samples % global_batch_size:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must be a non-negative multiple of global_batch_size "
                f"({global_batch_size})"
            )
        self.total_samples = total_samples
        self.global_batch_size = global_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.consumed_samples = consumed_samples
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{total_samples} samples make no full global batch of {global_batch_size} (drop_last=True): add "
                "samples, lower the global batch size or set drop_last=False"
            )

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (global batches) in one pass over the data."""
        if self.drop_last:
            return self.total_samples // self.global_batch_size
        return math.ceil(self.total_samples / self.global_batch_size)

    @property
    def rank_batch_size(self) -> int:
        """Indices per rank per step (``global_batch_size / data_parallel_size``)."""
        return self.global_batch_size // self.data_parallel_size

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self.consumed_samples // (self.steps_per_epoch * self.global_batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """The order in which epoch ``epoch`` visits the samples."""
        if not self.shuffle:
            return list(range(self.total_samples))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.total_samples, generator=generator).tolist()

    def global_batch(self, order: list[int], step: int) -> list[int]:
        """All G indices of step ``step`` of an epoch with sample order ``order``, fillers last."""
        batch = order[step * self.global_batch_size : (step + 1) * self.global_batch_size]
        return batch + [FILLER_INDEX] * (self.global_batch_size - len(batch))

    def _step_in_epoch(self) -> int:
        return (self.consumed_samples // self.global_batch_size) % self.steps_per_epoch

    def __len__(self) -> int:
        """Steps left in the current epoch."""
        return self.steps_per_epoch - self._step_in_epoch()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        share = self.rank_batch_size
        start = self.data_parallel_rank * share
        for step in range(self._step_in_epoch(), self.steps_per_epoch):
            batch = self.global_batch(order, step)
            self.consumed_samples += self.global_batch_size
            yield batch[start : start + share]


class ValidationBatchSampler:
    """Validation sampler: all samples in file order, every iteration from the start, with the same layout
    across ranks and the same ``drop_last`` rule (fillers pad the last global batch) as training."""

    def __init__(
        self,
        total_samples: int,
        global_batch_size: int,
        *,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self._kwargs = {
            "total_samples": total_samples,
            "global_batch_size": global_batch_size,
            "data_parallel_rank": data_parallel_rank,
            "data_parallel_size": data_parallel_size,
            "shuffle": False,
            "drop_last": drop_last,
        }
        self.steps_per_epoch = GlobalBatchSampler(**self._kwargs).steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(GlobalBatchSampler(**self._kwargs))
