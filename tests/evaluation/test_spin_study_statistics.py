"""The multi-seed study's statistics (benchmarks/spin_study.py) against hand-computed values."""

import pytest

from benchmarks.spin_study import compare, exact_mcnemar_p, sign_flip_p, spread


def test_exact_mcnemar_is_a_two_sided_sign_test_on_the_discordant_prompts():
    # 1 : 5 discordant prompts: P(X <= 1) for Binomial(6, 1/2) = (1 + 6) / 64, both tails.
    assert exact_mcnemar_p(1, 5) == pytest.approx(14 / 64)
    assert exact_mcnemar_p(5, 1) == exact_mcnemar_p(1, 5)
    assert exact_mcnemar_p(0, 10) == pytest.approx(2 / 1024)
    assert exact_mcnemar_p(3, 3) == 1.0  # (1 + 6 + 15 + 20) * 2 / 64 > 1: capped
    assert exact_mcnemar_p(0, 0) == 1.0  # no disagreement, no evidence


def test_spread_uses_the_sample_standard_deviation():
    assert spread([0.30, 0.33, 0.36]) == {"mean": 0.33, "std": 0.03, "min": 0.30, "max": 0.36}
    assert spread([0.5])["std"] == 0.0


def test_compare_pools_prompts_over_seeds_and_pairs_the_seeds():
    treatment = {
        1: [{"step": 9, "accuracy": 0.5, "correct": "1100"}],
        2: [{"step": 9, "accuracy": 0.5, "correct": "1010"}],
    }
    control = {
        1: [{"step": 9, "accuracy": 0.25, "correct": "1000"}],
        2: [{"step": 9, "accuracy": 0.5, "correct": "0011"}],
    }
    (row,) = compare(treatment, control)

    # Seed 1: prompt 2 only the treatment's; seed 2: prompt 1 only the treatment's, prompt 4 only the control's.
    assert row["mcnemar"] == {"pairs": 8, "treatment_only_correct": 2, "control_only_correct": 1, "p": 1.0}
    assert row["difference"]["mean"] == 0.125 and row["seeds"] == [1, 2] and row["steps"] == [9, 9]
    assert row["sign_flip_p"] == 1.0  # differences 0.25 and 0: every sign flip gives |mean| 0.125


def test_sign_flip_p_enumerates_the_sign_assignments_of_the_seed_differences():
    assert sign_flip_p([0.01, 0.02, 0.03]) == 2 / 8  # only all + and all - reach |sum| 0.06: the floor with 3 seeds
    # Sums of +-0.03 +-0.01 +-0.01: 0.05, 0.03, 0.03, 0.01 and their negatives; |sum| >= 0.03 in 6 of 8.
    assert sign_flip_p([0.03, -0.01, 0.01]) == 6 / 8
