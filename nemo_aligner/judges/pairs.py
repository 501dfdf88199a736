"""Preference-pair choice from judged responses, with length control (Wu et al. 2024, arXiv 2407.19594, sec. 2.1).

Each of a prompt's N responses is judged k times; its score ``s`` is the mean of the valid judgements and their
(population) variance measures the judge's disagreement. Over responses with at least one valid judgement, with
``rho = length_control`` in ``[0, 0.5)``:

* chosen from ``{s >= (1-rho)*s_max + rho*s_min}``, rejected from ``{s <= (1-rho)*s_min + rho*s_max}``;
* rho > 0: the shortest chosen candidate and the longest rejected one (ties: the better-scored, then the lower
  variance, then the earlier response); this counters the judge's length bias;
* rho == 0 (the sets are the top and the bottom score): the lowest variance, then more valid judgements, then the
  earlier response.

rho < 0.5 keeps the two sets disjoint, so a response is never both chosen and rejected. A bad sample (masked out and
counted by the caller) is a prompt with fewer than two scored responses, with all scores equal, or whose chosen and
rejected responses have identical token ids.
"""

from __future__ import annotations

import enum
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

LENGTH_CONTROL_KEY = "model.spin.length_control"


@dataclass(frozen=True)
class Candidate:
    """One generated response: its k judge scores (None = unparseable), token length and token ids."""

    scores: Sequence[float | None]
    length: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class JudgeScore:
    """Aggregate of a response's valid judgements; ``mean``/``variance`` are None without a valid one."""

    mean: float | None
    variance: float | None
    num_valid: int


@dataclass(frozen=True)
class Pair:
    """Indices of the chosen and rejected responses and their scores."""

    chosen: int
    rejected: int
    chosen_score: float
    rejected_score: float


class BadSampleReason(str, enum.Enum):
    """Why a prompt yields no preference pair."""

    TOO_FEW_SCORES = "fewer than two responses with a valid score"
    ALL_EQUAL = "all valid scores are equal"
    IDENTICAL = "chosen and rejected have identical token ids"


@dataclass(frozen=True)
class BadSample:
    """A prompt without a usable pair: masked out of the batch and counted in ``bad_samples_per_GBS``."""

    reason: BadSampleReason


def aggregate_scores(scores: Sequence[float | None]) -> JudgeScore:
    """Mean and population variance of the non-None ``scores``."""
    valid = [float(s) for s in scores if s is not None]
    if not valid:
        return JudgeScore(None, None, 0)
    mean = sum(valid) / len(valid)
    return JudgeScore(mean, sum((s - mean) ** 2 for s in valid) / len(valid), len(valid))


def check_length_control(rho: object) -> float:
    """``rho`` as a float; ValueError naming ``model.spin.length_control`` unless a number in ``[0, 0.5)``."""
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 <= rho < 0.5:
        raise ValueError(
            f"{LENGTH_CONTROL_KEY} values must be numbers in [0, 0.5) (at 0.5 and above one response could be both "
            f"chosen and rejected), got {rho!r}"
        )
    return float(rho)


def length_control_for_iteration(length_control: float | Sequence[float], iteration: int, max_iterations: int) -> float:
    """rho for ``iteration`` (0-based): a scalar applies to every iteration, a list holds one value per iteration.

    A list shorter than ``max_iterations`` is a ValueError; entries past ``max_iterations`` are never used.
    """
    if isinstance(length_control, Sequence) and not isinstance(length_control, str):
        if len(length_control) < max_iterations:
            raise ValueError(
                f"{LENGTH_CONTROL_KEY} has {len(length_control)} values but trainer.self_rewarding.max_iterations is "
                f"{max_iterations}: give one value per iteration, or a scalar for all of them"
            )
        return check_length_control(length_control[iteration])
    return check_length_control(length_control)


def select_pair(candidates: Sequence[Candidate], length_control: float) -> Pair | BadSample:
    """The chosen/rejected pair among one prompt's responses, or why there is none (rules in the module docstring)."""
    rho = check_length_control(length_control)
    judged = [(i, aggregate_scores(c.scores)) for i, c in enumerate(candidates)]
    scored = [(i, j) for i, j in judged if j.mean is not None]
    if len(scored) < 2:
        return BadSample(BadSampleReason.TOO_FEW_SCORES)
    s_max = max(j.mean for _, j in scored)
    s_min = min(j.mean for _, j in scored)
    if s_max == s_min:
        return BadSample(BadSampleReason.ALL_EQUAL)
    chosen_pool = [(i, j) for i, j in scored if j.mean >= (1 - rho) * s_max + rho * s_min]
    rejected_pool = [(i, j) for i, j in scored if j.mean <= (1 - rho) * s_min + rho * s_max]
    if rho > 0:
        chosen, chosen_j = min(
            chosen_pool, key=lambda ij: (candidates[ij[0]].length, -ij[1].mean, ij[1].variance, ij[0])
        )
        rejected, rejected_j = min(
            rejected_pool, key=lambda ij: (-candidates[ij[0]].length, ij[1].mean, ij[1].variance, ij[0])
        )
    else:
        chosen, chosen_j = min(chosen_pool, key=lambda ij: (ij[1].variance, -ij[1].num_valid, ij[0]))
        rejected, rejected_j = min(rejected_pool, key=lambda ij: (ij[1].variance, -ij[1].num_valid, ij[0]))
    if tuple(candidates[chosen].token_ids) == tuple(candidates[rejected].token_ids):
        return BadSample(BadSampleReason.IDENTICAL)
    return Pair(chosen, rejected, chosen_j.mean, rejected_j.mean)
