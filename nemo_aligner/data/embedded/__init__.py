"""The bundled synthetic "embedded default" data: short exact-answer tasks a tiny byte-level model can learn on CPU.

Seven tasks (``TASKS``) with one fixed prompt phrasing each, for example ``add 12 and 7`` -> ``19`` or
``reverse: plane`` -> ``enalp``. The jsonl files next to this module are written by
``scripts/make_embedded_data.py`` (see ``README.md`` here for the files, sizes and the exact command).

This module is the single home of the strings every consumer must agree on: the ``<extra_id_*>`` chat template the
DPO files are rendered with (and the SFT/SPIN chat data renders to), the judge prompt and judgements of the
Self-Rewarding judge split, and the answer check (``exact_match``) used by all evaluations. ``answer_for`` recomputes
the ground truth of any well-formed prompt, so answers to model-written prompts can be checked too.
"""

from __future__ import annotations

import re
from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent
"""Directory holding the bundled jsonl files."""

TASKS = ("add", "sub", "max", "sort", "reverse", "count", "upper")
"""Task names, in the order the generator cycles through them."""

CHAT_PROMPT_TOKENS = {
    "system_turn_start": "<extra_id_0>",
    "turn_start": "<extra_id_1>",
    "label_start": "<extra_id_2>",
    "end_of_turn": "\n",
    "end_of_name": "\n",
}
"""NeMo's ``model.data.chat_prompt_tokens`` for the chat files; with system ``""`` a one-turn conversation renders
to ``PROMPT_TEMPLATE`` + ``RESPONSE_TEMPLATE``."""

PROMPT_TEMPLATE = "<extra_id_0>System\n\n<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n"
"""A user prompt rendered with the chat template (empty system turn), up to where the assistant's answer starts."""

END_OF_TURN = "\n<extra_id_1>"
"""What the chat template puts after an assistant answer: the end-of-turn newline and the next turn's marker."""

RESPONSE_TEMPLATE = "{answer}" + END_OF_TURN
"""An assistant answer rendered with the chat template; DPO responses end exactly like an SFT model's generation."""

SFT_PROMPT_TEMPLATE = "<extra_id_0>System\n\n<extra_id_1>User\n{input}\n<extra_id_1>Assistant\n{output}"
"""``model.data.*.prompt_template`` for the ``sft_*`` files; NeMo requires ``{output}`` last, so these samples end
with the tokenizer's EOS, not ``END_OF_TURN`` (train on the ``chat_*`` files when DPO/SPIN follow)."""

JUDGE_PROMPT_TEMPLATE = "Rate the answer.\nQuestion: {{ prompt }}\nAnswer: {{ response }}"
"""Jinja judge prompt (``model.spin.llm_judge_prompt``) for the judge split, kept short for a tiny model's context."""

META_JUDGE_PROMPT_TEMPLATE = (
    "Which judgement is right?\nQuestion: {{ prompt }}\nAnswer: {{ response }}\n"
    "Judgement A: {{ judgement_a }}\nJudgement B: {{ judgement_b }}"
)
"""Jinja meta-judge prompt (``model.spin.llm_meta_judge_prompt``) for the judge split's comparisons; the target
answer is ``Winner: Judgement A`` or ``Winner: Judgement B`` (``meta_verdict_for``)."""

JUDGE_SCORE_LOW = 0
"""Lowest judge score (``model.spin.judge_score_low``)."""

JUDGE_SCORE_HIGH = 5
"""Highest judge score (``model.spin.judge_score_high``), given to correct answers only."""

JUDGE_SCORES = (0, 1, 2, 5)
"""The score levels of :func:`judge_score`."""

_PROMPT_PATTERNS = {
    "add": re.compile(r"add (\d+) and (\d+)"),
    "sub": re.compile(r"subtract (\d+) from (\d+)"),
    "max": re.compile(r"max of (\d+(?:, \d+)+)"),
    "sort": re.compile(r"sort (\d(?: \d)+)"),
    "reverse": re.compile(r"reverse: ([a-z]+)"),
    "count": re.compile(r"count the letter ([a-z]) in ([a-z]+)"),
    "upper": re.compile(r"uppercase: ([a-z]+)"),
}
_NUMERIC_TASKS = frozenset({"add", "sub", "max", "count"})
_TURN_MARKER = CHAT_PROMPT_TOKENS["turn_start"]


