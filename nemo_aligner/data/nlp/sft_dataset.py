"""Supervised fine-tuning samples: plain prompt templates, tokenized samples and the dataset.

Every sample is tokenized once, when the dataset is built, so that length problems (too short, nothing left to
score after truncation, bad chat roles) are reported with their file and line before training starts. Token ids
are kept as int32 numpy arrays to hold large files in little memory.

A dataset item is ``{"input_ids": LongTensor[S], "loss_mask": LongTensor[S], "prompt_length": int,
"sample_index": int}``: ``loss_mask`` is 1 on the answer tokens the loss scores, ``prompt_length`` the number of
tokens before the first scored one, ``sample_index`` the sample's position in the file (-1 for a filler).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from nemo_aligner.data.nlp.collate import SFTCollate, filler_item
from nemo_aligner.data.nlp.jsonl import JsonlRecord, ProblemReport, type_problem
from nemo_aligner.data.nlp.samplers import FILLER_INDEX
from nemo_aligner.tokenizers import Tokenizer

logger = logging.getLogger(__name__)

TRUNCATION_METHODS = ("left", "right")
# The placeholder pieces of a template, NeMo's way: spaces just before a placeholder belong to its piece.
_PLACEHOLDER_SPLIT = re.compile(r"( *?{.+?})")
_PLACEHOLDER_KEYS = re.compile(r"{(.*?)}")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


class SampleError(Exception):
    """One sample cannot be used; the dataset builder adds the file and line."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


