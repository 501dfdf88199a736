"""DPO training loop, and when its precomputed reference values are scored.

The reference policy of DPO (``nemo_aligner/models/nlp/gpt/reference.py``) is frozen, so by default its log-probs
are computed once, before training, with the same batching and padding as the training steps (the first step then
sees bit-identical policy and reference values: loss exactly log 2, every reward 0). They are stored per sample
beside the experiment and reused across epochs and on resume; a fingerprint of data, model, tokenizer and batching
invalidates them when any changes. The other reference policies (CPU-swapped weights, LoRA adapters off) compute
them per step in the model.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from nemo_aligner.algorithms.base import BaseTrainer
from nemo_aligner.data.nlp.collate import refuse_unsupported_layout_flags
from nemo_aligner.data.nlp.dpo_dataset import DPOCollate
from nemo_aligner.models.nlp.gpt.reference import (  # noqa: F401 (names this module has always offered)
    ReferenceLogprobs,
    checkpoint_identity,
    compute_reference_logprobs,
    fingerprint,
    gather_reference_logprobs,
)
from nemo_aligner.utils.distributed import gather_data_parallel_objects, is_global_rank_zero
from nemo_aligner.utils.utils import release_freed_memory

logger = logging.getLogger(__name__)


def training_order_batches(dataloader, steps_per_epoch: int, max_steps: int) -> Iterable[Mapping[str, Any]]:
    """The batches of the first epoch's steps exactly as training will see them (epoch 0 order), then, when
    training runs past one epoch, the samples that the later epochs' steps (up to ``max_steps``) draw and that were
    not scored yet, in further batches of the same size. Nothing the run will not read is scored."""
    sampler = dataloader.batch_sampler
    sampler.consumed_samples = 0
    seen: set[int] = set()
    for step, batch in enumerate(dataloader):
        if step >= min(steps_per_epoch, max_steps):
            break
        seen.update(i for i in batch["sample_index"].tolist() if i >= 0)
        yield batch
    if max_steps > steps_per_epoch:
        yield from _remaining_batches(dataloader, seen, later_epochs_samples(sampler, steps_per_epoch, max_steps))


def later_epochs_samples(sampler, steps_per_epoch: int, max_steps: int) -> set[int]:
    """The sample indices that epochs 1, 2, ... draw in their first ``steps_per_epoch`` steps, until ``max_steps``
    steps in all (``BaseTrainer.run_epoch``: an epoch cut short by ``limit_train_batches`` ends there)."""
    needed: set[int] = set()
    epoch = 1
    while epoch * steps_per_epoch < max_steps:
        order = sampler.epoch_order(epoch)
        for step in range(min(steps_per_epoch, max_steps - epoch * steps_per_epoch)):
            needed.update(i for i in sampler.global_batch(order, step) if i >= 0)
        epoch += 1
    return needed


def _remaining_batches(dataloader, seen: set[int], needed: set[int]):
    sampler = dataloader.batch_sampler
    share = sampler.rank_batch_size
    everything = sorted(needed - _all_ranks_seen(seen))
    per_step = sampler.global_batch_size
    start = sampler.data_parallel_rank * share
    for offset in range(0, len(everything), per_step):
        chunk = everything[offset : offset + per_step]
        chunk = chunk + [-1] * (per_step - len(chunk))
        yield dataloader.collate_fn([dataloader.dataset[i] for i in chunk[start : start + share]])


def _all_ranks_seen(seen: set[int]) -> set[int]:
    return set().union(*gather_data_parallel_objects(seen))


def dpo_custom_collate(
    batch: Sequence[Mapping[str, Any]],
    eos_id: int,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    pad_length_to_multiple_of: int | None = None,
) -> dict:
    """NeMo-Aligner's DPO collate function: a thin entry to :class:`~nemo_aligner.data.nlp.dpo_dataset.DPOCollate`
    (padding with ``eos_id``), so the batch has this package's keys (``chosen``, ``rejected``, their masks, ...).
    The three flags must be false (:func:`~nemo_aligner.data.nlp.collate.refuse_unsupported_layout_flags`)."""
    refuse_unsupported_layout_flags(
        reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask, eod_mask_loss=eod_mask_loss
    )
    return DPOCollate(eos_id, pad_length_to_multiple_of)(batch)


def load_or_compute_reference(
    model, batches: Iterable[Mapping[str, Any]], cache_path: Path | None
) -> ReferenceLogprobs:
    """The cached table when its fingerprinted file exists, else computed from ``batches`` (cached by rank 0)."""
    if cache_path is not None and cache_path.is_file():
        logger.info("Reusing precomputed reference log-probs %s", cache_path)
        return ReferenceLogprobs.load(cache_path)
    logger.info("Precomputing reference log-probs (%s)", cache_path or "not cached")
    table = compute_reference_logprobs(model, batches)
    if cache_path is not None and is_global_rank_zero():
        table.save(cache_path)
    if dist.is_initialized():
        dist.barrier()
    return table


class DPOTrainer(BaseTrainer):
    """The shared loop; with a precomputed reference policy its values are attached to every batch.

    ``collate_fn`` (NeMo-Aligner's argument): when given, both dataloaders collate with it (its scripts build them
    with ``identity_collate`` and pass ``partial(dpo_custom_collate, ...)`` here).
    """

    def __init__(self, *args, collate_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        if collate_fn is not None:
            for loader in (self.train_dataloader, self.val_dataloader):
                if loader is not None:
                    loader.collate_fn = collate_fn

    def precompute_reference(self, cache_dir: Path | None, settings: Mapping[str, Any]) -> None:
        """Score the precomputed reference's train and validation tables with the initial weights (before a resumed
        checkpoint replaces them), or reuse the cached files. ``settings`` (checkpoint, tokenizer, data) and the
        reference policy's own fingerprint name the files; nothing to do for a per-step reference."""
        reference = self.model.reference
        if not reference.precomputed:
            return
        settings = {**settings, **reference.fingerprint(self.model)}
        train_ds, val_ds = self.train_dataloader.dataset, self.val_dataloader.dataset
        train_batches = training_order_batches(self.train_dataloader, self.steps_per_epoch, self.max_steps)
        steps = {"steps": self.max_steps, "steps_per_epoch": self.steps_per_epoch}
        train_name = f"train-{fingerprint({**settings, **steps}, train_ds.paths)}.pt"
        reference.set_table("train", load_or_compute_reference(self.model, train_batches, _in(cache_dir, train_name)))
        # Only the batches validation will read (none with limit_val_batches=0).
        validation = None
        if self.val_batches > 0:
            val_name = f"validation-{fingerprint({**settings, 'batches': self.val_batches}, val_ds.paths)}.pt"
            val_batches = itertools.islice(self.val_dataloader, self.val_batches)
            validation = load_or_compute_reference(self.model, val_batches, _in(cache_dir, val_name))
        reference.set_table("validation", validation)
        release_freed_memory()  # the pass's activations: not resident under the training loop's

    def prepare_batch(self, batch: Mapping[str, Any], training: bool) -> Mapping[str, Any]:
        reference = self.model.reference
        return reference.attach(batch, "train" if training else "validation") if reference.precomputed else batch


def _in(directory: Path | None, name: str) -> Path | None:
    return None if directory is None else Path(directory) / name
