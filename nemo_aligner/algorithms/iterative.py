"""The loop SPIN and Self-Rewarding share: iterations of (rollout, preference epochs), one LR schedule across all.

Per iteration t, with the iteration-start weights (= the reference of iteration t):

1. **Rollout** (:meth:`IterativeTrainer.run_rollout`): the algorithm's :meth:`~IterativeTrainer.generate` hook
   answers the prompts the iteration's steps will draw (and judges them, for Self-Rewarding) and its
   :meth:`~IterativeTrainer.use_rollout` hook turns the result into the iteration's training pairs; with a
   precomputed reference policy the reference log-probs of those pairs are scored here. Everything is persisted
   under ``rollout_dir`` and reused across the iteration's epochs and on resume.
2. **Train** ``max_epochs`` epochs on the pairs (:class:`~nemo_aligner.algorithms.base.BaseTrainer`'s steps).
3. The policy becomes the next iteration's reference (``model.reference.refresh``).

Validation is the plain SFT loss of the held-out set, as NeMo-Aligner's SPIN reports it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_aligner.algorithms.base import BaseTrainer
from nemo_aligner.data.nlp.pairs import SPINPairsDataset, pairs_loader_over_prompts
from nemo_aligner.data.nlp.samplers import FILLER_INDEX
from nemo_aligner.models.nlp.gpt.reference import ReferenceLogprobs, compute_reference_logprobs
from nemo_aligner.utils.config import model_seed
from nemo_aligner.utils.distributed import is_global_rank_zero
from nemo_aligner.utils.exp_manager import PreemptionHandler
from nemo_aligner.utils.kill_points import kill_point
from nemo_aligner.utils.timers import PhaseTimers

logger = logging.getLogger(__name__)

# The iteration's sampler seed: a different epoch order in every iteration, reproducible from model.seed.
ITERATION_SEED_STRIDE = 1_000_003


class IterativeTrainer(BaseTrainer):
    """``max_iterations`` x (rollout, ``max_epochs`` epochs) (module docstring).

    Args (beyond :class:`BaseTrainer`): ``sft_dataset`` (prompts and ground truth, ``prompt_and_answer(i)``),
    ``rollout_dir`` (where rollouts persist), ``seed`` (generation RNG keys).

    Hooks: :meth:`generate` (fill in a rollout), :meth:`use_rollout` (a rollout -> the pairs dataset),
    :meth:`step_metrics` (per-step metrics of the pairs), :meth:`log_samples`.
    """

    pairs_dataset_class = SPINPairsDataset
    rollout_dir_name = "spin_rollouts"

    def __init__(self, *args, sft_dataset=None, rollout_dir: Path | None = None, seed: int | None = None, **kwargs):
        loader = kwargs.get("train_dataloader")
        if sft_dataset is None and loader is not None and not isinstance(loader.dataset, self.pairs_dataset_class):
            # NeMo-Aligner's scripts pass a loader of the prompts' SFT samples: train on pairs drawn the same way.
            sft_dataset = loader.dataset
            kwargs["train_dataloader"] = pairs_loader_over_prompts(loader, self.pairs_dataset_class)
        super().__init__(*args, **kwargs)
        self.sft_dataset = sft_dataset
        if rollout_dir is None and self.ckpt_callback is not None:  # the recipes' place, beside the checkpoints
            rollout_dir = Path(self.ckpt_callback.checkpoint_dir).parent / self.rollout_dir_name
        self.rollout_dir = Path(rollout_dir) if rollout_dir else None
        self.seed = model_seed(self.model.cfg) if seed is None else seed
        self.iteration = 0
        self.base_sampler_seed = self.train_dataloader.batch_sampler.seed
        self.rollout_stats: dict[str, float] = {}
        self.timers = PhaseTimers()

    # ------------------------------------------------------------------ schedule
    @property
    def max_iterations(self) -> int:
        return int(self.cfg.get("max_iterations", 1))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "iteration": self.iteration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.iteration = int(state.get("iteration", 0))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        if self.already_finished():
            return
        self.model.prepare_for_training()
        with self.progress_bar() as progress, PreemptionHandler() as preemption:
            self.evaluate_before_training()
            while self.iteration < self.max_iterations and self.step < self.max_steps:
                self.start_iteration()
                iteration_end = min((self.iteration + 1) * self.steps_per_iteration, self.max_steps)
                stop = self.train_until(iteration_end, progress, preemption)
                self.log(self.timers.pop_metrics(), self.metric_prefix_train)
                if self.step >= iteration_end:
                    self.announce_iteration_end()
                if stop:
                    break
                self.finish_iteration()
        self.finish_evaluation()
        self.model.finish_training()
        if self.logger is not None:
            self.logger.finalize()

    def start_iteration(self) -> None:
        """The iteration's sampler order, KL penalty and rollout (loaded when persisted, else generated now)."""
        sampler = self.train_dataloader.batch_sampler
        sampler.seed = self.base_sampler_seed + self.iteration * ITERATION_SEED_STRIDE
        self.model.set_KL_penalty_by_iteration(self.iteration)
        path = self.rollout_dir / f"iteration_{self.iteration}.pt" if self.rollout_dir else None
        if path is not None and path.is_file():
            rollout = torch.load(path, map_location="cpu", weights_only=True)
            logger.info("Iteration %d/%d: reusing the persisted rollout %s", *self.iteration_of(), path)
        else:
            logger.info("Iteration %d/%d: rollout started (%s)", *self.iteration_of(), self.rollout_dir_name)
            with self.timers("rollout"):
                rollout = self.run_rollout()
            logger.info("Iteration %d/%d: rollout done in %.1f s", *self.iteration_of(), self.timers.seconds["rollout"])
            if path is not None and is_global_rank_zero():
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(rollout, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
            if dist.is_initialized():
                dist.barrier()
        self.use_rollout(rollout)
        self.activate_rollout(rollout)

    def iteration_of(self) -> tuple[int, int]:
        """(this iteration counted from 1, the number of iterations): how the log names it."""
        return self.iteration + 1, self.max_iterations

    def announce_iteration_end(self) -> None:
        """Log the iteration's end (with its held-out evaluation when enabled)."""
        metrics = self.run_evaluation(f"iteration {self.iteration + 1}")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        logger.info("Iteration %d/%d done at step %d%s", *self.iteration_of(), self.step, f": {shown}" if shown else "")

    def finish_iteration(self) -> None:
        """The policy becomes the reference; the next iteration starts at the beginning of its data."""
        self.iteration += 1
        self.consumed_samples = 0
        self.model.reference.refresh(self.model)
        kill_point("before_iteration_end")
        if self.ckpt_callback is not None and self.iteration < self.max_iterations and self.step < self.max_steps:
            self.save()

    # ------------------------------------------------------------------ rollout
    def needed_indices(self) -> list[int]:
        """Sample indices that this iteration's training steps will draw (only these are generated)."""
        sampler = self.train_dataloader.batch_sampler
        remaining = min(self.steps_per_iteration, self.max_steps - self.iteration * self.steps_per_iteration)
        needed: set[int] = set()
        epoch = 0
        while remaining > 0:
            order = sampler.epoch_order(epoch)
            for step in range(min(self.steps_per_epoch, remaining)):
                needed.update(i for i in sampler.global_batch(order, step) if i != FILLER_INDEX)
            remaining -= self.steps_per_epoch
            epoch += 1
        return sorted(needed)

    @torch.no_grad()
    def run_rollout(self) -> dict[str, Any]:
        """With the iteration-start weights (Adam's moments offloaded): :meth:`generate`, the pairs, and with a
        precomputed reference their reference log-probs; back to training mode."""
        self.model.offload_adam_states()
        self.model.eval()
        rollout: dict[str, Any] = {"iteration": self.iteration, "indices": self.needed_indices()}
        self.generate(rollout)
        self.use_rollout(rollout)
        if self.model.reference.precomputed:
            with self.timers("reference"):
                rollout["reference"] = self.score_reference(rollout).state()
        self.model.train()
        self.model.onload_adam_states()
        return rollout

    def generate(self, rollout: dict[str, Any]) -> None:
        """Fill ``rollout`` (``iteration``, ``indices`` given) with what this algorithm generated."""
        raise NotImplementedError

    def use_rollout(self, rollout: Mapping[str, Any]) -> None:
        """Load ``rollout`` into the pairs dataset; set ``rollout_stats``."""
        raise NotImplementedError

    def score_reference(self, rollout: Mapping[str, Any]) -> ReferenceLogprobs:
        """The reference log-probs of every pair the rollout built (a forward over all of them)."""
        return compute_reference_logprobs(self.model, self.scoring_batches())

    def scoring_batches(self) -> Iterable[dict]:
        """This rank's share of all generated pairs, in batches of ``log_prob_forward_micro_batch_size``."""
        dataset = self.train_dataloader.dataset
        indices = sorted(dataset.generated)
        dp_size = parallel_state.get_data_parallel_world_size()
        per_rank = self.model.log_prob_micro_batch_size
        step = per_rank * dp_size
        start = parallel_state.get_data_parallel_rank() * per_rank
        collate = self.train_dataloader.collate_fn
        for offset in range(0, len(indices), step):
            chunk = indices[offset : offset + step]
            chunk = chunk + [FILLER_INDEX] * (step - len(chunk))
            yield collate([dataset[i] for i in chunk[start : start + per_rank]])

    def activate_rollout(self, rollout: Mapping[str, Any]) -> None:
        """The rollout's reference log-probs become the training reference; its statistics and samples are logged."""
        if "reference" in rollout:
            self.model.reference.set_table("train", ReferenceLogprobs.from_state(rollout["reference"]))
        if self.consumed_samples == 0:  # logged once, when the iteration starts (not again by a resumed run)
            self.log(self.rollout_stats, self.metric_prefix_train)
            self.log_samples(rollout)

    def log_samples(self, rollout: Mapping[str, Any]) -> None:
        """Log a few of the rollout's samples as a table."""

    # ------------------------------------------------------------------ steps
    def prepare_batch(self, batch: dict, training: bool) -> dict:
        if training and self.model.reference.precomputed:
            return self.model.reference.attach(batch, "train")
        return batch

    def train_single_step(self, batch: dict) -> dict[str, float]:
        with self.timers("train"):
            metrics = super().train_single_step(batch)
        return {**metrics, **self.step_metrics(batch)}

    def step_metrics(self, batch: dict) -> dict[str, float]:
        """Metrics of the step's pairs beyond the loss's (of the global batch, not this rank's share)."""
        return {}

    def run_validation(self) -> dict[str, float]:
        """The plain SFT loss of the validation set (no generation), as NeMo-Aligner's SPIN reports it."""
        if not self.val_dataloader or self.val_batches == 0:
            return {}
        self.model.prepare_for_validation_step()
        total = tokens = 0.0
        for index, batch in enumerate(self.val_dataloader):
            if index >= self.val_batches:
                break
            loss, metrics = self.model.get_loss_and_metrics_vanilla_sft(batch, forward_only=True)
            kill_point("validation")
            total += loss * metrics["num_tokens"]
            tokens += metrics["num_tokens"]
        self.model.finish_validation_step()
        return {"loss": total / max(tokens, 1.0)}
