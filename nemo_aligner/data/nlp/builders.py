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
from nemo_aligner.data.nlp.dpo_builders import build_dpo_datasets
from nemo_aligner.data.nlp.jsonl import ProblemReport, read_jsonl
from nemo_aligner.data.nlp.loading import (  # noqa: F401 (SPLIT_DEFAULTS: this module's name for them since ever)
    SPLIT_DEFAULTS,
    build_train_sampler,
    build_validation_sampler,
    rank_share_dataloader,
    split_value,
)
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


def build_sample_format(
    data_cfg: Mapping[str, Any], split_cfg: Mapping[str, Any], tokenizer: Tokenizer
) -> SampleFormat:
    """The chat template (``model.data.chat``) or the plain prompt template of a split."""
    max_seq_length = int(split_value(split_cfg, "max_seq_length"))
    min_seq_length = int(split_value(split_cfg, "min_seq_length"))
    if data_cfg.get("chat", False):
        tokens = ChatPromptTokens.from_config(data_cfg.get("chat_prompt_tokens"))
        return ChatTemplate(tokenizer, tokens, max_seq_length=max_seq_length, min_seq_length=min_seq_length)
    return PromptTemplate(
        tokenizer,
        split_value(split_cfg, "prompt_template"),
        max_seq_length=max_seq_length,
        min_seq_length=min_seq_length,
        label_key=split_value(split_cfg, "label_key"),
        truncation_fields=split_value(split_cfg, "truncation_field"),
        truncation_method=split_value(split_cfg, "truncation_method"),
        add_bos=bool(split_value(split_cfg, "add_bos")),
        add_eos=bool(split_value(split_cfg, "add_eos")),
        add_sep=bool(split_value(split_cfg, "add_sep")),
        sep_id=int(split_value(split_cfg, "sep_id")),
    )


def num_samples_for(data_cfg: Mapping[str, Any], max_steps: int, global_batch_size: int) -> int | None:
    """``max_steps * global_batch_size`` when ``model.data.sample`` is set and max_steps is known, else None."""
    if not data_cfg.get("sample", False) or max_steps is None or max_steps < 0:
        return None
    return max_steps * global_batch_size


def build_sft_dataset(
    data_cfg: Mapping[str, Any],
    split_cfg: Mapping[str, Any] | Tokenizer,
    tokenizer: Tokenizer | int | None = None,
    seed: int | None = None,
    num_samples: int | None = None,
    **nemo_aligner_kwargs: Any,
) -> SFTDataset:
    """Read, validate and tokenize a split's jsonl file (all problems raised together as one ``DataError``).

    With ``num_samples`` (see :func:`num_samples_for`) the dataset has exactly that many items, drawn from the
    file in seeded shuffled passes (:func:`~nemo_aligner.data.nlp.sft_dataset.build_sample_mapping`).

    NeMo-Aligner's call ``build_sft_dataset(split_cfg, tokenizer, num_samples, answer_only_loss=True,
    is_chat=..., special_tokens=...)`` (a tokenizer second) is understood too: see :func:`nemo_aligner_sft_dataset`.
    """
    if not isinstance(split_cfg, Mapping):
        return nemo_aligner_sft_dataset(data_cfg, split_cfg, tokenizer, **nemo_aligner_kwargs)
    if nemo_aligner_kwargs or seed is None:
        raise TypeError("build_sft_dataset(data_cfg, split_cfg, tokenizer, seed, num_samples=None)")
    file_path = str(split_value(split_cfg, "file_path"))
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
        split_value(split_cfg, "pad_length_to_multiple_of"),
        int(split_value(split_cfg, "max_seq_length")),
    )


def build_dataloader(
    dataset: SFTDataset,
    sampler: GlobalBatchSampler | ValidationBatchSampler | None = None,
    collate: SFTCollate | None = None,
    data_cfg: Mapping[str, Any] | None = None,
    *,
    cfg: Mapping[str, Any] | None = None,
    **nemo_aligner_kwargs: Any,
) -> DataLoader:
    """A DataLoader yielding one collated rank share per step, with ``model.data.num_workers`` workers.

    Called NeMo-Aligner's way (``cfg=`` the run config, ``consumed_samples``, ``mbs``, ``gbs``, ...; see
    :func:`nemo_aligner_dataloader`), the sampler is built here from those arguments.
    """
    if cfg is not None:
        return nemo_aligner_dataloader(cfg, dataset, **nemo_aligner_kwargs)
    return rank_share_dataloader(dataset, sampler, collate, data_cfg)


