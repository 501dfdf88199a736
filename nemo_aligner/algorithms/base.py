"""The training-loop skeleton every algorithm shares: steps, epochs, validation, checkpoints, stopping.

Read :meth:`BaseTrainer.fit` top to bottom: it is the whole loop. Algorithms subclass and change only what
differs (SFT and DPO: nothing but names; SPIN and Self-Rewarding wrap ``fit`` in iterations with a rollout
phase). The math lives in the model (``get_loss_and_metrics``); the loop never computes a loss.

Bookkeeping: ``step`` counts optimizer steps over the whole run, ``consumed_samples`` is the position in the
data (global batches handed out, in samples; it jumps to the next epoch's start when ``limit_train_batches``
ends an epoch early), and ``epoch`` follows from it. All three are stored in every trainer checkpoint, so a
resumed run continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nemo_aligner.checkpoint.trainer_checkpoint import load_checkpoint
from nemo_aligner.utils.distributed import is_global_rank_zero
from nemo_aligner.utils.exp_manager import PreemptionHandler, RunTimer
from nemo_aligner.utils.health import NonFiniteGuard, agree_any, step_health_metrics
from nemo_aligner.utils.kill_points import kill_point
from nemo_aligner.utils.timers import mark_event
from nemo_aligner.utils.utils import release_freed_memory

logger = logging.getLogger(__name__)

# The distributed optimizer's state is saved in a layout-independent form, so a run resumes at any TP/PP/DP.
OPTIMIZER_CHECKPOINT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# Key of a trainer state that names the checkpoint it was read from (train_script_utils' resume entries).
RESUME_PATH_KEY = "resume_path"


def limited(total: int, limit: float | int | None) -> int:
    """``limit_*_batches``: a float in [0, 1] is a fraction of ``total``, an int a count (NeMo semantics)."""
    if limit is None:
        return total
    if isinstance(limit, float) and limit <= 1.0:
        return int(math.floor(total * limit)) if limit < 1.0 else total
    return min(total, int(limit))


def epoch_steps(cfg: Mapping[str, Any], full_epoch_steps: int) -> int:
    """Optimizer steps per epoch: the sampler's, limited by ``limit_train_batches``."""
    return max(limited(full_epoch_steps, cfg.get("limit_train_batches", 1.0)), 1)


def planned_max_steps(cfg: Mapping[str, Any], steps_per_epoch: int) -> int:
    """The run's number of optimizer steps (the LR schedule spans it): ``max_iterations`` (else 1) x ``max_epochs``
    x ``steps_per_epoch``, capped by ``max_steps``."""
    by_epochs = int(cfg.get("max_iterations", 1)) * int(cfg.get("max_epochs", 1)) * steps_per_epoch
    max_steps = int(cfg.get("max_steps", -1) or -1)
    return by_epochs if max_steps < 0 else min(max_steps, by_epochs)


