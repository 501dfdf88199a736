"""NeMo-Aligner's preference-model methods, for custom pipelines written against its ``MegatronGPTDPOModel`` /
``MegatronGPTSPINModel`` (docs/coming_from_nemo_aligner.md): the one place for them.

Where one of our methods does the job, the NeMo-Aligner name is a thin entry to it; NeMo-Aligner's forward-step
plumbing (``get_forward_output_and_loss_func``, ``loss_func``, ``get_logprob_batch``) has no counterpart, since the
loss and its micro-batching live in ``get_loss_and_metrics``: those names raise an error that says what to call.
"""

from __future__ import annotations

import torch

from nemo_aligner.utils.distributed import all_gather_data_parallel


def _refused(name: str, instead: str):
    def method(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__}.{name} (NeMo-Aligner's forward-step API) is not provided: {instead}"
        )

    method.__name__ = name
    method.__doc__ = f"Refused (NeMo-Aligner's forward-step API): {instead}"
    return method


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

    get_forward_output_and_loss_func = _refused(
        "get_forward_output_and_loss_func",
        "call model.get_loss_and_metrics(batch, forward_only) for the loss (it runs megatron-core's schedule)",
    )
    loss_func = _refused(
        "loss_func", "the preference losses are nemo_aligner.losses.preference.get_preference_loss(name)"
    )
    get_logprob_batch = _refused(
        "get_logprob_batch",
        "use model.get_logprobs(tokens) for per-token log-probs or model.get_logprob_sums(batch) for sums",
    )
