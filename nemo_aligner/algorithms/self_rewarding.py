"""Self-Rewarding (Yuan et al. 2024, arXiv 2401.10020) and Meta-Rewarding (Wu et al. 2024, arXiv 2407.19594).

The iterative loop SPIN uses (:class:`~nemo_aligner.algorithms.iterative.IterativeTrainer`: iterations of rollout +
preference epochs, one LR schedule, persisted rollouts, precomputed reference log-probs, resume) with a judged
rollout (``nemo_aligner/judges/rollout.py``). Per iteration t,
with the iteration-start weights:

1. **Responses**: ``num_responses_to_gen`` (N) sampled responses per prompt, each keyed by (seed, t, sample, r).
2. **Judgements**: the same model judges every response ``num_evals_to_average`` (k) times with
   ``llm_judge_prompt`` (rendered on the chat-template-free prompt and response, wrapped in the chat template as
   a user turn); scores come from ``judge_reward_regex`` and are valid in ``[judge_score_low, judge_score_high]``;
   a response's score is the mean of its valid judgements.
3. **Pairs** (``nemo_aligner.judges.select_pair``): chosen/rejected with length control rho =
   ``length_control[t]``. A bad sample (fewer than two scored responses, all scores equal, identical chosen and
   rejected) is masked and counted; with ``trainer.self_rewarding.mask_unfinished_generations`` a pair whose chosen
   or rejected response never ended is masked too and counted as a bad end.
4. **Meta-judge** (``use_meta_judge``): for each prompt, the response whose judgements disagree most; its k
   judgements are compared pairwise in both orders with ``llm_meta_judge_prompt``, ranked by a Bradley-Terry fit,
   and (best, worst) judgement becomes a judge-training pair (prompt = the judge prompt). In every global batch of
   the iteration's first epoch, ``select_meta_judge_pairs`` picks at most ``meta_judge_pcnt`` x GBS of them (none
   when <= 0), capped per score class by ``meta_max_relative_pcnt``; they replace the batch's bad samples first,
   then its last pairs. Their ground-truth rewards (for ``rpo_*``/``scale`` losses) are the judgements'
   Bradley-Terry strengths; a response pair's are its judge scores.
5. **Train** ``max_epochs`` epochs with the preference loss of ``model.spin.preference_loss``; then the policy
   becomes the reference AND the optimizer moments are reset (each iteration is a fresh DPO run, as in the papers).

``first_iteration_sft``: iteration 0 generates nothing and trains the plain SFT loss on the ground truth (pairs
chosen = rejected = ground truth with preference weight 0 and SFT weight 1: the DPO term of identical sides has no
gradient), as the papers start from an SFT model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from megatron.core import parallel_state
from omegaconf import ListConfig, OmegaConf

from nemo_aligner.algorithms.iterative import IterativeTrainer
from nemo_aligner.data.nlp.pairs import SFT, TRAINED_KINDS, SelfRewardingPairsDataset
from nemo_aligner.data.nlp.samplers import FILLER_INDEX
from nemo_aligner.judges import length_control_for_iteration
from nemo_aligner.judges.rollout import JudgeConfig, JudgedRollout, batch_metrics, build_pairs, judge_health, slot
from nemo_aligner.utils.distributed import all_gather_data_parallel, union_over_data_parallel
from nemo_aligner.utils.optimizer_state import restart_adam

logger = logging.getLogger(__name__)


class SelfRewardingTrainer(IterativeTrainer):
    """The iterative loop with the Self-Rewarding / Meta-Rewarding rollout (module docstring);
    ``chat_prompt_tokens`` are the policy's ``model.data.chat_prompt_tokens`` (judge prompts are user turns in that
    template)."""

    pairs_dataset_class = SelfRewardingPairsDataset
    rollout_dir_name = "self_rewarding_rollouts"

    def __init__(self, *args, chat_prompt_tokens: Mapping[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        spin = self.model.spin_config
        self.judge_cfg = JudgeConfig.from_config(spin)
        if chat_prompt_tokens is None:  # NeMo-Aligner's scripts pass none: the model's own template
            chat_prompt_tokens = self.model.cfg.get("data", {}).get("chat_prompt_tokens")
        self.chat_prompt_tokens = dict(chat_prompt_tokens or {})
        self.loss_weights = (self.model.preference_loss_weight, self.model.sft_loss_weight)
        self.first_iteration_sft = bool(spin.get("first_iteration_sft", False))
        length_control = spin.get("length_control", 0.0)
        if isinstance(length_control, ListConfig):
            length_control = list(length_control)
        self.length_control = length_control

    def start_iteration(self) -> None:
        sft = self.first_iteration_sft and self.iteration == 0
        self.model.preference_loss_weight, self.model.sft_loss_weight = (0.0, 1.0) if sft else self.loss_weights
        super().start_iteration()

    def finish_iteration(self) -> None:
        """The reference refresh, plus an optimizer restart: each iteration starts a fresh run."""
        restart_adam(self.optimizer)
        super().finish_iteration()

    def _global_batches(self) -> list[list[int]]:
        """Sample indices of the iteration's first-epoch global batches, in training order."""
        sampler = self.train_dataloader.batch_sampler
        steps = min(self.steps_per_epoch, self.max_steps - self.iteration * self.steps_per_iteration)
        order = sampler.epoch_order(0)
        return [[i for i in sampler.global_batch(order, s) if i != FILLER_INDEX] for s in range(steps)]

    def generate(self, rollout: dict[str, Any]) -> None:
        """N responses per prompt judged by the model itself (``judges/rollout.py``), or the ground truth as SFT
        pairs in a ``first_iteration_sft`` iteration 0: ``records``, ``stats`` and the batches' ``slots``."""
        spin = self.model.spin_config
        indices = rollout["indices"]
        prompts = {i: list(self.sft_dataset.prompt_and_answer(i)[0]) for i in indices}
        if self.first_iteration_sft and self.iteration == 0:
            slots = {}
            for i in indices:
                answer = list(self.sft_dataset.prompt_and_answer(i)[1])
                slots[i] = slot(prompts[i], answer, answer, 0.0, 0.0, SFT)
            rollout.update(records={}, stats={})
        else:
            dp_rank = parallel_state.get_data_parallel_rank()
            dp_size = parallel_state.get_data_parallel_world_size()
            context = int(self.model.cfg.encoder_seq_length)
            judged = JudgedRollout(self.model, spin, self.chat_prompt_tokens, context, timers=self.timers)
            mine = {i: prompts[i] for i in indices[dp_rank::dp_size]}
            judge = judged.judge(mine, self.iteration, self.seed, int(spin.rollout_micro_batch_size))
            records = union_over_data_parallel(judge)
            rho = length_control_for_iteration(self.length_control, self.iteration, self.max_iterations)
            mask_unfinished = bool(self.cfg.get("mask_unfinished_generations", True))
            slots = build_pairs(
                records, prompts, self._global_batches(), self.judge_cfg, rho, mask_unfinished, self.seed
            )
            rollout.update(records=records, stats={**judge_health(records, self.judge_cfg), "length_control": rho})
        rollout["slots"] = slots

    def use_rollout(self, rollout: Mapping[str, Any]) -> None:
        """The rollout's slots become the pairs dataset; the judge's health its statistics."""
        dataset = self.train_dataloader.dataset
        dataset.generated = {int(i): dict(s) for i, s in rollout["slots"].items()}
        self.rollout_stats = dict(rollout.get("stats", {}))

    def log_samples(self, rollout: Mapping[str, Any], count: int = 4) -> None:
        """Prompt / chosen / rejected of the first ``count`` trained pairs (table ``train/pairs``)."""
        if self.logger is None:
            return
        rows = self.pair_rows(count)
        self.logger.log_table("train/pairs", ["kind", "prompt", "chosen", "rejected"], rows, step=self.step)

    def pair_rows(self, count: int) -> list[list[str]]:
        text = self.model.tokenizer.ids_to_text
        slots = [s for _, s in sorted(self.train_dataloader.dataset.generated.items()) if s["kind"] in TRAINED_KINDS]
        return [[s["kind"], text(s["prompt"]), text(s["chosen"]), text(s["rejected"])] for s in slots[:count]]

    def step_metrics(self, batch: dict) -> dict[str, float]:
        """Lengths and judge rewards of the step's trained pairs, bad samples and bad ends per global batch."""
        generated = self.train_dataloader.dataset.generated
        indices = all_gather_data_parallel(batch["sample_index"])  # the global batch, not this rank's share
        return batch_metrics([generated[int(i)] for i in indices if int(i) != FILLER_INDEX])

    def evaluation_judge(self, prompts: Mapping[int, list[int]], responses: Mapping[int, list[int]]) -> dict:
        """The held-out evaluation's judge score of each response: the model judges it ``num_evals_to_average``
        times with the rollouts' judge prompt and regex; the mean of the valid scores (None when none is valid)."""
        spin = {**OmegaConf.to_container(self.model.spin_config, resolve=True), "num_responses_to_gen": 1}
        context = int(self.model.cfg.encoder_seq_length)
        judged = JudgedRollout(self.model, spin, self.chat_prompt_tokens, context)
        records = {i: {"responses": [list(ids)], "ended": [True]} for i, ids in responses.items()}
        judged.judge_responses(list(records), prompts, records, iteration=0, seed=self.seed)
        scores = {i: [s for s in record["scores"][0] if s is not None] for i, record in records.items()}
        return {i: sum(valid) / len(valid) if valid else None for i, valid in scores.items()}

    def run_validation(self) -> dict[str, float]:
        """The SFT validation loss, plus a table of prompt / chosen / rejected (``val/pairs``)."""
        metrics = super().run_validation()
        if self.logger is not None and self.train_dataloader.dataset.generated:
            self.logger.log_table(
                "val/pairs", ["kind", "prompt", "chosen", "rejected"], self.pair_rows(4), step=self.step
            )
        return metrics
