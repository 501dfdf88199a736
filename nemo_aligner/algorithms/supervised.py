"""Supervised fine-tuning loop: the shared skeleton as is (the SFT loss lives in ``GPTSFTModel``)."""

from __future__ import annotations

from nemo_aligner.algorithms.base import BaseTrainer


class SupervisedTrainer(BaseTrainer):
    """Trains a ``SupervisedInterface`` model; validation reports the token-mean loss as ``val/loss``."""
