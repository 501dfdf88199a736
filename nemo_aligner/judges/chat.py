"""Chat-template removal: the judge sees the user's text and the response's text, not the policy's chat markup.

With the policy's ``model.data.chat_prompt_tokens`` ``S`` (system_turn_start), ``T`` (turn_start), ``L``
(label_start), ``E`` (end_of_turn) and ``N`` (end_of_name), a prompt renders as (``nemo_aligner.data.nlp.chat``)::

    S "System" N system E  T role N [L label N] value E  ...  T role N [L label N]

Rules of ``normalise_prompt``:

* text without ``T`` is not templated and is returned stripped;
* everything before the first ``T`` (``S`` and the system turn) is dropped, and so is a first turn named
  ``System`` (a decoded prompt that lost ``S``): the system prompt configures the policy, the judge rates the answer
  to the user;
* each turn is split into its role (up to the first ``N``), an optional label (``L ... N``, dropped) and its value
  (without one trailing ``E``, then stripped); turns with an empty value (the open assistant header at the end) are
  dropped;
* one remaining turn gives its value alone (``"add 1 and 2"``); several give a readable conversation, one
  ``"Role: value"`` paragraph per turn with the role's first letter upper-cased (``"User: hi\\n\\nAssistant: hello"``).

Rules of ``normalise_response``: the response ends where the next turn starts (everything from the first ``T`` is
dropped); then, when ``E`` is visible text (Llama 3's ``<|eot_id|>``), everything from its first occurrence is
dropped, while a whitespace ``E`` (the ``<extra_id_*>`` default ``"\\n"``) cannot mark an end inside text and goes
with the final strip.
"""

from __future__ import annotations

from collections.abc import Mapping

from nemo_aligner.data.nlp.chat import SYSTEM_ROLE, ChatPromptTokens


def _tokens(chat_prompt_tokens: ChatPromptTokens | Mapping[str, str]) -> ChatPromptTokens:
    if isinstance(chat_prompt_tokens, ChatPromptTokens):
        return chat_prompt_tokens
    return ChatPromptTokens.from_config(chat_prompt_tokens)


def _turn(text: str, t: ChatPromptTokens) -> tuple[str, str]:
    """``(role, value)`` of one turn's text ``role N [L label N] value E``."""
    role, sep, rest = text.partition(t.end_of_name)
    if not sep:
        return role.strip(), ""
    if t.label_start and rest.startswith(t.label_start):
        rest = rest[len(t.label_start) :].partition(t.end_of_name)[2]
    return role.strip(), rest.removesuffix(t.end_of_turn).strip()


def normalise_prompt(prompt: str, chat_prompt_tokens: ChatPromptTokens | Mapping[str, str]) -> str:
    """``prompt`` without the chat template (rules in the module docstring)."""
    t = _tokens(chat_prompt_tokens)
    pieces = prompt.removeprefix(t.system_turn_start).split(t.turn_start)
    if len(pieces) == 1:
        return prompt.strip()
    turns = [_turn(piece, t) for piece in pieces[1:]]
    if turns[0][0] == SYSTEM_ROLE:
        turns = turns[1:]
    turns = [(role, value) for role, value in turns if value]
    if len(turns) == 1:
        return turns[0][1]
    return "\n\n".join(f"{role[:1].upper()}{role[1:]}: {value}" for role, value in turns)


def normalise_response(response: str, chat_prompt_tokens: ChatPromptTokens | Mapping[str, str]) -> str:
    """``response`` cut at its end of turn (rules in the module docstring)."""
    t = _tokens(chat_prompt_tokens)
    response = response.partition(t.turn_start)[0]
    if t.end_of_turn.strip():
        response = response.partition(t.end_of_turn)[0]
    return response.strip()
