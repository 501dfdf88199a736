"""Batch samplers: data-parallel layout, resume from consumed_samples, per-epoch shuffles, filler padding."""

from __future__ import annotations

import itertools

import pytest
import torch

from nemo_aligner.data.nlp.samplers import FILLER_INDEX, GlobalBatchSampler, ValidationBatchSampler


def epoch_batches(sampler) -> list[list[int]]:
    return [list(batch) for batch in sampler]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("dp_size", [2, 4])
def test_union_over_ranks_is_the_single_process_global_batch(dp_size, drop_last):
    kwargs = {"total_samples": 21, "global_batch_size": 8, "seed": 7, "drop_last": drop_last}
    single = GlobalBatchSampler(**kwargs)
    ranks = [GlobalBatchSampler(**kwargs, data_parallel_rank=r, data_parallel_size=dp_size) for r in range(dp_size)]
    for _ in range(3):  # three epochs
        expected = epoch_batches(single)
        per_rank = [epoch_batches(sampler) for sampler in ranks]
        assert all(len(batches) == len(expected) == single.steps_per_epoch for batches in per_rank)
        for step, global_batch in enumerate(expected):
            shares = [batches[step] for batches in per_rank]
            assert all(len(share) == 8 // dp_size for share in shares)
            assert list(itertools.chain(*shares)) == global_batch


def test_resume_from_consumed_samples_equals_continuing():
    kwargs = {"total_samples": 10, "global_batch_size": 4, "seed": 3, "drop_last": False}
    running = GlobalBatchSampler(**kwargs)
    stream = [batch for _ in range(4) for batch in epoch_batches(running)]  # 4 epochs x 3 steps
    for steps_done in (1, 2, 3, 5, 7):  # mid-epoch and on epoch boundaries
        resumed = GlobalBatchSampler(**kwargs, consumed_samples=steps_done * 4)
        assert len(resumed) == 3 - steps_done % 3
        continued = [batch for _ in range(2) for batch in epoch_batches(resumed)]
        assert continued == stream[steps_done : steps_done + len(continued)]


def test_epochs_reshuffle_deterministically():
    sampler = GlobalBatchSampler(12, 4, seed=11)
    epochs = [sum(epoch_batches(sampler), []) for _ in range(3)]
    assert all(sorted(order) == list(range(12)) for order in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[1] == torch.randperm(12, generator=torch.Generator().manual_seed(12)).tolist()
    again = GlobalBatchSampler(12, 4, seed=11)
    assert [sum(epoch_batches(again), []) for _ in range(3)] == epochs
    assert sampler.consumed_samples == 36 and sampler.epoch == 3


def test_drop_last_true_drops_the_partial_batch():
    sampler = GlobalBatchSampler(10, 4, seed=0, drop_last=True)
    batches = epoch_batches(sampler)
    assert sampler.steps_per_epoch == 2 and len(batches) == 2
    assert len(set(sum(batches, []))) == 8 and FILLER_INDEX not in sum(batches, [])


def test_drop_last_false_pads_with_fillers():
    rank0, rank1 = (
        GlobalBatchSampler(10, 4, data_parallel_rank=r, data_parallel_size=2, drop_last=False) for r in (0, 1)
    )
    batches0, batches1 = epoch_batches(rank0), epoch_batches(rank1)
    assert rank0.steps_per_epoch == 3 and len(batches0) == len(batches1) == 3
    assert batches1[-1] == [FILLER_INDEX, FILLER_INDEX]
    assert FILLER_INDEX not in batches0[-1]
    assert sorted(sum(batches0 + batches1, []))[2:] == list(range(10))


def test_validation_sampler_in_order_from_the_start_every_time():
    sampler = ValidationBatchSampler(7, 4, data_parallel_rank=1, data_parallel_size=2, drop_last=False)
    assert len(sampler) == 2
    assert epoch_batches(sampler) == [[2, 3], [6, FILLER_INDEX]]
    assert epoch_batches(sampler) == [[2, 3], [6, FILLER_INDEX]]
    assert epoch_batches(ValidationBatchSampler(7, 4, drop_last=True)) == [[0, 1, 2, 3]]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"global_batch_size": 6, "data_parallel_size": 4}, "multiple of the data-parallel size"),
        ({"consumed_samples": 3}, "multiple of global_batch_size"),
        ({"total_samples": 3}, "no full global batch"),
        ({"data_parallel_rank": 2, "data_parallel_size": 2}, "outside"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GlobalBatchSampler(**{"total_samples": 10, "global_batch_size": 4, **kwargs})
