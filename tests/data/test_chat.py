"""Chat SFT samples: NeMo's rendering, the scored tokens, Llama 3 tokens, labels, prompts for generation."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from nemo_aligner.data.nlp.builders import build_sft_dataset
from nemo_aligner.data.nlp.chat import ChatPromptTokens, ChatTemplate
from nemo_aligner.data.nlp.jsonl import DataError
from nemo_aligner.tokenizers import ByteLevelTokenizer, build_tokenizer

S, T, L = 514, 513, 512  # <extra_id_0>, <extra_id_1>, <extra_id_2> in the byte-level tokenizer

LINE = {
    "system": "Be nice.",
    "mask": "User",
    "conversations": [
        {"from": "User", "value": "Hi"},
        {"from": "Assistant", "value": "Hello"},
        {"from": "User", "value": "Bye"},
        {"from": "Assistant", "value": "Ciao"},
    ],
}


def expected(*pieces: tuple[bytes | int, int]) -> tuple[list[int], list[int]]:
    """Ids and loss mask from hand-written (bytes or special id, scored) pieces."""
    ids, mask = [], []
    for piece, scored in pieces:
        piece_ids = list(piece) if isinstance(piece, bytes) else [piece]
        ids += piece_ids
        mask += [scored] * len(piece_ids)
    return ids, mask


def template(tokenizer, max_seq_length: int = 256, **tokens) -> ChatTemplate:
    return ChatTemplate(tokenizer, ChatPromptTokens(**tokens), max_seq_length=max_seq_length)


def test_rendering_and_scored_tokens(tokenizer):
    chat = template(tokenizer)
    assert chat.render(LINE) == (
        "<extra_id_0>System\nBe nice.\n"
        "<extra_id_1>User\nHi\n"
        "<extra_id_1>Assistant\nHello\n"
        "<extra_id_1>User\nBye\n"
        "<extra_id_1>Assistant\nCiao\n"
        "<extra_id_1>"
    )
    ids, mask = expected(
        (S, 0), (b"System\nBe nice.\n", 0),
        (T, 0), (b"User\nHi\n", 0),
        (T, 0), (b"Assistant\n", 0), (b"Hello\n", 1),
        (T, 1), (b"User\nBye\n", 0),
        (T, 0), (b"Assistant\n", 0), (b"Ciao\n", 1),
        (T, 1),
    )  # fmt: skip
    sample = chat.tokenize(LINE)
    assert sample.input_ids.tolist() == ids
    assert sample.loss_mask.astype(int).tolist() == mask
    assert sample.prompt_length == mask.index(1)


def test_dataset_item_from_config(write_jsonl, tokenizer):
    path = write_jsonl([LINE])
    data_cfg = OmegaConf.create({"chat": True, "chat_prompt_tokens": {"end_of_turn": "\n"}})
    dataset = build_sft_dataset(data_cfg, {"file_path": str(path), "max_seq_length": 256}, tokenizer, seed=0)
    item = dataset[0]
    assert item["input_ids"].tolist() == template(tokenizer).tokenize(LINE).input_ids.tolist()
    assert item["prompt_length"] == len(b"System\nBe nice.\nUser\nHi\nAssistant\n") + 3


def test_prompt_and_answer_uses_the_last_answer(tokenizer):
    chat = template(tokenizer)
    prompt, answer = chat.prompt_and_answer(LINE)
    assert tokenizer.ids_to_text(prompt) == chat.render(LINE)[: -len("Ciao\n<extra_id_1>")].rstrip()
    assert prompt[-len(b"Assistant\n") - 1 :] == [T, *b"Assistant\n"]
    assert answer == [*b"Ciao\n", T]
    # A trailing user turn is not part of the answer: the answer ends at the next turn start.
    line = {**LINE, "conversations": LINE["conversations"][:3]}
    prompt, answer = chat.prompt_and_answer(line)
    assert answer == [*b"Hello\n", T]
    assert prompt == chat.tokenize(line).input_ids.tolist()[: len(prompt)]


def test_llama3_tokens(tokenizer):
    llama_tokens = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    llama = build_tokenizer({"library": "byte-level", "special_tokens": llama_tokens})
    bot, start, end, eot = (llama.token_to_id(t) for t in llama_tokens)
    chat = template(
        llama,
        system_turn_start="<|begin_of_text|><|start_header_id|>",
        turn_start="<|start_header_id|>",
        end_of_name="<|end_header_id|>\n\n",
        end_of_turn="<|eot_id|>",
    )
    line = {
        "system": "sys",
        "mask": "user",
        "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}],
    }
    assert chat.render(line) == (
        "<|begin_of_text|><|start_header_id|>System<|end_header_id|>\n\nsys<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|><|start_header_id|>"
    )
    ids, mask = expected(
        (bot, 0), (start, 0), (b"System", 0), (end, 0), (b"\n\nsys", 0), (eot, 0),
        (start, 0), (b"user", 0), (end, 0), (b"\n\nhi", 0), (eot, 0),
        (start, 0), (b"assistant", 0), (end, 0), (b"\n\n", 0), (b"hello", 1), (eot, 1),
        (start, 1),
    )  # fmt: skip
    sample = chat.tokenize(line)
    assert sample.input_ids.tolist() == ids
    assert sample.loss_mask.astype(int).tolist() == mask
    assert sample.prompt_and_answer()[1] == [*b"hello", eot, start]


def test_labels_only_with_value_to_text(tokenizer):
    chat = template(tokenizer)
    turns = [{"from": "User", "value": "q"}, {"from": "Assistant", "value": "a", "label": "quality:4"}]
    labelled = {"conversations": turns, "type": "VALUE_TO_TEXT"}
    assert chat.render(labelled).endswith("<extra_id_1>Assistant\n<extra_id_2>quality:4\na\n<extra_id_1>")
    sample = chat.tokenize(labelled)
    assert sample.prompt_and_answer()[1] == [*b"a\n", T]
    assert L in sample.prompt_and_answer()[0]
    # Without the type, NeMo ignores labels; a missing system renders as empty.
    assert chat.render({"conversations": turns}) == (
        "<extra_id_0>System\n\n<extra_id_1>User\nq\n<extra_id_1>Assistant\na\n<extra_id_1>"
    )


def test_several_mask_roles(tokenizer):
    line = {
        "mask": "User,Tool",
        "conversations": [
            {"from": "User", "value": "q"},
            {"from": "Assistant", "value": "call"},
            {"from": "Tool", "value": "42"},
            {"from": "Assistant", "value": "It is 42"},
        ],
    }
    chat = template(tokenizer)
    assert chat.validate(line) == []
    sample = chat.tokenize(line)
    scored = [i for i, m in zip(sample.input_ids.tolist(), sample.loss_mask.tolist()) if m]
    assert scored == [*b"call\n", T, *b"It is 42\n", T]


def test_right_truncation(tokenizer):
    full = template(tokenizer).tokenize(LINE)
    sample = template(tokenizer, max_seq_length=len(full.input_ids) - 3).tokenize(LINE)
    assert sample.truncated and sample.input_ids.tolist() == full.input_ids.tolist()[:-3]


def test_truncation_leaving_nothing_to_score_is_an_error(write_jsonl, tokenizer):
    path = write_jsonl([LINE])
    data_cfg = OmegaConf.create({"chat": True})
    with pytest.raises(DataError, match=rf"{path}:1: no answer token is left to score after truncation"):
        build_sft_dataset(data_cfg, {"file_path": str(path), "max_seq_length": 20}, tokenizer, seed=0)


def test_unknown_prompt_token_key():
    with pytest.raises(ValueError, match="chat_prompt_tokens: unknown keys"):
        ChatPromptTokens.from_config({"turn_begin": "<s>"})


def test_mask_boundary_is_exact_when_the_tokenizer_merges_across_it():
    class MergingTokenizer(ByteLevelTokenizer):
        """Byte-level, except that newline + 'b' is one token (300), like a BPE merge across the turn header."""

        def text_to_ids(self, text: str) -> list[int]:
            ids = super().text_to_ids(text)
            out = []
            for i in ids:
                if out and out[-1] == ord("\n") and i == ord("b"):
                    out[-1] = 300
                else:
                    out.append(i)
            return out

    merging = MergingTokenizer(["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"])
    line = {"conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "bb"}]}
    sample = template(merging).tokenize(line)
    assert 300 not in sample.prompt_and_answer()[1]
    assert sample.prompt_and_answer() == (
        [S, *b"System\n\n", T, *b"User\na\n", T, *b"Assistant\n"],
        [*b"bb\n", T],
    )
