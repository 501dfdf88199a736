"""Losses shared by the alignment algorithms: the preference-loss registry (DPO, IPO, RPO, scale) + SFT term."""

from nemo_aligner.losses.preference import (
    PREFERENCE_LOSSES,
    PREFERENCE_METRIC_SUM_KEYS,
    PreferenceLossFn,
    PreferenceLossOutput,
    finalize_preference_metrics,
    get_preference_loss,
    preference_loss_and_metrics,
)

__all__ = [
    "PREFERENCE_LOSSES",
    "PREFERENCE_METRIC_SUM_KEYS",
    "PreferenceLossFn",
    "PreferenceLossOutput",
    "finalize_preference_metrics",
    "get_preference_loss",
    "preference_loss_and_metrics",
]
