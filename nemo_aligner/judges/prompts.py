"""LLM-as-a-judge and meta-judge prompts: the papers' defaults, Jinja templates validated against their variables.

A template is Jinja source whose only variables are the ones its role fills in: ``prompt`` and ``response`` for the
judge (``model.spin.llm_judge_prompt``), plus ``judgement_a`` and ``judgement_b`` for the meta-judge
(``model.spin.llm_meta_judge_prompt``). Model text is passed to Jinja as values, never parsed as template source, so
braces in a response are harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import jinja2
from jinja2 import meta

JUDGE_PROMPT_KEY = "model.spin.llm_judge_prompt"
META_JUDGE_PROMPT_KEY = "model.spin.llm_meta_judge_prompt"
JUDGE_VARIABLES = frozenset({"prompt", "response"})
META_JUDGE_VARIABLES = frozenset({"prompt", "response", "judgement_a", "judgement_b"})

_RUBRIC = """\
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it \
is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not \
completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, \
regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in \
blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the user's \
question directly and comprehensively, and is well-organized and helpful, even if there is slight room for \
improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, \
without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and \
insightful answer."""

DEFAULT_JUDGE_PROMPT = f"""\
Review the user's question and the corresponding response using the additive 5-point scoring system described \
below. Points are accumulated based on the satisfaction of each criterion:
{_RUBRIC}

User: {{{{ prompt }}}}
<response>{{{{ response }}}}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"

Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate the \
response in alignment with this additive scoring model, we'll systematically attribute points based on the \
outlined criteria."""
"""The LLM-as-a-Judge prompt of Yuan et al. 2024, "Self-Rewarding Language Models" (arXiv 2401.10020, Figure 2),
quoted verbatim except for ASCII quotes and unwrapped lines; scores 0..5."""

DEFAULT_META_JUDGE_PROMPT = f"""\
Review the user's question and the corresponding response, along with two judgments. Determine which judgment is \
more accurate according to the rubric provided below. The rubric used for the initial judgments is as follows:
{_RUBRIC}

User: {{{{ prompt }}}}
<response>{{{{ response }}}}</response>
Judgment A: <judgment>{{{{ judgement_a }}}}</judgment>
Judgment B: <judgment>{{{{ judgement_b }}}}</judgment>

After examining the original question, response, and both judgments:
- Explain which judgment is more accurate according to the original rubric and why. Consider factors such as \
adherence to the rubric, accuracy in evaluating the response, and consistency in applying the criteria.
- Conclude with a clear statement of which judgment is better using the format: \
"Winner: [Judgement A | Judgement B]\""""
"""The LLM-as-a-Meta-Judge prompt of Wu et al. 2024, "Meta-Rewarding Language Models" (arXiv 2407.19594, Figure 2),
quoted verbatim except for ASCII quotes and unwrapped lines; the answer is ``Winner: Judgement A|B``."""

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@dataclass(frozen=True)
class PromptTemplate:
    """A compiled Jinja template known to use exactly ``variables``; build it with ``judge_prompt_template`` or
    ``meta_judge_prompt_template``."""

    source: str
    variables: frozenset[str]
    template: jinja2.Template

    def render(self, **values: str) -> str:
        """The template filled in; ``values`` must name exactly ``variables`` (a programming error otherwise)."""
        if set(values) != self.variables:
            raise TypeError(f"render() needs exactly {sorted(self.variables)}, got {sorted(values)}")
        return self.template.render(**values)


def compile_template(source: str, variables: frozenset[str], key: str) -> PromptTemplate:
    """``source`` compiled; ValueError naming ``key`` on a syntax error or when its variables are not ``variables``."""
    if not isinstance(source, str):
        raise ValueError(f"{key} must be a Jinja template string, got {type(source).__name__}")
    try:
        found = meta.find_undeclared_variables(_ENV.parse(source))
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"{key} is not a valid Jinja template (line {err.lineno}: {err.message})") from err
    missing, unknown = sorted(variables - found), sorted(found - variables)
    if missing or unknown:
        raise ValueError(
            f"{key} must use exactly the variables {sorted(variables)} (as {{{{ name }}}}); "
            f"missing: {missing}, unknown: {unknown}"
        )
    return PromptTemplate(source, variables, _ENV.from_string(source))


def judge_prompt_template(source: str = DEFAULT_JUDGE_PROMPT) -> PromptTemplate:
    """The judge template (``model.spin.llm_judge_prompt``): variables ``prompt`` and ``response``."""
    return compile_template(source, JUDGE_VARIABLES, JUDGE_PROMPT_KEY)


def meta_judge_prompt_template(source: str = DEFAULT_META_JUDGE_PROMPT) -> PromptTemplate:
    """The meta-judge template (``model.spin.llm_meta_judge_prompt``): ``prompt, response, judgement_a,
    judgement_b``."""
    return compile_template(source, META_JUDGE_VARIABLES, META_JUDGE_PROMPT_KEY)


def fit_to_context(
    template: PromptTemplate,
    values: Mapping[str, str],
    *,
    token_length: Callable[[str], int],
    max_length: int,
    truncate: str = "response",
) -> tuple[str | None, bool]:
    """``template`` rendered within ``max_length`` tokens: ``(text, truncated)``, or ``(None, False)`` to skip.

    The template and the other values stay intact; only the end of ``values[truncate]`` is cut, to the longest
    prefix (found by bisection on characters, ~log2(len) calls of ``token_length``) whose rendering fits. When not
    even an empty ``truncate`` value fits, the prompt is skipped. ``max_length`` is the judge's prompt budget: the
    context length minus the tokens reserved for the judgement.
    """
    text = template.render(**values)
    if token_length(text) <= max_length:
        return text, False
    full = values[truncate]

    def render_prefix(n: int) -> str:
        return template.render(**{**values, truncate: full[:n]})

    if token_length(render_prefix(0)) > max_length:
        return None, False
    low, high = 0, len(full)  # render_prefix(low) fits, render_prefix(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        if token_length(render_prefix(mid)) <= max_length:
            low = mid
        else:
            high = mid
    return render_prefix(low), True


@dataclass(frozen=True)
class FittedPrompts:
    """Judge prompts after ``fit_judge_prompts``: ``None`` marks a skipped one."""

    prompts: list[str | None]
    num_truncated: int
    num_skipped: int


def fit_judge_prompts(
    template: PromptTemplate,
    items: Sequence[Mapping[str, str]],
    *,
    token_length: Callable[[str], int],
    max_length: int,
    truncate: str = "response",
) -> FittedPrompts:
    """``fit_to_context`` over a batch of value mappings, counting the truncated and the skipped prompts."""
    prompts: list[str | None] = []
    truncated = 0
    for values in items:
        text, was_truncated = fit_to_context(
            template, values, token_length=token_length, max_length=max_length, truncate=truncate
        )
        prompts.append(text)
        truncated += was_truncated
    return FittedPrompts(prompts, truncated, prompts.count(None))
