"""SPIN training loop: iterations of (rollout phase, preference epochs), one LR schedule across all of them.

Per iteration t (Chen et al. 2024, arXiv 2401.01335):

1. **Rollout** with the iteration-start weights (= the reference of iteration t): generate one response for every
   prompt the iteration's steps will draw (KV cache, ``model.spin.sampling_params``/``length_params``, randomness
   keyed by (seed, iteration, sample index)), then take the reference log-probs of the ground-truth ("actual")
   and generated responses. The generated responses' values come from generation itself
   (``model.spin.reference_from_generation``, default): generation runs with the reference weights and records
   each token's log-probability under the model's raw distribution, so only the ground truth needs a forward.
   Everything is persisted under ``<log_dir>/spin_rollouts/`` and reused across the iteration's epochs and on
   resume.
2. **Train** ``trainer.spin.max_epochs`` epochs on (chosen = actual, rejected = generated) pairs with
   beta = ``ref_policy_kl_penalty[t]``.
3. The policy becomes the next iteration's reference.

Rollout rules (docs/spin.md): generated responses are scored as the token ids that were generated, never
re-tokenised; pairs whose generated ids equal the ground truth carry no signal and are masked (counted);
generations that never produced an end token are masked by default (``trainer.spin.mask_unfinished_generations``)
and counted; ``rollout_micro_batch_size`` is the generation batch per data-parallel rank. With
``trainer.spin.mix_previous_generations`` iteration t also trains on iteration t-1's generations, as the paper
does (off by default; NeMo-Aligner never did).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from nemo_aligner.algorithms.base import BaseTrainer
from nemo_aligner.algorithms.dpo import ReferenceLogprobs, compute_reference_logprobs, gather_reference_logprobs
from nemo_aligner.data.nlp.dpo_dataset import DPOCollate, filler_pair_item
from nemo_aligner.data.nlp.samplers import FILLER_INDEX, GlobalBatchSampler
from nemo_aligner.utils.distributed import all_gather_data_parallel, is_global_rank_zero
from nemo_aligner.utils.exp_manager import PreemptionHandler
from nemo_aligner.utils.kill_points import kill_point
from nemo_aligner.utils.timers import PhaseTimers
from nemo_aligner.utils.utils import retrieve_model_state_dict_in_cpu

logger = logging.getLogger(__name__)

# The iteration's sampler seed: a different epoch order in every iteration, reproducible from model.seed.
ITERATION_SEED_STRIDE = 1_000_003


def sample_seed(seed: int, iteration: int, sample_index: int) -> int:
    """The generation RNG key of one sample: the same whatever the batch, data-parallel size or resume point."""
    return (seed * 1_000_003 + iteration * 7_919 + sample_index * 104_729) % (2**63 - 1)


class SPINPairsDataset(Dataset):
    """Pairs (prompt + actual, prompt + generated) of one iteration, indexed like the SFT dataset.

    Index ``N + i`` is prompt i's pair with iteration t-1's generation (``mix_previous_generations``); when that
    iteration did not generate for prompt i, the pair is masked out.
    """

    def __init__(self, sft_dataset, pad_id: int):
        self.sft_dataset = sft_dataset
        self.pad_id = pad_id
        self.generated: dict[int, tuple[list[int], bool]] = {}

    def __len__(self) -> int:
        return len(self.sft_dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index == FILLER_INDEX:
            return filler_pair_item(self.pad_id)
        prompt, actual = self.sft_dataset.prompt_and_answer(index % len(self.sft_dataset))
        generated, valid = self.generated.get(index, (list(actual), False))
        prompt, actual = list(prompt), list(actual)
        return {
            "chosen_ids": torch.tensor(prompt + actual, device="cpu"),
            "rejected_ids": torch.tensor(prompt + list(generated), device="cpu"),
            "prompt_length": len(prompt),
            "chosen_length": len(prompt) + len(actual),
            "rejected_length": len(prompt) + len(generated),
            "chosen_reward": 1.0,
            "rejected_reward": 0.0,
            "sample_index": index,
            "valid": valid,
        }


class SPINBatchSampler(GlobalBatchSampler):
    """The training sampler; with ``mix_previous`` each drawn prompt i also brings its pair with the previous
    iteration's generation (index N + i), so iteration t trains on the generations of t and t-1 (Chen et al.)
    with the same number of steps."""

    mix_previous = False

    def __iter__(self) -> Iterator[list[int]]:
        size = self.total_samples
        for share in super().__iter__():
            yield share + [i + size if i != FILLER_INDEX else i for i in share] if self.mix_previous else share


spin_custom_collate = DPOCollate
"""Collates SPIN pairs (actual = chosen, generated = rejected) into one batch (NeMo-Aligner's name)."""


class SPINTrainer(BaseTrainer):
    """``max_iterations`` x (rollout, ``max_epochs`` epochs); validation is the SFT loss on held-out data.

    Args (beyond :class:`BaseTrainer`): ``sft_dataset`` (prompts and ground truth, ``prompt_and_answer(i)``),
    ``rollout_dir`` (where rollouts persist), ``seed``.
    """

    def __init__(self, *args, sft_dataset=None, rollout_dir: Path | None = None, seed: int = 1234, **kwargs):
        super().__init__(*args, **kwargs)
        self.sft_dataset = sft_dataset
        self.rollout_dir = Path(rollout_dir) if rollout_dir else None
        self.seed = seed
        self.iteration = 0
        self.base_sampler_seed = self.train_dataloader.batch_sampler.seed
        self.reference: ReferenceLogprobs | None = None
        self.rollout_stats: dict[str, float] = {}
        self.timers = PhaseTimers()

    # ------------------------------------------------------------------ schedule
    @property
    def max_iterations(self) -> int:
        return int(self.cfg.get("max_iterations", 1))

    @property
    def steps_per_iteration(self) -> int:
        return int(self.cfg.get("max_epochs", 1)) * self.steps_per_epoch

    def _compute_max_steps(self) -> int:
        total = int(self.cfg.get("max_iterations", 1)) * int(self.cfg.get("max_epochs", 1)) * self.steps_per_epoch
        max_steps = int(self.cfg.get("max_steps", -1) or -1)
        return total if max_steps < 0 else min(max_steps, total)

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
            while self.iteration < self.max_iterations and self.step < self.max_steps:
                self.start_iteration()
                iteration_end = min((self.iteration + 1) * self.steps_per_iteration, self.max_steps)
                stop = self.train_until(iteration_end, progress, preemption)
                self.log(self.timers.pop_metrics(), self.metric_prefix_train)
                if stop:
                    break
                self.finish_iteration()
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
            logger.info("Iteration %d: reusing the persisted rollout %s", self.iteration, path)
        else:
            with self.timers("rollout"):
                rollout = self.run_rollout()
            if path is not None and is_global_rank_zero():
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(rollout, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
            if dist.is_initialized():
                dist.barrier()
        self.use_rollout(rollout)

    def finish_iteration(self) -> None:
        """The policy becomes the reference; the next iteration starts at the beginning of its data."""
        self.iteration += 1
        self.consumed_samples = 0
        if self.model.ref_policy_state_dict is not None:
            self.model.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(self.model)
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
        """Generate with the iteration-start weights; reference log-probs of actual and generated responses."""
        spin = self.model.spin_config
        self.model.offload_adam_states()
        self.model.eval()
        indices = self.needed_indices()
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        mine = indices[dp_rank::dp_size]
        batch_size = int(spin.get("rollout_micro_batch_size", 32))
        sampling_params = OmegaConf.to_container(spin.sampling_params, resolve=True)
        sampling_params["compute_logprob"] = sampling_params["compute_logprob"] or self.reference_from_generation
        generated: dict[int, tuple[list[int], bool, float]] = {}
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            prompts = [list(self.sft_dataset.prompt_and_answer(i)[0]) for i in chunk]
            seeds = [sample_seed(self.seed, self.iteration, i) for i in chunk]
            output = self.model.generate(prompts, sampling_params, spin.length_params, seeds)
            logprobs = output.logprobs or [torch.zeros(0, device="cpu")] * len(chunk)
            for i, response, ended, lp in zip(chunk, output.response_ids, output.ended, logprobs):
                generated[i] = ([int(t) for t in response], bool(ended), float(lp.sum()))
            kill_point("rollout")
        generated = _gather_dicts(generated)
        rollout = {"iteration": self.iteration, "indices": indices}
        rollout["generated"] = [generated[i][0] for i in indices]
        rollout["ended"] = [generated[i][1] for i in indices]
        if self.reference_from_generation:
            rollout["generated_logprob_sums"] = [generated[i][2] for i in indices]
        if self.cfg.get("mix_previous_generations", False) and self.iteration > 0 and self.rollout_dir:
            previous = torch.load(self.rollout_dir / f"iteration_{self.iteration - 1}.pt", weights_only=True)
            rollout["previous"] = {k: previous[k] for k in ("indices", "generated", "ended")}
        return self.finish_rollout(rollout)

    @property
    def reference_from_generation(self) -> bool:
        """Whether the generated responses' reference log-probs are taken from generation (see the module doc).

        Only where that is the same quantity: the precomputed strategy (the generating weights are the reference;
        not with LoRA, whose reference is the base model) and no BOS added to generation prompts (training pairs
        have none). The values equal a forward pass's up to float rounding (a KV-cached decode multiplies other
        shapes), so ``false`` keeps the policy and reference of a step bit-identical at the start of an iteration.
        """
        return (
            bool(self.model.spin_config.get("reference_from_generation", True))
            and self.model.reference_strategy == "precomputed"
            and getattr(self.model, "lora_adapters_disabled", None) is None
            and not self.model.spin_config.sampling_params.get("add_BOS", False)
        )

    def finish_rollout(self, rollout: dict[str, Any]) -> dict[str, Any]:
        """Reference log-probs of every pair the rollout built (precomputed strategy); back to training mode."""
        self.use_rollout(rollout, with_reference=False)
        if self.model.reference_strategy == "precomputed":
            with self.timers("reference"):
                if "generated_logprob_sums" in rollout:
                    table = self._reference_with_generation_logprobs(rollout)
                else:
                    table = compute_reference_logprobs(self.model, self._scoring_batches())
            rollout["reference"] = {
                "sample_index": table.sample_index,
                "chosen": table.chosen,
                "rejected": table.rejected,
            }
        self.model.train()
        self.model.onload_adam_states()
        return rollout

    def _reference_with_generation_logprobs(self, rollout: Mapping[str, Any]) -> ReferenceLogprobs:
        """The rollout's reference table with one forward over ground-truth responses only: generated responses
        take the log-prob sums generation recorded (previous-iteration generations, with
        ``mix_previous_generations``, were generated by other weights and are scored here too)."""
        dataset = self.train_dataloader.dataset
        from_generation = dict(zip(rollout["indices"], rollout["generated_logprob_sums"]))
        dp_size = parallel_state.get_data_parallel_world_size()
        mine = sorted(dataset.generated)[parallel_state.get_data_parallel_rank() :: dp_size]
        if not mine:
            return gather_reference_logprobs(*(torch.empty(0, device="cpu") for _ in range(3)))
        batch = self.train_dataloader.collate_fn([dataset[i] for i in mine])
        scored_rejected = torch.tensor([i not in from_generation for i in mine], device="cpu")
        tokens = torch.cat([batch["chosen"], batch["rejected"][scored_rejected]])
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"][scored_rejected]])
        sums = self.model.get_sequence_logprob_sums(tokens, mask).float()
        kill_point("reference_logprobs")
        rejected = torch.tensor([from_generation.get(i, 0.0) for i in mine], dtype=torch.float32, device="cpu")
        rejected[scored_rejected] = sums[len(mine) :]
        return gather_reference_logprobs(batch["sample_index"], sums[: len(mine)], rejected)

    def _scoring_batches(self):
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

    def use_rollout(self, rollout: Mapping[str, Any], with_reference: bool = True) -> None:
        """Load a rollout into the pairs dataset (and the reference table); log its statistics and samples."""
        dataset = self.train_dataloader.dataset
        size = len(self.sft_dataset)
        mask_unfinished = bool(self.cfg.get("mask_unfinished_generations", True))
        dataset.generated = {}
        identical = unfinished = 0
        lengths = []
        parts = [(0, rollout)] + ([(size, rollout["previous"])] if rollout.get("previous") else [])
        self.train_dataloader.batch_sampler.mix_previous = bool(rollout.get("previous"))
        for offset, part in parts:
            for i, response, ended in zip(part["indices"], part["generated"], part["ended"]):
                same = list(response) == list(self.sft_dataset.prompt_and_answer(i)[1])
                valid = not same and (ended or not mask_unfinished)
                dataset.generated[offset + i] = (list(response), valid)
                if offset == 0:
                    identical += same
                    unfinished += not ended
                    lengths.append(len(response))
        total = max(len(rollout["indices"]), 1)
        self.rollout_stats = {
            "rollout_identical_fraction": identical / total,
            "rollout_unfinished_fraction": unfinished / total,
            "rollout_generated_length_mean": sum(lengths) / max(len(lengths), 1),
        }
        if with_reference:
            self.activate_rollout(rollout)

    def activate_rollout(self, rollout: Mapping[str, Any]) -> None:
        """The rollout's reference log-probs become the training reference; its statistics and samples are logged."""
        if "reference" in rollout:
            ref = rollout["reference"]
            self.reference = ReferenceLogprobs(ref["sample_index"], ref["chosen"], ref["rejected"])
        if self.consumed_samples == 0:  # logged once, when the iteration starts (not again by a resumed run)
            self.log(self.rollout_stats, self.metric_prefix_train)
            self._log_samples(rollout)

    def _log_samples(self, rollout: Mapping[str, Any], count: int = 4) -> None:
        if self.logger is None:
            return
        tokenizer = self.model.tokenizer
        rows = []
        for i, response in list(zip(rollout["indices"], rollout["generated"]))[:count]:
            prompt, actual = self.sft_dataset.prompt_and_answer(i)
            texts = (list(prompt), list(response), list(actual))
            rows.append([tokenizer.ids_to_text(ids) for ids in texts])
        self.logger.log_table("train/generations", ["prompt", "generated", "ground_truth"], rows, step=self.step)

    # ------------------------------------------------------------------ steps
    def prepare_batch(self, batch: dict, training: bool) -> dict:
        if training and self.reference is not None and self.model.reference_strategy == "precomputed":
            return self.reference.attach(batch)
        return batch

    def train_single_step(self, batch: dict) -> dict[str, float]:
        with self.timers("train"):
            metrics = super().train_single_step(batch)
        valid = all_gather_data_parallel(batch["valid"]) > 0  # the global batch, not this rank's share
        generated = all_gather_data_parallel(batch["rejected_lengths"] - batch["prompt_lengths"])[valid].float()
        metrics["avg_generated_lengths"] = float(generated.mean()) if generated.numel() else 0.0
        return metrics

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


def _gather_dicts(local: dict) -> dict:
    """Union of every data-parallel rank's dict."""
    if not dist.is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
        return local
    gathered = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(gathered, local, group=parallel_state.get_data_parallel_group(with_context_parallel=False))
    merged: dict = {}
    for part in gathered:
        merged.update(part)
    return merged
