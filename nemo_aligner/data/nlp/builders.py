"""From the ``model.data`` config to datasets, collate functions, samplers and data loaders.

``data_cfg`` is the ``model.data`` node (``chat``, ``chat_prompt_tokens``, ``sample``, ``num_workers``) and
``split_cfg`` a split node (``model.data.train_ds`` / ``validation_ds``) with NeMo-Aligner's ``gpt_sft.yaml`` keys.
Batch sizes, seeds and data-parallel coordinates come from the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch.utils.data import DataLoader

from nemo_aligner.data.nlp.chat import ChatPromptTokens, ChatTemplate
from nemo_aligner.data.nlp.collate import SFTCollate, resolve_pad_id
from nemo_aligner.data.nlp.jsonl import ProblemReport, read_jsonl
from nemo_aligner.data.nlp.samplers import GlobalBatchSampler, ValidationBatchSampler
from nemo_aligner.data.nlp.sft_dataset import (
    PromptTemplate,
    SampleFormat,
    SFTDataset,
    build_sample_mapping,
    load_samples,
)
from nemo_aligner.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

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


def _split_value(split_cfg: Mapping[str, Any], key: str) -> Any:
    """A split key, falling back to :data:`SPLIT_DEFAULTS`; keys without a default are required."""
    value = split_cfg.get(key, SPLIT_DEFAULTS.get(key))
    if value is None and key not in SPLIT_DEFAULTS:
        raise ValueError(f"model.data.<split>.{key} must be set")
    return value


def build_sample_format(
    data_cfg: Mapping[str, Any], split_cfg: Mapping[str, Any], tokenizer: Tokenizer
) -> SampleFormat:
    """The chat template (``model.data.chat``) or the plain prompt template of a split."""
    max_seq_length = int(_split_value(split_cfg, "max_seq_length"))
    min_seq_length = int(_split_value(split_cfg, "min_seq_length"))
    if data_cfg.get("chat", False):
        tokens = ChatPromptTokens.from_config(data_cfg.get("chat_prompt_tokens"))
        return ChatTemplate(tokenizer, tokens, max_seq_length=max_seq_length, min_seq_length=min_seq_length)
    return PromptTemplate(
        tokenizer,
        _split_value(split_cfg, "prompt_template"),
        max_seq_length=max_seq_length,
        min_seq_length=min_seq_length,
        label_key=_split_value(split_cfg, "label_key"),
        truncation_fields=_split_value(split_cfg, "truncation_field"),
        truncation_method=_split_value(split_cfg, "truncation_method"),
        add_bos=bool(_split_value(split_cfg, "add_bos")),
        add_eos=bool(_split_value(split_cfg, "add_eos")),
        add_sep=bool(_split_value(split_cfg, "add_sep")),
        sep_id=int(_split_value(split_cfg, "sep_id")),
    )


def num_samples_for(data_cfg: Mapping[str, Any], max_steps: int, global_batch_size: int) -> int | None:
    """``max_steps * global_batch_size`` when ``model.data.sample`` is set and max_steps is known, else None."""
    if not data_cfg.get("sample", False) or max_steps is None or max_steps < 0:
        return None
    return max_steps * global_batch_size


def build_sft_dataset(
    data_cfg: Mapping[str, Any],
    split_cfg: Mapping[str, Any],
    tokenizer: Tokenizer,
    seed: int,
    num_samples: int | None = None,
) -> SFTDataset:
    """Read, validate and tokenize a split's jsonl file (all problems raised together as one ``DataError``).

    With ``num_samples`` (see :func:`num_samples_for`) the dataset has exactly that many items, drawn from the
    file in seeded shuffled passes (:func:`~nemo_aligner.data.nlp.sft_dataset.build_sample_mapping`).
    """
    file_path = str(_split_value(split_cfg, "file_path"))
    sample_format = build_sample_format(data_cfg, split_cfg, tokenizer)
    report = ProblemReport(file_path)
    records = read_jsonl(file_path, report)
    samples = load_samples(records, sample_format, report)
    report.raise_if_any()
    truncated = sum(sample.truncated for sample in samples)
    if truncated:
        logger.warning("%s: %d of %d samples were truncated to max_seq_length", file_path, truncated, len(samples))
    mapping = None if num_samples is None else build_sample_mapping(len(samples), num_samples, seed)
    logger.info("%s: %d samples%s", file_path, len(samples), "" if mapping is None else f", {num_samples} drawn")
    return SFTDataset(samples, file_path, resolve_pad_id(tokenizer), mapping)


def build_collate(split_cfg: Mapping[str, Any], tokenizer: Tokenizer) -> SFTCollate:
    """Right padding with the tokenizer's pad (or EOS) id, rounded up to ``pad_length_to_multiple_of``."""
    return SFTCollate(
        resolve_pad_id(tokenizer),
        _split_value(split_cfg, "pad_length_to_multiple_of"),
        int(_split_value(split_cfg, "max_seq_length")),
    )


def build_train_sampler(
    split_cfg: Mapping[str, Any],
    dataset: SFTDataset,
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
        shuffle=bool(_split_value(split_cfg, "shuffle")),
        drop_last=bool(_split_value(split_cfg, "drop_last")),
    )


def build_validation_sampler(
    split_cfg: Mapping[str, Any],
    dataset: SFTDataset,
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
        drop_last=bool(_split_value(split_cfg, "drop_last")),
    )


def build_dataloader(
    dataset: SFTDataset,
    sampler: GlobalBatchSampler | ValidationBatchSampler,
    collate: SFTCollate,
    data_cfg: Mapping[str, Any] | None = None,
) -> DataLoader:
    """A DataLoader yielding one collated rank share per step, with ``model.data.num_workers`` workers."""
    num_workers = int((data_cfg or {}).get("num_workers", 0))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
