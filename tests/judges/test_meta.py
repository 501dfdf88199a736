"""Meta-judge support: the most disputed response, the Bradley-Terry/Elo ranking, the batch share."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from nemo_aligner.judges import (
    bradley_terry_elo,
    meta_judge_comparisons,
    most_disputed_response,
    rank_judgements,
    select_meta_judge_pairs,
)
from nemo_aligner.judges.meta import ELO_SCALE, win_matrix


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([[3, 3, 3], [1, 5, 3], [2, 4, 3]], 1),  # highest variance
        ([[1, 5, None], [1, 5], [0, 2, 4]], 0),  # variance ties: the earlier response
        ([[1, 5], [1, 5, 3, 3, 1, 5]], 0),  # 4.0 vs 8/3: variance first
        ([[0, 4, 2], [0, 4, 2, 0, 4, 2]], 1),  # equal variance: more valid judgements
        ([[5, None, None], [2, 2, 2]], None),  # no two disagreeing valid scores
        ([], None),
    ],
)
def test_most_disputed_response(scores, expected):
    assert most_disputed_response(scores) == expected


def test_meta_judge_comparisons_cover_both_orders():
    pairs = meta_judge_comparisons(3)
    assert len(pairs) == 6 and set(pairs) == {(a, b) for a in range(3) for b in range(3) if a != b}


def test_win_matrix_drops_unparseable_and_checks_indices():
    wins = win_matrix(3, [(0, 1, "A"), (1, 0, "A"), (2, 0, None), (0, 2, "B")])
    assert wins.tolist() == [[0, 1, 0], [1, 0, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="two different items"):
        win_matrix(2, [(1, 1, "A")])


def test_bradley_terry_matches_the_closed_form_for_two_items():
    # Two items, w wins for 0 and l for 1: the MAP strengths are +-d/2 with w*sigmoid(-d) - l*sigmoid(d) = l2*d/2.
    verdicts = [(0, 1, "A")] * 3 + [(1, 0, "B")] * 3 + [(0, 1, "B")] * 2
    elo = bradley_terry_elo(2, verdicts, l2=0.01)
    d = (elo[0] - elo[1]) / ELO_SCALE
    sigmoid = 1 / (1 + np.exp(-d))
    assert abs(6 * (1 - sigmoid) - 2 * sigmoid - 0.01 * d / 2) < 1e-9
    assert abs(elo.mean() - 1000) < 1e-6  # the prior centres the strengths


def test_elo_recovers_a_known_order_from_a_sampled_tournament():
    rng = np.random.default_rng(0)
    strengths = np.array([0.3, -1.5, 1.6, -0.4, 0.9])  # order: 2 > 4 > 0 > 3 > 1
    verdicts = []
    for _ in range(20):
        for a, b in meta_judge_comparisons(5):  # both orders
            a_wins = rng.random() < 1 / (1 + np.exp(strengths[b] - strengths[a]))
            verdicts.append((a, b, "A" if a_wins else "B"))
    elo = bradley_terry_elo(5, verdicts)
    assert np.argsort(-elo).tolist() == [2, 4, 0, 3, 1]
    ranking = rank_judgements(5, verdicts)
    assert (ranking.chosen, ranking.rejected) == (2, 1)
    np.testing.assert_allclose(ranking.ratings, elo)


def test_undefeated_judgement_gets_a_finite_top_rating():
    verdicts = [(a, b, "A" if a == 0 else "B" if b == 0 else None) for a, b in meta_judge_comparisons(3)]
    ranking = rank_judgements(3, verdicts)
    assert np.isfinite(ranking.ratings).all()
    assert ranking.chosen == 0 and ranking.rejected == 1  # 1 and 2 tie at the bottom: the earlier one


@pytest.mark.parametrize(
    "verdicts",
    [
        [],
        [(0, 1, None), (1, 0, None), (0, 2, None)],  # all unparseable: dropped
        [(a, b, "A") for a, b in meta_judge_comparisons(3)],  # pure position bias: every pair is a tie
        [(a, b, "B") for a, b in meta_judge_comparisons(3)],
    ],
)
def test_all_ties_give_no_ranking(verdicts):
    assert rank_judgements(3, verdicts) is None


def test_contradictory_verdicts_are_ties():
    # 0 beats 1 in both orders; the 1-2 verdicts contradict each other (position bias): 1 and 2 stay tied.
    verdicts = [(0, 1, "A"), (1, 0, "B"), (1, 2, "A"), (2, 1, "A")]
    elo = bradley_terry_elo(3, verdicts)
    assert elo[0] > elo[1] and elo[0] > elo[2]
    assert elo[2] > elo[1]  # 1 lost to 0, 2 did not play 0
    ranking = rank_judgements(3, verdicts)
    assert (ranking.chosen, ranking.rejected) == (0, 1)


def test_top_tie_breaks_to_the_earlier_judgement():
    verdicts = [(1, 0, "A"), (0, 1, "B"), (2, 0, "A"), (0, 2, "B")]  # 1 and 2 both beat 0 twice
    ranking = rank_judgements(3, verdicts)
    assert (ranking.chosen, ranking.rejected) == (1, 0)


def _select(classes, **overrides):
    kwargs = {"global_batch_size": 64, "meta_judge_pcnt": 0.15, "meta_max_relative_pcnt": 0.4, "seed": 0}
    return select_meta_judge_pairs(classes, **{**kwargs, **overrides})


@pytest.mark.parametrize(
    ("classes", "overrides", "expected_count"),
    [
        ([5, 4, 3, 2, 1] * 10, {}, 9),  # floor(0.15 * 64) = 9
        ([5, 4, 3, 2, 1] * 10, {"meta_judge_pcnt": -1}, 0),  # disabled
        ([5, 4, 3, 2, 1] * 10, {"meta_judge_pcnt": 0}, 0),
        ([5, 4, 3, 2, 1] * 10, {"meta_judge_pcnt": 0.29, "global_batch_size": 100}, 29),  # not 28
        ([5] * 40, {}, 0),  # one class can never be <= 40% of the selection
        ([5] * 40 + [4] * 40, {}, 0),  # two classes: 50% each is still too much
        ([5] * 40 + [4] * 40 + [3], {}, 5),  # n=5: cap 2 per class, 2 + 2 + 1
        ([5] * 40 + [4] * 40, {"meta_max_relative_pcnt": 0.5}, 8),  # n=9: cap 4 + 4 < 9; n=8: 4 + 4
        ([5, 4, 3], {"meta_max_relative_pcnt": 1.0}, 3),  # fewer candidates than the budget
    ],
)
def test_select_meta_judge_pairs_counts(classes, overrides, expected_count):
    selected = _select(classes, **overrides)
    assert len(selected) == expected_count
    assert selected == sorted(set(selected))
    if selected:
        rel = overrides.get("meta_max_relative_pcnt", 0.4)
        assert max(Counter(classes[i] for i in selected).values()) <= rel * len(selected) + 1e-9


def test_select_meta_judge_pairs_is_deterministic_given_the_seed():
    classes = [i % 4 for i in range(60)]
    assert _select(classes, seed=3) == _select(classes, seed=3)
    assert any(_select(classes, seed=3) != _select(classes, seed=s) for s in range(4, 10))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"meta_judge_pcnt": 1.5}, r"model\.spin\.meta_judge_pcnt"),
        ({"meta_max_relative_pcnt": 0.0}, r"model\.spin\.meta_max_relative_pcnt"),
        ({"meta_max_relative_pcnt": 1.2}, r"model\.spin\.meta_max_relative_pcnt"),
    ],
)
def test_select_meta_judge_pairs_bad_config(overrides, key):
    with pytest.raises(ValueError, match=key):
        _select([1, 2, 3], **overrides)
