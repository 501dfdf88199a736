"""From the DPO ``model.data`` config to preference datasets, collate functions and data loaders.

``data_cfg`` is the ``model.data`` node, with NeMo-Aligner's ``gpt_dpo.yaml`` keys: ``data_prefix`` (``{train:
[..], validation: [..], test: [..]}``, each split one file or a list of files concatenated in order),
``data_impl`` (``jsonl``), ``seq_length``, ``append_eod``, ``pad_length_to_multiple_of``, ``chat_prompt_tokens``
(for message-list lines), ``default_chosen_reward``/``default_rejected_reward``, ``drop_last``,
``validation_drop_last``, ``shuffle`` and ``num_workers``. The samplers and the DataLoader are the SFT ones.

Reward defaults, highest precedence first: the line's ``chosen_reward``/``rejected_reward``; ``model.data.
default_*_reward``; ``model.dpo.default_*_reward`` (the key the NeMo-Aligner DPO guide names); NeMo-Aligner's
1.0 / 0.0. When both config keys are set and differ, a warning names the one that wins.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader

from nemo_aligner.data.nlp.builders import build_dataloader, build_train_sampler, build_validation_sampler
from nemo_aligner.data.nlp.chat import ChatPromptTokens
from nemo_aligner.data.nlp.collate import resolve_pad_id
from nemo_aligner.data.nlp.dpo_dataset import DPOCollate, DPODataset, PreferencePairFormat, load_pairs
from nemo_aligner.data.nlp.jsonl import DataError, ProblemReport, check_global_batch_fits, read_jsonl
from nemo_aligner.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# NeMo-Aligner's values for the model.data keys a config leaves out (seq_length has none: it is required).
DATA_DEFAULTS: dict[str, Any] = {
    "data_impl": "jsonl",
    "append_eod": False,
    "pad_length_to_multiple_of": None,
    "chat_prompt_tokens": None,
    "shuffle": True,
    "drop_last": True,
    "validation_drop_last": False,
}
REWARD_DEFAULTS = {"default_chosen_reward": 1.0, "default_rejected_reward": 0.0}
_MAX_LISTED_DROPS = 10


def _data_value(data_cfg: Mapping[str, Any], key: str) -> Any:
    """A ``model.data`` key, falling back to :data:`DATA_DEFAULTS`."""
    value = data_cfg.get(key)
    return DATA_DEFAULTS.get(key) if value is None else value


def seq_length_of(data_cfg: Mapping[str, Any]) -> int:
    """``model.data.seq_length``, which must be a positive integer."""
    value = data_cfg.get("seq_length")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"model.data.seq_length must be a positive integer, got {value!r}")
    return value


def default_rewards(data_cfg: Mapping[str, Any], dpo_cfg: Mapping[str, Any] | None = None) -> tuple[float, float]:
    """The chosen and rejected rewards of lines without their own: ``model.data.*`` over ``model.dpo.*`` over 1.0 /
    0.0 (see the module docstring)."""
    values = []
    for key, fallback in REWARD_DEFAULTS.items():
        data_value = data_cfg.get(key)
        dpo_value = (dpo_cfg or {}).get(key)
        if data_value is not None and dpo_value is not None and data_value != dpo_value:
            logger.warning(
                "model.data.%s=%s and model.dpo.%s=%s are both set: model.data's value is used",
                key,
                data_value,
                key,
                dpo_value,
            )
        name, value = (f"model.data.{key}", data_value) if data_value is not None else (f"model.dpo.{key}", dpo_value)
        if value is None:
            value = fallback
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number, got {value!r}")
        values.append(float(value))
    return values[0], values[1]


def build_pair_format(
    data_cfg: Mapping[str, Any], tokenizer: Tokenizer, dpo_cfg: Mapping[str, Any] | None = None
) -> PreferencePairFormat:
    """The line format: chat tokens for message lists, ``append_eod`` and the reward defaults."""
    chosen, rejected = default_rewards(data_cfg, dpo_cfg)
    return PreferencePairFormat(
        tokenizer,
        ChatPromptTokens.from_config(_data_value(data_cfg, "chat_prompt_tokens")),
        append_eod=bool(_data_value(data_cfg, "append_eod")),
        default_chosen_reward=chosen,
        default_rejected_reward=rejected,
    )


def _check_data_impl(data_cfg: Mapping[str, Any]) -> None:
    data_impl = _data_value(data_cfg, "data_impl")
    if data_impl == "packed_jsonl":
        raise NotImplementedError(
            "model.data.data_impl=packed_jsonl (NeMo-Aligner's offline-packed files) is not supported: use "
            "data_impl=jsonl; to pack sequences (THD, no compute on padding) set model.dpo.packed_sequences=true"
        )
    if data_impl != "jsonl":
        raise ValueError(f"model.data.data_impl must be 'jsonl', got {data_impl!r}")


def _file_list(value: Any, name: str) -> list[str]:
    """One path or a list of paths; NeMo's blending weights (numbers) are rejected with an explanation."""
    if isinstance(value, str | os.PathLike):
        return [os.fspath(value)]
    if not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a jsonl path or a non-empty list of them, got {value!r}")
    paths = []
    for item in value:
        if isinstance(item, int | float):
            raise ValueError(
                f"{name} holds the number {item!r}: NeMo's weighted blending ([weight, path, ...]) is not supported; "
                "list the jsonl files, which are concatenated in order"
            )
        if not isinstance(item, str | os.PathLike):
            raise ValueError(f"{name} entries must be jsonl paths, got {item!r}")
        paths.append(os.fspath(item))
    return paths


