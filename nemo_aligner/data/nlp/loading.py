"""Samplers and data loaders from a split config (``model.data.train_ds`` / ``validation_ds`` keys), shared by the
SFT builders (``builders.py``) and the DPO builders (``dpo_builders.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sized
from typing import Any

from torch.utils.data import DataLoader

from nemo_aligner.data.nlp.samplers import GlobalBatchSampler, ValidationBatchSampler

# The split keys' values in NeMo-Aligner's gpt_sft.yaml, used only for keys a config leaves out.
SPLIT_DEFAULTS: dict[str, Any] = {
    "min_seq_length": 1,
    "drop_last": True,
    "shuffle": True,
    "label_key": "output",
    "add_eos": True,
    "add_sep": False,
    "add_bos": False,
    "sep_id": 0,  # NeMo-Aligner's build_sft_dataset passes sep_id=0
    "truncation_field": "input",
    "truncation_method": "right",
    "prompt_template": "{input} {output}",
    "pad_length_to_multiple_of": None,
}


def split_value(split_cfg: Mapping[str, Any], key: str) -> Any:
    """A split key, falling back to :data:`SPLIT_DEFAULTS`; keys without a default are required."""
    value = split_cfg.get(key, SPLIT_DEFAULTS.get(key))
    if value is None and key not in SPLIT_DEFAULTS:
        raise ValueError(f"model.data.<split>.{key} must be set")
    return value


def build_train_sampler(
    split_cfg: Mapping[str, Any],
    dataset: Sized,
    global_batch_size: int,
    *,
    data_parallel_rank: int,
    data_parallel_size: int,
    seed: int,
    consumed_samples: int = 0,
) -> GlobalBatchSampler:
    """The training sampler, with the split's ``shuffle`` and ``drop_last``."""
    return GlobalBatchSampler(
        len(dataset),
        global_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
        consumed_samples=consumed_samples,
        seed=seed,
        shuffle=bool(split_value(split_cfg, "shuffle")),
        drop_last=bool(split_value(split_cfg, "drop_last")),
    )


def build_validation_sampler(
    split_cfg: Mapping[str, Any],
    dataset: Sized,
    global_batch_size: int,
    *,
    data_parallel_rank: int,
    data_parallel_size: int,
) -> ValidationBatchSampler:
    """The validation sampler (file order), with the split's ``drop_last``."""
    return ValidationBatchSampler(
        len(dataset),
        global_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
        drop_last=bool(split_value(split_cfg, "drop_last")),
    )


def rank_share_dataloader(dataset, sampler, collate, data_cfg: Mapping[str, Any] | None = None) -> DataLoader:
    """A DataLoader yielding one collated rank share per step, with ``model.data.num_workers`` workers."""
    num_workers = int((data_cfg or {}).get("num_workers", 0))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
