"""Reading scores and verdicts out of judge and meta-judge text; never raises on model output.

``model.spin.judge_reward_regex`` and ``model.spin.meta_judge_reward_regex`` are regexes written as Jinja templates
with one ``{{ reward }}`` placeholder, which becomes a named capture group: ``-?\\d+(?:\\.\\d+)?`` for scores (integers
and decimals; a sign so that ``Score: -1`` is read and rejected as out of range, not skipped) and ``A|B`` followed by
a word boundary for verdicts (so ``Judgement Answer`` is not read as ``A``).

Rules: the LAST match in the text decides, since both prompts ask to conclude with the answer (earlier matches are
usually the model restating the format or thinking aloud); when that last match is invalid (a score outside
``[judge_score_low, judge_score_high]``) the judgement is invalid, with no fall back to earlier matches. No match
gives ``None``. Verdict letters are returned upper-case.
"""

from __future__ import annotations

import re
from typing import Literal

import jinja2
from jinja2 import meta

JUDGE_REGEX_KEY = "model.spin.judge_reward_regex"
META_JUDGE_REGEX_KEY = "model.spin.meta_judge_reward_regex"
DEFAULT_JUDGE_REWARD_REGEX = "(?i)(?:Score|Points): {{ reward }}"
DEFAULT_META_JUDGE_REWARD_REGEX = "(?i)Winner: (?:Judgement|Judgment) {{ reward }}"
SCORE_GROUP = r"(?P<reward>-?\d+(?:\.\d+)?)"
VERDICT_GROUP = r"(?P<reward>A|B)\b"

Verdict = Literal["A", "B"]

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined)


def compile_reward_regex(template: str, group: str, key: str) -> re.Pattern[str]:
    """``template`` with ``{{ reward }}`` replaced by ``group``, compiled; ValueError naming ``key`` otherwise."""
    if not isinstance(template, str):
        raise ValueError(f"{key} must be a string, got {type(template).__name__}")
    try:
        variables = meta.find_undeclared_variables(_ENV.parse(template))
        if variables != {"reward"}:
            raise ValueError(f"{key} must use exactly one variable, {{{{ reward }}}}; found {sorted(variables)}")
        return re.compile(_ENV.from_string(template).render(reward=group))
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"{key} is not a valid Jinja template ({err.message}): {template!r}") from err
    except re.error as err:
        raise ValueError(
            f"{key} is not a valid regex once {{{{ reward }}}} is filled in ({err}): {template!r}"
        ) from err


def judge_reward_regex(template: str = DEFAULT_JUDGE_REWARD_REGEX) -> re.Pattern[str]:
    """The compiled ``model.spin.judge_reward_regex``."""
    return compile_reward_regex(template, SCORE_GROUP, JUDGE_REGEX_KEY)


def meta_judge_reward_regex(template: str = DEFAULT_META_JUDGE_REWARD_REGEX) -> re.Pattern[str]:
    """The compiled ``model.spin.meta_judge_reward_regex``."""
    return compile_reward_regex(template, VERDICT_GROUP, META_JUDGE_REGEX_KEY)


def _last_reward(text: str, pattern: re.Pattern[str]) -> str | None:
    last = None
    for match in pattern.finditer(text):
        last = match
    return None if last is None else last.group("reward")


def parse_score(text: str, pattern: re.Pattern[str], low: float, high: float) -> float | None:
    """The judge score in ``text`` (the last match), or None when absent or outside ``[low, high]``."""
    reward = _last_reward(text, pattern)
    if reward is None:
        return None
    score = float(reward)
    return score if low <= score <= high else None


def parse_verdict(text: str, pattern: re.Pattern[str]) -> Verdict | None:
    """The meta-judge's winner, ``"A"`` or ``"B"`` (the last match), or None when absent."""
    reward = _last_reward(text, pattern)
    return None if reward is None else reward.upper()
