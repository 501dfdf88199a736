"""The precomputed reference pass scores exactly the samples the run will read: the training steps up to
``max_steps`` (across epochs cut short by ``limit_train_batches``) and the validation batches that
``limit_val_batches`` lets validation read, none when it is 0."""

from __future__ import annotations

import pytest

from examples.nlp.gpt.train_gpt_dpo import main as dpo_main
from nemo_aligner.algorithms import dpo
from nemo_aligner.data.nlp.samplers import GlobalBatchSampler
from tests.functional.dpo_runs import FAST_DPO, dpo_config


def samples_the_loop_draws(sampler: GlobalBatchSampler, steps_per_epoch: int, max_steps: int) -> set[int]:
    """What BaseTrainer.run_epoch reads: each epoch from its start, its first ``steps_per_epoch`` batches."""
    drawn, step, epoch = set(), 0, 0
    while step < max_steps:
        sampler.consumed_samples = epoch * sampler.steps_per_epoch * sampler.global_batch_size
        for in_epoch, batch in enumerate(sampler):
            if in_epoch >= steps_per_epoch or step >= max_steps:
                break
            drawn.update(i for i in batch if i >= 0)
            step += 1
        epoch += 1
    return drawn


@pytest.mark.parametrize("steps_per_epoch, max_steps", [(2, 5), (5, 12), (5, 3), (3, 3)])
def test_later_epochs_samples_are_what_training_draws_after_the_first_epoch(steps_per_epoch, max_steps):
    sampler = GlobalBatchSampler(23, 4, seed=7)
    first_epoch = samples_the_loop_draws(sampler, steps_per_epoch, min(steps_per_epoch, max_steps))
    everything = samples_the_loop_draws(sampler, steps_per_epoch, max_steps)
    later = dpo.later_epochs_samples(sampler, steps_per_epoch, max_steps)
    assert first_epoch | later == everything
    if max_steps <= steps_per_epoch:
        assert later == set()


@pytest.mark.slow
@pytest.mark.parametrize("limit_val_batches", [0, 2])
def test_reference_pass_scores_only_what_the_run_reads(tmp_path, tiny_sft_model, monkeypatch, limit_val_batches):
    scored: list[int] = []
    original = dpo.compute_reference_logprobs

    def counting(model, batches):
        def counted():
            for batch in batches:
                scored.append(int((batch["sample_index"] >= 0).sum()))
                yield batch

        return original(model, counted())

    monkeypatch.setattr(dpo, "compute_reference_logprobs", counting)
    overrides = [*FAST_DPO, f"trainer.dpo.limit_val_batches={limit_val_batches}"]
    dpo_main(dpo_config(tmp_path / "run", tiny_sft_model, *overrides))
    # FAST_DPO: 3 steps of 8 pairs, validation batches of 8 pairs.
    assert sum(scored) == 3 * 8 + limit_val_batches * 8
    tables = sorted(p.name.split("-")[0] for p in (tmp_path / "run" / "reference_logprobs").glob("*.pt"))
    assert tables == (["train"] if limit_val_batches == 0 else ["train", "validation"])
