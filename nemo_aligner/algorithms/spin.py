"""SPIN's rollout on the shared iterative loop (``iterative.py``: iterations of rollout and preference epochs, one
LR schedule across all of them).

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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from megatron.core import parallel_state
from omegaconf import OmegaConf

from nemo_aligner.algorithms.iterative import IterativeTrainer
from nemo_aligner.data.nlp.collate import refuse_unsupported_layout_flags
from nemo_aligner.data.nlp.dpo_dataset import DPOCollate
from nemo_aligner.models.nlp.gpt.reference import ReferenceLogprobs, gather_reference_logprobs
from nemo_aligner.utils.distributed import all_gather_data_parallel, union_over_data_parallel
from nemo_aligner.utils.kill_points import kill_point
from nemo_aligner.utils.seeds import sample_seed

logger = logging.getLogger(__name__)


def spin_custom_collate(
    batch: Sequence[Mapping[str, Any]],
    eos_id: int,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
) -> dict:
    """NeMo-Aligner's SPIN collate function: SPIN pairs (actual = chosen, generated = rejected, as
    :class:`~nemo_aligner.data.nlp.pairs.SPINPairsDataset` gives them) padded with ``eos_id`` into one batch; a thin
    entry to :class:`~nemo_aligner.data.nlp.dpo_dataset.DPOCollate`. The flags must be false."""
    refuse_unsupported_layout_flags(
        reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask, eod_mask_loss=eod_mask_loss
    )
    return DPOCollate(eos_id)(batch)


class SPINTrainer(IterativeTrainer):
    """The iterative loop (``iterative.py``) with SPIN's rollout: one generated response per prompt, the rejected
    side of a pair whose chosen side is the ground truth."""

    def generate(self, rollout: dict[str, Any]) -> None:
        """One response per prompt with the iteration-start weights (randomness keyed by seed, iteration and
        sample); with :attr:`reference_from_generation` also each response's log-prob sum."""
        spin = self.model.spin_config
        indices = rollout["indices"]
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
        generated = union_over_data_parallel(generated)
        rollout["generated"] = [generated[i][0] for i in indices]
        rollout["ended"] = [generated[i][1] for i in indices]
        if self.reference_from_generation:
            rollout["generated_logprob_sums"] = [generated[i][2] for i in indices]
        if self.cfg.get("mix_previous_generations", False) and self.iteration > 0 and self.rollout_dir:
            previous = torch.load(self.rollout_dir / f"iteration_{self.iteration - 1}.pt", weights_only=True)
            rollout["previous"] = {k: previous[k] for k in ("indices", "generated", "ended")}

    @property
    def reference_from_generation(self) -> bool:
        """Whether the generated responses' reference log-probs are taken from generation (see the module doc).

        Only where that is the same quantity: a precomputed reference scored with the current weights (the
        generating weights are the reference; not with LoRA, whose reference is the base model) and no BOS added
        to generation prompts (training pairs have none). The values equal a forward pass's up to float rounding
        (a KV-cached decode multiplies other shapes), so ``false`` keeps the policy and reference of a step
        bit-identical at the start of an iteration.
        """
        return (
            bool(self.model.spin_config.get("reference_from_generation", True))
            and self.model.reference.precomputed
            and self.model.reference.scores_current_weights
            and not self.model.spin_config.sampling_params.get("add_BOS", False)
        )

    def score_reference(self, rollout: Mapping[str, Any]) -> ReferenceLogprobs:
        """The rollout's reference table. With ``generated_logprob_sums`` (see :attr:`reference_from_generation`),
        one forward over ground-truth responses only: generated responses take the log-prob sums generation
        recorded (previous-iteration generations, with ``mix_previous_generations``, were generated by other
        weights and are scored here too)."""
        if "generated_logprob_sums" not in rollout:
            return super().score_reference(rollout)
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
        sums = self.model.get_sequence_logprob_sums(tokens, mask).float().cpu()  # joins CPU values, then gathered
        kill_point("reference_logprobs")
        rejected = torch.tensor([from_generation.get(i, 0.0) for i in mine], dtype=torch.float32, device="cpu")
        rejected[scored_rejected] = sums[len(mine) :]
        return gather_reference_logprobs(batch["sample_index"], sums[: len(mine)], rejected)

    def use_rollout(self, rollout: Mapping[str, Any]) -> None:
        """The rollout's pairs (actual, generated; the previous iteration's too when mixed) and statistics."""
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

    def log_samples(self, rollout: Mapping[str, Any], count: int = 4) -> None:
        if self.logger is None:
            return
        tokenizer = self.model.tokenizer
        rows = []
        for i, response in list(zip(rollout["indices"], rollout["generated"]))[:count]:
            prompt, actual = self.sft_dataset.prompt_and_answer(i)
            texts = (list(prompt), list(response), list(actual))
            rows.append([tokenizer.ids_to_text(ids) for ids in texts])
        self.logger.log_table("table/train_generations", ["prompt", "generated", "ground_truth"], rows, step=self.step)

    # ------------------------------------------------------------------ steps
    def step_metrics(self, batch: dict) -> dict[str, float]:
        valid = all_gather_data_parallel(batch["valid"]) > 0  # the global batch, not this rank's share
        generated = all_gather_data_parallel(batch["rejected_lengths"] - batch["prompt_lengths"])[valid].float()
        return {"avg_generated_lengths": float(generated.mean()) if generated.numel() else 0.0}
