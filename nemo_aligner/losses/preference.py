"""The preference-loss registry shared by DPO, SPIN and Self-Rewarding.

Notation (per chosen/rejected pair; the model code computes the log-prob sums, or per-token means when
``preference_average_log_probs=True``):

- implicit reward ``r(y) = lp_policy(y) - lp_ref(y)``;  ``h = r(chosen) - r(rejected)``;
- ``beta`` = ``ref_policy_kl_penalty``;  ``s(x)`` = sigmoid;
- ground-truth rewards ``R_c, R_r`` (data fields ``chosen_reward``/``rejected_reward`` or the judge's scores);
  ``g = gt_reward_scale * (R_c - R_r)``.

========================  ==========================================================================
``preference_loss``       loss of one pair
========================  ==========================================================================
``dpo``                   ``-log s(beta*h)``                                       (:func:`dpo_loss`)
``ipo``                   ``(h - 1/(2*beta))^2``, h *not* multiplied by beta      (:func:`ipo_loss`)
``rpo_sq``                ``(beta*h - g)^2``                                       (:func:`rpo_sq_loss`)
``rpo_bwd_kl``            ``KL(Bern(s(g)) || Bern(s(beta*h)))``                    (:func:`rpo_bwd_kl_loss`)
``rpo_fwd_kl``            ``KL(Bern(s(beta*h)) || Bern(s(g)))``                    (:func:`rpo_fwd_kl_loss`)
``scale``                 ``|R_c - R_r| * -log s(beta*h)``                        (:func:`scale_loss`)
========================  ==========================================================================

The training objective is ``preference_loss_weight * L_pref + sft_loss_weight * L_sft`` with
``L_sft = -lp_policy(chosen)`` (Rafailov et al. 2023's DPO plus an NLL term on the chosen response),
averaged over the valid pairs of the *global* batch: :func:`preference_loss_and_metrics` returns the sum over
one micro batch's valid pairs and their count, and megatron-core (``calculate_per_token_loss``) divides the
gradients by the count summed over all micro batches and data-parallel ranks.

Papers: DPO, Rafailov et al. 2023 (arXiv 2305.18290); IPO, Azar et al. 2023 (arXiv 2310.12036);
RPO (reward-aware preference optimization), NVIDIA, Nemotron-4 340B report (arXiv 2406.11704);
SPIN, Chen et al. 2024 (arXiv 2401.01335), which is the DPO loss with chosen = ground truth and
rejected = the previous iterate's generation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F

PreferenceLossFn = Callable[[torch.Tensor, float, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""``loss_fn(h, beta, gt_chosen, gt_rejected, gt_reward_scale) -> per-pair loss [P]``; all tensors ``[P]``."""


def dpo_loss(
    h: torch.Tensor, beta: float, gt_chosen: torch.Tensor, gt_rejected: torch.Tensor, gt_reward_scale: float
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7): ``-log sigmoid(beta * h)``.

    The negative log-likelihood of "chosen beats rejected" under a Bradley-Terry model whose reward is the
    implicit reward ``beta * r``. Equals ``log 2`` at ``h = 0`` (policy == reference). Ground-truth rewards unused.
    """
    return -F.logsigmoid(beta * h)


def ipo_loss(
    h: torch.Tensor, beta: float, gt_chosen: torch.Tensor, gt_rejected: torch.Tensor, gt_reward_scale: float
) -> torch.Tensor:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): ``(h - 1/(2*beta))^2``.

    ``h`` is the log-likelihood-ratio margin, *not* multiplied by beta: beta (the paper's tau) sets the target
    margin ``1/(2*beta)`` the squared loss regresses to. Ground-truth rewards unused.
    """
    return (h - 1.0 / (2.0 * beta)) ** 2


def rpo_sq_loss(
    h: torch.Tensor, beta: float, gt_chosen: torch.Tensor, gt_rejected: torch.Tensor, gt_reward_scale: float
) -> torch.Tensor:
    """RPO, squared distance (Nemotron-4 340B report, arXiv 2406.11704): ``(beta*h - g)^2``.

    Regresses the implicit reward margin ``beta*h`` onto the ground-truth margin
    ``g = gt_reward_scale * (R_c - R_r)``.
    """
    return (beta * h - gt_reward_scale * (gt_chosen - gt_rejected)) ** 2