def build_dpo_dataset(
    data_cfg: Mapping[str, Any],
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tokenizer: Tokenizer,
    *,
    dpo_cfg: Mapping[str, Any] | None = None,
    name: str = "model.data.data_prefix",
) -> DPODataset:
    """Read, validate and tokenize one split's files (concatenated in order) into a :class:`DPODataset`.

    Every problem of every file is raised together as one ``DataError``; pairs longer than ``seq_length`` are
    dropped with a warning, and a split with nothing left is a ``DataError``. ``name`` is the config key the
    paths came from, for messages.
    """
    _check_data_impl(data_cfg)
    paths = _file_list(paths, name)
    seq_length = seq_length_of(data_cfg)
    pair_format = build_pair_format(data_cfg, tokenizer, dpo_cfg)
    pairs, positions, dropped, errors = [], [], [], []
    for k, path in enumerate(paths):
        report = ProblemReport(path)
        try:
            loaded = load_pairs(read_jsonl(path, report), pair_format, report, seq_length)
            report.raise_if_any()
        except DataError as err:
            errors.append(str(err))
            continue
        pairs += loaded.pairs
        positions += [(k, line) for line in loaded.lines]
        dropped += [(k, line) for line in loaded.dropped]
    if errors:
        raise DataError("\n".join(errors))
    dataset = DPODataset(pairs, positions, dropped, paths, resolve_pad_id(tokenizer))
    files = ", ".join(paths)
    if dropped:
        listed = ", ".join(f"{path}:{line}" for path, line in dataset.dropped_lines[:_MAX_LISTED_DROPS])
        more = " ..." if len(dropped) > _MAX_LISTED_DROPS else ""
        total = len(dropped) + len(pairs)
        logger.warning(
            "%s: dropped %d of %d pairs longer than model.data.seq_length=%d (prompt + chosen or prompt + rejected "
            "tokens): %s%s",
            name,
            len(dropped),
            total,
            seq_length,
            listed,
            more,
        )
    if not pairs:
        raise DataError(
            f"{files}: all {len(dropped)} pairs are longer than model.data.seq_length={seq_length} tokens (prompt + "
            "the longer response); raise model.data.seq_length or shorten the data"
        )
    _report_identical_pairs(dataset, name)
    logger.info("%s (%s): %d pairs", name, files, len(pairs))
    return dataset


