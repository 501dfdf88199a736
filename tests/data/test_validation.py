"""Every data problem is a DataError naming the file, the 1-based line and the key, found before any model work."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from nemo_aligner.data.nlp.builders import build_sft_dataset
from nemo_aligner.data.nlp.jsonl import MAX_REPORTED_PROBLEMS, DataError, check_global_batch_fits, read_jsonl
from nemo_aligner.tokenizers import build_tokenizer

TOKENIZER = build_tokenizer({"library": "byte-level", "special_tokens": ["<extra_id_0>", "<extra_id_1>"]})

GOOD = {"input": "a", "output": "b"}
GOOD_CHAT = {"system": "", "conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b"}]}


def build(path, chat: bool = False, **split):
    data_cfg = OmegaConf.create({"chat": chat})
    split_cfg = OmegaConf.create({"file_path": str(path), "max_seq_length": 64, **split})
    return build_sft_dataset(data_cfg, split_cfg, TOKENIZER, seed=1)


def chat_line(*roles: str, **extra) -> dict:
    return {"system": "s", "conversations": [{"from": r, "value": "v"} for r in roles], **extra}


# (case id, lines written, chat?, split overrides, substrings the message must contain besides the file path)
CASES = [
    ("malformed_json", [GOOD, '{"input": "a",'], False, {}, [":2:", "malformed JSON"]),
    ("not_an_object", [GOOD, "[1, 2]"], False, {}, [":2:", "expected a JSON object, got array"]),
    ("missing_output", [GOOD, {"input": "a"}], False, {}, [":2:", "'output'", "missing key"]),
    ("missing_input", [{"output": "b"}], False, {}, [":1:", "'input'", "missing key"]),
    ("wrong_type", [{"input": "a", "output": 5}], False, {}, [":1:", "'output'", "must be a string, got number"]),
    (
        "template_key",
        [{"input": "a", "output": "b"}],
        False,
        {"prompt_template": "{system}\n{input} {output}"},
        [":1:", "'system'", "missing key"],
    ),
    ("too_short", [GOOD, GOOD], False, {"min_seq_length": 10}, [":1:", ":2:", "min_seq_length=10"]),
    ("chat_no_conversations", [{"system": "s"}], True, {}, [":1:", "'conversations'", "missing key"]),
    ("chat_not_list", [{"conversations": "hi"}], True, {}, [":1:", "'conversations'", "must be a list"]),
    ("chat_no_value", [{"conversations": [{"from": "User"}]}], True, {}, [":1:", "'conversations[0].value'"]),
    ("chat_role_type", [chat_line("User", "Assistant", mask=3)], True, {}, [":1:", "'mask'", "must be a string"]),
    (
        "chat_two_users",
        [GOOD_CHAT, chat_line("User", "User", "Assistant")],
        True,
        {},
        [":2:", "'conversations[1].from'", "must alternate"],
    ),
    ("chat_first_not_mask", [chat_line("Assistant", "User")], True, {}, [":1:", "'conversations[0].from'", "User"]),
    ("chat_no_answer", [chat_line("User")], True, {}, [":1:", "'conversations'", "no answering turn"]),
    ("chat_type", [chat_line("User", "Assistant", type="TEXT_TO_VALUE")], True, {}, [":1:", "'type'", "unsupported"]),
]


@pytest.mark.parametrize("lines,chat,split,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_problem_names_file_line_and_key(write_jsonl, lines, chat, split, expected):
    path = write_jsonl(lines)
    with pytest.raises(DataError) as err:
        build(path, chat=chat, **split)
    message = str(err.value)
    for part in [str(path), *expected]:
        assert part in message


def test_non_utf8_names_the_line(write_jsonl):
    path = write_jsonl(json.dumps(GOOD).encode() + b'\n{"input": "\xff", "output": "b"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8"):
        read_jsonl(path)


@pytest.mark.parametrize("content,expected", [(b"", "holds no samples"), (b"\n  \n", "holds no samples")])
def test_empty_file(write_jsonl, content, expected):
    path = write_jsonl(content)
    with pytest.raises(DataError, match=expected) as err:
        read_jsonl(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_blank_lines_keep_numbering(write_jsonl):
    path = write_jsonl([GOOD, "", {"input": "a"}])
    with pytest.raises(DataError, match=":3: 'output'"):
        build(path)


def test_problems_are_collected_into_one_message(write_jsonl):
    lines = [GOOD] + [{"input": "a"}] * 25 + ["{oops"]
    path = write_jsonl(lines)
    with pytest.raises(DataError) as err:
        build(path)
    message = str(err.value)
    assert message.startswith(f"26 problems in {path} (first {MAX_REPORTED_PROBLEMS} shown)")
    # JSON problems are found while reading, before the keys of the parsed lines are checked.
    assert f"{path}:27: malformed JSON" in message
    assert message.count("missing key") == MAX_REPORTED_PROBLEMS - 1
    assert f"{path}:2: 'output'" in message and f"{path}:20: 'output'" in message


def test_file_shorter_than_global_batch(write_jsonl):
    path = write_jsonl([GOOD] * 3)
    dataset = build(path)
    check_global_batch_fits(path, len(dataset), 3)
    with pytest.raises(DataError) as err:
        check_global_batch_fits(path, len(dataset), 4)
    assert str(path) in str(err.value)
    assert "3 samples" in str(err.value) and "global_batch_size=4" in str(err.value)
