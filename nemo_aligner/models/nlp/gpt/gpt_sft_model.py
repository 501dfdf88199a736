"""Supervised fine-tuning: token-level negative log-likelihood of the answer tokens."""

from __future__ import annotations

import torch

from nemo_aligner.data.nlp.collate import padded_length
from nemo_aligner.models.alignable_interface import SupervisedInterface
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel, forward_tokens
from nemo_aligner.utils.batching import COMPUTE_WIDTH_MULTIPLE, reduce_metric_sums, split_into_micro_batches
from nemo_aligner.utils.logprobs import shifted_logprobs


def masked_token_nll(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over scored tokens, number of scored tokens) for shifted log-probs ``[B, S-1]``.

    ``loss_mask`` is ``[B, S]`` over input positions; position t+1 being scored means log-prob t counts.
    """
    mask = loss_mask[:, 1:].to(logprobs.dtype)
    return -(logprobs * mask).sum(), mask.sum()


def _at_compute_width(batch: dict, multiple_of: int, max_length: int | None) -> dict:
    """``input_ids`` and ``loss_mask`` right-padded to a multiple of ``multiple_of`` (never past ``max_length``, nor
    cut): the collate pads each batch to its own longest sample, and every new width costs CPU kernels compiled and
    kept for that shape (:data:`COMPUTE_WIDTH_MULTIPLE`). No real token attends to the padding (causal) and no loss
    counts it (mask 0)."""
    width = batch["input_ids"].shape[1]
    extra = padded_length(width, multiple_of, max(width, max_length or width)) - width
    if extra == 0:
        return batch
    return {
        **batch,
        "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, extra), value=0),
        "loss_mask": torch.nn.functional.pad(batch["loss_mask"], (0, extra), value=0),
    }


def _width_multiple(cfg) -> int:
    """The training split's ``pad_length_to_multiple_of`` where the data sets one (the collate pads to it, e.g. a
    multiple of the tensor-parallel size for sequence parallelism), else :data:`COMPUTE_WIDTH_MULTIPLE`: the rule
    of the DPO model's widths."""
    train_ds = (cfg.get("data") or {}).get("train_ds") or {}
    return train_ds.get("pad_length_to_multiple_of") or COMPUTE_WIDTH_MULTIPLE


class SFTLoss:
    """The SFT loss of a ``MegatronGPTModel``: the mean NLL over every scored (answer) token of the global batch.

    A mixin: :class:`GPTSFTModel` trains with it; the SPIN model validates with it.
    """

    def sft_loss_and_metrics(self, batch: dict, forward_only: bool) -> tuple[float, dict[str, float]]:
        batch = self.to_model_device(batch)
        batch = _at_compute_width(batch, _width_multiple(self.cfg), self.cfg.get("encoder_seq_length"))
        micro_batch_size = self.cfg.get("micro_batch_size") or batch["input_ids"].shape[0]
        micro_batches = split_into_micro_batches(batch, micro_batch_size)
        outputs = self.forward_backward(
            micro_batches,
            num_microbatches=len(micro_batches),
            forward_step=self._sft_forward_step,
            forward_only=forward_only,
            seq_length=batch["input_ids"].shape[1],
            micro_batch_size=micro_batch_size,
        )
        totals = reduce_metric_sums(outputs, ("loss_sum", "num_tokens"))
        loss = totals["loss_sum"] / max(totals["num_tokens"], 1.0)
        return loss, {"loss": loss, "num_tokens": totals["num_tokens"]}

    def _sft_forward_step(self, model_chunk, micro_batch: dict):
        input_ids = micro_batch["input_ids"]
        output = forward_tokens(model_chunk, input_ids)

        def loss_func(logits: torch.Tensor):
            loss_sum, num_tokens = masked_token_nll(shifted_logprobs(logits, input_ids), micro_batch["loss_mask"])
            metrics = {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens.detach()}
            return loss_sum, num_tokens.to(torch.int), metrics

        return output, loss_func


class GPTSFTModel(SFTLoss, MegatronGPTModel, SupervisedInterface):
    """A GPT trained on answer tokens only (:class:`SFTLoss`)."""

    def get_loss_and_metrics(self, batch: dict, forward_only: bool) -> tuple[float, dict[str, float]]:
        return self.sft_loss_and_metrics(batch, forward_only)
