"""Meta-judge support (Wu et al. 2024, "Meta-Rewarding Language Models", arXiv 2407.19594, sec. 2.2).

For judge training: take the response whose k judgements disagree most, let the meta-judge compare every ordered
pair of its judgements (both orders, to cancel position bias), rank the judgements by a Bradley-Terry fit on those
verdicts (reported as Elo points), and train on (highest-rated, lowest-rated) judgement pairs; such pairs fill a
capped share of each global batch.

Ties: an unparseable verdict (None) is dropped, as it carries no preference. A contradictory pair of verdicts (the
meta-judge prefers whichever judgement is shown as A, or as B) gives each judgement one win over the other, which
the fit treats exactly as a tie.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from nemo_aligner.judges.pairs import aggregate_scores
from nemo_aligner.judges.parsing import Verdict

ELO_BASE = 1000.0
ELO_SCALE = 400.0 / math.log(10.0)
"""Elo points per unit of Bradley-Terry strength: P(i beats j) = 1 / (1 + 10 ** ((elo_j - elo_i) / 400))."""

RATING_TIE_TOLERANCE = 1e-6
"""Strengths closer than this (well above the solver's precision) are equal."""

META_JUDGE_PCNT_KEY = "model.spin.meta_judge_pcnt"
META_MAX_RELATIVE_PCNT_KEY = "model.spin.meta_max_relative_pcnt"


def most_disputed_response(scores: Sequence[Sequence[float | None]]) -> int | None:
    """Index of the response whose valid judge scores have the highest variance; None when no response has two
    disagreeing valid scores. Ties: more valid scores (more judgements to compare), then the earlier response."""
    best: tuple[float, int, int] | None = None
    for index, response_scores in enumerate(scores):
        judged = aggregate_scores(response_scores)
        if judged.num_valid < 2 or judged.variance == 0:
            continue
        key = (-judged.variance, -judged.num_valid, index)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def meta_judge_comparisons(num_judgements: int) -> list[tuple[int, int]]:
    """Every ordered pair ``(a, b)``, ``a != b``: judgement ``a`` shown as "Judgement A", ``b`` as "Judgement B"."""
    return [(a, b) for a in range(num_judgements) for b in range(num_judgements) if a != b]


def win_matrix(num_items: int, verdicts: Sequence[tuple[int, int, Verdict | None]]) -> np.ndarray:
    """``W[i, j]`` = times item i beat item j; ``verdicts`` are ``(a, b, "A" | "B" | None)``, None is dropped."""
    wins = np.zeros((num_items, num_items))
    for a, b, verdict in verdicts:
        if not (0 <= a < num_items and 0 <= b < num_items and a != b):
            raise ValueError(f"verdict ({a}, {b}) must compare two different items among {num_items}")
        if verdict == "A":
            wins[a, b] += 1
        elif verdict == "B":
            wins[b, a] += 1
    return wins


def bradley_terry_elo(
    num_items: int, verdicts: Sequence[tuple[int, int, Verdict | None]], l2: float = 0.01
) -> np.ndarray:
    """Elo ratings of ``num_items`` from pairwise ``verdicts`` by a Bradley-Terry fit (Bradley & Terry 1952).

    Maximises ``sum_ij W_ij log sigmoid(theta_i - theta_j) - l2/2 * |theta|^2`` with ``scipy.optimize.minimize``
    (trust-exact Newton steps with the analytic gradient and Hessian, to a gradient norm of 1e-10); the small L2
    prior keeps strengths finite for an undefeated item and makes the optimum unique.
    Returns ``ELO_BASE + ELO_SCALE * theta``.
    """
    # Imported here: scipy.optimize costs 0.3 s and 20 MB, and every run imports this module (run summary).
    from scipy.optimize import minimize
    from scipy.special import expit

    wins = win_matrix(num_items, verdicts)
    games = wins + wins.T

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        diff = theta[:, None] - theta[None, :]
        loss = float(np.sum(wins * np.logaddexp(0.0, -diff)) + 0.5 * l2 * theta @ theta)
        pressure = wins * expit(-diff)  # d loss / d diff_ij = -W_ij * (1 - sigmoid(diff_ij))
        return loss, pressure.sum(axis=0) - pressure.sum(axis=1) + l2 * theta

    def hessian(theta: np.ndarray) -> np.ndarray:
        p = expit(theta[:, None] - theta[None, :])
        curvature = games * p * (1 - p)
        return np.diag(curvature.sum(axis=1) + l2) - curvature

    result = minimize(
        objective, np.zeros(num_items), jac=True, hess=hessian, method="trust-exact", options={"gtol": 1e-10}
    )
    return ELO_BASE + ELO_SCALE * result.x


@dataclass(frozen=True)
class JudgementRanking:
    """The best (``chosen``) and worst (``rejected``) judgement by Elo, with all the ratings."""

    chosen: int
    rejected: int
    ratings: np.ndarray


def rank_judgements(
    num_judgements: int, verdicts: Sequence[tuple[int, int, Verdict | None]], l2: float = 0.01
) -> JudgementRanking | None:
    """Chosen = highest Elo, rejected = lowest (ties: the earlier judgement); None when all ratings are equal."""
    ratings = bradley_terry_elo(num_judgements, verdicts, l2)
    tolerance = RATING_TIE_TOLERANCE * ELO_SCALE
    if ratings.max() - ratings.min() < tolerance:
        return None
    chosen = int(np.flatnonzero(ratings >= ratings.max() - tolerance)[0])
    rejected = int(np.flatnonzero(ratings <= ratings.min() + tolerance)[0])
    return JudgementRanking(chosen, rejected, ratings)


def _floor(x: float) -> int:
    """floor that does not lose a unit to rounding (``0.29 * 100 == 28.999999999999996``)."""
    return math.floor(x + 1e-9)


def select_meta_judge_pairs(
    score_classes: Sequence[Hashable],
    *,
    global_batch_size: int,
    meta_judge_pcnt: float,
    meta_max_relative_pcnt: float,
    seed: int,
) -> list[int]:
    """Indices (ascending) of the judge-training pairs that go into one global batch.

    ``score_classes[i]`` is the score of candidate i's chosen judgement. At most ``floor(meta_judge_pcnt *
    global_batch_size)`` are taken (none when ``meta_judge_pcnt <= 0``), and the largest count ``n`` is used for which
    no score class exceeds ``floor(meta_max_relative_pcnt * n)`` of them, so the judge cannot learn to give one score
    to everything. Classes are filled round-robin in a seeded random order with seeded random members, so the
    choice is deterministic given ``seed``.
    """
    if meta_judge_pcnt > 1:
        raise ValueError(
            f"{META_JUDGE_PCNT_KEY} is a share of the global batch in [0, 1] (<= 0 disables), got {meta_judge_pcnt}"
        )
    if not 0 < meta_max_relative_pcnt <= 1:
        raise ValueError(f"{META_MAX_RELATIVE_PCNT_KEY} must be in (0, 1], got {meta_max_relative_pcnt}")
    budget = min(_floor(meta_judge_pcnt * global_batch_size), len(score_classes)) if meta_judge_pcnt > 0 else 0
    groups: dict[Hashable, list[int]] = {}
    for index, score_class in enumerate(score_classes):
        groups.setdefault(score_class, []).append(index)
    for size in range(budget, 0, -1):
        cap = _floor(meta_max_relative_pcnt * size)
        if sum(min(len(members), cap) for members in groups.values()) >= size:
            break
    else:
        return []
    rng = np.random.default_rng(seed)
    members = [[int(i) for i in rng.permutation(group)] for group in groups.values()]
    order = [int(k) for k in rng.permutation(len(members))]
    selected: list[int] = []
    for rank in range(cap):
        for k in order:
            if rank < len(members[k]) and len(selected) < size:
                selected.append(members[k][rank])
    return sorted(selected)