def _report_identical_pairs(dataset: DPODataset, name: str) -> None:
    """Pairs whose chosen and rejected tokens are the same stay out of the loss; say where they are, per file."""
    identical = dataset.identical_lines
    for path in dict.fromkeys(path for path, _ in identical):
        lines = [line for p, line in identical if p == path]
        listed = ", ".join(f"{path}:{line}" for line in lines[:_MAX_LISTED_DROPS])
        logger.warning(
            "%s: %d pairs of %s have identical chosen and rejected responses after tokenization; they are excluded "
            "from the loss (metric excluded_pairs): %s%s",
            name,
            len(lines),
            path,
            listed,
            " ..." if len(lines) > _MAX_LISTED_DROPS else "",
        )


def build_dpo_datasets(
    data_cfg: Mapping[str, Any],
    data_prefix: Mapping[str, Any] | None,
    tokenizer: Tokenizer,
    *,
    dpo_cfg: Mapping[str, Any] | None = None,
    splits: Sequence[str] = SPLITS,
    global_batch_size: int | None = None,
) -> dict[str, DPODataset]:
    """The datasets of ``splits`` from ``data_prefix`` (``model.data.data_prefix`` when None).

    With ``global_batch_size``, the train and validation splits must each hold at least one global batch (after
    dropping over-length pairs).
    """
    data_prefix = data_cfg.get("data_prefix") if data_prefix is None else data_prefix
    if not isinstance(data_prefix, Mapping):
        raise ValueError(
            "model.data.data_prefix must be a mapping {train: [files], validation: [files], test: [files]}, got "
            f"{data_prefix!r}; to read one file or list of files use build_dpo_dataset"
        )
    unknown = sorted(set(data_prefix) - set(SPLITS))
    if unknown:
        raise ValueError(f"model.data.data_prefix: unknown splits {unknown}; allowed: {list(SPLITS)}")
    datasets = {}
    for split in splits:
        key = f"model.data.data_prefix.{split}"
        if data_prefix.get(split) is None:
            raise ValueError(f"{key} must be set (a jsonl path or a list of them)")
        datasets[split] = build_dpo_dataset(data_cfg, data_prefix[split], tokenizer, dpo_cfg=dpo_cfg, name=key)
        if global_batch_size is not None and split != "test":
            check_global_batch_fits(", ".join(datasets[split].paths), len(datasets[split]), global_batch_size)
    return datasets


def build_dpo_collate(data_cfg: Mapping[str, Any], tokenizer: Tokenizer) -> DPOCollate:
    """Right padding with the tokenizer's pad (or EOS) id, rounded up to ``pad_length_to_multiple_of``."""
    return DPOCollate(
        resolve_pad_id(tokenizer), _data_value(data_cfg, "pad_length_to_multiple_of"), seq_length_of(data_cfg)
    )


def build_dpo_dataloader(
    data_cfg: Mapping[str, Any],
    dataset: DPODataset,
    tokenizer: Tokenizer,
    global_batch_size: int,
    *,
    train: bool,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    seed: int = 0,
    consumed_samples: int = 0,
) -> DataLoader:
    """A DataLoader yielding this rank's collated share of each global batch (the SFT samplers).

    Training shuffles per ``model.data.shuffle`` and drops a partial last batch per ``drop_last``; validation
    keeps file order and pads the last batch with fillers unless ``validation_drop_last``.
    """
    if train:
        split_cfg = {"shuffle": _data_value(data_cfg, "shuffle"), "drop_last": _data_value(data_cfg, "drop_last")}
        sampler = build_train_sampler(
            split_cfg,
            dataset,
            global_batch_size,
            data_parallel_rank=data_parallel_rank,
            data_parallel_size=data_parallel_size,
            seed=seed,
            consumed_samples=consumed_samples,
        )
    else:
        sampler = build_validation_sampler(
            {"drop_last": _data_value(data_cfg, "validation_drop_last")},
            dataset,
            global_batch_size,
            data_parallel_rank=data_parallel_rank,
            data_parallel_size=data_parallel_size,
        )
    return build_dataloader(dataset, sampler, build_dpo_collate(data_cfg, tokenizer), data_cfg)
