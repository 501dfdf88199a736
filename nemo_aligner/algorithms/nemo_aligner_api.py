"""NeMo-Aligner's trainer methods beyond ``fit``/``save``/``state_dict``, for custom pipelines written against its
``SPINTrainer`` and ``SelfRewardingTrainer`` (docs/coming_from_nemo_aligner.md): the one place for them.

``train_single_step`` and ``validation_step`` are our own step methods (``algorithms/base.py``) and return
``(loss, metrics)`` as NeMo-Aligner's do. NeMo-Aligner's rollout ran inside the data loader
(``augment_dataloader`` wrapping ``get_generations`` and the reference pass); ours runs once per iteration in
:meth:`~nemo_aligner.algorithms.iterative.IterativeTrainer.run_rollout` and trains on a pairs dataset, so those two
names raise an error that says what to use.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from nemo_aligner.judges.meta import bradley_terry_elo
from nemo_aligner.judges.parsing import Verdict
from nemo_aligner.models.nlp.gpt.nemo_aligner_api import refused

TRAINER_API = "trainer API"


class NeMoAlignerIterativeAPI:
    """Mixed into :class:`~nemo_aligner.algorithms.iterative.IterativeTrainer` (SPIN and Self-Rewarding)."""

    augment_dataloader = refused(
        "augment_dataloader",
        "generations and their reference log-probs are made once per iteration by trainer.run_rollout() (fit calls "
        "it), and training batches are the pairs of trainer.train_dataloader",
        TRAINER_API,
    )
    get_generations = refused(
        "get_generations",
        "generate with model.generate(prompts, sampling_params, length_params, seeds), or run the iteration's whole "
        "rollout with trainer.run_rollout()",
        TRAINER_API,
    )


class NeMoAlignerSelfRewardingAPI(NeMoAlignerIterativeAPI):
    """Mixed into :class:`~nemo_aligner.algorithms.self_rewarding.SelfRewardingTrainer` (PR #321's names)."""

    def train_single_step_dpo(self, global_batch: dict) -> tuple[float, dict[str, float]]:
        """NeMo-Aligner's name for one preference step on a global batch of pairs: :meth:`train_single_step`."""
        return self.train_single_step(global_batch)

    train_single_step_sft = refused(
        "train_single_step_sft",
        "iteration 0 of model.spin.first_iteration_sft=true trains the SFT loss through train_single_step, on "
        "(ground truth, ground truth) pairs with preference weight 0 and SFT weight 1",
        TRAINER_API,
    )

    @staticmethod
    def get_elo_scores(p: int, N: int, meta_reward_scores: list[Verdict | None]) -> np.ndarray:
        """Elo ratings of ``p`` judgements from the next ``N`` meta-judge verdicts, which are taken off the front of
        ``meta_reward_scores`` (as NeMo-Aligner's does): for each pair ``(a, b)`` of
        ``itertools.combinations(range(p), 2)`` the verdict with ``a`` shown first, then with ``b`` shown first.
        A thin entry to our Bradley-Terry fit :func:`~nemo_aligner.judges.meta.bradley_terry_elo` (NeMo-Aligner
        fitted a logistic regression: other numbers, the same model)."""
        if N % 2:
            raise ValueError(f"get_elo_scores: N={N} must be even (each pair of judgements is compared in both orders)")
        taken: Sequence[Verdict | None] = [meta_reward_scores.pop(0) for _ in range(N)]
        verdicts = []
        for (a, b), first, second in zip(itertools.combinations(range(p), 2), taken[0::2], taken[1::2]):
            verdicts += [(a, b, first), (b, a, second)]
        return bradley_terry_elo(p, verdicts)
