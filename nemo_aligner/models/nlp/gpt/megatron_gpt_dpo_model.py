"""DPO and its variants (IPO, RPO, scale) on a GPT: chosen and rejected responses scored in one forward.

The per-pair losses live in ``nemo_aligner/losses/preference.py`` (shared with SPIN and Self-Rewarding). This
model turns a batch of pairs into per-response log-prob sums, takes the reference's from the batch (precomputed,
see ``reference.py``) or asks its reference policy for them in each step (CPU-swapped reference weights, or LoRA
adapters switched off), and reduces loss and metrics over the whole global batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from megatron.core.transformer.enums import AttnBackend
from omegaconf import DictConfig, ListConfig

from nemo_aligner.losses.preference import (
    PREFERENCE_METRIC_SUM_KEYS,
    finalize_preference_metrics,
    get_preference_loss,
    preference_loss_and_metrics,
)
from nemo_aligner.models.alignable_interface import SupervisedInterface
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel, forward_tokens
from nemo_aligner.models.nlp.gpt.nemo_aligner_api import NeMoAlignerPreferenceAPI
from nemo_aligner.models.nlp.gpt.packed_sequences import (
    forward_packed_sequences,
    pack_sequences,
    resolve_packed_sequences,
)
from nemo_aligner.models.nlp.gpt.prefix_sharing import (
    forward_packed,
    pack_pairs,
    packed_lengths,
    resolve_prefix_sharing,
)
from nemo_aligner.models.nlp.gpt.reference import (
    REFERENCE_PREFIX,
    REFERENCE_STRATEGIES,
    CPUWeightSwapReference,
    build_reference_policy,
)
from nemo_aligner.utils.batching import (
    COMPUTE_WIDTH_MULTIPLE,
    length_bucketed_micro_batches,
    reduce_metric_sums,
    sequence_ends,
)
from nemo_aligner.utils.distributed import broadcast_from_last_pipeline_stage
from nemo_aligner.utils.logprobs import shifted_logprobs

__all__ = ["REFERENCE_STRATEGIES", "MegatronGPTDPOModel", "concat_pairs", "response_logprob_sums"]

logger = logging.getLogger(__name__)


def response_logprob_sums(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    """Per-sequence sum of log-probs over the masked (response) tokens, and their count. ``[N]`` each.

    ``mask[i, t] = 1`` means token t of sequence i is scored (predicted from position t-1).
    """
    response = mask[:, 1:].to(torch.float32)
    return (shifted_logprobs(logits, tokens) * response).sum(-1), response.sum(-1)


def concat_pairs(micro_batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen then rejected in one ``[2b, S]`` batch (one forward for both halves of every pair)."""
    tokens = torch.cat([micro_batch["chosen"], micro_batch["rejected"]])
    mask = torch.cat([micro_batch["chosen_mask"], micro_batch["rejected_mask"]])
    return tokens, mask


