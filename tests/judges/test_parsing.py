"""Judge score and meta-judge verdict parsing: table-driven, never raising on model output."""

from __future__ import annotations

import pytest

from nemo_aligner.data.embedded import JUDGE_SCORE_HIGH, JUDGE_SCORE_LOW, judgement_for
from nemo_aligner.judges import judge_reward_regex, meta_judge_reward_regex, parse_score, parse_verdict

SCORE = judge_reward_regex()
VERDICT = meta_judge_reward_regex()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is right. Score: 4", 4.0),  # valid integer
        ("Mostly right. Score: 3.5 out of 5", 3.5),  # decimal
        ("score: 2", 2.0),  # lower case
        ("POINTS: 1", 1.0),  # the other keyword
        ("Score: 5.", 5.0),  # sentence full stop is not a decimal
        ("Score: 0", 0.0),  # the low end is valid
        ("The response deserves four points.", None),  # missing
        ("Score: 6", None),  # above judge_score_high
        ("Score: 45", None),  # digits are not split
        ("Score: -1", None),  # below judge_score_low
        ("Score: <total points>", None),  # the format echoed
        ("Score: 2 at first, but on reflection Score: 4", 4.0),  # multiple: the last one decides
        ("Score: 3 ... final Score: 9", None),  # the last one is out of range: no fall back
        ("", None),  # empty
        ("\x00\ufffd}{{ reward }}Score:: ]](", None),  # garbage
        ("Score:4", None),  # the default regex wants ": "
    ],
)
def test_parse_score(text, expected):
    assert parse_score(text, SCORE, JUDGE_SCORE_LOW, JUDGE_SCORE_HIGH) == expected


@pytest.mark.parametrize("score", [0, 1, 2, 5])
@pytest.mark.parametrize("expected", ["19", "-3", "1 2 5", "SCORE 4"])
def test_embedded_judgements_parse(expected, score):
    assert (
        parse_score(judgement_for(expected, expected[::-1], score), SCORE, JUDGE_SCORE_LOW, JUDGE_SCORE_HIGH) == score
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A is more accurate. Winner: Judgement A", "A"),
        ("Winner: Judgment B", "B"),  # American spelling
        ("winner: judgement b", "B"),  # lower case, returned upper case
        ("Winner: Judgement A ... no wait. Winner: Judgement B", "B"),  # the last one decides
        ('Use the format "Winner: [Judgement A | Judgement B]"', None),  # the format echoed
        ("Winner: Judgement Answer", None),  # A must be a whole word
        ("Winner: Judgement C", None),
        ("Both are fine.", None),
        ("", None),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text, VERDICT) == expected


def test_custom_regex_with_its_own_groups():
    pattern = judge_reward_regex(r"(Rating|Grade)=\[{{ reward }}\]")
    assert parse_score("Grade=[3]", pattern, 0, 5) == 3.0


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Score: (\\d+)", r"exactly one variable, \{\{ reward \}\}; found \[\]"),
        ("Score: {{ score }}", r"found \['score'\]"),
        ("Score: {{ reward }} {{ reward }}", "not a valid regex"),
        ("Score: ({{ reward }}", "not a valid regex"),
        ("Score: {{ reward ", "not a valid Jinja template"),
    ],
)
def test_bad_judge_regex_names_the_key(template, message):
    with pytest.raises(ValueError, match=r"model\.spin\.judge_reward_regex") as info:
        judge_reward_regex(template)
    assert info.match(message)


def test_bad_meta_judge_regex_names_the_key():
    with pytest.raises(ValueError, match=r"model\.spin\.meta_judge_reward_regex"):
        meta_judge_reward_regex("Winner: {{ winner }}")
