"""DPO preference data: both line formats, rewards, over-length drops, validation errors, collate and builders."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from omegaconf import OmegaConf

from nemo_aligner.data.embedded import CHAT_PROMPT_TOKENS, EMBEDDED_DIR, END_OF_TURN
from nemo_aligner.data.nlp.chat import ChatPromptTokens, ChatTemplate
from nemo_aligner.data.nlp.dpo_builders import (
    build_dpo_dataloader,
    build_dpo_dataset,
    build_dpo_datasets,
    default_rewards,
)
from nemo_aligner.data.nlp.dpo_dataset import DPOCollate, scoring_lines
from nemo_aligner.data.nlp.jsonl import DataError
from nemo_aligner.tokenizers import build_tokenizer
from nemo_aligner.utils.batching import length_bucketed_micro_batches
from nemo_aligner.utils.distributed import initialize_distributed

S, T = 514, 513  # <extra_id_0>, <extra_id_1> in the conftest byte-level tokenizer
EOS = 0  # byte-level EOS id (pad is 1)
PROMPT = "<extra_id_0>System\n\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\n"
LINE = {"prompt": PROMPT, "chosen_response": "hello\n<extra_id_1>", "rejected_response": "go\n<extra_id_1>"}


def data_cfg(**overrides):
    return OmegaConf.create({"seq_length": 128, **overrides})


def build(path, tokenizer, dpo_cfg=None, **overrides):
    return build_dpo_dataset(data_cfg(**overrides), path, tokenizer, dpo_cfg=dpo_cfg)


def messages_line(prompt: str, chosen: str, rejected: str, system: str | None = "") -> dict:
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return {
        "prompt": messages,
        "chosen_response": {"role": "assistant", "content": chosen},
        "rejected_response": [{"role": "assistant", "content": rejected}],
    }


def test_templated_strings_are_scored_exactly_as_given(write_jsonl, tokenizer):
    item = build(write_jsonl([LINE]), tokenizer)[0]
    assert item["chosen_ids"].tolist() == tokenizer.text_to_ids(PROMPT + LINE["chosen_response"])
    assert item["rejected_ids"].tolist() == tokenizer.text_to_ids(PROMPT + LINE["rejected_response"])
    assert item["prompt_length"] == len(tokenizer.text_to_ids(PROMPT))
    assert item["chosen_ids"][item["prompt_length"] :].tolist() == [*b"hello\n", T]
    assert item["chosen_length"] == len(item["chosen_ids"]) and item["rejected_length"] == len(item["rejected_ids"])
    assert item["sample_index"] == 0


def test_append_eod_adds_eos_to_each_response(write_jsonl, tokenizer):
    path = write_jsonl([LINE])
    plain, with_eod = build(path, tokenizer)[0], build(path, tokenizer, append_eod=True)[0]
    for side in ("chosen_ids", "rejected_ids"):
        assert with_eod[side].tolist() == [*plain[side].tolist(), EOS]
    assert with_eod["prompt_length"] == plain["prompt_length"]


@pytest.fixture(scope="module")
def merging_tokenizer(tmp_path_factory):
    """A BPE that merges "a" + "b" into one token, so "xa" | "b" does not survive tokenization."""
    from tokenizers import Tokenizer, models

    vocab = {"<eos>": 0, "a": 1, "b": 2, "x": 3, "\n": 4, "ab": 5}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    backend.save(str(path))
    return build_tokenizer({"library": "huggingface", "type": str(path), "eos_token": "<eos>"})


def test_prompt_must_be_a_token_prefix(write_jsonl, merging_tokenizer):
    good = {"prompt": "x\n", "chosen_response": "ab", "rejected_response": "b"}
    item = build(write_jsonl([good]), merging_tokenizer)[0]
    assert item["chosen_ids"].tolist() == [3, 4, 5] and item["prompt_length"] == 2
    path = write_jsonl([good, {"prompt": "xa", "chosen_response": "x", "rejected_response": "b"}])
    with pytest.raises(DataError) as err:
        build(path, merging_tokenizer)
    message = str(err.value)
    assert f"{path}:2: 'rejected_response': the tokenizer merges the end of the prompt" in message
    assert "special token or a newline" in message and "chosen_response" not in message


def to_messages(line: dict) -> dict:
    """A bundled templated line rewritten as OpenAI messages (the inverse of the embedded template)."""
    head, tail = "<extra_id_0>System\n\n<extra_id_1>User\n", "\n<extra_id_1>Assistant\n"
    assert line["prompt"].startswith(head) and line["prompt"].endswith(tail)
    answers = [line[key].removesuffix(END_OF_TURN) for key in ("chosen_response", "rejected_response")]
    return messages_line(line["prompt"][len(head) : -len(tail)], *answers)


def test_messages_render_to_the_bundled_templated_tokens(write_jsonl, tokenizer):
    templated_path = EMBEDDED_DIR / "dpo_train.jsonl"
    lines = [json.loads(text) for text in templated_path.read_text().splitlines()[:300]]
    templated = build(write_jsonl(lines), tokenizer)
    rendered = build(
        write_jsonl([to_messages(line) for line in lines]), tokenizer, chat_prompt_tokens=CHAT_PROMPT_TOKENS
    )
    assert len(rendered) == len(templated) == 300
    for i in range(len(lines)):
        a, b = templated[i], rendered[i]
        assert a["chosen_ids"].tolist() == b["chosen_ids"].tolist()
        assert a["rejected_ids"].tolist() == b["rejected_ids"].tolist()
        assert a["prompt_length"] == b["prompt_length"]


def test_messages_are_rendered_by_the_sft_chat_template(write_jsonl, tokenizer):
    line = {
        "prompt": [
            {"role": "system", "content": "Be nice."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
        "chosen_response": {"role": "assistant", "content": "Ciao"},
        "rejected_response": {"role": "assistant", "content": "No"},
    }
    item = build(write_jsonl([line]), tokenizer)[0]
    text = (
        "<extra_id_0>System\nBe nice.\n<extra_id_1>User\nHi\n<extra_id_1>Assistant\nHello\n"
        "<extra_id_1>User\nBye\n<extra_id_1>Assistant\n"
    )
    assert item["chosen_ids"].tolist() == tokenizer.text_to_ids(text + "Ciao\n<extra_id_1>")
    assert item["prompt_length"] == len(tokenizer.text_to_ids(text))
    # The scored response is exactly the SFT loss mask's last scored run for the same conversation.
    sft = ChatTemplate(tokenizer, ChatPromptTokens(), max_seq_length=256)
    turns = [{"from": r, "value": v} for r, v in [("User", "Hi"), ("Assistant", "Hello"), ("User", "Bye")]]
    conversation = {"system": "Be nice.", "conversations": [*turns, {"from": "Assistant", "value": "No"}]}
    prompt, answer = sft.prompt_and_answer(conversation)
    assert item["rejected_ids"].tolist() == prompt + answer and answer == [*b"No\n", T]


def test_llama3_tokens(write_jsonl):
    llama_tokens = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    llama = build_tokenizer({"library": "byte-level", "special_tokens": llama_tokens})
    bot, start, end, eot = (llama.token_to_id(t) for t in llama_tokens)
    chat_tokens = {
        "system_turn_start": "<|begin_of_text|><|start_header_id|>",
        "turn_start": "<|start_header_id|>",
        "end_of_name": "<|end_header_id|>\n\n",
        "end_of_turn": "<|eot_id|>",
    }
    line = messages_line("hi", "hello", "bye", system="sys")
    item = build(write_jsonl([line]), llama, chat_prompt_tokens=chat_tokens, append_eod=True)[0]
    prompt = [
        bot, start, *b"System", end, *b"\n\nsys", eot,
        start, *b"User", end, *b"\n\nhi", eot,
        start, *b"Assistant", end, *b"\n\n",
    ]  # fmt: skip
    assert item["prompt_length"] == len(prompt)
    assert item["chosen_ids"].tolist() == [*prompt, *b"hello", eot, start, EOS]
    assert item["rejected_ids"].tolist() == [*prompt, *b"bye", eot, start, EOS]


def test_rewards_from_the_line_then_model_data_then_model_dpo(write_jsonl, tokenizer, caplog):
    path = write_jsonl([{**LINE, "chosen_reward": 7, "rejected_reward": -2.5}, LINE])

    def rewards(dataset):
        return [(dataset[i]["chosen_reward"], dataset[i]["rejected_reward"]) for i in range(len(dataset))]

    assert rewards(build(path, tokenizer)) == [(7.0, -2.5), (1.0, 0.0)]
    dpo = {"default_chosen_reward": 4, "default_rejected_reward": 3}
    assert rewards(build(path, tokenizer, dpo_cfg=dpo)) == [(7.0, -2.5), (4.0, 3.0)]
    with caplog.at_level(logging.WARNING):
        assert rewards(build(path, tokenizer, dpo_cfg=dpo, default_chosen_reward=0.5)) == [(7.0, -2.5), (0.5, 3.0)]
    assert "model.data.default_chosen_reward=0.5 and model.dpo.default_chosen_reward=4" in caplog.text
    assert default_rewards({"default_rejected_reward": 0.25}, {"default_rejected_reward": 9}) == (1.0, 0.25)
    with pytest.raises(ValueError, match=r"model\.dpo\.default_chosen_reward must be a number"):
        default_rewards({}, {"default_chosen_reward": "high"})


def test_over_length_pairs_are_dropped_and_counted(write_jsonl, tokenizer, caplog):
    prompt_length = len(tokenizer.text_to_ids(PROMPT))
    long_rejected = {**LINE, "rejected_response": "x" * 20 + "\n<extra_id_1>"}
    long_chosen = {**LINE, "chosen_response": "x" * 20 + "\n<extra_id_1>"}
    path = write_jsonl([LINE, long_rejected, LINE, long_chosen, LINE])
    seq_length = prompt_length + len("hello\n") + 1  # the longest of LINE fits exactly
    with caplog.at_level(logging.WARNING):
        dataset = build(path, tokenizer, seq_length=seq_length)
    assert len(dataset) == 3 and dataset.num_dropped == 2
    assert dataset.dropped_lines == [(str(path), 2), (str(path), 4)]
    assert [dataset.origin(i)[1] for i in range(3)] == [1, 3, 5]
    assert f"dropped 2 of 5 pairs longer than model.data.seq_length={seq_length}" in caplog.text
    assert max(len(dataset[i]["chosen_ids"]) for i in range(3)) == seq_length
    with pytest.raises(DataError, match=r"all 5 pairs are longer than model\.data\.seq_length=10"):
        build(path, tokenizer, seq_length=10)


MSG_PROMPT = [{"role": "user", "content": "q"}]
ANSWER = {"role": "assistant", "content": "a"}
# (case id, line, key named in the message, substring of the message)
BAD_LINES = [
    ("missing_prompt", {"chosen_response": "a", "rejected_response": "b"}, "prompt", "missing key"),
    ("missing_rejected", {"prompt": "p", "chosen_response": "a"}, "rejected_response", "missing key"),
    ("prompt_type", {**LINE, "prompt": 3}, "prompt", "got number"),
    ("empty_prompt", {**LINE, "prompt": ""}, "prompt", "must not be empty"),
    ("empty_response", {**LINE, "chosen_response": ""}, "chosen_response", "must not be empty"),
    ("response_type", {**LINE, "rejected_response": ANSWER}, "rejected_response", "must be a string"),
    ("reward_string", {**LINE, "chosen_reward": "1"}, "chosen_reward", "must be a number"),
    ("reward_bool", {**LINE, "rejected_reward": True}, "rejected_reward", "got boolean"),
    ("reward_nan", {**LINE, "chosen_reward": float("nan")}, "chosen_reward", "must be finite"),
    ("reward_null", {**LINE, "chosen_reward": None}, "chosen_reward", "got null"),
    (
        "bad_role",
        {**messages_line("q", "a", "b"), "prompt": [{"role": "human", "content": "q"}]},
        "prompt[0].role",
        "'human'",
    ),
    (
        "system_not_first",
        {**messages_line("q", "a", "b"), "prompt": [*MSG_PROMPT, {"role": "system", "content": ""}]},
        "prompt[1].role",
        "a system message may only come first",
    ),
    (
        "not_alternating",
        {**messages_line("q", "a", "b"), "prompt": [*MSG_PROMPT, *MSG_PROMPT]},
        "prompt[1].role",
        "alternate",
    ),
    (
        "ends_with_assistant",
        {**messages_line("q", "a", "b"), "prompt": [*MSG_PROMPT, ANSWER]},
        "prompt",
        "last message must be a user message",
    ),
    ("empty_messages", {**messages_line("q", "a", "b"), "prompt": []}, "prompt", "at least one message"),
    (
        "missing_content",
        {**messages_line("q", "a", "b"), "prompt": [{"role": "user"}]},
        "prompt[0].content",
        "missing key",
    ),
    (
        "empty_user_content",
        {**messages_line("q", "a", "b"), "prompt": [{"role": "user", "content": ""}]},
        "prompt[0].content",
        "must not be empty",
    ),
    (
        "response_role",
        {**messages_line("q", "a", "b"), "chosen_response": {"role": "user", "content": "a"}},
        "chosen_response.role",
        "must be one of 'assistant'",
    ),
    (
        "response_list_of_two",
        {**messages_line("q", "a", "b"), "rejected_response": [ANSWER, ANSWER]},
        "rejected_response",
        "exactly one assistant message",
    ),
    (
        "string_response_to_messages",
        {**messages_line("q", "a", "b"), "chosen_response": "a"},
        "chosen_response",
        "the prompt is a message list",
    ),
]


@pytest.mark.parametrize("line,key,text", [case[1:] for case in BAD_LINES], ids=[case[0] for case in BAD_LINES])
def test_validation_errors_name_file_line_and_key(write_jsonl, tokenizer, line, key, text):
    path = write_jsonl([LINE, "", line])
    with pytest.raises(DataError) as err:
        build(path, tokenizer)
    message = str(err.value)
    assert f"{path}:3: '{key}': " in message and text in message


def test_problems_of_every_line_and_file_are_reported_together(write_jsonl, tokenizer):
    first = write_jsonl([LINE, '{"prompt": ', {**LINE, "chosen_reward": "x"}])
    second = write_jsonl([{"prompt": "p"}])
    with pytest.raises(DataError) as err:
        build_dpo_dataset(data_cfg(), [first, second], tokenizer)
    message = str(err.value)
    assert f"{first}:2: malformed JSON" in message and f"{first}:3: 'chosen_reward'" in message
    assert f"{second}:1: 'chosen_response': missing key" in message
    assert f"{second}:1: 'rejected_response': missing key" in message


def test_data_prefix_splits_concatenate_files_in_order(write_jsonl, tokenizer):
    first = write_jsonl([{**LINE, "chosen_reward": 1}, {**LINE, "chosen_reward": 2}])
    second = write_jsonl([{**LINE, "chosen_reward": 3}])
    cfg = data_cfg(data_prefix={"train": [str(first), str(second)], "validation": str(second)})
    datasets = build_dpo_datasets(cfg, None, tokenizer, splits=("train", "validation"))
    train = datasets["train"]
    assert [train[i]["chosen_reward"] for i in range(3)] == [1.0, 2.0, 3.0]
    assert [train[i]["sample_index"] for i in range(3)] == [0, 1, 2]
    assert [train.origin(i) for i in range(3)] == [(str(first), 1), (str(first), 2), (str(second), 1)]
    assert len(datasets["validation"]) == 1
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_dpo_datasets(cfg, None, tokenizer, splits=("train", "validation"), global_batch_size=2)
    with pytest.raises(ValueError, match=r"model\.data\.data_prefix\.test must be set"):
        build_dpo_datasets(cfg, None, tokenizer)


@pytest.mark.parametrize(
    "prefix,overrides,error,match",
    [
        ({"train": [0.5, "a.jsonl"]}, {}, ValueError, "weighted blending"),
        ({"train": ["a.jsonl"], "dev": ["a.jsonl"]}, {}, ValueError, r"unknown splits \['dev'\]"),
        ("a.jsonl", {}, ValueError, "must be a mapping"),
        ({"train": ["a.jsonl"]}, {"data_impl": "packed_jsonl"}, NotImplementedError, "model.dpo.packed_sequences=true"),
        ({"train": ["a.jsonl"]}, {"data_impl": "mmap"}, ValueError, "must be 'jsonl'"),
        ({"train": ["a.jsonl"]}, {"seq_length": None}, ValueError, r"model\.data\.seq_length must be a positive"),
    ],
)
def test_data_config_errors(tokenizer, prefix, overrides, error, match):
    with pytest.raises(error, match=match):
        build_dpo_datasets(data_cfg(**overrides), prefix, tokenizer, splits=("train",))


def pair_item(chosen, rejected, prompt_length, index, rewards=(1.0, 0.0)):
    return {
        "chosen_ids": torch.tensor(chosen),
        "rejected_ids": torch.tensor(rejected),
        "prompt_length": prompt_length,
        "chosen_length": len(chosen),
        "rejected_length": len(rejected),
        "chosen_reward": rewards[0],
        "rejected_reward": rewards[1],
        "sample_index": index,
    }


def test_collate_masks_by_hand():
    items = [
        pair_item([10, 11, 12, 13], [10, 11, 14], prompt_length=2, index=5, rewards=(2.0, -1.0)),
        pair_item([20, 21, 22], [20, 21, 23, 24, 25], prompt_length=1, index=0),
    ]
    batch = DPOCollate(pad_id=1)(items)
    assert batch["chosen"].tolist() == [[10, 11, 12, 13, 1], [20, 21, 22, 1, 1]]
    assert batch["rejected"].tolist() == [[10, 11, 14, 1, 1], [20, 21, 23, 24, 25]]
    assert batch["chosen_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]]
    assert batch["rejected_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert batch["chosen_mask"].dtype == torch.float32 and batch["chosen"].dtype == torch.long
    assert batch["chosen_rewards"].tolist() == [2.0, 1.0] and batch["rejected_rewards"].tolist() == [-1.0, 0.0]
    assert batch["valid"].tolist() == [1.0, 1.0] and batch["sample_index"].tolist() == [5, 0]
    assert batch["prompt_lengths"].tolist() == [2, 1]
    assert batch["chosen_lengths"].tolist() == [4, 3] and batch["rejected_lengths"].tolist() == [3, 5]
    assert DPOCollate(pad_id=1, pad_length_to_multiple_of=4)(items)["chosen"].shape == (2, 8)
    assert DPOCollate(pad_id=1, pad_length_to_multiple_of=4, max_length=6)(items)["rejected_mask"].shape == (2, 6)

    initialize_distributed()  # one process: no pipeline, so micro batches are trimmed
    keys = ("chosen", "rejected", "chosen_mask", "rejected_mask")
    ends = torch.maximum(batch["chosen_lengths"], batch["rejected_lengths"])  # one past the last response token
    micro, order = length_bucketed_micro_batches(batch, 1, ends, keys)
    assert order.tolist() == [0, 1] and [m["chosen"].shape[1] for m in micro] == [4, 5]
    assert micro[0]["chosen_mask"].tolist() == [[0, 0, 1, 1]] and micro[1]["valid"].tolist() == [1.0]


def test_filler_pairs_are_fully_masked(write_jsonl, tokenizer):
    dataset = build(write_jsonl([LINE, LINE, LINE]), tokenizer)
    filler = dataset[-1]
    assert filler["sample_index"] == -1 and filler["chosen_ids"].tolist() == [tokenizer.pad_id]
    batch = DPOCollate(pad_id=tokenizer.pad_id)([dataset[0], filler])
    assert batch["valid"].tolist() == [1.0, 0.0]
    assert batch["chosen_mask"][1].sum() == 0 and batch["rejected_mask"][1].sum() == 0
    assert (batch["chosen"][1] == tokenizer.pad_id).all()

    loader = build_dpo_dataloader(data_cfg(), dataset, tokenizer, 2, train=False)
    indices = torch.cat([b["sample_index"] for b in loader]).tolist()
    assert indices == [0, 1, 2, -1]


def test_train_dataloader_splits_global_batches_over_ranks(write_jsonl, tokenizer):
    dataset = build(write_jsonl([{**LINE, "chosen_reward": i} for i in range(8)]), tokenizer)
    cfg = data_cfg(pad_length_to_multiple_of=16)
    seen = []
    for rank in range(2):
        loader = build_dpo_dataloader(
            cfg, dataset, tokenizer, 4, train=True, data_parallel_rank=rank, data_parallel_size=2, seed=3
        )
        for batch in loader:
            assert batch["chosen"].shape == (2, 48) and batch["valid"].all()
            seen += batch["sample_index"].tolist()
    assert sorted(seen) == list(range(8))


def test_scoring_lines_keep_the_input_order(write_jsonl, tokenizer):
    long_line = {**LINE, "chosen_response": "x" * 50}
    first = write_jsonl([LINE, long_line, "", {**LINE, "id": "c"}])
    second = write_jsonl([long_line, {**LINE, "id": "e"}])
    dataset = build_dpo_dataset(data_cfg(seq_length=50), [first, second, first], tokenizer)
    assert len(dataset) == 5 and dataset.num_dropped == 3
    lines = list(scoring_lines(dataset))
    assert [(line.path, line.line, line.index) for line in lines] == [
        (str(first), 1, 0), (str(first), 2, None), (str(first), 4, 1),
        (str(second), 1, None), (str(second), 2, 2),
        (str(first), 1, 3), (str(first), 2, None), (str(first), 4, 4),
    ]  # fmt: skip
    assert lines[2].data["id"] == "c" and lines[4].data["id"] == "e"
