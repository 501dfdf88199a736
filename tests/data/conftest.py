"""Fixtures for the data tests: the byte-level tokenizer with NeMo's chat tokens, and jsonl file writing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from nemo_aligner.tokenizers import Tokenizer, build_tokenizer

EXTRA_IDS = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """Byte ids 0-255 (eos 0, pad 1, no BOS) plus <extra_id_0/1/2> as the single ids 514/513/512."""
    return build_tokenizer({"library": "byte-level", "special_tokens": EXTRA_IDS})


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Write objects (dumped as JSON) or raw bytes/str lines to a fresh jsonl file and return its path."""
    counter = iter(range(1000))

    def write(lines, name: str | None = None) -> Path:
        path = tmp_path / (name or f"data_{next(counter)}.jsonl")
        if isinstance(lines, bytes):
            path.write_bytes(lines)
        else:
            path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        return path

    return write
