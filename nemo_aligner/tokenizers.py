"""Tokenizers built from a NeMo-style ``model.tokenizer`` config.

A ``.nemo`` checkpoint names its tokenizer with ``tokenizer.library`` plus a few keys; this module builds the same
tokenizer NeMo 2.5 would build for that config, so token ids match NeMo's exactly:

- ``byte-level``: NeMo's ``ByteLevelTokenizer`` (UTF-8 bytes, vocab 512, eos 0, pad 1, no BOS).
- ``sentencepiece``: a SentencePiece ``.model`` file (``tokenizer.model``), honouring ``sentencepiece_legacy``.
- ``huggingface``: a local ``tokenizer.json`` file (or GPT-2 ``vocab.json`` + ``merges.txt``), run by the
  ``tokenizers`` library alone, or a saved tokenizer directory, loaded with ``transformers``; nothing is ever
  downloaded.

The classes keep NeMo's ``TokenizerSpec`` method names so code ported from NeMo-Aligner runs unchanged. Beyond NeMo,
every library keeps configured special tokens (BOS/EOS/pad and chat markers such as ``<extra_id_1>`` or
``<|eot_id|>``) as single ids in both directions, because alignment code finds turn ends by token id.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece

logger = logging.getLogger(__name__)

SUPPORTED_LIBRARIES = ("byte-level", "huggingface", "sentencepiece")
NEMO_ARTIFACT_PREFIX = "nemo:"
# Names NeMo's Hugging Face wrapper accepts in ``tokenizer.special_tokens``, in the order it registers them: tokens
# new to the vocabulary get ids in this order (NeMo 2.5's ``AutoTokenizer.__init__``).
HF_SPECIAL_TOKEN_KEYS = (
    "unk_token",
    "mask_token",
    "pad_token",
    "sep_token",
    "eos_token",
    "bos_token",
    "cls_token",
    "additional_special_tokens",
)
# The single named tokens among them.
NAMED_SPECIAL_TOKEN_KEYS = HF_SPECIAL_TOKEN_KEYS[:-1]
GPT2_END_OF_TEXT = "<|endoftext|>"

# A token is a string, except in the byte-level tokenizer where, as in NeMo, a plain byte's token is its value.
Token = str | int


class Tokenizer(ABC):
    """Converts between text, tokens and ids with NeMo's ``TokenizerSpec`` method names."""

    @abstractmethod
    def text_to_ids(self, text: str) -> list[int]:
        """Ids for ``text``, without BOS/EOS (NeMo adds none here); special-token strings become single ids."""

    @abstractmethod
    def ids_to_text(self, ids: Sequence[int], remove_special_tokens: bool = False) -> str:
        """Text for ``ids``; special tokens are rendered as their strings unless ``remove_special_tokens``."""

    @abstractmethod
    def text_to_tokens(self, text: str) -> list[Token]:
        """Tokens for ``text``, one per id of ``text_to_ids``."""

    @abstractmethod
    def tokens_to_ids(self, tokens: Sequence[Token]) -> list[int]:
        """Ids for ``tokens``."""

    @abstractmethod
    def ids_to_tokens(self, ids: Sequence[int]) -> list[Token]:
        """Tokens for ``ids``."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of ``token`` when it is a single token (e.g. ``"<|eot_id|>"``), else None."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (before padding to a multiple for the embedding)."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id as NeMo reports it (None or -1 when the tokenizer has none)."""

    @property
    @abstractmethod
    def eos_id(self) -> int | None:
        """End-of-sequence id as NeMo reports it."""

    @property
    @abstractmethod
    def pad_id(self) -> int | None:
        """Padding id as NeMo reports it."""

    @property
    @abstractmethod
    def unk_id(self) -> int | None:
        """Unknown-token id as NeMo reports it."""

    @property
    @abstractmethod
    def special_token_ids(self) -> dict[str, int]:
        """Special-token strings and their single ids."""


