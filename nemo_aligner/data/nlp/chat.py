"""Chat SFT samples (``model.data.chat=True``): NeMo's conversation rendering and loss mask.

A line is ``{"system": str, "mask": "User", "type": optional, "conversations": [{"from": role, "value": text,
"label": optional}, ...]}``. With the ``model.data.chat_prompt_tokens`` strings ``S`` (system_turn_start), ``T``
(turn_start), ``L`` (label_start), ``E`` (end_of_turn) and ``N`` (end_of_name) it renders as::

    S "System" N system E                      header (the name "System" is fixed, as in NeMo)
    T role N [L label N] value E               each turn; the label part only with "type": "VALUE_TO_TEXT"
    T                                          appended when the last turn is not a masked role

Which tokens the loss scores (``mask`` may list several roles separated by commas; "answering" = not masked):

=========================================  =================================================================
piece                                      scored
=========================================  =================================================================
header ``S System N system E``             never
first turn (must be a masked role)         never
answering turn: ``T role N [L label N]``   no (the turn's header)
answering turn: ``value E``                yes
masked turn after an answer: ``T``         yes (it closes the answer: the model learns to end its turn)
masked turn after an answer: the rest      no
trailing ``T`` after a final answer        yes
=========================================  =================================================================

So each answer scores ``value + end_of_turn + turn_start``, exactly as NeMo's ``GPTSFTChatDataset`` does. Unlike
NeMo, which accepts any role order and silently leaves such turns unscored or half-scored, turns here must start
with a masked role and then alternate masked/answering, and a line without an answering turn is rejected.
Labels without ``"type": "VALUE_TO_TEXT"`` are ignored and ``"TEXT_TO_VALUE"`` is not supported (a data error).

Pieces are tokenized per turn, like NeMo; the split points inside a turn come from tokenizing the leading parts on
their own, and when a tokenizer merges across a split point the parts are tokenized separately, so the loss mask
boundaries are always exact. A conversation longer than ``max_seq_length`` loses its end (NeMo's right
truncation); ``add_bos``/``add_eos``/``add_sep`` do not apply to chat (put BOS in ``system_turn_start``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from nemo_aligner.data.nlp.jsonl import type_problem
from nemo_aligner.data.nlp.sft_dataset import TokenizedSample, make_sample
from nemo_aligner.tokenizers import Tokenizer

SYSTEM_ROLE = "System"
DEFAULT_MASK = "User"
VALUE_TO_TEXT = "VALUE_TO_TEXT"


@dataclass(frozen=True)
class ChatPromptTokens:
    """The ``model.data.chat_prompt_tokens`` strings; defaults are NeMo's ``<extra_id_*>`` tokens."""

    system_turn_start: str = "<extra_id_0>"
    turn_start: str = "<extra_id_1>"
    label_start: str = "<extra_id_2>"
    end_of_turn: str = "\n"
    end_of_name: str = "\n"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> ChatPromptTokens:
        """Tokens from a config mapping; absent keys keep their defaults, unknown keys are an error."""
        cfg = dict(cfg or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"model.data.chat_prompt_tokens: unknown keys {unknown}; allowed: {sorted(names)}")
        for key, value in cfg.items():
            if not isinstance(value, str):
                raise ValueError(f"model.data.chat_prompt_tokens.{key} must be a string, got {value!r}")
        return cls(**cfg)


def mask_roles(data: Mapping[str, Any]) -> frozenset[str]:
    """The roles whose turns are context only (``mask``, comma separated, default ``"User"``)."""
    return frozenset(role.strip() for role in data.get("mask", DEFAULT_MASK).split(","))


