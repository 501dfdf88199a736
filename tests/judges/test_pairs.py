"""Preference-pair choice with length control: table-driven cases for each rule of ``nemo_aligner.judges.pairs``."""

from __future__ import annotations

import pytest

from nemo_aligner.judges import (
    BadSample,
    BadSampleReason,
    Candidate,
    JudgeScore,
    Pair,
    aggregate_scores,
    length_control_for_iteration,
    select_pair,
)


def candidates(*rows: tuple) -> list[Candidate]:
    """``(scores, length)`` rows; token ids are distinct per row unless a row gives its own."""
    out = []
    for i, row in enumerate(rows):
        scores, length, *ids = row
        out.append(Candidate(scores, length, ids[0] if ids else (i,) * length))
    return out


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([4, 4, 4], JudgeScore(4.0, 0.0, 3)),
        ([5, None, 3], JudgeScore(4.0, 1.0, 2)),
        ([2.5], JudgeScore(2.5, 0.0, 1)),
        ([None, None], JudgeScore(None, None, 0)),
        ([], JudgeScore(None, None, 0)),
    ],
)
def test_aggregate_scores(scores, expected):
    assert aggregate_scores(scores) == expected


CASES = {
    # rho = 0: top and bottom score; among equal scores the lowest judge variance wins.
    "rho0_variance_tie_break": (
        candidates(([5, 5, 5], 10), ([4, 5, 6], 3), ([1, 1, 1], 20), ([0, 1, 2], 5)),
        0.0,
        Pair(chosen=0, rejected=2, chosen_score=5.0, rejected_score=1.0),
    ),
    "rho0_lower_variance_later_index": (
        candidates(([3, 5], 1), ([4, 4], 50), ([0, 2], 1), ([1, 1], 50)),
        0.0,
        Pair(chosen=1, rejected=3, chosen_score=4.0, rejected_score=1.0),
    ),
    # rho = 0, equal variance: more valid judgements, then the earlier response.
    "rho0_more_valid_judgements": (
        candidates(([5, None, None], 1), ([5, 5, None], 1), ([1, 1, 1], 1), ([1, 1, 1], 1)),
        0.0,
        Pair(chosen=1, rejected=2, chosen_score=5.0, rejected_score=1.0),
    ),
    # rho > 0: the shortest of {s >= 0.75*5 + 0.25*1 = 4} and the longest of {s <= 0.75*1 + 0.25*5 = 2}.
    "rho_shortest_chosen_longest_rejected": (
        candidates(([5], 40), ([4], 12), ([3], 1), ([2], 60), ([1], 30)),
        0.25,
        Pair(chosen=1, rejected=3, chosen_score=4.0, rejected_score=2.0),
    ),
    # rho > 0, length ties: the better score (chosen) / the worse score (rejected), then lower variance, then index.
    "rho_length_ties_score": (
        candidates(([4, 4], 10), ([5, 5], 10), ([2, 2], 30), ([1, 1], 30), ([3, 3], 2)),
        0.25,
        Pair(chosen=1, rejected=3, chosen_score=5.0, rejected_score=1.0),
    ),
    "rho_length_and_score_ties_variance": (
        candidates(([3, 5], 10), ([4, 4], 10), ([0, 2], 30), ([1, 1], 30)),
        0.25,
        Pair(chosen=1, rejected=3, chosen_score=4.0, rejected_score=1.0),
    ),
    "rho_full_tie_earlier_index": (
        candidates(([5, 5], 10), ([5, 5], 10), ([1, 1], 30), ([1, 1], 30)),
        0.1,
        Pair(chosen=0, rejected=2, chosen_score=5.0, rejected_score=1.0),
    ),
    # Unparseable judgements are ignored; a response without a valid one is never picked, however short.
    "unscored_response_never_picked": (
        candidates(([None, None], 1), ([5, None], 30), ([None, 2], 40)),
        0.4,
        Pair(chosen=1, rejected=2, chosen_score=5.0, rejected_score=2.0),
    ),
    "single_valid_score": (
        candidates(([None, None], 5), ([3, None], 5), ([None], 5)),
        0.0,
        BadSample(BadSampleReason.TOO_FEW_SCORES),
    ),
    "all_scores_equal": (
        candidates(([3, 3], 5), ([2, 4], 9), ([3, None], 1)),
        0.1,
        BadSample(BadSampleReason.ALL_EQUAL),
    ),
    "identical_token_ids": (
        candidates(([5], 3, (7, 8, 9)), ([1], 3, (7, 8, 9))),
        0.0,
        BadSample(BadSampleReason.IDENTICAL),
    ),
    "no_responses": ([], 0.0, BadSample(BadSampleReason.TOO_FEW_SCORES)),
}


@pytest.mark.parametrize(("cands", "rho", "expected"), list(CASES.values()), ids=list(CASES))
def test_select_pair(cands, rho, expected):
    assert select_pair(cands, rho) == expected


def test_chosen_always_outscores_rejected_below_half():
    cands = candidates(([5], 50), ([4], 1), ([3], 25), ([2], 60), ([1], 2))
    for rho in (0.0, 0.1, 0.25, 0.4, 0.49):
        pair = select_pair(cands, rho)
        assert pair.chosen_score > pair.rejected_score


@pytest.mark.parametrize(
    ("length_control", "iteration", "max_iterations", "expected"),
    [
        (0.0, 0, 3, 0.0),
        (0.1, 2, 3, 0.1),
        ([0, 0, 0.1], 0, 3, 0.0),
        ([0, 0, 0.1], 2, 3, 0.1),
        ((0.2, 0.3, 0.4, 0.0), 1, 3, 0.3),  # entries past max_iterations are never used
    ],
)
def test_length_control_for_iteration(length_control, iteration, max_iterations, expected):
    assert length_control_for_iteration(length_control, iteration, max_iterations) == expected


@pytest.mark.parametrize(
    ("length_control", "message"),
    [
        ([0.0, 0.1], "has 2 values but trainer.self_rewarding.max_iterations is 3"),
        ([0.0, 0.6, 0.1], r"\[0, 0.5\)"),
        (-0.1, r"\[0, 0.5\)"),
        (0.5, r"\[0, 0.5\)"),
        ("0.1", "numbers"),
        (True, "numbers"),
    ],
)
def test_bad_length_control_names_the_key(length_control, message):
    with pytest.raises(ValueError, match=r"model\.spin\.length_control") as info:
        length_control_for_iteration(length_control, 1, 3)
    assert info.match(message)


def test_select_pair_rejects_bad_rho():
    with pytest.raises(ValueError, match=r"model\.spin\.length_control"):
        select_pair(candidates(([5], 1), ([1], 1)), 0.7)