class BaseTrainer:
    """Epoch/step loop with validation, checkpointing, preemption and time limits.

    Args:
        cfg: the loop settings (``trainer.<algorithm>``: max_epochs, max_steps, val_check_interval, save_interval,
            limit_train_batches, limit_val_batches, gradient_clip_val).
        model: a ``SupervisedInterface`` model.
        train_dataloader, val_dataloader: dataloaders whose ``batch_sampler`` yields this rank's share of a
            global batch per step (``nemo_aligner.data.nlp.samplers``).
        optimizer, scheduler: megatron-core optimizer and ``OptimizerParamScheduler``; built after the loop
            (``nemo_aligner.recipes.common.assemble``), since the schedule spans the loop's ``max_steps``.
        logger: ``CustomLoggerWrapper``; ckpt_callback: ``CheckpointCallback``; run_timer: ``RunTimer``.
    """

    metric_prefix_train = "train/"
    metric_prefix_val = "val/"

    def __init__(
        self,
        cfg: Mapping[str, Any],
        model,
        *,
        train_dataloader,
        val_dataloader,
        optimizer=None,
        scheduler=None,
        test_dataloader=None,
        logger=None,
        ckpt_callback=None,
        run_timer: RunTimer | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_dataloader = train_dataloader
        self.val_dataloader = val_dataloader
        self.test_dataloader = test_dataloader
        self.logger = logger
        self.ckpt_callback = ckpt_callback
        if ckpt_callback is not None and ckpt_callback.state_fn is None:
            ckpt_callback.state_fn = self.checkpoint_state  # made before the loop (add_custom_checkpoint_callback)
        self.run_timer = run_timer or RunTimer(None)

        self.step = 0
        self.consumed_samples = 0
        sampler = train_dataloader.batch_sampler
        self.global_batch_size = sampler.global_batch_size
        self.full_epoch_steps = sampler.steps_per_epoch
        self.steps_per_epoch = epoch_steps(cfg, self.full_epoch_steps)
        self.max_steps = planned_max_steps(cfg, self.steps_per_epoch)
        self.val_check_interval = self._compute_interval(cfg.get("val_check_interval", 1.0))
        self.save_interval = int(cfg.get("save_interval") or self.val_check_interval)
        self.val_batches = limited(len(val_dataloader), cfg.get("limit_val_batches", 1.0)) if val_dataloader else 0
        self.last_val_metrics: dict[str, float] = {}
        self.health = NonFiniteGuard.from_config(cfg)
        # Held-out generation evaluation (trainer.<algorithm>.evaluation; set by the recipe when enabled).
        self.evaluator = None  # nemo_aligner.evaluation.GenerationEvaluator
        self.evaluation_report = None  # nemo_aligner.evaluation.EvaluationReport

    # ------------------------------------------------------------------ schedule
    @property
    def steps_per_iteration(self) -> int:
        """``max_epochs`` x steps per epoch (the whole run, unless iterations repeat it: SPIN, Self-Rewarding)."""
        return int(self.cfg.get("max_epochs", 1)) * self.steps_per_epoch

    def _compute_interval(self, value: float | int) -> int:
        """An int counts steps; a float in (0, 1] is a fraction of an epoch (NeMo's val_check_interval)."""
        if isinstance(value, float) and value <= 1.0:
            return max(int(self.steps_per_epoch * value), 1)
        return max(int(value), 1)

    @property
    def epoch(self) -> int:
        return self.consumed_samples // (self.full_epoch_steps * self.global_batch_size)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "consumed_samples": self.consumed_samples, "epoch": self.epoch}
        return {**state, **self.health.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loop counters; a state from ``retrieve_custom_trainer_state_dict`` (NeMo-Aligner's resume) names its
        checkpoint, and the whole checkpoint (weights, optimizer, schedule, counters) is restored from it."""
        if RESUME_PATH_KEY in state:
            self.resume_from(Path(state[RESUME_PATH_KEY]))
            return
        self.step = int(state["step"])
        self.consumed_samples = int(state["consumed_samples"])
        self.health.load_state_dict(state)

    def checkpoint_state(self) -> tuple[dict, dict]:
        """(sharded state dict of model + optimizer + schedule, trainer state) for the checkpoint callback."""
        model_state = self.model.sharded_state_dict()
        sharded = {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_CHECKPOINT_METADATA),
            "lr_scheduler": self.scheduler.state_dict(),
        }
        return sharded, {**self.state_dict(), **self.model.get_trainer_state()}

    def resume_from(self, path) -> None:
        """Restore model, optimizer, schedule, RNG and loop state from a trainer checkpoint."""
        model_state = self.model.sharded_state_dict()
        sharded = {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(
                model_state, is_loading=True, metadata=OPTIMIZER_CHECKPOINT_METADATA
            ),
            "lr_scheduler": self.scheduler.state_dict(),
        }
        state, trainer_state = load_checkpoint(path, sharded)
        self.model.load_model_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.load_state_dict(trainer_state)
        logger.info("Resumed at step %d (consumed_samples=%d) from %s", self.step, self.consumed_samples, path)

    # ------------------------------------------------------------------ steps
    def prepare_batch(self, batch: dict, training: bool) -> dict:
        """Hook for algorithms that add to each batch (e.g. precomputed reference log-probs)."""
        return batch

    def train_single_step(self, batch: dict) -> tuple[float, dict[str, float]]:
        """One optimizer step on a global batch: ``(loss, metrics)``, as NeMo-Aligner's trainers return it."""
        self.model.prepare_for_training_step()
        loss, metrics = self.model.get_loss_and_metrics(batch=self.prepare_batch(batch, True), forward_only=False)
        self.model.finish_training_step()
        kill_point("after_backward")
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        # megatron's optimizer step; a non-finite loss or gradient norm on any rank stops the run or skips the update
        updated, grad_norm = self.health.optimizer_step(self.optimizer, metrics.get("loss", loss), self.step + 1)
        if updated:
            self.scheduler.step(increment=1)
        kill_point("after_optimizer_step")
        health = step_health_metrics(self.health, batch)
        return loss, {**metrics, "grad_norm": float(grad_norm or 0.0), "lr": lr, **health}

    def validation_step(self, batch: dict) -> tuple[float, dict[str, float]]:
        """``(loss, metrics)`` of one validation batch, in evaluation mode (NeMo-Aligner's step method)."""
        self.model.prepare_for_validation_step()
        loss, metrics = self.model.get_loss_and_metrics(batch=self.prepare_batch(batch, False), forward_only=True)
        self.model.finish_validation_step()
        return loss, metrics

    def run_validation(self) -> dict[str, float]:
        """Metrics over the validation set, each a mean weighted by the batch's ``num_tokens``/``num_pairs``."""
        if not self.val_dataloader or self.val_batches == 0:
            return {}
        sums: dict[str, float] = {}
        total_weight = 0.0
        for index, batch in enumerate(self.val_dataloader):
            if index >= self.val_batches:
                break
            _, metrics = self.validation_step(batch)
            kill_point("validation")
            weight = float(metrics.get("num_tokens", metrics.get("num_pairs", 1.0)))
            total_weight += weight
            for key, value in metrics.items():
                if key not in ("num_tokens", "num_pairs"):
                    sums[key] = sums.get(key, 0.0) + float(value) * weight
        return {key: value / max(total_weight, 1e-12) for key, value in sums.items()}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        """Train until ``max_steps``, validating and saving on schedule; stop cleanly on SIGTERM or time-out."""
        if self.already_finished():
            return
        self.model.prepare_for_training()
        with self.progress_bar() as progress, PreemptionHandler() as preemption:
            self.evaluate_before_training()
            self.train_until(self.max_steps, progress, preemption)
        mark_event("training_done")
        self.finish_evaluation()
        self.model.finish_training()
        if self.logger is not None:
            self.logger.finalize()

    def already_finished(self) -> bool:
        """A rerun of a finished run (resumed at its last step) says so instead of drawing a full progress bar."""
        if self.step < self.max_steps:
            return False
        logger.info(
            "This run is already finished: resumed at step %d of max_steps=%d; nothing to train. Raise max_steps "
            "(or max_epochs) to train further, or use another exp_manager.explicit_log_dir for a new run.",
            self.step,
            self.max_steps,
        )
        return True

    def progress_bar(self):
        return tqdm(total=self.max_steps, initial=self.step, desc="train", disable=not is_global_rank_zero())

    def train_until(self, stop_step: int, progress, preemption: PreemptionHandler) -> bool:
        """Epochs until ``step == stop_step``; returns True when the whole run must stop (done, SIGTERM, time-out)."""
        while self.step < stop_step:
            if self.run_epoch(progress, preemption, stop_step):
                return True
        return self.step >= self.max_steps

    def run_epoch(self, progress, preemption: PreemptionHandler, stop_step: int) -> bool:
        """The rest of the current epoch (or until ``stop_step``); returns True when the run must stop."""
        epoch = self.epoch
        epoch_samples = self.full_epoch_steps * self.global_batch_size
        steps_done_in_epoch = (self.consumed_samples - epoch * epoch_samples) // self.global_batch_size
        sampler = self.train_dataloader.batch_sampler
        sampler.consumed_samples = self.consumed_samples
        for batch in self.train_dataloader:
            if steps_done_in_epoch >= self.steps_per_epoch:
                break
            mark_event("first_step")
            start = time.monotonic()
            _, metrics = self.train_single_step(batch)
            step_seconds = time.monotonic() - start
            self.step += 1
            self.consumed_samples += self.global_batch_size
            steps_done_in_epoch += 1
            kill_point("after_step", self.step)
            self.log({**metrics, **self.progress_metrics(step_seconds)}, self.metric_prefix_train)
            progress.update(1)
            progress.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "acc", "lr")})
            if self.after_step(preemption, is_last=self.step >= self.max_steps):
                return True
            if self.step >= stop_step:
                return False
        # Epoch done, or cut short by limit_train_batches: the next one starts at its own first batch.
        self.consumed_samples = (epoch + 1) * epoch_samples
        return False

    def after_step(self, preemption: PreemptionHandler, is_last: bool) -> bool:
        """Validate and save on schedule; returns True when the run must stop now."""
        stop = agree_any(preemption.received or self.run_timer.is_finished())
        if is_last:
            release_freed_memory()  # the loop's freed memory: not resident under the end of the run's work
        if self.step % self.val_check_interval == 0 or is_last:
            start = time.monotonic()
            self.last_val_metrics = self.run_validation()
            if self.last_val_metrics:
                timing = {"validation_step_time": time.monotonic() - start}
                self.log({**self.last_val_metrics, **timing}, self.metric_prefix_val)
            self.last_val_metrics.update(self.run_evaluation(f"step {self.step}"))
        if self.ckpt_callback is not None and (self.step % self.save_interval == 0 or is_last or stop):
            self.save(is_train_end=is_last)
        return stop or is_last

    # ------------------------------------------------------------------ held-out generation evaluation
    evaluation_judge = None
    """Scores the evaluation's responses (``nemo_aligner.evaluation.Judge``): Self-Rewarding's own judge."""

    def evaluate_before_training(self) -> None:
        """The report of a fresh run starts with the initial model's metrics; a resumed run's keeps its entries."""
        if self.evaluator is None:
            return
        self.evaluation_report.resume(self.step)
        if self.step == 0:
            self.run_evaluation("start")

    def run_evaluation(self, label: str) -> dict[str, float]:
        """Held-out generation metrics of the current weights, logged as ``val/<metric>`` and added to the report
        (once per step: a validation and an iteration end at the same step share one); {} when disabled."""
        if self.evaluator is None:
            return {}
        metrics = self.evaluation_report.latest(self.step)
        if metrics is None:
            started = time.perf_counter()
            metrics = self.evaluator.evaluate(self.model, judge=self.evaluation_judge)
            seconds = time.perf_counter() - started  # its cost, a wall-clock phase timer like the rollout's
            self.log(metrics, self.metric_prefix_val)
            self.log({"timers/evaluation_s": seconds}, self.metric_prefix_train)
            where = {"epoch": self.epoch, "iteration": getattr(self, "iteration", 0), "seconds": seconds}
            self.evaluation_report.record(self.step, label, metrics, **where)
        else:
            self.evaluation_report.record(self.step, label, metrics)
        return metrics

    def finish_evaluation(self) -> None:
        """The last evaluation of a finished run is marked as its end (not that of a run stopped early)."""
        if self.evaluator is not None and self.step >= self.max_steps:
            self.evaluation_report.finish()

    def save(self, extra_candidates: Mapping[str, Any] | None = None, is_train_end: bool = False) -> None:
        """A checkpoint now; ``extra_candidates`` add to the values its name and ``monitor`` read (NeMo-Aligner's
        signature)."""
        candidates = {
            **{f"val_{k}": v for k, v in self.last_val_metrics.items()},
            **(extra_candidates or {}),
            **self.state_dict(),
        }
        self.ckpt_callback.custom_save(monitor_candidates=candidates, is_train_end=is_train_end)

    def progress_metrics(self, step_seconds: float) -> dict[str, float]:
        """Logged with every step as NeMo-Aligner does: ``consumed_samples``, ``step_time`` (seconds), ``epoch``."""
        return {"consumed_samples": self.consumed_samples, "step_time": step_seconds, "epoch": self.epoch}

    def log(self, metrics: Mapping[str, float], prefix: str) -> None:
        if self.logger is not None and metrics:
            self.logger.log_metrics(metrics, step=self.step, prefix=prefix)