def _as_id_list(ids: Iterable[int]) -> list[int]:
    """Plain ints from a list, numpy array or torch tensor (NeMo accepts all three)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _split_on_special_tokens(text: str, pattern: re.Pattern[str] | None) -> list[tuple[str, bool]]:
    """Cut ``text`` into ``(segment, is_special)`` pairs that alternate plain (possibly empty) and special segments,
    always starting and ending with a plain one."""
    if pattern is None:
        return [(text, False)]
    segments = []
    start = 0
    for match in pattern.finditer(text):
        segments.append((text[start : match.start()], False))
        segments.append((match.group(), True))
        start = match.end()
    segments.append((text[start:], False))
    return segments


def _special_token_pattern(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """Regex finding the leftmost special token, preferring the longest when several start at the same place."""
    ordered = sorted(set(tokens), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, ordered))) if ordered else None


class ByteLevelTokenizer(Tokenizer):
    """NeMo's byte-level tokenizer, plus single-id special tokens.

    Ids 0-255 are UTF-8 bytes and 256-511 are unused (NeMo reports 259 as ``unk_id``). eos (0) and pad (1) share
    their ids with the bytes 0x00 and 0x01, and there is no BOS, exactly as in NeMo. Special tokens take the ids
    512 ... 511 + n in NeMo's order: the first listed gets the highest id. Unlike NeMo, which only reserves those
    ids, ``text_to_ids`` turns each special-token string into its id and ``ids_to_text`` renders it back.
    ``ids_to_text`` otherwise decodes like NeMo: invalid UTF-8 is dropped and the result is right-stripped.
    """

    base_vocab_size = 512
    _eos_id = 0
    _pad_id = 1
    _unk_id = 259

    def __init__(self, special_tokens: Sequence[str] = ()) -> None:
        valid = all(isinstance(t, str) and t for t in special_tokens)
        if not valid or len(set(special_tokens)) != len(special_tokens):
            raise ValueError(
                f"tokenizer.special_tokens must be a list of distinct non-empty strings, got {list(special_tokens)!r}"
            )
        top = self.base_vocab_size + len(special_tokens) - 1
        self._special_to_id = {token: top - i for i, token in enumerate(special_tokens)}
        self._id_to_special = {i: token for token, i in self._special_to_id.items()}
        self._pattern = _special_token_pattern(special_tokens)

    def text_to_ids(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``, with each special-token string replaced by its id."""
        ids: list[int] = []
        for segment, special in _split_on_special_tokens(text, self._pattern):
            if special:
                ids.append(self._special_to_id[segment])
            else:
                ids.extend(segment.encode("utf-8"))
        return ids

    def text_to_tokens(self, text: str) -> list[Token]:
        """Byte values and special-token strings (NeMo's tokens are the ids themselves)."""
        return self.ids_to_tokens(self.text_to_ids(text))

    def ids_to_text(self, ids: Sequence[int], remove_special_tokens: bool = False) -> str:
        """Decode bytes, render special tokens, and drop every other id (unused ids 256-511 and ids past the vocab)."""
        pieces: list[str] = []
        run = bytearray()
        for i in _as_id_list(ids):
            if i < 256:
                run.append(i)
            elif i in self._id_to_special and not remove_special_tokens:
                pieces.append(run.decode("utf-8", errors="ignore"))
                pieces.append(self._id_to_special[i])
                run = bytearray()
        pieces.append(run.decode("utf-8", errors="ignore"))
        return "".join(pieces).rstrip()

    def tokens_to_ids(self, tokens: Sequence[Token]) -> list[int]:
        """Ids for byte values, special-token strings and single-byte characters."""
        ids = []
        for token in tokens:
            i = token if isinstance(token, int) else self.token_to_id(token)
            if i is None:
                raise ValueError(f"{token!r} is neither a byte, a one-byte character nor a configured special token")
            ids.append(i)
        return ids

    def ids_to_tokens(self, ids: Sequence[int]) -> list[Token]:
        """Special-token strings for special ids, the id itself otherwise."""
        return [self._id_to_special.get(i, i) for i in _as_id_list(ids)]

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token, or the byte of a one-byte character."""
        if token in self._special_to_id:
            return self._special_to_id[token]
        encoded = token.encode("utf-8")
        return encoded[0] if len(encoded) == 1 else None

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self._special_to_id)

    @property
    def bos_id(self) -> None:
        return None

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def special_token_ids(self) -> dict[str, int]:
        return dict(self._special_to_id)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model used the way NeMo's ``SentencePieceTokenizer`` uses it.

    ``text_to_ids`` adds no BOS/EOS and leaves normalization (NFKC, removal of extra spaces) to the model; unknown
    characters decode as `` ⁇ ``. Special tokens need ``legacy`` (``tokenizer.sentencepiece_legacy``), as in NeMo:
    a token already in the model keeps its piece id, a new one gets the next id past the model's pieces. Legacy
    encoding then cuts the text at special tokens, encodes the pieces in between, and drops a lone ``▁`` that
    starts a piece following a special token (NeMo does not do this for the text after the last special token).
    Legacy decoding joins pieces and special tokens with single spaces and strips the result.
    """

    _separator = "▁"

    def __init__(
        self,
        model_path: str | Path,
        legacy: bool = False,
        special_tokens: Sequence[str] | Mapping[str, str] | None = None,
    ) -> None:
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"tokenizer.model: cannot load SentencePiece model {model_path}: {err}") from err
        self.legacy = legacy
        self._piece_count = self._sp.get_piece_size()
        self._vocab_size = self._piece_count
        self._special_to_id: dict[str, int] = {}
        self._named_tokens: dict[str, str] = {}
        if special_tokens:
            if not legacy:
                raise ValueError(
                    "tokenizer.special_tokens needs tokenizer.sentencepiece_legacy: true (NeMo adds special tokens "
                    "to a SentencePiece model only in legacy mode); or train the model with them as "
                    "user_defined_symbols"
                )
            self._add_legacy_special_tokens(special_tokens)
        self._id_to_special = {i: token for token, i in self._special_to_id.items()}
        self._pattern = _special_token_pattern(self._special_to_id)
        separator_id = self._sp.piece_to_id(self._separator)
        self._separator_id = separator_id if self._sp.id_to_piece(separator_id) == self._separator else None
        controls = {self._sp.id_to_piece(i): i for i in range(self._piece_count) if self._sp.is_control(i)}
        self._special_token_ids = controls | self._special_to_id

    def _add_legacy_special_tokens(self, special_tokens: Sequence[str] | Mapping[str, str]) -> None:
        """Register special tokens as NeMo does; a mapping also names them (``bos_token: "<s>"``)."""
        if isinstance(special_tokens, Mapping):
            self._named_tokens = dict(special_tokens)
            tokens = list(special_tokens.values())
        else:
            tokens = list(special_tokens)
        if any(not isinstance(t, str) or not t for t in tokens):
            raise ValueError(f"tokenizer.special_tokens must hold non-empty strings, got {special_tokens!r}")
        unk = self._sp.unk_id()
        for token in tokens:
            piece_id = self._sp.piece_to_id(token)
            if piece_id != unk:
                self._special_to_id[token] = piece_id
            elif token not in self._special_to_id:
                self._special_to_id[token] = self._vocab_size
                self._vocab_size += 1

    def _encode(
        self, text: str, encode: Callable[[str], list[Token]], specials: Mapping[str, Token], separator: Token | None
    ) -> list[Token]:
        """Legacy encoding shared by ids and pieces: ``encode`` handles plain text, ``specials`` maps a special
        token to what is emitted for it."""
        if not self.legacy:
            return encode(text)
        emitted_specials = set(specials.values())
        out: list[Token] = []
        segments = _split_on_special_tokens(text, self._pattern)
        for index, (segment, special) in enumerate(segments):
            if special:
                out.append(specials[segment])
                continue
            encoded = encode(segment)
            is_tail = index == len(segments) - 1
            if not is_tail and out and out[-1] in emitted_specials and encoded[:1] == [separator]:
                encoded = encoded[1:]
            out.extend(encoded)
        return out

    def text_to_ids(self, text: str) -> list[int]:
        return self._encode(text, self._sp.encode_as_ids, self._special_to_id, self._separator_id)

    def text_to_tokens(self, text: str) -> list[Token]:
        specials = {token: token for token in self._special_to_id}
        return self._encode(text, self._sp.encode_as_pieces, specials, self._separator)

    def ids_to_text(self, ids: Sequence[int], remove_special_tokens: bool = False) -> str:
        """Decoded text; SentencePiece itself renders control pieces such as ``<s>`` as nothing, so
        ``remove_special_tokens`` only matters for legacy special tokens."""
        ids = _as_id_list(ids)
        if not self.legacy:
            return self._sp.decode_ids(ids)
        parts = []
        run: list[int] = []
        for i in ids:
            if i in self._id_to_special:
                parts.append(self._sp.decode_ids(run))
                if not remove_special_tokens:
                    parts.append(self._id_to_special[i])
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode_ids(run))
        if remove_special_tokens:
            parts = [part for part in parts if part]
        return " ".join(parts).strip()

    def tokens_to_ids(self, tokens: Sequence[Token]) -> list[int]:
        """Ids for pieces and legacy special tokens; unknown strings get ``unk_id`` as in NeMo."""
        return [self._special_to_id.get(t, self._sp.piece_to_id(t)) for t in tokens]

    def ids_to_tokens(self, ids: Sequence[int]) -> list[Token]:
        return [
            self._id_to_special[i] if i in self._id_to_special else self._sp.id_to_piece(i) for i in _as_id_list(ids)
        ]

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_to_id:
            return self._special_to_id[token]
        piece_id = self._sp.piece_to_id(token)
        return piece_id if self._sp.id_to_piece(piece_id) == token else None

    def _named_or_model_id(self, name: str, model_id: int) -> int:
        """Legacy NeMo looks BOS/EOS/pad up by the names given in ``special_tokens``; otherwise the model's own."""
        token = self._named_tokens.get(name)
        return model_id if token is None else self.tokens_to_ids([token])[0]

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._named_or_model_id("bos_token", self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return self._named_or_model_id("eos_token", self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        return self._named_or_model_id("pad_token", self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The model's control pieces (e.g. ``<s>``) plus legacy special tokens."""
        return dict(self._special_token_ids)


class HuggingFaceTokenizer(Tokenizer):
    """A ``transformers`` tokenizer used the way NeMo's ``AutoTokenizer`` wrapper uses it.

    ``text_to_ids`` adds no BOS/EOS or template tokens (NeMo's default ``include_special_tokens=False``); added and
    special tokens are single ids. ``special_tokens`` (NeMo's keys: ``bos_token``, ``eos_token``, ...,
    ``additional_special_tokens``) are registered on the tokenizer and added to the vocabulary when missing. As in
    NeMo, a missing EOS falls back to the separator token and a missing BOS to the classifier token. Decoding
    follows NeMo (ids to tokens to string); NeMo drops special tokens there by default, this class only when
    ``remove_special_tokens`` is set.
    """

    def __init__(self, tokenizer: Any, special_tokens: Mapping[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        requested = dict(special_tokens or {})
        if "eos_token" not in requested and tokenizer.eos_token is None and tokenizer.sep_token:
            requested["eos_token"] = tokenizer.sep_token
        if "bos_token" not in requested and tokenizer.bos_token is None and tokenizer.cls_token:
            requested["bos_token"] = tokenizer.cls_token
        size_before = len(tokenizer)
        if requested:
            tokenizer.add_special_tokens(requested)
        self._vocab: dict[str, int] = tokenizer.get_vocab()
        added = {token.content: i for i, token in tokenizer.added_tokens_decoder.items()}
        self._special_token_ids = added | {t: self._vocab[t] for t in tokenizer.all_special_tokens}
        _note_new_special_tokens(added, size_before)

    def text_to_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def text_to_tokens(self, text: str) -> list[Token]:
        return self.tokenizer.tokenize(text)

    def ids_to_text(self, ids: Sequence[int], remove_special_tokens: bool = False) -> str:
        tokens = self.tokenizer.convert_ids_to_tokens(_as_id_list(ids))
        if remove_special_tokens:
            special = set(self.tokenizer.all_special_tokens)
            tokens = [t for t in tokens if t not in special]
        return self.tokenizer.convert_tokens_to_string(tokens)

    def tokens_to_ids(self, tokens: Sequence[Token]) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(list(tokens))

    def ids_to_tokens(self, ids: Sequence[int]) -> list[Token]:
        return self.tokenizer.convert_ids_to_tokens(_as_id_list(ids))

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def unk_id(self) -> int | None:
        return self.tokenizer.unk_token_id

    @property
    def special_token_ids(self) -> dict[str, int]:
        """Added tokens (e.g. ``<|eot_id|>``) and the named special tokens."""
        return dict(self._special_token_ids)

    @property
    def named_special_tokens(self) -> dict[str, str]:
        """``bos_token``, ``eos_token``, ... -> the token string, for the names that are set."""
        named = ((key, getattr(self.tokenizer, key, None)) for key in NAMED_SPECIAL_TOKEN_KEYS)
        return {key: str(token) for key, token in named if token is not None}

    def save_pretrained(self, directory: str | Path) -> None:
        """The tokenizer as a ``transformers`` directory (``AutoTokenizer.from_pretrained`` reads it back)."""
        self.tokenizer.save_pretrained(str(directory))


class HuggingFaceJsonTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library alone, without ``transformers``.

    This is what a ``.nemo`` written by this library restores (its tokenizer travels as a ``tokenizer.json``), so
    a run restoring one starts without importing ``transformers`` and building its tokenizer wrapper (0.66 s of
    the tiny DPO benchmark's set-up, docs/performance.md). It behaves as :class:`HuggingFaceTokenizer` around
    ``PreTrainedTokenizerFast(tokenizer_file=...)`` does (``tests/test_tokenizers.py`` compares the two with the
    installed transformers): encoding adds no post-processor tokens and neither truncates nor pads;
    ``special_tokens`` are registered as special added tokens (not normalized, no stripping), so each is one id,
    and get new ids when missing (a file names no special token of its own, except a pad token in its padding
    settings, so NeMo's EOS-from-separator and BOS-from-classifier fallbacks never apply); decoding maps ids to
    tokens, drops the named special tokens when asked, and joins the rest with the file's decoder.
    """

    def __init__(self, backend: Any, special_tokens: Mapping[str, Any] | None = None) -> None:
        from tokenizers import AddedToken

        self.tokenizer = backend
        configured = _special_token_list(special_tokens or {})
        named = {key: str(token) for key, token in (special_tokens or {}).items() if key in NAMED_SPECIAL_TOKEN_KEYS}
        # A file that pads names its pad token, which transformers registers once (unless the config names one).
        self._file_settings = {"truncation": backend.truncation, "padding": backend.padding}
        if backend.padding is not None and "pad_token" not in named:
            file_pad = str(backend.padding["pad_token"])
            named["pad_token"] = file_pad
            if file_pad not in {t.content for t in backend.get_added_tokens_decoder().values()}:
                backend.add_special_tokens([AddedToken(file_pad, normalized=False, special=True)])
        backend.no_truncation()  # transformers' encode neither truncates nor pads unless asked
        backend.no_padding()
        self._named = named
        size_before = backend.get_vocab_size(with_added_tokens=True)
        if configured:
            # In the given order (build_tokenizer's is NeMo's): tokens new to the vocabulary get ids in this order.
            backend.add_special_tokens(
                [AddedToken(token, rstrip=False, lstrip=False, normalized=False, special=True) for token in configured]
            )
        self._all_special_tokens = list(dict.fromkeys([*named.values(), *configured]))
        self._vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
        added = {token.content: i for i, token in backend.get_added_tokens_decoder().items()}
        self._special_token_ids = added | {t: self._vocab[t] for t in self._all_special_tokens}
        _note_new_special_tokens(added, size_before)

    def text_to_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def text_to_tokens(self, text: str) -> list[Token]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def ids_to_text(self, ids: Sequence[int], remove_special_tokens: bool = False) -> str:
        tokens = self.ids_to_tokens(ids)
        if remove_special_tokens:
            special = set(self._all_special_tokens)
            tokens = [t for t in tokens if t not in special]
        decoder = self.tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def tokens_to_ids(self, tokens: Sequence[Token]) -> list[int]:
        found = (self.tokenizer.token_to_id(token) for token in tokens)
        return [self.unk_id if i is None else i for i in found]

    def ids_to_tokens(self, ids: Sequence[int]) -> list[Token]:
        return [self.tokenizer.id_to_token(i) for i in _as_id_list(ids)]

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def _named_id(self, key: str) -> int | None:
        token = self._named.get(key)
        return None if token is None else self._vocab.get(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._named_id("pad_token")

    @property
    def unk_id(self) -> int | None:
        return self._named_id("unk_token")

    @property
    def special_token_ids(self) -> dict[str, int]:
        """Added tokens (e.g. ``<|eot_id|>``) and the named special tokens."""
        return dict(self._special_token_ids)

    @property
    def named_special_tokens(self) -> dict[str, str]:
        """``bos_token``, ``eos_token``, ... -> the token string, for the names that are set."""
        return dict(self._named)

    def save_pretrained(self, directory: str | Path) -> None:
        """The tokenizer as a ``transformers`` directory (``AutoTokenizer.from_pretrained`` reads it back); the
        one place this class imports ``transformers``."""
        from transformers import PreTrainedTokenizerFast

        backend = copy.deepcopy(self.tokenizer)  # with the file's own truncation and padding settings again
        if self._file_settings["truncation"] is not None:
            backend.enable_truncation(**self._file_settings["truncation"])
        if self._file_settings["padding"] is not None:
            backend.enable_padding(**self._file_settings["padding"])
        additional = [t for t in self._all_special_tokens if t not in self._named.values()]
        extra = {"additional_special_tokens": additional} if additional else {}
        PreTrainedTokenizerFast(tokenizer_object=backend, **self._named, **extra).save_pretrained(str(directory))


def _special_token_list(special_tokens: Mapping[str, Any]) -> list[str]:
    """The strings of a special-tokens mapping (``additional_special_tokens`` flattened), in its order, once each."""
    ordered = (
        [str(t) for t in token] if key == "additional_special_tokens" else [str(token)]
        for key, token in special_tokens.items()
    )
    return list(dict.fromkeys(itertools.chain.from_iterable(ordered)))


def _note_new_special_tokens(added: Mapping[str, int], size_before: int) -> None:
    """Say which ids configured special tokens new to the vocabulary got (the added tokens from ``size_before``
    on, the vocabulary's size before they were registered): with two or more, their order decides which embedding
    row each one uses."""
    new_ids = {token: i for token, i in added.items() if i >= size_before}
    if len(new_ids) < 2:
        return
    logger.warning(
        "tokenizer: special tokens new to the vocabulary got the ids %s, in the order NVIDIA NeMo registers them "
        "(unk, mask, pad, sep, eos, bos, cls, then additional_special_tokens); nemo_aligner before 2026-12-05 gave "
        "new named tokens ids in the config's order (docs/checkpoints.md)",
        dict(new_ids),
    )


def _plain(value: Any) -> Any:
    """Plain dicts/lists from OmegaConf containers, so the checks below see ordinary Python types."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _resolve_path(cfg: Mapping[str, Any], key: str, artifact_dir: str | Path | None) -> Path:
    """The path in ``tokenizer.<key>``; ``nemo:<name>`` names a file in the unpacked ``.nemo`` directory."""
    value = str(cfg[key])
    if not value.startswith(NEMO_ARTIFACT_PREFIX):
        return Path(value).expanduser()
    name = Path(value[len(NEMO_ARTIFACT_PREFIX) :])
    if artifact_dir is None:
        raise ValueError(
            f"tokenizer.{key} is the .nemo artifact {value!r}: pass artifact_dir (the unpacked .nemo directory)"
        )
    if name.is_absolute() or ".." in name.parts:
        raise ValueError(f"tokenizer.{key}: artifact {value!r} points outside the .nemo directory")
    return Path(artifact_dir) / name


def _existing_path(cfg: Mapping[str, Any], key: str, artifact_dir: str | Path | None) -> Path:
    """Like ``_resolve_path``, but the file or directory must exist."""
    if cfg.get(key) is None:
        raise ValueError(f"tokenizer.{key} must be set for tokenizer.library {cfg.get('library')!r}")
    path = _resolve_path(cfg, key, artifact_dir)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer.{key}: no such file or directory: {path}")
    return path


def _hf_special_tokens(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """NeMo's ``tokenizer.special_tokens`` mapping (a list means additional special tokens), merged with the
    top-level ``bos_token``/``eos_token``/``pad_token``/``unk_token`` keys, in the order NeMo registers them."""
    raw = _plain(cfg.get("special_tokens")) or {}
    special = {"additional_special_tokens": raw} if isinstance(raw, list) else dict(raw)
    unknown = sorted(set(special) - set(HF_SPECIAL_TOKEN_KEYS))
    if unknown:
        raise ValueError(
            f"tokenizer.special_tokens: unknown keys {unknown}; allowed: {', '.join(HF_SPECIAL_TOKEN_KEYS)}"
        )
    special = {key: value for key, value in special.items() if value is not None}  # NeMo: null = not given
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = cfg.get(key)
        if value is None:
            continue
        if special.get(key, value) != value:
            raise ValueError(f"tokenizer.{key} ({value!r}) contradicts tokenizer.special_tokens.{key}")
        special[key] = value
    for key, value in special.items():
        values = value if key == "additional_special_tokens" else [value]
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            wanted = "a list of non-empty strings" if key == "additional_special_tokens" else "a non-empty string"
            raise ValueError(f"tokenizer.special_tokens.{key} must be {wanted}, got {value!r}")
    return {key: special[key] for key in HF_SPECIAL_TOKEN_KEYS if key in special}


def _gpt2_bpe_tokenizer(vocab_file: Path, merge_file: Path) -> Any:
    """A GPT-2 style byte-level BPE from ``vocab.json`` + ``merges.txt`` (the files NeMo stores for such models);
    the only Hugging Face format with a vocab/merges pair, so no hub name is needed to rebuild it."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    backend = BackendTokenizer(models.BPE.from_file(str(vocab_file), str(merge_file)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _hf_source(cfg: Mapping[str, Any], artifact_dir: str | Path | None) -> tuple[str, Path]:
    """The config key and local path of the tokenizer: ``model`` or ``vocab_file`` (a ``tokenizer.json``, e.g. the
    ``.nemo``'s own artifact), else ``type`` (unless it is a hub name). A file's own tokenizer comes first, so
    the directory in ``type`` that our ``.nemo`` files name for NeMo is never opened when reading them."""
    for key in ("model", "vocab_file", "type"):
        if cfg.get(key) is None:
            continue
        path = _resolve_path(cfg, key, artifact_dir)
        if path.exists():
            return key, path
        if key != "type" or str(cfg[key]).startswith(NEMO_ARTIFACT_PREFIX):
            raise FileNotFoundError(f"tokenizer.{key}: no such file or directory: {path}")
    if cfg.get("type") is not None:
        raise FileNotFoundError(
            f"tokenizer.type: {cfg['type']!r} is not a local tokenizer.json or tokenizer directory; Hugging Face Hub "
            "names are never downloaded: save the tokenizer locally and point tokenizer.type at it"
        )
    raise ValueError(
        "tokenizer.type, tokenizer.model or tokenizer.vocab_file must point to a tokenizer.json file or a saved "
        "tokenizer directory for tokenizer.library 'huggingface'"
    )


def _build_huggingface(cfg: Mapping[str, Any], artifact_dir: str | Path | None) -> Tokenizer:
    """Load a Hugging Face tokenizer from local files only: a ``tokenizer.json`` (or vocab + merges) with the
    ``tokenizers`` library, a saved directory (whose ``tokenizer_config.json`` may name a class with its own
    behaviour) with ``transformers``' ``AutoTokenizer``."""
    special = _hf_special_tokens(cfg)
    if cfg.get("merge_file") is not None:
        vocab_file = _existing_path(cfg, "vocab_file", artifact_dir)
        backend = _gpt2_bpe_tokenizer(vocab_file, _existing_path(cfg, "merge_file", artifact_dir))
        if backend.token_to_id(GPT2_END_OF_TEXT) is not None:
            for key in ("bos_token", "eos_token", "unk_token"):
                special.setdefault(key, GPT2_END_OF_TEXT)
        return HuggingFaceJsonTokenizer(backend, special)
    key, path = _hf_source(cfg, artifact_dir)
    try:
        if path.is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, use_fast=bool(cfg.get("use_fast", False))
            )
        else:
            from tokenizers import Tokenizer as BackendTokenizer

            return HuggingFaceJsonTokenizer(BackendTokenizer.from_file(str(path)), special)
    except Exception as err:
        raise ValueError(f"tokenizer.{key}: cannot load a Hugging Face tokenizer from {path}: {err}") from err
    return HuggingFaceTokenizer(tokenizer, special)


def build_tokenizer(tokenizer_cfg: Mapping[str, Any], artifact_dir: str | Path | None = None) -> Tokenizer:
    """Build the tokenizer described by a NeMo ``model.tokenizer`` config.

    ``artifact_dir`` is the unpacked ``.nemo`` directory that ``nemo:<name>`` paths refer to. Keys read:
    ``library``; ``special_tokens`` (all libraries); ``model`` and ``sentencepiece_legacy`` (sentencepiece);
    ``type``/``model``/``vocab_file``, ``merge_file``, ``use_fast`` and ``bos_token``/``eos_token``/``pad_token``/
    ``unk_token`` (huggingface). Defaults are NeMo's for configs that omit a key.
    """
    library = tokenizer_cfg.get("library")
    special_tokens = _plain(tokenizer_cfg.get("special_tokens"))
    if library == "byte-level":
        if special_tokens is not None and not isinstance(special_tokens, list):
            raise ValueError("tokenizer.special_tokens must be a list of strings for tokenizer.library 'byte-level'")
        return ByteLevelTokenizer(special_tokens or ())
    if library == "sentencepiece":
        return SentencePieceTokenizer(
            _existing_path(tokenizer_cfg, "model", artifact_dir),
            legacy=bool(tokenizer_cfg.get("sentencepiece_legacy", False)),
            special_tokens=special_tokens,
        )
    if library == "huggingface":
        return _build_huggingface(tokenizer_cfg, artifact_dir)
    raise ValueError(
        f"tokenizer.library: unsupported value {library!r}; supported values: {', '.join(SUPPORTED_LIBRARIES)}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Save side: the ``tokenizer`` config written into a ``.nemo``, in the form NeMo 2.5 rebuilds
# ---------------------------------------------------------------------------------------------------------------

# The tokenizer keys NeMo writes into every ``model_config.yaml`` (unused ones as null).
NEMO_TOKENIZER_KEYS = ("library", "type", "model", "vocab_file", "merge_file", "delimiter", "sentencepiece_legacy")
# The keys whose files NeMo carries inside the ``.nemo`` (``register_artifact``); ``type`` is never one of them.
NEMO_ARTIFACT_KEYS = ("model", "vocab_file", "merge_file")


# Class names that only transformers >= 5 writes into tokenizer_config.json (NeMo 2.5 pins transformers 4).
TRANSFORMERS_5_ONLY_CLASSES = ("TokenizersBackend",)


class NemoTokenizerWarning(UserWarning):
    """A ``.nemo`` is being written whose tokenizer NVIDIA NeMo would not rebuild as this library does."""


def nemo_tokenizer_config(
    tokenizer_cfg: Mapping[str, Any], tokenizer: Tokenizer
) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``tokenizer`` config to write into a ``.nemo`` and the local files that travel in it as artifacts.

    Returns ``(config, artifacts)`` where ``artifacts`` maps config keys (``"model"``, ...) to local files; the
    writer stores each file in the tar and sets its key to ``nemo:<name>``. The config has NeMo's keys and values
    such that NeMo 2.5's ``MegatronGPTModel.restore_from`` builds the same tokenizer (token ids) as
    :func:`build_tokenizer` does from it. Where NeMo cannot, a :class:`NemoTokenizerWarning` says why
    (``docs/checkpoints.md``, "Restoring our files in NVIDIA NeMo"):

    - ``byte-level`` with ``special_tokens`` (an INFO log line, not a warning: same model in NeMo): NeMo reserves
      the same ids but encodes the strings as plain bytes;
    - ``sentencepiece`` in legacy mode without a named ``eos_token``: NeMo's legacy tokenizer then has no eos id;
    - ``huggingface`` without a local tokenizer directory in ``type``: NeMo builds Hugging Face tokenizers only
      from ``type`` (a Hub id or a directory, never a file inside the ``.nemo``).
    """
    cfg = {key: None for key in NEMO_TOKENIZER_KEYS} | _plain(dict(tokenizer_cfg))
    artifacts: dict[str, str] = {}
    library = cfg["library"]
    if library == "sentencepiece":
        # NeMo's default for a missing key is legacy mode, this library's is not: say which one was used.
        cfg["sentencepiece_legacy"] = bool(getattr(tokenizer, "legacy", False))
        named = cfg.get("special_tokens") if isinstance(cfg.get("special_tokens"), Mapping) else {}
        if cfg["sentencepiece_legacy"] and "eos_token" not in named:
            _warn_nemo(
                "tokenizer.sentencepiece_legacy: NeMo's legacy SentencePiece tokenizer knows bos/eos/pad only by "
                "name, so without tokenizer.special_tokens {bos_token: ..., eos_token: ..., pad_token: ...} its "
                "eos_id fails (this library falls back to the model's own ids)"
            )
    elif library == "byte-level" and cfg.get("special_tokens"):
        # A note, not a warning: NeMo restores the same model (same ids, same logits); only its encoding of text
        # holding these strings differs. This is the embedded default's tokenizer, whose runs must not warn.
        logger.info(
            "Writing a .nemo that NVIDIA NeMo would encode differently: tokenizer.special_tokens %s: NeMo's "
            "byte-level tokenizer reserves the same ids but encodes these strings as plain bytes, so text holding "
            "them gets other token ids in NeMo (the weights and logits for the same ids are unaffected; "
            "docs/checkpoints.md)",
            cfg["special_tokens"],
        )
    elif library == "huggingface":
        _huggingface_for_nemo(cfg, tokenizer, artifacts)
    for key in NEMO_ARTIFACT_KEYS:
        value = cfg.get(key)
        if isinstance(value, str) and Path(value).is_file():
            artifacts[key] = value
    return cfg, artifacts


def _huggingface_for_nemo(cfg: dict[str, Any], tokenizer: Tokenizer, artifacts: dict[str, str]) -> None:
    """NeMo builds a Hugging Face tokenizer with ``AutoTokenizer.from_pretrained(tokenizer.type, ...)`` and passes
    ``special_tokens`` as keyword arguments. So ``type`` stays (or becomes) a local tokenizer directory, whose
    ``tokenizer.json`` also travels as the ``model`` artifact for this library, and a list of special tokens
    becomes NeMo's ``{additional_special_tokens: [...]}``."""
    if isinstance(cfg.get("special_tokens"), list):
        cfg["special_tokens"] = {"additional_special_tokens": cfg["special_tokens"]}
    source = cfg.get("type")
    if isinstance(source, str) and Path(source).expanduser().is_dir():
        directory = Path(source).expanduser().resolve()
        cfg["type"] = str(directory)
        if _tokenizer_class(directory) in TRANSFORMERS_5_ONLY_CLASSES:
            _warn_nemo(
                f"tokenizer.type {directory} was saved by transformers 5 (tokenizer_class "
                f"{_tokenizer_class(directory)}), which NeMo 2.5's transformers 4 cannot load: give NeMo the "
                "model's original tokenizer files (e.g. from the Hub)"
            )
        if (directory / "tokenizer.json").is_file() and cfg.get("model") is None:
            artifacts["model"] = str(directory / "tokenizer.json")
        # Named special tokens, so the tokenizer.json alone rebuilds them where the directory is gone.
        named = getattr(tokenizer, "named_special_tokens", {})
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if key in named and cfg.get(key) is None:
                cfg[key] = named[key]
        return
    if isinstance(source, str) and Path(source).expanduser().is_file():
        # A bare tokenizer.json travels under ``model``: NeMo would read ``type`` as a Hub id.
        if cfg.get("model") is None:
            cfg["model"] = source
        cfg["type"] = source = None
    if source is None or str(source).startswith(NEMO_ARTIFACT_PREFIX) or Path(str(source)).is_absolute():
        _warn_nemo(
            f"tokenizer.type={source!r}: NeMo 2.5 builds a Hugging Face tokenizer only from tokenizer.type (a Hub "
            "id or a local directory), never from a file inside the .nemo; this file carries its tokenizer for "
            "nemo_aligner, but NeMo cannot restore it until tokenizer.type names a directory written with the "
            "tokenizer's "
            "save_pretrained (pass it as NeMo's override_config_path, or set model.tokenizer.type before saving)"
        )


def _tokenizer_class(directory: Path) -> str | None:
    config = directory / "tokenizer_config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def _warn_nemo(message: str) -> None:
    warnings.warn(f"writing a .nemo that NVIDIA NeMo would read differently: {message}", NemoTokenizerWarning, 3)