class MegatronGPTDPOModel(NeMoAlignerPreferenceAPI, MegatronGPTModel, SupervisedInterface):
    """GPT trained with a preference loss from the registry (``model.dpo.preference_loss``).

    Reward of a response: ``r = lp_policy - lp_reference`` over its tokens (sums, or per-token means with
    ``preference_average_log_probs``). Reported rewards are multiplied by beta (``ref_policy_kl_penalty``).
    """

    algorithm_key = "dpo"
    reference_in_checkpoints = False
    """Whether trainer checkpoints hold the reference policy's own state (its CPU weights): only where the
    reference moves during training (SPIN). DPO's CPU-swapped reference is the initial checkpoint, reloaded."""

    def __init__(self, cfg: DictConfig, trainer=None, tokenizer=None):
        super().__init__(cfg, trainer, tokenizer=tokenizer)
        cfg = self.cfg
        settings = cfg[self.algorithm_key]
        self.preference_loss_name = settings.get("preference_loss", "dpo")
        get_preference_loss(self.preference_loss_name)  # an unknown name fails here, before training
        penalty = settings.get("ref_policy_kl_penalty", 0.2)
        # SPIN allows one value per iteration (a list); its first iteration's value is the starting beta.
        self.ref_policy_kl_penalty = float(penalty[0] if isinstance(penalty, (list, tuple, ListConfig)) else penalty)
        self.preference_average_log_probs = bool(settings.get("preference_average_log_probs", False))
        self.sft_average_log_probs = bool(settings.get("sft_average_log_probs", self.preference_average_log_probs))
        self.gt_reward_scale = float(settings.get("gt_reward_scale", 1.0))
        self.preference_loss_weight = float(settings.get("preference_loss_weight", 1.0))
        self.sft_loss_weight = float(settings.get("sft_loss_weight", 0.0))
        self.log_prob_micro_batch_size = int(settings.get("log_prob_forward_micro_batch_size") or cfg.micro_batch_size)
        self.reference = build_reference_policy(
            settings.get("reference", "precomputed"),
            lora=(cfg.get("peft") or {}).get("peft_scheme", "none") == "lora",
            in_checkpoints=self.reference_in_checkpoints,
            key=f"model.{self.algorithm_key}.reference",
        )
        transformer_engine = self.transformer_config.attention_backend != AttnBackend.local
        key = f"model.{self.algorithm_key}"
        self.packed_sequences = resolve_packed_sequences(
            settings.get("packed_sequences", False), f"{key}.packed_sequences", cfg, transformer_engine
        )
        prefix_sharing = settings.get("prefix_sharing", False)
        if self.packed_sequences and prefix_sharing is not False:
            # One layout per forward: packed sequences win (they also drop the padding on TransformerEngine).
            logger.info("%s.packed_sequences=true: %s.prefix_sharing=%s is turned off", key, key, prefix_sharing)
            prefix_sharing = False
        self.prefix_sharing = resolve_prefix_sharing(prefix_sharing, f"{key}.prefix_sharing", cfg, transformer_engine)

    # ------------------------------------------------------------------ reference policy (reference.py)
    @property
    def ref_policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The reference weights held in CPU memory, if the reference policy is a CPU weight swap (NeMo-Aligner's
        attribute)."""
        return self.reference.weights if isinstance(self.reference, CPUWeightSwapReference) else None

    @ref_policy_state_dict.setter
    def ref_policy_state_dict(self, weights: dict[str, torch.Tensor] | None) -> None:
        """NeMo-Aligner's way of giving the model its reference: CPU weights, swapped in for reference passes."""
        self.reference = CPUWeightSwapReference(weights, in_checkpoints=self.reference_in_checkpoints)

    def get_ref_policy_logprob_sums(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-prob sums ``([B], [B])`` of chosen and rejected responses, on the model's device."""
        return self.reference.logprob_sums(self, batch)

    def sharded_state_dict(self, prefix: str = "") -> dict:
        """The model's weights, plus the reference policy's state where checkpoints hold it."""
        return {**super().sharded_state_dict(prefix), **self.reference.sharded_state_dict(self, prefix)}

    def load_model_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load weights; a loaded ``reference_policy.`` part (trainer checkpoints) goes to the reference policy."""
        reference = state_dict.get(REFERENCE_PREFIX)
        super().load_model_state_dict({k: v for k, v in state_dict.items() if k != REFERENCE_PREFIX}, strict=strict)
        self.reference.load_state_dict(reference)

    @torch.no_grad()
    def get_logprob_sums(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Current-weights log-prob sums of chosen and rejected responses, through the training forward path.

        Same micro batching and concatenation as training, so a frozen policy gives bit-identical values.
        """
        batch = self.to_model_device(batch)
        micro_batches, order = self._bucketed_pairs(batch, self.log_prob_micro_batch_size)
        rows = 2 * self.log_prob_micro_batch_size  # chosen and rejected in one forward
        sums = self._forward_only_sums(micro_batches, self._pairs_forward, batch["chosen"].shape[1], rows)
        chosen, rejected = [], []
        for part in sums.split(rows):
            half = part.shape[0] // 2
            chosen.append(part[:half])
            rejected.append(part[half:])
        return _unsort(torch.cat(chosen), order), _unsort(torch.cat(rejected), order)

    @torch.no_grad()
    def get_sequence_logprob_sums(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Current-weights log-prob sums ``[N]`` of single sequences' masked tokens (``mask`` as in
        :func:`response_logprob_sums`): one side of some pairs, when the other side's values are already known
        (SPIN takes the generated responses' reference log-probs from generation).

        Micro batches of ``2 * log_prob_forward_micro_batch_size`` rows (the rows of one pair forward), bucketed by
        length; padded with empty rows to a whole number of micro batches (pipeline stages exchange activations of
        one fixed shape; the empty rows go with the shortest sequences, so they cost little).
        """
        tokens, mask = self.to_model_device((tokens, mask))
        rows = 2 * self.log_prob_micro_batch_size
        count = tokens.shape[0]
        padding = -count % rows
        tokens = torch.cat([tokens, tokens.new_zeros(padding, tokens.shape[1])])
        mask = torch.cat([mask, mask.new_zeros(padding, mask.shape[1])])
        sequences = {"tokens": tokens, "mask": mask}
        micro_batches, order = length_bucketed_micro_batches(
            sequences, rows, sequence_ends(mask), ("tokens", "mask"), self._pad_multiple_of()
        )

        def forward(chunk, micro_batch):
            sums = functools.partial(response_logprob_sums, tokens=micro_batch["tokens"], mask=micro_batch["mask"])
            return _forward(chunk, micro_batch["tokens"]), sums

        sums = self._forward_only_sums(micro_batches, forward, tokens.shape[1], rows)
        return _unsort(sums, order)[:count]

    def _forward_only_sums(self, micro_batches: list[dict], forward: Callable, seq_length: int, rows: int):
        """Log-prob sums of every row of ``micro_batches`` (in order; ``rows`` per micro batch), in eval mode,
        on every pipeline stage. ``forward(chunk, micro_batch)`` gives the output and the logits-to-sums function
        (as :meth:`_pairs_forward`)."""

        def forward_step(chunk, micro_batch):
            output, logprob_sums = forward(chunk, micro_batch)

            def loss_func(logits):
                sums, _ = logprob_sums(logits)
                zero = torch.zeros((), device=sums.device)
                return zero, zero.to(torch.int), {"sums": sums}

            return output, loss_func

        was_training = self.training
        self.eval()
        outputs = self.forward_backward(
            micro_batches,
            num_microbatches=len(micro_batches),
            forward_step=forward_step,
            forward_only=True,
            seq_length=seq_length,
            micro_batch_size=rows,
        )
        self.train(was_training)
        local = torch.cat([o["sums"] for o in outputs]) if outputs else None
        return broadcast_from_last_pipeline_stage(local, (len(micro_batches) * rows,))

    def _bucketed_pairs(self, batch: dict, micro_batch_size: int) -> tuple[list[dict], torch.Tensor]:
        """Micro batches of pairs of similar length, trimmed to their longest sequence (see
        :func:`length_bucketed_micro_batches`); a pair's length is one past its last response token (fillers: 1),
        or with prefix sharing its packed row's (never shorter, so the trim keeps every response token).
        The policy and reference passes cut the same micro batches, so a frozen policy still gives identical values.
        """
        pairs = _pair_tensors(batch)
        if self.prefix_sharing:
            lengths = packed_lengths(pairs)
        else:
            lengths = sequence_ends(torch.maximum(pairs["chosen_mask"], pairs["rejected_mask"]))
        keys = ("chosen", "rejected", "chosen_mask", "rejected_mask")
        return length_bucketed_micro_batches(pairs, micro_batch_size, lengths, keys, self._pad_multiple_of())

    def _pad_multiple_of(self) -> int:
        return (self.cfg.get("data") or {}).get("pad_length_to_multiple_of") or COMPUTE_WIDTH_MULTIPLE

    def _pairs_forward(self, model_chunk, micro_batch: dict) -> tuple[torch.Tensor, Callable]:
        """One forward over a micro batch of pairs: the chunk's output, and a function from logits to the
        per-response log-prob sums and token counts ``[2b]`` (chosen then rejected). Unshared: chosen and rejected
        rows concatenated; with ``prefix_sharing``: one packed row per pair (``prefix_sharing.py``); with
        ``packed_sequences``: all 2b sequences in one THD row (``packed_sequences.py``)."""
        if self.prefix_sharing:
            packed = pack_pairs(micro_batch, self._pad_multiple_of())
            return forward_packed(model_chunk, packed), packed.response_logprob_sums
        tokens, mask = concat_pairs(micro_batch)
        if self.packed_sequences:
            thd = pack_sequences(tokens, mask, self._pad_multiple_of())
            return forward_packed_sequences(model_chunk, thd), thd.response_logprob_sums
        return _forward(model_chunk, tokens), functools.partial(response_logprob_sums, tokens=tokens, mask=mask)

    # ------------------------------------------------------------------ loss
    def get_loss_and_metrics(self, batch: dict, forward_only: bool) -> tuple[float, dict[str, float]]:
        batch = self.to_model_device(batch)
        if "ref_chosen_logps" not in batch:
            ref_chosen, ref_rejected = self.get_ref_policy_logprob_sums(batch)
            batch = {**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        micro_batch_size = self.cfg.micro_batch_size
        micro_batches, _ = self._bucketed_pairs(batch, micro_batch_size)
        outputs = self.forward_backward(
            micro_batches,
            num_microbatches=len(micro_batches),
            forward_step=self._forward_step,
            forward_only=forward_only,
            seq_length=batch["chosen"].shape[1],
            micro_batch_size=2 * micro_batch_size,  # chosen and rejected in one forward
        )
        metrics = finalize_preference_metrics(reduce_metric_sums(outputs, PREFERENCE_METRIC_SUM_KEYS))
        metrics["num_pairs"] = metrics.pop("num_valid_pairs")
        return metrics["loss"], metrics

    def _forward_step(self, model_chunk, micro_batch: dict):
        output, logprob_sums = self._pairs_forward(model_chunk, micro_batch)
        pairs = micro_batch["chosen"].shape[0]

        def loss_func(logits: torch.Tensor):
            sums, counts = logprob_sums(logits)
            counts = counts.clamp(min=1)
            ref = torch.cat([micro_batch["ref_chosen_logps"], micro_batch["ref_rejected_logps"]]).to(sums)
            policy_pref, ref_pref = (sums / counts, ref / counts) if self.preference_average_log_probs else (sums, ref)
            sft = sums[:pairs] / counts[:pairs] if self.sft_average_log_probs else sums[:pairs]
            out = preference_loss_and_metrics(
                policy_pref[:pairs],
                policy_pref[pairs:],
                ref_pref[:pairs],
                ref_pref[pairs:],
                micro_batch["valid"],
                beta=self.ref_policy_kl_penalty,
                loss_name=self.preference_loss_name,
                gt_chosen=micro_batch["chosen_rewards"].to(sums),
                gt_rejected=micro_batch["rejected_rewards"].to(sums),
                gt_reward_scale=self.gt_reward_scale,
                preference_loss_weight=self.preference_loss_weight,
                sft_loss_weight=self.sft_loss_weight,
                sft_chosen=sft,
            )
            return out.loss_sum, out.num_valid, out.metric_sums

        return output, loss_func


def _forward(model_chunk, tokens: torch.Tensor) -> torch.Tensor:
    """The pairs' forward (one name for everything this model scores, so a test can count its rows)."""
    return forward_tokens(model_chunk, tokens)


_PAIR_KEYS = (
    "chosen",
    "rejected",
    "chosen_mask",
    "rejected_mask",
    "chosen_rewards",
    "rejected_rewards",
    "valid",
    "ref_chosen_logps",
    "ref_rejected_logps",
)


def _pair_tensors(batch: dict) -> dict:
    """The per-pair tensors of a batch (what the forward steps read)."""
    return {k: batch[k] for k in _PAIR_KEYS if k in batch}


def _unsort(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(values)
    out[order] = values
    return out
