"""NeMo-Aligner's preference-model methods, for custom pipelines written against its ``MegatronGPTDPOModel`` /
``MegatronGPTSPINModel`` (docs/coming_from_nemo_aligner.md): the one place for them.

Where one of our methods does the job, the NeMo-Aligner name is a thin entry to it; NeMo-Aligner's forward-step
plumbing (``get_forward_output_and_loss_func``, ``loss_func``, ``get_logprob_batch``) has no counterpart, since the
loss and its micro-batching live in ``get_loss_and_metrics``: those names raise an error that says what to call.
"""

from __future__ import annotations

import torch

from nemo_aligner.utils.distributed import all_gather_data_parallel


def refused(name: str, instead: str, api: str = "forward-step API"):
    """A method that raises: NeMo-Aligner's ``name`` is not provided here; the message says what to use."""

    def method(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.{name} (NeMo-Aligner's {api}) is not provided: {instead}")

    method.__name__ = name
    method.__doc__ = f"Refused (NeMo-Aligner's {api}): {instead}"
    return method


def pairs_from_nemo_aligner_spin_batch(batch: dict) -> dict:
    """Our pair batch (``chosen``/``rejected``, see ``DPOCollate``) from a SPIN batch as NeMo-Aligner builds it
    (``actual``, ``generated``, ``actual_mask``, ``generated_mask`` ``[B, S]``; optionally the per-token reference
    log-probs ``ref_policy_log_probs_actual`` / ``_generated`` ``[B, S-1]``). Any other batch is returned as is.

    NeMo-Aligner's masks (``create_mask``) mark position ``t - 1`` for response token ``t``, the position that
    predicts it; ours mark ``t`` itself, so the masks move one position right: the same response tokens, from the
    first through the last (end of turn included). The per-token reference log-probs become our per-response
    sums over those tokens. Every pair counts (``valid``); there are no ground-truth rewards (zeros).
    """
    if "actual" not in batch:
        return batch
    chosen_mask, rejected_mask = (
        torch.nn.functional.pad(batch[key].float(), (1, 0))[:, :-1] for key in ("actual_mask", "generated_mask")
    )
    pairs = batch["actual"].shape[0]
    prompt_lengths = torch.argmax((chosen_mask > 0).int(), dim=1)
    out = {
        "chosen": batch["actual"],
        "rejected": batch["generated"],
        "chosen_mask": chosen_mask,
        "rejected_mask": rejected_mask,
        "chosen_rewards": torch.zeros(pairs, device=chosen_mask.device),
        "rejected_rewards": torch.zeros(pairs, device=chosen_mask.device),
        "valid": torch.ones(pairs, device=chosen_mask.device),
        "sample_index": torch.arange(pairs, device=chosen_mask.device),
        "prompt_lengths": prompt_lengths,
        "chosen_lengths": prompt_lengths + chosen_mask.sum(1).long(),
        "rejected_lengths": prompt_lengths + rejected_mask.sum(1).long(),
    }
    for side, mask in (("actual", chosen_mask), ("generated", rejected_mask)):
        per_token = batch.get(f"ref_policy_log_probs_{side}")
        if per_token is not None:
            name = "ref_chosen_logps" if side == "actual" else "ref_rejected_logps"
            out[name] = (per_token.float() * mask[:, 1:].to(per_token.device)).sum(-1)
    return out


class NeMoAlignerPreferenceAPI:
    """Mixed into :class:`~nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model.MegatronGPTDPOModel` (and so SPIN)."""

    def prepare_for_inference(self) -> None:
        """Evaluation mode for a forward-only or generation phase (NeMo-Aligner's name; undone by
        :meth:`finish_inference`)."""
        self.eval()

    def finish_inference(self) -> None:
        """Back to training mode after :meth:`prepare_for_inference`."""
        self.train()

    @staticmethod
    def get_reduced_masked_logps(
        logps: torch.Tensor, loss_mask: torch.Tensor, average_log_probs: bool = False
    ) -> torch.Tensor:
        """Per-sequence sum (or, with ``average_log_probs``, mean) of per-token log-probs over ``loss_mask``;
        the quantity our ``get_logprob_sums`` returns from a batch."""
        total = (logps * loss_mask).sum(-1)
        return total / loss_mask.sum(-1).clamp(min=1) if average_log_probs else total

    @staticmethod
    def split_output_tensor(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen (first half of the rows) and rejected (second half) of a ``[2B, ...]`` pair forward's output,
        the order our model concatenates pairs in."""
        chosen, rejected = torch.split(output.float(), len(output) // 2, dim=0)
        return chosen, rejected

    def gather_and_split_rewards(
        self,
        pi_logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        masks: torch.Tensor,
        average_log_probs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards ``beta * (policy - reference)`` of the reduced log-probs of a ``[2B, S]`` pair batch, gathered
        over the data-parallel ranks, split into chosen and rejected (:meth:`split_output_tensor`)."""
        rewards = self.ref_policy_kl_penalty * (
            self.get_reduced_masked_logps(pi_logprobs - ref_logprobs, masks, average_log_probs)
        )
        chosen, rejected = self.split_output_tensor(rewards)
        return all_gather_data_parallel(chosen), all_gather_data_parallel(rejected)

    get_forward_output_and_loss_func = refused(
        "get_forward_output_and_loss_func",
        "call model.get_loss_and_metrics(batch, forward_only) for the loss (it runs megatron-core's schedule)",
    )
    loss_func = refused(
        "loss_func", "the preference losses are nemo_aligner.losses.preference.get_preference_loss(name)"
    )
    get_logprob_batch = refused(
        "get_logprob_batch",
        "use model.get_logprobs(tokens) for per-token log-probs or model.get_logprob_sums(batch) for sums",
    )
