"""What a loop in ``nemo_aligner.algorithms`` asks of a model (NeMo-Aligner's interface names).

A loop never computes a loss; a model never iterates over a dataloader. The loop hands the model one global
batch (this data-parallel rank's share of it) and gets back a loss and metrics already reduced over the whole
global batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class SupervisedInterface(ABC):
    """Models trained by SFT and the preference algorithms."""

    @abstractmethod
    def get_loss_and_metrics(self, batch: dict, forward_only: bool) -> tuple[float, dict[str, float]]:
        """Forward (and backward unless ``forward_only``) over ``batch``; metrics reduced over the global batch."""

    def prepare_for_training(self) -> None:
        """Called once before the first training step."""

    def prepare_for_training_step(self) -> None:
        """Called before each training step (e.g. switch to train mode, zero gradient buffers)."""

    def finish_training_step(self) -> None:
        """Called after the backward pass and before the optimizer step."""

    def prepare_for_validation_step(self) -> None:
        """Called before each validation step."""

    def finish_validation_step(self) -> None:
        """Called after each validation step."""

    def finish_training(self) -> None:
        """Called once after the last training step."""

    def get_trainer_state(self) -> dict[str, Any]:
        """Extra model state a trainer checkpoint must carry (e.g. SPIN's KL schedule position)."""
        return {}