# ---------------------------------------------------------------------------------------------- NeMo-Aligner's API
def nemo_aligner_dataloader(
    cfg: Mapping[str, Any],
    dataset,
    consumed_samples: int = 0,
    mbs: int | None = None,
    gbs: int | None = None,
    drop_last: bool = True,
    pad_samples_to_global_batch_size: bool = False,
    collate_fn=None,
    load_gbs: bool = True,
    use_random_sampler: bool = True,
    limit_batches: float | int | None = None,
) -> DataLoader:
    """``build_dataloader(cfg=..., dataset=..., ...)`` as NeMo-Aligner's scripts call it: our samplers (a global
    batch per step, this rank's share), shuffled by ``model.seed`` when ``use_random_sampler`` and
    ``model.data.shuffle`` (default true), in file order otherwise. ``mbs`` is unused (micro batches are cut by the
    model) and ``load_gbs`` must be true (one global batch per step is the only layout); a partial last batch is
    padded with fillers unless ``drop_last`` (``pad_samples_to_global_batch_size`` is implied). ``limit_batches``
    is unused: the trainer applies ``limit_train_batches``."""
    from megatron.core import parallel_state

    from nemo_aligner.utils.config import model_seed

    if not load_gbs:
        raise ValueError("build_dataloader(load_gbs=False) is not supported: each step loads one global batch")
    layout = {
        "data_parallel_rank": parallel_state.get_data_parallel_rank(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }
    model_cfg = cfg["model"]
    if use_random_sampler:
        shuffle = model_cfg.get("data", {}).get("shuffle", True)
        split_cfg = {"shuffle": True if shuffle is None else shuffle, "drop_last": drop_last}
        sampler = build_train_sampler(
            split_cfg, dataset, gbs, seed=model_seed(model_cfg), consumed_samples=consumed_samples, **layout
        )
    else:
        sampler = build_validation_sampler({"drop_last": drop_last}, dataset, gbs, **layout)
    return build_dataloader(dataset, sampler, collate_fn or identity_collate, model_cfg.get("data"))


def nemo_aligner_sft_dataset(
    split_cfg: Mapping[str, Any],
    tokenizer: Tokenizer,
    num_samples: int | None = None,
    answer_only_loss: bool = True,
    is_chat: bool = False,
    special_tokens: Mapping[str, str] | None = None,
) -> SFTDataset:
    """``build_sft_dataset`` called NeMo-Aligner's way: the split config, the tokenizer, ``num_samples``; chat
    format when ``is_chat`` (``special_tokens`` = ``model.data.chat_prompt_tokens``). ``num_samples`` draws with
    NeMo's default seed (the ``model.seed`` of the shipped configs), as NeMo-Aligner's builder did. Only
    answer tokens are ever scored here, so ``answer_only_loss=False`` is refused."""
    if not answer_only_loss:
        raise ValueError("answer_only_loss=False is not supported: only response tokens are scored")
    data_cfg = {"chat": is_chat, "chat_prompt_tokens": special_tokens}
    from nemo_aligner.utils.config import NEMO_DEFAULT_SEED

    return build_sft_dataset(data_cfg, split_cfg, tokenizer, NEMO_DEFAULT_SEED, num_samples)


def identity_collate(batch: list) -> list:
    """NeMo-Aligner's collate that leaves the items as a list (a trainer's ``collate_fn`` pads them later)."""
    return batch


def build_train_valid_test_dpo_datasets(
    cfg: Mapping[str, Any],
    data_prefix: Mapping[str, Any],
    data_impl: str = "jsonl",
    splits_string: str | None = None,
    train_valid_test_num_samples=None,
    seq_length: int | None = None,
    seed: int | None = None,
    tokenizer: Tokenizer | None = None,
):
    """NeMo-Aligner's DPO builder, a thin entry to :func:`~nemo_aligner.data.nlp.dpo_builders.build_dpo_datasets`:
    ``(train, validation, test)`` from ``cfg.data`` (``cfg`` is the model config) and the ``data_prefix`` mapping;
    ``test`` is None when ``data_prefix`` has none. ``splits_string``, ``train_valid_test_num_samples``,
    ``seq_length`` and ``seed`` are NeMo-Aligner's and unused: each split is its own file list, used whole, at
    ``model.data.seq_length``."""
    if data_impl != "jsonl":
        raise ValueError(f"data_impl={data_impl!r}: build_train_valid_test_dpo_datasets reads jsonl files")
    splits = [split for split in ("train", "validation", "test") if data_prefix.get(split) is not None]
    datasets = build_dpo_datasets(
        cfg["data"], data_prefix, tokenizer, dpo_cfg=cfg.get("dpo"), splits=splits, global_batch_size=None
    )
    return datasets.get("train"), datasets.get("validation"), datasets.get("test")


def build_train_valid_test_dpo_packed_datasets(*args: Any, **kwargs: Any):
    """Refused: NeMo-Aligner's offline-packed DPO data (``data_impl: packed_jsonl``) is not read here."""
    raise NotImplementedError(
        "build_train_valid_test_dpo_packed_datasets: pre-packed DPO data is not supported; keep the jsonl pairs "
        "(build_train_valid_test_dpo_datasets) and set model.dpo.packed_sequences=true to pack them at run time"
    )


def collate_with_pad_to_max_batch(max_seqlen: int, tokenizer_eos_id: int, cfg=None, **kwargs: Any) -> SFTCollate:
    """NeMo-Aligner's SFT collate factory: a thin entry to :class:`~nemo_aligner.data.nlp.collate.SFTCollate`
    padding every batch to ``max_seqlen`` with ``tokenizer_eos_id``. ``cfg`` and other keywords are accepted and
    unused (positions and attention masks are built by the model)."""
    return SFTCollate(tokenizer_eos_id, pad_length_to_multiple_of=max_seqlen, max_length=max_seqlen)