def format_prompt(prompt: str) -> str:
    """``prompt`` rendered with the chat template, ready for generation."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def format_response(answer: str) -> str:
    """``answer`` rendered as an assistant turn, ending with ``END_OF_TURN``."""
    return RESPONSE_TEMPLATE.format(answer=answer)


def render_judge_prompt(prompt: str, response: str) -> str:
    """``JUDGE_PROMPT_TEMPLATE`` filled in (plain substitution, what Jinja renders for these strings)."""
    return JUDGE_PROMPT_TEMPLATE.replace("{{ prompt }}", prompt).replace("{{ response }}", response)


def render_meta_judge_prompt(prompt: str, response: str, judgement_a: str, judgement_b: str) -> str:
    """``META_JUDGE_PROMPT_TEMPLATE`` filled in (plain substitution, what Jinja renders for these strings)."""
    values = {"prompt": prompt, "response": response, "judgement_a": judgement_a, "judgement_b": judgement_b}
    text = META_JUDGE_PROMPT_TEMPLATE
    for name, value in values.items():
        text = text.replace("{{ " + name + " }}", value)
    return text


def meta_verdict_for(winner: str) -> str:
    """The target meta-judge answer naming ``winner`` (``"A"`` or ``"B"``), e.g. ``"Winner: Judgement A"``."""
    return f"Winner: Judgement {winner}"


def judgement_for(expected: str, response: str, score: int) -> str:
    """The target judgement: the answer the judge expects, the response, then the score.

    For example ``"Expected 111, got 101. Score: 1"`` for ``add 27 and 84`` answered ``101``. Like the paper's
    rubric, which asks for a justification before the score, the judgement works the question out first: a tiny
    model cannot tell whether 101 is right without computing 111 somewhere, and once both strings stand side by side,
    scoring is a comparison it can see.
    """
    return f"Expected {expected}, got {response}. Score: {score}"


def _clean(text: str) -> str:
    """Whitespace-stripped text, without one trailing turn marker (decoded generations may keep their end string)."""
    text = text.strip()
    if text.endswith(_TURN_MARKER):
        text = text[: -len(_TURN_MARKER)].strip()
    return text


def exact_match(prediction: str, answer: str) -> bool:
    """True when ``prediction`` equals ``answer`` after stripping whitespace (and a trailing ``<extra_id_1>``)."""
    return _clean(prediction) == answer.strip()


def task_of(prompt: str) -> str | None:
    """The task whose phrasing ``prompt`` matches exactly, or None."""
    for task, pattern in _PROMPT_PATTERNS.items():
        if pattern.fullmatch(prompt.strip()):
            return task
    return None


def answer_for(task: str, prompt: str) -> str:
    """The correct answer to ``prompt`` for ``task``; ValueError when the prompt is not that task's phrasing."""
    if task not in _PROMPT_PATTERNS:
        raise ValueError(f"Unknown embedded task {task!r}; expected one of {TASKS}.")
    match = _PROMPT_PATTERNS[task].fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"Prompt {prompt!r} is not a well-formed {task!r} prompt.")
    args = match.groups()
    if task == "add":
        return str(int(args[0]) + int(args[1]))
    if task == "sub":
        return str(int(args[1]) - int(args[0]))
    if task == "max":
        return str(max(int(n) for n in args[0].split(", ")))
    if task == "sort":
        return " ".join(sorted(args[0].split(" ")))
    if task == "reverse":
        return args[0][::-1]
    if task == "count":
        return str(args[1].count(args[0]))
    return args[0].upper()


def _within_one_edit(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` differ by at most one substitution, insertion, deletion or adjacent swap."""
    if a == b:
        return True
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    if abs(len(a) - len(b)) != 1:
        return False
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = 0
    while i < len(short) and short[i] == long[i]:
        i += 1
    return short[i:] == long[i + 1 :]


def judge_score(task: str, answer: str, response: str) -> int:
    """Ground-truth judge score of ``response`` against the correct ``answer``, a function of the two strings only.

    5: exact match. Numeric tasks: 2 when off by one, 1 when off by at most ten, else 0. String tasks (compared
    without spaces): 2 within one edit (substitution, insertion, deletion or adjacent swap), 1 when the same letters
    in another order or the right letters in the wrong case, else 0.
    """
    if exact_match(response, answer):
        return JUDGE_SCORE_HIGH
    response, answer = _clean(response), answer.strip()
    if task in _NUMERIC_TASKS:
        if not re.fullmatch(r"-?\d+", response):
            return 0
        distance = abs(int(response) - int(answer))
        return 2 if distance == 1 else 1 if distance <= 10 else 0
    response, answer = response.replace(" ", ""), answer.replace(" ", "")
    if _within_one_edit(response, answer):
        return 2
    if sorted(response) == sorted(answer) or response.lower() == answer.lower():
        return 1
    return 0