class ChatTemplate:
    """Renders, validates and tokenizes chat lines (see the module docstring for the format and the loss mask)."""

    def __init__(
        self, tokenizer: Tokenizer, tokens: ChatPromptTokens, *, max_seq_length: int, min_seq_length: int = 1
    ) -> None:
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.max_seq_length = max_seq_length
        self.min_seq_length = min_seq_length

    def validate(self, data: Mapping[str, Any]) -> list[tuple[str | None, str]]:
        """Types of every key, the supported ``type``, and the role order."""
        problems: list[tuple[str | None, str]] = []
        for key in ("system", "mask"):
            if key in data and not isinstance(data[key], str):
                problems.append((key, type_problem(data[key], "a string")))
        if data.get("type") not in (None, VALUE_TO_TEXT):
            problems.append(("type", f"unsupported value {data['type']!r}; use {VALUE_TO_TEXT!r} or leave it out"))
        turns = data.get("conversations")
        if turns is None:
            return [*problems, ("conversations", "missing key (a list of {'from': role, 'value': text} turns)")]
        if not isinstance(turns, list):
            return [*problems, ("conversations", type_problem(turns, "a list of turns"))]
        if not turns:
            return [*problems, ("conversations", "must hold at least one turn")]
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                problems.append((f"conversations[{i}]", type_problem(turn, "an object")))
                continue
            for key in ("from", "value"):
                if key not in turn:
                    problems.append((f"conversations[{i}].{key}", "missing key"))
                elif not isinstance(turn[key], str):
                    problems.append((f"conversations[{i}].{key}", type_problem(turn[key], "a string")))
            if turn.get("label") is not None and not isinstance(turn["label"], str):
                problems.append((f"conversations[{i}].label", type_problem(turn["label"], "a string or null")))
        if problems:
            return problems
        return self._role_problems(data)

    def _role_problems(self, data: Mapping[str, Any]) -> list[tuple[str | None, str]]:
        """Turns must start with a masked role, then alternate masked/answering, with at least one answer."""
        masked = mask_roles(data)
        shown = ",".join(sorted(masked))
        roles = [turn["from"] for turn in data["conversations"]]
        if roles[0] not in masked:
            return [
                (
                    "conversations[0].from",
                    f"the first turn is {roles[0]!r} but must be the mask role ({shown}): it is context, never scored",
                )
            ]
        for i in range(1, len(roles)):
            if (roles[i] in masked) == (roles[i - 1] in masked):
                kind = "masked" if roles[i] in masked else "answering"
                return [
                    (
                        f"conversations[{i}].from",
                        f"{kind} role {roles[i]!r} follows {roles[i - 1]!r}: turns must alternate between the mask "
                        f"role ({shown}) and the answering role",
                    )
                ]
        if len(roles) == 1:
            return [("conversations", f"only a {roles[0]!r} turn: no answering turn to score (mask: {shown})")]
        return []

    def _units(self, data: Mapping[str, Any]) -> list[list[tuple[str, bool]]]:
        """The conversation as tokenization units, each a list of ``(text, scored)`` parts."""
        t = self.tokens
        masked = mask_roles(data)
        with_labels = data.get("type") == VALUE_TO_TEXT
        units = [[(f"{t.system_turn_start}{SYSTEM_ROLE}{t.end_of_name}{data.get('system', '')}{t.end_of_turn}", False)]]
        turns = data["conversations"]
        for i, turn in enumerate(turns):
            name = f"{turn['from']}{t.end_of_name}"
            if with_labels and turn.get("label") is not None:
                name += f"{t.label_start}{turn['label']}{t.end_of_name}"
            body = f"{turn['value']}{t.end_of_turn}"
            if turn["from"] not in masked:
                units.append([(t.turn_start + name, False), (body, True)])
            elif i == 0:
                units.append([(t.turn_start + name + body, False)])
            else:
                units.append([(t.turn_start, True), (name + body, False)])
        if turns[-1]["from"] not in masked:
            units.append([(t.turn_start, True)])
        return units

    def render(self, data: Mapping[str, Any]) -> str:
        """The full conversation text that is tokenized."""
        return "".join(text for unit in self._units(data) for text, _ in unit)

    def tokenize(self, data: Mapping[str, Any]) -> TokenizedSample:
        ids: list[int] = []
        mask: list[int] = []
        for unit in self._units(data):
            for part_ids, (_, scored) in zip(self._tokenize_parts([text for text, _ in unit]), unit):
                ids.extend(part_ids)
                mask.extend([int(scored)] * len(part_ids))
        truncated = len(ids) > self.max_seq_length
        return make_sample(ids[: self.max_seq_length], mask[: self.max_seq_length], self.min_seq_length, truncated)

    def prompt_and_answer(self, data: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        """Generation prompt (through the header of the last answering turn) and that turn's scored ids."""
        return self.tokenize(data).prompt_and_answer()

    def _tokenize_parts(self, parts: Sequence[str]) -> list[list[int]]:
        """Ids of each part, as one tokenization of their concatenation when the split points survive it."""
        whole = self.tokenizer.text_to_ids("".join(parts))
        cuts = [0]
        for k in range(1, len(parts)):
            head = self.tokenizer.text_to_ids("".join(parts[:k]))
            if whole[: len(head)] != head or len(head) < cuts[-1]:
                return [self.tokenizer.text_to_ids(part) for part in parts]
            cuts.append(len(head))
        cuts.append(len(whole))
        return [whole[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
