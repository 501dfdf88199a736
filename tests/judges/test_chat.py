"""Chat-template removal for the judge: NeMo <extra_id_*> and Llama 3 chat prompt tokens."""

from __future__ import annotations

import pytest

from nemo_aligner.data.embedded import CHAT_PROMPT_TOKENS, format_prompt, format_response
from nemo_aligner.data.nlp.chat import ChatPromptTokens
from nemo_aligner.judges import normalise_prompt, normalise_response

LLAMA3 = ChatPromptTokens(
    system_turn_start="<|begin_of_text|><|start_header_id|>",
    turn_start="<|start_header_id|>",
    label_start="<|reserved_special_token_0|>",
    end_of_turn="<|eot_id|>",
    end_of_name="<|end_header_id|>\n\n",
)
EXTRA_ID = ChatPromptTokens()


@pytest.mark.parametrize(
    ("tokens", "prompt", "expected"),
    [
        (
            CHAT_PROMPT_TOKENS,
            "<extra_id_0>System\n\n<extra_id_1>User\nadd 1 and 2\n<extra_id_1>Assistant\n",
            "add 1 and 2",
        ),
        (EXTRA_ID, format_prompt("reverse: plane"), "reverse: plane"),
        (
            EXTRA_ID,
            "<extra_id_0>System\nBe brief.\n<extra_id_1>User\nline 1\nline 2\n<extra_id_1>Assistant\n",
            "line 1\nline 2",
        ),
        (
            EXTRA_ID,
            "<extra_id_0>System\n\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\nhello\n<extra_id_1>User\nadd 1 and 2\n"
            "<extra_id_1>Assistant\n",
            "User: hi\n\nAssistant: hello\n\nUser: add 1 and 2",
        ),
        (EXTRA_ID, "<extra_id_1>User\nq\n<extra_id_1>Assistant\n<extra_id_2>quality:4\n", "q"),
        (EXTRA_ID, "  plain text, no template \n", "plain text, no template"),
        (
            LLAMA3,
            "<|begin_of_text|><|start_header_id|>System<|end_header_id|>\n\nsys<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            "hi",
        ),
        (
            LLAMA3,
            "<|start_header_id|>System<|end_header_id|>\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi"
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nthanks<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
            "\n\n",
            "User: hi\n\nAssistant: hello\n\nUser: thanks",
        ),
    ],
)
def test_normalise_prompt(tokens, prompt, expected):
    assert normalise_prompt(prompt, tokens) == expected


@pytest.mark.parametrize(
    ("tokens", "response", "expected"),
    [
        (CHAT_PROMPT_TOKENS, "3\n<extra_id_1>", "3"),
        (EXTRA_ID, format_response("enalp"), "enalp"),
        (EXTRA_ID, "first line\nsecond line\n<extra_id_1>User\nmore", "first line\nsecond line"),
        (EXTRA_ID, "no end token ", "no end token"),
        (LLAMA3, "hello<|eot_id|><|start_header_id|>", "hello"),
        (LLAMA3, "hello<|eot_id|>rambling after the end", "hello"),
        (LLAMA3, "two\n\nparagraphs<|eot_id|>", "two\n\nparagraphs"),
        (LLAMA3, "", ""),
    ],
)
def test_normalise_response(tokens, response, expected):
    assert normalise_response(response, tokens) == expected