def _bernoulli_kl(logit_p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(s(a)) || Bern(s(b)))`` = ``s(a)[log s(a) - log s(b)] + s(-a)[log s(-a) - log s(-b)]``.

    Written with ``logsigmoid`` only (no ``log(sigmoid(.))``), so it stays finite for any finite logits.
    """
    log_p, log_not_p = F.logsigmoid(logit_p), F.logsigmoid(-logit_p)
    log_q, log_not_q = F.logsigmoid(logit_q), F.logsigmoid(-logit_q)
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)


def rpo_bwd_kl_loss(
    h: torch.Tensor, beta: float, gt_chosen: torch.Tensor, gt_rejected: torch.Tensor, gt_reward_scale: float
) -> torch.Tensor:
    """RPO, backward KL (arXiv 2406.11704): ``KL(Bern(s(g)) || Bern(s(beta*h)))``.

    The target preference probability ``s(g)`` (from ground-truth rewards) comes first, the model's ``s(beta*h)``
    second: ``s(g)[log s(g) - log s(beta h)] + s(-g)[log s(-g) - log s(-beta h)]``.
    Gradient w.r.t. h: ``beta * (s(beta*h) - s(g))``.
    """
    return _bernoulli_kl(gt_reward_scale * (gt_chosen - gt_rejected), beta * h)


def rpo_fwd_kl_loss(
    h: torch.Tensor, beta: float, gt_chosen: torch.Tensor, gt_rejected: torch.Tensor, gt_reward_scale: float
) -> torch.Tensor:
    """RPO, forward KL (arXiv 2406.11704): ``KL(Bern(s(beta*h)) || Bern(s(g)))``, the reverse of ``rpo_bwd_kl``.

    ``s(beta h)[log s(beta h) - log s(g)] + s(-beta h)[log s(-beta h) - log s(-g)]``.
    Gradient w.r.t. h: ``beta * s(beta*h) * s(-beta*h) * (beta*h - g)``.
    """
    return _bernoulli_kl(beta * h, gt_reward_scale * (gt_chosen - gt_rejected))


def scale_loss(
    h: torch.Tensor, beta: float, gt_chosen: torch.Tensor, gt_rejected: torch.Tensor, gt_reward_scale: float
) -> torch.Tensor:
    """Reward-gap-weighted DPO: ``|R_c - R_r| * -log sigmoid(beta*h)``, weighted per pair before averaging.

    ``gt_reward_scale`` is not used (the weight is the raw gap). NeMo-Aligner averaged the DPO loss over the
    batch before multiplying by the gap, i.e. ``mean(w) * mean(l)`` instead of ``mean(w * l)``; this is the latter.
    """
    return (gt_chosen - gt_rejected).abs() * -F.logsigmoid(beta * h)


PREFERENCE_LOSSES: dict[str, PreferenceLossFn] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "rpo_sq": rpo_sq_loss,
    "rpo_bwd_kl": rpo_bwd_kl_loss,
    "rpo_fwd_kl": rpo_fwd_kl_loss,
    "scale": scale_loss,
}
"""``preference_loss`` config value -> per-pair loss function (see the module docstring for the formulas)."""


def get_preference_loss(name: str) -> PreferenceLossFn:
    """The loss registered as ``name``; an unknown name is a config error (never silently replaced)."""
    try:
        return PREFERENCE_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown preference_loss {name!r} (config key model.<algorithm>.preference_loss); "
            f"valid names: {', '.join(PREFERENCE_LOSSES)}"
        ) from None


PREFERENCE_METRIC_SUM_KEYS: tuple[str, ...] = (
    "num_valid_pairs",
    "loss_sum",
    "preference_loss_sum",
    "sft_loss_sum",
    "acc_sum",
    "rewards_chosen_sum",
    "rewards_rejected_sum",
    "rewards_sq_sum",
)
"""Keys of :attr:`PreferenceLossOutput.metric_sums`: sums over valid pairs, to be added across micro batches
and data-parallel ranks (e.g. ``nemo_aligner.utils.batching.reduce_metric_sums``) before
:func:`finalize_preference_metrics`."""


class PreferenceLossOutput(NamedTuple):
    """What a megatron-core ``loss_func`` returns: ``(loss_sum, count, metrics)``."""

    loss_sum: torch.Tensor
    """Scalar, differentiable: sum over valid pairs of ``w_pref * L_pref + w_sft * L_sft``."""
    num_valid: torch.Tensor
    """Scalar ``torch.int``: number of valid pairs in this micro batch (the divisor, once summed globally)."""
    metric_sums: dict[str, torch.Tensor]
    """Detached float64 scalars keyed by :data:`PREFERENCE_METRIC_SUM_KEYS`."""


def preference_loss_and_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    valid: torch.Tensor,
    *,
    beta: float,
    loss_name: str,
    gt_chosen: torch.Tensor,
    gt_rejected: torch.Tensor,
    gt_reward_scale: float,
    preference_loss_weight: float,
    sft_loss_weight: float,
    sft_chosen: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Preference (+ SFT) loss of one micro batch as a sum over its valid pairs, with metric sums.

    Inputs are per pair, shape ``[P]``: ``policy_*``/``ref_*`` are log-probs of the responses (sums, or per-token
    means with ``preference_average_log_probs``; the caller chooses); ``gt_*`` ground-truth rewards;
    ``sft_chosen`` the policy log-prob of the chosen response used by the SFT term (sum or per-token mean per
    ``sft_average_log_probs``; ``None`` means ``policy_chosen``). ``valid`` is a bool (or 0/1) mask: a pair with
    ``valid == 0`` (dropped, over-length, bad judge output) contributes exactly 0 to the loss, its gradient and
    every metric, even when its inputs are NaN or inf (they are replaced with 0 before any arithmetic).

    Per valid pair: ``L_pref = PREFERENCE_LOSSES[loss_name](h, ...)``, ``L_sft = -sft_chosen`` and
    ``loss = preference_loss_weight * L_pref + sft_loss_weight * L_sft``. ``loss_sum`` is the sum over valid pairs;
    the caller divides by the number of valid pairs of the whole global batch (megatron-core's
    ``calculate_per_token_loss``), so the step does not depend on micro batch size or data-parallel size.

    Metric sums (detached, float64; unweighted ``L_pref`` and ``L_sft``, as NeMo-Aligner logged them):
    ``acc_sum`` counts pairs with ``r(chosen) > r(rejected)`` strictly, so a tie (e.g. every pair at step 0,
    policy == reference) counts as wrong, as in NeMo-Aligner. Rewards are reported unscaled, as NeMo-Aligner's code
    logs them (``r`` = policy minus reference log-prob, without beta): ``rewards_chosen_sum = sum r(chosen)``,
    ``rewards_rejected_sum = sum r(rejected)``, ``rewards_sq_sum = sum r(chosen)^2 + r(rejected)^2`` for the std
    over all ``2 * valid`` rewards.
    """
    loss_fn = get_preference_loss(loss_name)
    valid = valid.to(torch.bool)

    def masked(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))

    if sft_chosen is None:
        sft_chosen = policy_chosen
    reward_chosen = masked(policy_chosen) - masked(ref_chosen)
    reward_rejected = masked(policy_rejected) - masked(ref_rejected)
    h = reward_chosen - reward_rejected

    preference_loss = masked(loss_fn(h, beta, masked(gt_chosen), masked(gt_rejected), gt_reward_scale))
    sft_loss = -masked(sft_chosen)
    loss = preference_loss_weight * preference_loss + sft_loss_weight * sft_loss

    with torch.no_grad():
        rewards_chosen = reward_chosen.to(torch.float64)
        rewards_rejected = reward_rejected.to(torch.float64)
        metric_sums = {
            "num_valid_pairs": valid.sum(dtype=torch.float64),
            "loss_sum": loss.sum(dtype=torch.float64),
            "preference_loss_sum": preference_loss.sum(dtype=torch.float64),
            "sft_loss_sum": sft_loss.sum(dtype=torch.float64),
            "acc_sum": (valid & (reward_chosen > reward_rejected)).sum(dtype=torch.float64),
            "rewards_chosen_sum": rewards_chosen.sum(),
            "rewards_rejected_sum": rewards_rejected.sum(),
            "rewards_sq_sum": (rewards_chosen.square() + rewards_rejected.square()).sum(),
        }
    return PreferenceLossOutput(loss.sum(), valid.sum().to(torch.int), metric_sums)


