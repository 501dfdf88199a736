"""Judge prompt templates: the papers' defaults, variable validation, fitting into the judge's context."""

from __future__ import annotations

import pytest

from nemo_aligner.data.embedded import JUDGE_PROMPT_TEMPLATE, render_judge_prompt
from nemo_aligner.judges import (
    DEFAULT_JUDGE_PROMPT,
    DEFAULT_META_JUDGE_PROMPT,
    fit_judge_prompts,
    fit_to_context,
    judge_prompt_template,
    meta_judge_prompt_template,
)


def test_default_judge_prompt_renders_exactly_prompt_and_response():
    template = judge_prompt_template()
    assert template.variables == {"prompt", "response"}
    text = template.render(prompt="What is 2+2?", response="4, since {{ braces }} stay text")
    assert "User: What is 2+2?\n<response>4, since {{ braces }} stay text</response>" in text
    assert "additive 5-point scoring system" in text
    assert text.count("point") >= 5
    assert 'Conclude with the score using the format: "Score: <total points>"' in text
    assert "{{" not in DEFAULT_JUDGE_PROMPT.replace("{{ prompt }}", "").replace("{{ response }}", "")
    with pytest.raises(TypeError):
        template.render(prompt="p")


def test_default_meta_judge_prompt_variables_and_answer_format():
    template = meta_judge_prompt_template()
    assert template.variables == {"prompt", "response", "judgement_a", "judgement_b"}
    text = template.render(prompt="q", response="r", judgement_a="first", judgement_b="second")
    assert "Judgment A: <judgment>first</judgment>\nJudgment B: <judgment>second</judgment>" in text
    assert text.endswith('"Winner: [Judgement A | Judgement B]"')
    assert DEFAULT_META_JUDGE_PROMPT.startswith("Review the user's question and the corresponding response, along")


def test_embedded_judge_prompt_is_a_valid_template():
    text = judge_prompt_template(JUDGE_PROMPT_TEMPLATE).render(prompt="add 1 and 2", response="3")
    assert text == render_judge_prompt("add 1 and 2", "3")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("Rate {{ response }}", r"missing: \['prompt'\]"),
        ("{{ prompt }} {{ response }} {{ reference }}", r"unknown: \['reference'\]"),
        ("{{ prompt }} {{ response ", "not a valid Jinja template"),
        (None, "must be a Jinja template string"),
    ],
)
def test_bad_judge_templates_name_the_key(source, message):
    with pytest.raises(ValueError, match=r"model\.spin\.llm_judge_prompt") as info:
        judge_prompt_template(source)
    assert info.match(message)


def test_bad_meta_judge_template_names_the_key():
    with pytest.raises(ValueError, match=r"model\.spin\.llm_meta_judge_prompt.*missing: \['judgement_b'\]"):
        meta_judge_prompt_template("{{ prompt }} {{ response }} {{ judgement_a }}")


def test_filters_and_control_flow_are_allowed():
    template = judge_prompt_template("{% if prompt %}Q: {{ prompt | trim }}{% endif %} A: {{ response }}")
    assert template.render(prompt="  hi ", response="yo") == "Q: hi A: yo"


def _chars(text: str) -> int:
    return len(text)


def test_fit_to_context_keeps_template_and_cuts_the_response_end():
    template = judge_prompt_template("Q: {{ prompt }}\nA: {{ response }}\nScore it.")
    values = {"prompt": "add 1 and 2", "response": "0123456789"}
    full = template.render(**values)
    assert fit_to_context(template, values, token_length=_chars, max_length=len(full)) == (full, False)
    text, truncated = fit_to_context(template, values, token_length=_chars, max_length=len(full) - 4)
    assert truncated and text == "Q: add 1 and 2\nA: 012345\nScore it."
    empty = template.render(prompt="add 1 and 2", response="")
    assert fit_to_context(template, values, token_length=_chars, max_length=len(empty)) == (empty, True)
    assert fit_to_context(template, values, token_length=_chars, max_length=len(empty) - 1) == (None, False)


def test_fit_to_context_with_a_coarse_tokenizer_finds_the_longest_fitting_prefix():
    def words(text: str) -> int:
        return len(text.split())

    template = judge_prompt_template("{{ prompt }} | {{ response }} | end")
    values = {"prompt": "p", "response": "w1 w2 w3 w4 w5 w6"}
    text, truncated = fit_to_context(template, values, token_length=words, max_length=6)
    assert truncated and text == "p | w1 w2  | end"  # "w1 w2 w" would make 7 words


def test_fit_judge_prompts_counts_truncated_and_skipped():
    template = judge_prompt_template("{{ prompt }}:{{ response }}")
    items = [
        {"prompt": "ab", "response": "cd"},  # 5 chars: fits
        {"prompt": "ab", "response": "cdefgh"},  # 9 chars: truncated to "ab:cdef"
        {"prompt": "abcdefgh", "response": "x"},  # 9 chars even with an empty response: skipped
    ]
    fitted = fit_judge_prompts(template, items, token_length=_chars, max_length=7)
    assert fitted.prompts == ["ab:cd", "ab:cdef", None]
    assert (fitted.num_truncated, fitted.num_skipped) == (1, 1)
