"""DPO preference pairs: validation, tokenization, the dataset, collate, and file-order iteration for scoring.

A jsonl line is ``{"prompt", "chosen_response", "rejected_response"[, "chosen_reward", "rejected_reward"]}`` in
one of two formats, chosen by the type of ``prompt``:

- **templated strings** (NeMo-Aligner's format): the text is already in the model's template, e.g. prompt
  ``"<extra_id_0>System\\n\\n<extra_id_1>User\\nhi\\n<extra_id_1>Assistant\\n"`` and response
  ``"hello\\n<extra_id_1>"``, and is scored exactly as given. ``prompt`` and ``prompt + response`` are tokenized;
  the prompt's ids must be a prefix of the whole's (else the tokenizer merges across the boundary and the line is
  an error), and the response ids are the rest of the whole's ids.
- **messages** (OpenAI style): ``prompt`` is a list of ``{"role", "content"}`` messages (an optional first
  ``system``, then ``user``/``assistant`` alternating, ending with ``user``) and each response is
  ``{"role": "assistant", "content"}`` or a list holding one such message. The conversation is rendered and
  tokenized by the SFT chat template (:class:`~nemo_aligner.data.nlp.chat.ChatTemplate`, roles ``"User"`` and
  ``"Assistant"``, mask ``"User"``, the system message as the ``system`` text), so the prompt ends with the
  assistant header and the response is exactly what SFT scores after an assistant value: ``content + end_of_turn +
  turn_start`` (``"hello\\n<extra_id_1>"`` with the ``<extra_id_*>`` tokens, ``"hello<|eot_id|><|start_header_id|>"``
  with Llama 3's).

With ``append_eod`` the EOS id is appended to each response (both formats). Rewards (``chosen_reward``,
``rejected_reward``, used by the RPO losses) are numbers; a line without them gets the format's defaults.

A pair whose chosen or rejected sequence (prompt + response) is longer than ``seq_length`` is dropped and counted,
never truncated (a truncated response would be scored without its end). Dataset items, collated batches and the
mask convention are described on :class:`DPODataset` and :class:`DPOCollate`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nemo_aligner.data.nlp.chat import DEFAULT_MASK, ChatPromptTokens, ChatTemplate
from nemo_aligner.data.nlp.collate import padded_length
from nemo_aligner.data.nlp.jsonl import JsonlRecord, ProblemReport, read_jsonl, type_problem
from nemo_aligner.data.nlp.samplers import FILLER_INDEX
from nemo_aligner.tokenizers import Tokenizer

RESPONSE_KEYS = ("chosen_response", "rejected_response")
REWARD_KEYS = ("chosen_reward", "rejected_reward")
MESSAGE_ROLES = ("system", "user", "assistant")
CHAT_ROLE_NAMES = {"user": DEFAULT_MASK, "assistant": "Assistant"}
"""The NeMo chat ``from`` names the OpenAI roles are rendered with (the names of NeMo chat SFT data)."""

Problems = list[tuple[str | None, str]]


class PairError(Exception):
    """A line cannot be tokenized into a pair; ``problems`` are ``(key, message)`` for the dataset builder."""

    def __init__(self, problems: Problems) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


@dataclass(frozen=True, eq=False)
class PreferencePair:
    """A tokenized pair: full sequences (prompt + response) and the number of prompt tokens they share."""

    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    prompt_length: int
    chosen_reward: float
    rejected_reward: float

    @property
    def length(self) -> int:
        """Tokens of the longer sequence (what must fit in ``seq_length``)."""
        return max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def identical(self) -> bool:
        """Chosen and rejected are the same tokens: the pair cannot teach a preference (its loss is constant)."""
        return np.array_equal(self.chosen_ids, self.rejected_ids)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _message_problems(key: str, message: Any, roles: Sequence[str]) -> Problems:
    """Shape of one ``{"role", "content"}`` message; ``roles`` are the allowed roles."""
    if not isinstance(message, dict):
        return [(key, type_problem(message, "a {'role', 'content'} message object"))]
    problems: Problems = []
    role = message.get("role")
    if "role" not in message:
        problems.append((f"{key}.role", "missing key"))
    elif role not in roles:
        problems.append((f"{key}.role", f"must be one of {', '.join(map(repr, roles))}, got {role!r}"))
    content = message.get("content")
    if "content" not in message:
        problems.append((f"{key}.content", "missing key"))
    elif not isinstance(content, str):
        problems.append((f"{key}.content", type_problem(content, "a string")))
    elif not content and role != "system":
        problems.append((f"{key}.content", "must not be empty"))
    return problems


def _prompt_messages_problems(messages: list[Any]) -> Problems:
    """Each message's shape, then the order: optional system first, user/assistant alternating, user last."""
    if not messages:
        return [("prompt", "must hold at least one message")]
    problems = [p for i, m in enumerate(messages) for p in _message_problems(f"prompt[{i}]", m, MESSAGE_ROLES)]
    if problems:
        return problems
    roles = [m["role"] for m in messages]
    start = int(roles[0] == "system")
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] == "system":
            return [(f"prompt[{i}].role", "a system message may only come first")]
        if roles[i] != expected:
            return [
                (
                    f"prompt[{i}].role",
                    f"expected {expected!r}, got {roles[i]!r}: after an optional first system message, user and "
                    "assistant messages alternate, starting with user",
                )
            ]
    if start == len(roles):
        return [("prompt", "holds only a system message: it needs a user message for the responses to answer")]
    if roles[-1] != "user":
        return [("prompt", "the last message must be a user message: the responses are the assistant's answer to it")]
    return []