@dataclass(frozen=True, eq=False)
class TokenizedSample:
    """A tokenized sample: ids, which of them the loss scores, and whether it was truncated to fit."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    truncated: bool = field(default=False)

    @property
    def prompt_length(self) -> int:
        """Tokens before the first scored token (the generation context of single-turn data)."""
        return int(np.argmax(self.loss_mask)) if self.loss_mask.any() else len(self.loss_mask)

    def prompt_and_answer(self) -> tuple[list[int], list[int]]:
        """The generation prompt and the ground-truth response, as SPIN needs them.

        The response is the last run of scored tokens (plain: answer + EOS; chat: the last scored turn's value,
        its end-of-turn and the following turn start); the prompt is everything before it (chat: through the
        header of that turn). Tokens after the response (a trailing masked turn) are dropped.
        """
        scored = np.flatnonzero(self.loss_mask)
        end = int(scored[-1]) + 1
        gaps = np.flatnonzero(np.diff(scored) > 1)
        start = int(scored[gaps[-1] + 1]) if len(gaps) else int(scored[0])
        ids = self.input_ids.tolist()
        return ids[:start], ids[start:end]


def make_sample(ids: Sequence[int], mask: Sequence[int], min_seq_length: int, truncated: bool) -> TokenizedSample:
    """Check the length and that something is scored, then pack the sample into compact arrays."""
    if len(ids) < min_seq_length:
        raise SampleError(None, f"the sample has {len(ids)} tokens, fewer than min_seq_length={min_seq_length}")
    if not any(mask):
        reason = " after truncation to max_seq_length" if truncated else ""
        raise SampleError(None, f"no answer token is left to score{reason}")
    return TokenizedSample(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.bool_), truncated)


class SampleFormat(Protocol):
    """Turns one jsonl object into a tokenized sample (plain :class:`PromptTemplate` or chat ``ChatTemplate``)."""

    def validate(self, data: Mapping[str, Any]) -> list[tuple[str | None, str]]:
        """Structural problems of ``data`` as ``(key, message)`` pairs; empty when it can be tokenized."""

    def tokenize(self, data: Mapping[str, Any]) -> TokenizedSample:
        """The tokenized sample; raises :class:`SampleError` when it cannot be used."""


def unescape_template(template: str) -> str:
    """Turn the backslash escapes ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` typed on a command line into characters.

    NeMo decodes the whole template with ``unicode_escape``, which also mangles non-ASCII text; only these four
    escapes are decoded here.
    """
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], template)


def is_space_sensitive(tokenizer: Tokenizer) -> bool:
    """Whether a space changes the ids (``'x y'`` is not ``'x'`` + ``'y'``), NeMo's test for template pieces.

    SentencePiece-style tokenizers mark word starts themselves, so NeMo drops one leading space of each template
    piece for them; byte-level and byte-BPE tokenizers keep it.
    """
    return tokenizer.text_to_ids("x y") != tokenizer.text_to_ids("x") + tokenizer.text_to_ids("y")


class PromptTemplate:
    """Plain SFT samples from a ``prompt_template`` such as ``"{input} {output}"``, the NeMo way.

    The template is cut into pieces at its placeholders (spaces just before a placeholder go with it; one leading
    space of each piece is dropped for tokenizers that are not space sensitive), each placeholder is filled with
    the line's value stripped of spaces, and each piece is tokenized on its own, so the context/answer boundary is
    exact. The label placeholder (``{output}``) must end the template; every other placeholder (``{input}``,
    ``{system}``, ...) is a required string key of each line. The sample is ``[BOS] context [SEP] answer [EOS]``
    (BOS only when the tokenizer has one); the loss scores the answer and EOS (answer-only loss).

    When the sample is longer than ``max_seq_length``, the ``truncation_fields`` placeholders lose the excess,
    shared equally (the first fields take the remainder), from their end (``truncation_method="right"``) or their
    start (``"left"``); if they are too short, the remaining excess comes off the other pieces, from the last piece
    backwards (right) or the first forwards (left), as in NeMo.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_template: str,
        *,
        max_seq_length: int,
        min_seq_length: int = 1,
        label_key: str = "output",
        truncation_fields: str | Sequence[str] | None = "input",
        truncation_method: str = "right",
        add_bos: bool = False,
        add_eos: bool = True,
        add_sep: bool = False,
        sep_id: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = unescape_template(prompt_template)
        self.keys = tuple(dict.fromkeys(_PLACEHOLDER_KEYS.findall(self.template)))
        self.label_key = label_key
        if not self.template.endswith(f"{{{label_key}}}"):
            raise ValueError(
                f"prompt_template {prompt_template!r} must end with the label placeholder {{{label_key}}} "
                f"(label_key={label_key!r})"
            )
        if isinstance(truncation_fields, str):
            truncation_fields = [f.strip() for f in truncation_fields.split(",") if f.strip()]
        self.truncation_fields = tuple(truncation_fields or ())
        unknown = [f for f in self.truncation_fields if f not in self.keys]
        if unknown:
            raise ValueError(f"truncation_field {unknown} must name placeholders of prompt_template {self.keys}")
        if truncation_method not in TRUNCATION_METHODS:
            raise ValueError(f"truncation_method must be one of {TRUNCATION_METHODS}, got {truncation_method!r}")
        self.truncation_method = truncation_method
        self.max_seq_length = max_seq_length
        self.min_seq_length = min_seq_length
        bos_id = tokenizer.bos_id
        if add_bos and (bos_id is None or bos_id < 0):
            logger.warning("add_bos is set but the tokenizer has no BOS token: nothing is prepended")
        self.prefix_ids = [bos_id] if add_bos and bos_id is not None and bos_id >= 0 else []
        self.sep_ids = [sep_id] if add_sep else []
        self.eos_ids = [tokenizer.eos_id] if add_eos else []
        self._pieces = self._split_template(is_space_sensitive(tokenizer))

    def _split_template(self, space_sensitive: bool) -> list[tuple[str, str | None]]:
        """The template as ``(text, key)`` pieces: literal text (key None) or a placeholder with its leading
        spaces (text is the spaces)."""
        pieces = []
        for part in _PLACEHOLDER_SPLIT.split(self.template):
            if not space_sensitive and part.startswith(" "):
                part = part[1:]
            if not part:
                continue
            name = part.lstrip(" ")
            key = name[1:-1] if name.startswith("{") and name.endswith("}") and name[1:-1] in self.keys else None
            pieces.append((part[: len(part) - len(name)] if key is not None else part, key))
        return pieces

    def validate(self, data: Mapping[str, Any]) -> list[tuple[str | None, str]]:
        """Every placeholder must be a string key of the line."""
        problems = []
        for key in self.keys:
            if key not in data:
                problems.append((key, f"missing key (prompt_template {self.template!r} uses it)"))
            elif not isinstance(data[key], str):
                problems.append((key, type_problem(data[key], "a string")))
            elif key == self.label_key and not data[key].strip() and not self.eos_ids:
                # With EOS an empty answer teaches "stop here"; without it only the template's spaces are left.
                problems.append((key, "is empty and add_eos is false: the sample has nothing to learn"))
        return problems

    def render(self, data: Mapping[str, Any]) -> tuple[str, str]:
        """The context text and the answer text (the label piece with its leading spaces)."""
        texts = self._filled(data)
        return "".join(texts[:-1]), texts[-1]

    def _filled(self, data: Mapping[str, Any]) -> list[str]:
        """The template pieces with their placeholders filled with the line's values (stripped of spaces)."""
        return [text + data[key].strip(" ") if key is not None else text for text, key in self._pieces]

    def tokenize(self, data: Mapping[str, Any]) -> TokenizedSample:
        pieces = [self.tokenizer.text_to_ids(text) for text in self._filled(data)]
        keys = [key for _, key in self._pieces]
        extra = len(self.prefix_ids) + len(self.sep_ids) + len(self.eos_ids)
        excess = sum(map(len, pieces)) + extra - self.max_seq_length
        if excess > 0:
            self._truncate(pieces, keys, excess)
        context = self.prefix_ids + [i for ids in pieces[:-1] for i in ids] + self.sep_ids
        answer = pieces[-1] + self.eos_ids
        return make_sample(context + answer, [0] * len(context) + [1] * len(answer), self.min_seq_length, excess > 0)

    def _truncate(self, pieces: list[list[int]], keys: list[str | None], excess: int) -> None:
        """Remove ``excess`` tokens in place: first shared over the truncation fields, then from any piece."""
        fields = [i for i, key in enumerate(keys) if key in self.truncation_fields]
        remaining = excess
        for rank, i in enumerate(fields):
            share = excess // len(fields) + (1 if rank < excess % len(fields) else 0)
            cut = min(share, len(pieces[i]))
            pieces[i] = self._cut(pieces[i], cut)
            remaining -= cut
        order = range(len(pieces)) if self.truncation_method == "left" else range(len(pieces) - 1, -1, -1)
        for i in order:
            if remaining <= 0:
                break
            cut = min(remaining, len(pieces[i]))
            pieces[i] = self._cut(pieces[i], cut)
            remaining -= cut

    def _cut(self, ids: list[int], count: int) -> list[int]:
        """``ids`` without ``count`` tokens taken from its end (right) or start (left)."""
        if count <= 0:
            return ids
        return ids[count:] if self.truncation_method == "left" else ids[: len(ids) - count]


def load_samples(
    records: Sequence[JsonlRecord], sample_format: SampleFormat, report: ProblemReport
) -> list[TokenizedSample]:
    """Validate and tokenize every record; problems go to ``report`` with their line numbers."""
    samples = []
    for record in records:
        problems = sample_format.validate(record.data)
        for key, message in problems:
            report.add(record.line, key, message)
        if problems:
            continue
        try:
            samples.append(sample_format.tokenize(record.data))
        except SampleError as err:
            report.add(record.line, err.key, err.message)
    return samples


def build_sample_mapping(num_unique: int, num_samples: int, seed: int) -> np.ndarray:
    """Indices of ``num_samples`` draws from ``num_unique`` samples: whole shuffled passes, cut at num_samples.

    Pass ``e`` is a permutation from ``numpy.random.default_rng([seed, e])``, so every sample appears
    floor(num_samples / num_unique) or one more times (upsampling) and a smaller num_samples is a random subset
    without repeats (subsampling). NeMo's ``max_num_samples`` mapping has the same counts but always fills the
    last partial pass with the first samples of the file; here that pass is a random subset too.
    """
    if num_unique <= 0 or num_samples <= 0:
        raise ValueError(f"cannot draw {num_samples} samples from {num_unique}")
    passes = math.ceil(num_samples / num_unique)
    orders = [np.random.default_rng([seed, e]).permutation(num_unique) for e in range(passes)]
    return np.concatenate(orders)[:num_samples].astype(np.int64)


class SFTDataset(Dataset):
    """Tokenized SFT samples of one file, optionally seen through a sample mapping (``model.data.sample``).

    Index ``-1`` (``FILLER_INDEX``) is a filler: a one-token, all-masked sample that the batch samplers use to pad
    the last global batch, so every data-parallel rank runs the same number of micro batches while fillers add
    nothing to the loss.
    """

    def __init__(
        self,
        samples: Sequence[TokenizedSample],
        file_path: str,
        pad_id: int,
        sample_mapping: np.ndarray | None = None,
    ) -> None:
        self.samples = list(samples)
        self.file_path = file_path
        self.pad_id = pad_id
        self.sample_mapping = sample_mapping

    @property
    def collate_fn(self) -> SFTCollate:
        """Right padding with the dataset's pad id (NeMo-Aligner's scripts collate validation with it)."""
        return SFTCollate(self.pad_id)

    @property
    def num_unique_samples(self) -> int:
        """Samples in the file (the dataset is longer or shorter than this with a sample mapping)."""
        return len(self.samples)

    def __len__(self) -> int:
        return len(self.samples) if self.sample_mapping is None else len(self.sample_mapping)

    def file_index(self, index: int) -> int:
        """The position in the file of dataset item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples of {self.file_path}")
        return index if self.sample_mapping is None else int(self.sample_mapping[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index == FILLER_INDEX:
            return filler_item(self.pad_id)
        file_index = self.file_index(index)
        sample = self.samples[file_index]
        return {
            "input_ids": torch.from_numpy(sample.input_ids.astype(np.int64)),
            "loss_mask": torch.from_numpy(sample.loss_mask.astype(np.int64)),
            "prompt_length": sample.prompt_length,
            "sample_index": file_index,
        }

    def prompt_and_answer(self, index: int) -> tuple[list[int], list[int]]:
        """Generation prompt and ground-truth response ids of item ``index`` (see
        :meth:`TokenizedSample.prompt_and_answer`)."""
        return self.samples[self.file_index(index)].prompt_and_answer()
