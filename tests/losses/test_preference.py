"""The preference-loss registry against float64 references written here from the formulas in algorithms.md.

Tolerances: float64 inputs are compared at rtol=1e-10 (only rounding-order differences between two float64
formulations); float32 inputs against the float64 reference at rtol=1e-5 (a few float32 ulps through exp/log).
"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_aligner.losses import (
    PREFERENCE_LOSSES,
    PREFERENCE_METRIC_SUM_KEYS,
    finalize_preference_metrics,
    get_preference_loss,
    preference_loss_and_metrics,
)

F64 = {"rtol": 1e-10, "atol": 1e-12}
F32 = {"rtol": 1e-5, "atol": 1e-6}
NAMES = ("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "scale")


def sig(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def bern_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


# name -> (reference loss, analytic d loss / d h), both of (h, beta, R_c, R_r, scale).
REFERENCES = {
    "dpo": (
        lambda h, b, rc, rr, s: torch.log(1 + torch.exp(-b * h)),
        lambda h, b, rc, rr, s: -b / (1 + torch.exp(b * h)),
    ),
    "ipo": (
        lambda h, b, rc, rr, s: (h - 1 / (2 * b)) ** 2,
        lambda h, b, rc, rr, s: 2 * (h - 1 / (2 * b)),
    ),
    "rpo_sq": (
        lambda h, b, rc, rr, s: (b * h - s * (rc - rr)) ** 2,
        lambda h, b, rc, rr, s: 2 * b * (b * h - s * (rc - rr)),
    ),
    "rpo_bwd_kl": (
        lambda h, b, rc, rr, s: bern_kl(sig(s * (rc - rr)), sig(b * h)),
        lambda h, b, rc, rr, s: b * (sig(b * h) - sig(s * (rc - rr))),
    ),
    "rpo_fwd_kl": (
        lambda h, b, rc, rr, s: bern_kl(sig(b * h), sig(s * (rc - rr))),
        lambda h, b, rc, rr, s: b * sig(b * h) * (1 - sig(b * h)) * (b * h - s * (rc - rr)),
    ),
    "scale": (
        lambda h, b, rc, rr, s: (rc - rr).abs() * torch.log(1 + torch.exp(-b * h)),
        lambda h, b, rc, rr, s: -(rc - rr).abs() * b / (1 + torch.exp(b * h)),
    ),
}


def random_pairs(num_pairs: int, seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def draw(scale: float, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(num_pairs, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    return {
        "policy_chosen": draw(5.0, -40.0),
        "policy_rejected": draw(5.0, -45.0),
        "ref_chosen": draw(5.0, -42.0),
        "ref_rejected": draw(5.0, -43.0),
        "gt_chosen": draw(2.0, 1.0),
        "gt_rejected": draw(2.0),
    }


def call(pairs: dict, valid: torch.Tensor, name: str = "dpo", **overrides):
    kwargs = {
        "beta": 0.3,
        "loss_name": name,
        "gt_chosen": pairs["gt_chosen"],
        "gt_rejected": pairs["gt_rejected"],
        "gt_reward_scale": 0.7,
        "preference_loss_weight": 1.0,
        "sft_loss_weight": 0.0,
        **overrides,
    }
    return preference_loss_and_metrics(
        pairs["policy_chosen"], pairs["policy_rejected"], pairs["ref_chosen"], pairs["ref_rejected"], valid, **kwargs
    )


def test_registry_holds_exactly_the_documented_names():
    assert tuple(PREFERENCE_LOSSES) == NAMES
    assert all(get_preference_loss(name) is PREFERENCE_LOSSES[name] for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_loss_and_gradient_match_float64_reference(name):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(64, generator=gen, dtype=torch.float64) * 4
    rc, rr = (
        torch.randn(64, generator=gen, dtype=torch.float64) * 2,
        torch.randn(64, generator=gen, dtype=torch.float64),
    )
    beta, scale = 0.37, 1.3
    reference, derivative = REFERENCES[name]

    h64 = h.clone().requires_grad_(True)
    loss = get_preference_loss(name)(h64, beta, rc, rr, scale)
    torch.testing.assert_close(loss, reference(h, beta, rc, rr, scale), **F64)
    (grad,) = torch.autograd.grad(loss.sum(), h64)
    torch.testing.assert_close(grad, derivative(h, beta, rc, rr, scale), **F64)
    h_ref = h.clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(reference(h_ref, beta, rc, rr, scale).sum(), h_ref)
    torch.testing.assert_close(grad, grad_ref, **F64)

    h32 = h.float().requires_grad_(True)
    loss32 = get_preference_loss(name)(h32, beta, rc.float(), rr.float(), scale)
    assert loss32.dtype == torch.float32
    (grad32,) = torch.autograd.grad(loss32.sum(), h32)
    torch.testing.assert_close(loss32.double(), reference(h32.detach().double(), beta, rc, rr, scale), **F32)
    torch.testing.assert_close(grad32.double(), derivative(h32.detach().double(), beta, rc, rr, scale), **F32)


@pytest.mark.parametrize("name", NAMES)
def test_losses_stay_finite_at_extreme_margins(name):
    h = torch.tensor([-1e4, -200.0, 0.0, 200.0, 1e4], requires_grad=True)
    rc = torch.tensor([1e3, -1e3, 0.0, 50.0, -50.0])
    rr = torch.zeros(5)
    loss = get_preference_loss(name)(h, 1.0, rc, rr, 1.0)
    (grad,) = torch.autograd.grad(loss.sum(), h)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    if name == "dpo":
        torch.testing.assert_close(loss, torch.tensor([1e4, 200.0, math.log(2), 0.0, 0.0]))


def test_unknown_name_is_a_config_error_naming_the_key_and_the_choices():
    with pytest.raises(ValueError, match="preference_loss") as info:
        get_preference_loss("dpo_v2")
    assert "'dpo_v2'" in str(info.value)
    assert all(name in str(info.value) for name in NAMES)
    pairs = random_pairs(3, seed=0)
    with pytest.raises(ValueError, match="preference_loss"):
        call(pairs, torch.ones(3, dtype=torch.bool), name="DPO")


def test_scale_weights_each_pair_before_averaging():
    # Pair 0: gap 2, h = 0 (loss log 2). Pair 1: gap 0, h very negative (DPO loss 5).
    h = torch.tensor([0.0, -5.0], dtype=torch.float64)
    rc, rr = torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    weights, dpo = (rc - rr).abs(), torch.log(1 + torch.exp(-h))
    mean_of_products = (weights * dpo).mean().item()
    product_of_means = (weights.mean() * dpo.mean()).item()
    assert mean_of_products == pytest.approx(math.log(2))
    assert abs(mean_of_products - product_of_means) > 1.0

    pairs = {
        "policy_chosen": h,
        "policy_rejected": torch.zeros(2, dtype=torch.float64),
        "ref_chosen": torch.zeros(2, dtype=torch.float64),
        "ref_rejected": torch.zeros(2, dtype=torch.float64),
        "gt_chosen": rc,
        "gt_rejected": rr,
    }
    out = call(pairs, torch.ones(2, dtype=torch.bool), name="scale", beta=1.0)
    assert (out.loss_sum / out.num_valid).item() == pytest.approx(mean_of_products, rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf, 1e30])
def test_masked_pairs_change_nothing(name, poison):
    pairs = random_pairs(5, seed=2)
    valid = torch.tensor([True, False, True, True, False])
    poisoned = {key: torch.cat([value, torch.tensor([poison], dtype=value.dtype)]) for key, value in pairs.items()}
    sft = torch.cat([pairs["policy_chosen"] * 0.5, torch.tensor([poison], dtype=torch.float64)])
    weights = {"preference_loss_weight": 0.8, "sft_loss_weight": 0.25}

    def run(inputs, mask, sft_chosen):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        sft_leaf = sft_chosen.clone().requires_grad_(True)
        out = call(leaves, mask, name=name, sft_chosen=sft_leaf, **weights)
        grads = torch.autograd.grad(out.loss_sum, [*leaves.values(), sft_leaf], allow_unused=True)
        grads = [torch.zeros_like(sft_leaf) if g is None else g for g in grads]
        return out, grads

    base, base_grads = run(pairs, valid, sft[:5])
    more, more_grads = run(poisoned, torch.cat([valid, torch.tensor([False])]), sft)
    assert torch.equal(base.loss_sum, more.loss_sum)
    assert torch.equal(base.num_valid, more.num_valid)
    for key in PREFERENCE_METRIC_SUM_KEYS:
        assert torch.equal(base.metric_sums[key], more.metric_sums[key]), key
    for small, large in zip(base_grads, more_grads):
        assert torch.equal(large[:5], small)
        assert large[5] == 0
    # Masked pairs contribute exactly 0: the result equals the computation on the valid pairs alone.
    kept = {k: v[valid] for k, v in pairs.items()}
    alone, _ = run(kept, torch.ones(3, dtype=torch.bool), sft[:5][valid])
    torch.testing.assert_close(alone.loss_sum, base.loss_sum, **F64)


def test_float_mask_is_equivalent_to_bool_mask():
    pairs = random_pairs(4, seed=3)
    as_bool = call(pairs, torch.tensor([True, False, True, False]))
    as_float = call(pairs, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(as_bool.loss_sum, as_float.loss_sum) and as_float.num_valid.item() == 2


def test_step_zero_dpo_loss_is_log2_and_rewards_are_zero():
    lp = torch.randn(6, dtype=torch.float32) * 10 - 50
    pairs = {
        "policy_chosen": lp,
        "policy_rejected": lp.flip(0),
        "ref_chosen": lp.clone(),
        "ref_rejected": lp.flip(0).clone(),
        "gt_chosen": torch.ones(6),
        "gt_rejected": torch.zeros(6),
    }
    out = call(pairs, torch.ones(6, dtype=torch.bool))
    assert (out.loss_sum / out.num_valid).item() == pytest.approx(math.log(2), rel=1e-6)
    metrics = finalize_preference_metrics({k: v.item() for k, v in out.metric_sums.items()})
    assert metrics["loss"] == pytest.approx(math.log(2), rel=1e-6)
    # Ties count as wrong: at step 0 no pair has r(chosen) > r(rejected).
    assert metrics["acc"] == 0.0
    for key in ("rewards_chosen_mean", "rewards_rejected_mean", "rewards_all_mean", "rewards_all_std"):
        assert metrics[key] == 0.0, key


@pytest.mark.parametrize("name", NAMES)
def test_metrics_reduced_over_micro_batches_match_direct_computation(name):
    pairs = random_pairs(24, seed=4)
    valid = torch.rand(24, generator=torch.Generator().manual_seed(5)) > 0.3
    beta, scale, w_pref, w_sft = 0.3, 0.7, 1.5, 0.1
    totals = dict.fromkeys(PREFERENCE_METRIC_SUM_KEYS, 0.0)
    loss_total, count_total = 0.0, 0
    for chunk in range(0, 24, 8):  # three micro batches, reduced as reduce_metric_sums does
        part = {k: v[chunk : chunk + 8] for k, v in pairs.items()}
        out = call(part, valid[chunk : chunk + 8], name=name, preference_loss_weight=w_pref, sft_loss_weight=w_sft)
        loss_total += out.loss_sum.item()
        count_total += out.num_valid.item()
        for key, value in out.metric_sums.items():
            totals[key] += value.item()
    metrics = finalize_preference_metrics(totals)

    kept = {k: v[valid] for k, v in pairs.items()}
    r_c = kept["policy_chosen"] - kept["ref_chosen"]
    r_r = kept["policy_rejected"] - kept["ref_rejected"]
    pref = REFERENCES[name][0](r_c - r_r, beta, kept["gt_chosen"], kept["gt_rejected"], scale)
    sft = -kept["policy_chosen"]
    all_rewards = torch.cat([r_c, r_r])  # unscaled, as NeMo-Aligner logs them
    expected = {
        "loss": (w_pref * pref + w_sft * sft).mean().item(),
        "preference_loss": pref.mean().item(),
        "sft_loss": sft.mean().item(),
        "acc": (r_c > r_r).double().mean().item(),
        "rewards_chosen_mean": r_c.mean().item(),
        "rewards_rejected_mean": r_r.mean().item(),
        "rewards_all_mean": all_rewards.mean().item(),
        "rewards_all_std": all_rewards.std(correction=1).item(),
        "num_valid_pairs": float(valid.sum()),
    }
    assert count_total == valid.sum().item()
    assert loss_total / count_total == pytest.approx(expected["loss"], rel=1e-10)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_finalize_clamps_negative_variance_and_handles_no_valid_pair():
    # E[x^2] - E[x]^2 rounds slightly below 0 for identical rewards; the std must be 0, not NaN.
    x = 0.1
    totals = dict.fromkeys(PREFERENCE_METRIC_SUM_KEYS, 0.0)
    totals.update(num_valid_pairs=3.0, rewards_chosen_sum=3 * x, rewards_rejected_sum=3 * x, rewards_sq_sum=6 * x * x)
    assert finalize_preference_metrics(totals)["rewards_all_std"] == pytest.approx(0.0, abs=1e-8)
    empty = finalize_preference_metrics(dict.fromkeys(PREFERENCE_METRIC_SUM_KEYS, 0.0))
    assert all(value == 0.0 for value in empty.values())


def test_all_masked_micro_batch_gives_zero_loss_and_zero_gradients():
    pairs = {k: v.clone().requires_grad_(True) for k, v in random_pairs(3, seed=6).items()}
    out = call(pairs, torch.zeros(3, dtype=torch.bool), name="rpo_sq", sft_loss_weight=1.0)
    assert out.loss_sum.item() == 0.0 and out.num_valid.item() == 0 and out.num_valid.dtype == torch.int
    out.loss_sum.backward()
    assert all(torch.equal(t.grad, torch.zeros(3, dtype=torch.float64)) for t in pairs.values())


def test_sft_term_combines_with_the_preference_term():
    pairs = {k: v.clone().requires_grad_(True) for k, v in random_pairs(4, seed=7).items()}
    sft_chosen = (pairs["policy_chosen"].detach() / 17).requires_grad_(True)  # e.g. a per-token mean
    valid = torch.tensor([True, True, False, True])
    beta, w_pref, w_sft = 0.3, 0.6, 2.5
    out = call(pairs, valid, sft_chosen=sft_chosen, preference_loss_weight=w_pref, sft_loss_weight=w_sft)

    h = (pairs["policy_chosen"] - pairs["ref_chosen"] - pairs["policy_rejected"] + pairs["ref_rejected"]).detach()
    dpo = torch.log(1 + torch.exp(-beta * h))[valid]
    sft = -sft_chosen.detach()[valid]
    torch.testing.assert_close(out.loss_sum, w_pref * dpo.sum() + w_sft * sft.sum(), **F64)
    torch.testing.assert_close(out.metric_sums["preference_loss_sum"], dpo.sum(), **F64)
    torch.testing.assert_close(out.metric_sums["sft_loss_sum"], sft.sum(), **F64)

    out.loss_sum.backward()
    torch.testing.assert_close(sft_chosen.grad, -w_sft * valid.double())
    dpo_grad = -beta / (1 + torch.exp(beta * h))
    torch.testing.assert_close(pairs["policy_chosen"].grad, w_pref * dpo_grad * valid, **F64)

    # Without an explicit sft_chosen the SFT term uses policy_chosen.
    plain = {k: v.detach() for k, v in pairs.items()}
    implicit = call(plain, valid, sft_loss_weight=w_sft)
    explicit = call(plain, valid, sft_loss_weight=w_sft, sft_chosen=plain["policy_chosen"])
    assert torch.equal(implicit.loss_sum, explicit.loss_sum)