def finalize_preference_metrics(totals: Mapping[str, float]) -> dict[str, float]:
    """Turn metric sums (reduced over micro batches and ranks) into the logged means.

    Every per-pair metric is ``sum / num_valid_pairs``; ``rewards_all_mean`` and ``rewards_all_std`` are over the
    ``n = 2 * num_valid_pairs`` chosen and rejected rewards, with the unbiased std (as NeMo-Aligner's
    ``torch.std``) ``sqrt(max(E[x^2] - E[x]^2, 0) * n / (n - 1))`` (the clamp absorbs rounding below zero; 0 for
    n < 2). With no valid pair every metric is 0.
    """
    pairs = max(totals["num_valid_pairs"], 1.0)
    count = 2.0 * totals["num_valid_pairs"]
    rewards_all_mean = (totals["rewards_chosen_sum"] + totals["rewards_rejected_sum"]) / (2.0 * pairs)
    rewards_all_sq_mean = totals["rewards_sq_sum"] / (2.0 * pairs)
    variance = max(rewards_all_sq_mean - rewards_all_mean**2, 0.0) * count / (count - 1) if count > 1 else 0.0
    return {
        "loss": totals["loss_sum"] / pairs,
        "preference_loss": totals["preference_loss_sum"] / pairs,
        "sft_loss": totals["sft_loss_sum"] / pairs,
        "acc": totals["acc_sum"] / pairs,
        "rewards_chosen_mean": totals["rewards_chosen_sum"] / pairs,
        "rewards_rejected_mean": totals["rewards_rejected_sum"] / pairs,
        "rewards_all_mean": rewards_all_mean,
        "rewards_all_std": math.sqrt(variance),
        "num_valid_pairs": totals["num_valid_pairs"],
    }