def _response_message_problems(key: str, value: Any) -> Problems:
    """A response of a message-list line: one assistant message, bare or in a one-element list."""
    if isinstance(value, list):
        if len(value) != 1:
            return [(key, f"must hold exactly one assistant message, got {len(value)}")]
        key, value = f"{key}[0]", value[0]
    if not isinstance(value, dict):
        expected = "an {'role': 'assistant', 'content': ...} message (the prompt is a message list)"
        return [(key, type_problem(value, expected))]
    return _message_problems(key, value, ("assistant",))


class PreferencePairFormat:
    """Validates and tokenizes DPO lines (see the module docstring for both formats)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_tokens: ChatPromptTokens | None = None,
        *,
        append_eod: bool = False,
        default_chosen_reward: float = 1.0,
        default_rejected_reward: float = 0.0,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat = ChatTemplate(tokenizer, chat_tokens or ChatPromptTokens(), max_seq_length=sys.maxsize)
        if append_eod and (tokenizer.eos_id is None or tokenizer.eos_id < 0):
            raise ValueError("model.data.append_eod is set but the tokenizer has no EOS token")
        self.eod_ids = [tokenizer.eos_id] if append_eod else []
        self.default_rewards = {"chosen_reward": default_chosen_reward, "rejected_reward": default_rejected_reward}

    def validate(self, data: Mapping[str, Any]) -> Problems:
        """Missing keys, types, empty strings, rewards, and the message roles and order."""
        problems: Problems = []
        for key in ("prompt", *RESPONSE_KEYS):
            if key not in data:
                problems.append((key, "missing key (a DPO line needs prompt, chosen_response and rejected_response)"))
        for key in REWARD_KEYS:
            if key not in data:
                continue
            if not _is_number(data[key]):
                problems.append((key, type_problem(data[key], "a number (leave the key out for the default)")))
            elif not math.isfinite(data[key]):
                problems.append((key, f"must be finite, got {data[key]}"))
        if "prompt" not in data:
            return problems
        prompt = data["prompt"]
        responses = [key for key in RESPONSE_KEYS if key in data]
        if isinstance(prompt, str):
            if not prompt:
                problems.append(("prompt", "must not be empty"))
            for key in responses:
                if not isinstance(data[key], str):
                    problems.append((key, type_problem(data[key], "a string (the prompt is a templated string)")))
                elif not data[key]:
                    problems.append((key, "must not be empty"))
        elif isinstance(prompt, list):
            problems += _prompt_messages_problems(prompt)
            for key in responses:
                problems += _response_message_problems(key, data[key])
        else:
            problems.append(("prompt", type_problem(prompt, "a templated string or a list of {'role', 'content'}")))
        return problems

    def tokenize(self, data: Mapping[str, Any]) -> PreferencePair:
        """The pair of a validated line; raises :class:`PairError` when the tokens cannot be split cleanly."""
        if isinstance(data["prompt"], str):
            prompt_ids, responses = self._templated(data)
        else:
            prompt_ids, responses = self._messages(data)
        chosen, rejected = (prompt_ids + responses[key] + self.eod_ids for key in RESPONSE_KEYS)
        rewards = {key: float(data.get(key, default)) for key, default in self.default_rewards.items()}
        return PreferencePair(
            np.asarray(chosen, dtype=np.int32),
            np.asarray(rejected, dtype=np.int32),
            len(prompt_ids),
            rewards["chosen_reward"],
            rewards["rejected_reward"],
        )

    def _templated(self, data: Mapping[str, Any]) -> tuple[list[int], dict[str, list[int]]]:
        """Prompt ids and each response's ids, taken from the tokenization of prompt + response."""
        prompt = data["prompt"]
        prompt_ids = self.tokenizer.text_to_ids(prompt)
        if not prompt_ids:
            raise PairError([("prompt", "tokenizes to no tokens: the first response token needs a context")])
        problems: Problems = []
        responses = {}
        for key in RESPONSE_KEYS:
            ids = self.tokenizer.text_to_ids(prompt + data[key])
            if ids[: len(prompt_ids)] != prompt_ids:
                problems.append(
                    (
                        key,
                        f"the tokenizer merges the end of the prompt ({prompt[-12:]!r}) with the start of the response "
                        f"({data[key][:12]!r}): the prompt's tokens are not a prefix of prompt + response's, so "
                        "which tokens are the response is ambiguous; end the prompt with a special token or a newline "
                        "(as chat templates do after the assistant header)",
                    )
                )
            elif len(ids) == len(prompt_ids):
                problems.append((key, "adds no token to the prompt: there is nothing to score"))
            else:
                responses[key] = ids[len(prompt_ids) :]
        if problems:
            raise PairError(problems)
        return prompt_ids, responses

    def _messages(self, data: Mapping[str, Any]) -> tuple[list[int], dict[str, list[int]]]:
        """Prompt ids and each response's scored ids, as the SFT chat template tokenizes the conversation."""
        messages = data["prompt"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        turns = [{"from": CHAT_ROLE_NAMES[m["role"]], "value": m["content"]} for m in messages if m["role"] != "system"]
        prompt_ids: list[int] | None = None
        responses = {}
        for key in RESPONSE_KEYS:
            response = data[key][0] if isinstance(data[key], list) else data[key]
            answer = {"from": CHAT_ROLE_NAMES["assistant"], "value": response["content"]}
            conversation = {"system": system, "mask": DEFAULT_MASK, "conversations": [*turns, answer]}
            prompt, responses[key] = self.chat.prompt_and_answer(conversation)
            assert prompt_ids is None or prompt == prompt_ids, "chat prompt ids differ between the two responses"
            prompt_ids = prompt
        return prompt_ids, responses


@dataclass
class LoadedPairs:
    """The pairs of one file that fit, their line numbers, and the lines dropped for being too long."""

    pairs: list[PreferencePair]
    lines: list[int]
    dropped: list[int]


def load_pairs(
    records: Sequence[JsonlRecord], pair_format: PreferencePairFormat, report: ProblemReport, seq_length: int
) -> LoadedPairs:
    """Validate and tokenize every record (problems go to ``report``), dropping pairs longer than ``seq_length``."""
    loaded = LoadedPairs([], [], [])
    for record in records:
        problems = pair_format.validate(record.data)
        pair = None
        if not problems:
            try:
                pair = pair_format.tokenize(record.data)
            except PairError as err:
                problems = err.problems
        for key, message in problems:
            report.add(record.line, key, message)
        if pair is None:
            continue
        if pair.length > seq_length:
            loaded.dropped.append(record.line)
        else:
            loaded.pairs.append(pair)
            loaded.lines.append(record.line)
    return loaded


def filler_pair_item(pad_id: int) -> dict[str, Any]:
    """An all-masked one-token pair that pads a partial global batch (``valid`` 0 after collation)."""
    return {
        "chosen_ids": torch.tensor([pad_id], dtype=torch.long),
        "rejected_ids": torch.tensor([pad_id], dtype=torch.long),
        "prompt_length": 1,
        "chosen_length": 1,
        "rejected_length": 1,
        "chosen_reward": 0.0,
        "rejected_reward": 0.0,
        "sample_index": FILLER_INDEX,
    }


class DPODataset(Dataset):
    """Tokenized pairs of one or more files (concatenated in order), without the dropped over-length pairs.

    An item is ``{"chosen_ids": Long[Sc], "rejected_ids": Long[Sr]`` (full sequences, prompt + response),
    ``"prompt_length", "chosen_length", "rejected_length": int, "chosen_reward", "rejected_reward": float,
    "sample_index": int}``; index ``-1`` (``FILLER_INDEX``) is a filler pair. Positions are kept as ``(k, line)``:
    the k-th entry of ``paths`` (a file may be listed twice) and the 1-based line.
    """

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        positions: Sequence[tuple[int, int]],
        dropped_positions: Sequence[tuple[int, int]],
        paths: Sequence[str],
        pad_id: int,
    ) -> None:
        if len(pairs) != len(positions):
            raise ValueError(f"{len(pairs)} pairs but {len(positions)} positions")
        self.pairs = list(pairs)
        self.positions = list(positions)
        self.dropped_positions = list(dropped_positions)
        self.paths = list(paths)
        self.pad_id = pad_id

    @property
    def num_dropped(self) -> int:
        """Pairs left out because prompt + chosen or prompt + rejected is longer than ``seq_length``."""
        return len(self.dropped_positions)

    @property
    def dropped_lines(self) -> list[tuple[str, int]]:
        """File and 1-based line of every dropped pair, in file order."""
        return [(self.paths[k], line) for k, line in self.dropped_positions]

    def origin(self, index: int) -> tuple[str, int]:
        """File and 1-based line of item ``index``."""
        k, line = self.positions[index]
        return self.paths[k], line

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index == FILLER_INDEX:
            return filler_pair_item(self.pad_id)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs of {', '.join(self.paths)}")
        pair = self.pairs[index]
        return {
            "chosen_ids": torch.from_numpy(pair.chosen_ids.astype(np.int64)),
            "rejected_ids": torch.from_numpy(pair.rejected_ids.astype(np.int64)),
            "prompt_length": pair.prompt_length,
            "chosen_length": len(pair.chosen_ids),
            "rejected_length": len(pair.rejected_ids),
            "chosen_reward": pair.chosen_reward,
            "rejected_reward": pair.rejected_reward,
            "sample_index": index,
            "valid": not pair.identical,  # identical pairs add nothing to the loss (counted: excluded_pairs)
        }

    @property
    def identical_lines(self) -> list[tuple[str, int]]:
        """File and 1-based line of every pair whose chosen and rejected tokens are the same."""
        return [self.origin(i) for i, pair in enumerate(self.pairs) if pair.identical]


def response_mask(lengths: torch.Tensor, prompt_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Float[B, width]: 1 where ``prompt_length <= t < length`` (the response tokens, as SFT's ``loss_mask``)."""
    positions = torch.arange(width).unsqueeze(0)
    return ((positions >= prompt_lengths.unsqueeze(1)) & (positions < lengths.unsqueeze(1))).float()


class DPOCollate:
    """Right-pads pairs into one batch; chosen and rejected share the width so they can run as one 2B forward.

    The batch is ``{"chosen", "rejected": Long[B, S], "chosen_mask", "rejected_mask": Float[B, S], "chosen_rewards",
    "rejected_rewards", "valid": Float[B], "sample_index", "prompt_lengths", "chosen_lengths",
    "rejected_lengths": Long[B]}``. ``S`` is the longest sequence of the batch, rounded up to
    ``pad_length_to_multiple_of`` but never past ``max_length``. A mask is 1 at position ``t`` when token ``t`` is a
    response token (``prompt_length <= t < length``), i.e. scored as predicted from position ``t - 1``: the SFT
    ``loss_mask`` convention. ``valid`` is 0 for fillers (whose masks are all 0).
    """

    def __init__(
        self, pad_id: int, pad_length_to_multiple_of: int | None = None, max_length: int | None = None
    ) -> None:
        if pad_length_to_multiple_of is not None and pad_length_to_multiple_of <= 0:
            raise ValueError(f"pad_length_to_multiple_of must be positive, got {pad_length_to_multiple_of}")
        self.pad_id = pad_id
        self.pad_length_to_multiple_of = pad_length_to_multiple_of
        self.max_length = max_length

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def longs(key: str) -> torch.Tensor:
            return torch.tensor([item[key] for item in items], dtype=torch.long)

        chosen_lengths, rejected_lengths, prompt_lengths = (
            longs("chosen_length"),
            longs("rejected_length"),
            longs("prompt_length"),
        )
        longest = int(torch.maximum(chosen_lengths, rejected_lengths).max())
        width = padded_length(longest, self.pad_length_to_multiple_of, self.max_length)
        sample_index = longs("sample_index")
        batch = {}
        for side in ("chosen", "rejected"):
            ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
            for row, item in enumerate(items):
                ids[row, : item[f"{side}_length"]] = torch.as_tensor(item[f"{side}_ids"], dtype=torch.long)
            batch[side] = ids
        batch["chosen_mask"] = response_mask(chosen_lengths, prompt_lengths, width)
        batch["rejected_mask"] = response_mask(rejected_lengths, prompt_lengths, width)
        for side in ("chosen", "rejected"):
            batch[f"{side}_rewards"] = torch.tensor([item[f"{side}_reward"] for item in items], dtype=torch.float32)
        # Fillers, and pairs an algorithm marked invalid (e.g. SPIN generations equal to the ground truth), add 0.
        marked = torch.tensor([bool(item.get("valid", True)) for item in items])
        batch["valid"] = ((sample_index != FILLER_INDEX) & marked).float()
        batch["sample_index"] = sample_index
        batch["prompt_lengths"] = prompt_lengths
        batch["chosen_lengths"] = chosen_lengths
        batch["rejected_lengths"] = rejected_lengths
        return batch


_SEQUENCE_KEYS = ("chosen", "rejected", "chosen_mask", "rejected_mask")


def split_dpo_micro_batches(
    batch: dict[str, torch.Tensor], micro_batch_size: int, pad_length_to_multiple_of: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Cut a collated batch into consecutive micro batches, each trimmed to its own longest sequence (rounded up
    to ``pad_length_to_multiple_of``), as :func:`~nemo_aligner.data.nlp.collate.split_micro_batches` does for SFT."""
    size, width = batch["chosen"].shape
    if size % micro_batch_size:
        raise ValueError(f"a batch of {size} pairs does not split into micro batches of {micro_batch_size}")
    micro_batches = []
    for start in range(0, size, micro_batch_size):
        part = {key: value[start : start + micro_batch_size] for key, value in batch.items()}
        longest = int(torch.maximum(part["chosen_lengths"], part["rejected_lengths"]).max())
        part_width = padded_length(longest, pad_length_to_multiple_of, width)
        for key in _SEQUENCE_KEYS:
            part[key] = part[key][:, :part_width]
        micro_batches.append(part)
    return micro_batches


@dataclass(frozen=True)
class ScoringLine:
    """One line of a dataset's files, in file order: its parsed object and its dataset index (None if dropped)."""

    path: str
    line: int
    index: int | None
    data: dict[str, Any]


def scoring_lines(dataset: DPODataset) -> Iterator[ScoringLine]:
    """Every non-blank line of the dataset's files in file order, so a scoring script (reference log-probs) can
    write one output line per input line, in the input order, marking the dropped over-length pairs.

    The files are read again (they were validated when the dataset was built); blank lines are skipped.
    """
    indices = {position: index for index, position in enumerate(dataset.positions)}
    dropped = set(dataset.dropped_positions)
    for k, path in enumerate(dataset.paths):
        for record in read_jsonl(path):
            index = indices.get((k, record.line))
            if index is None and (k, record.line) not in dropped:
                raise ValueError(f"{path}:{record.line} is neither in the dataset nor dropped: the file changed")
            yield ScoringLine(path, record.line, index, record.data)
