"""SPIN: Self-Play Fine-Tuning (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong
Language Models", arXiv 2401.01335).

SPIN is the DPO loss with chosen = the ground-truth SFT response ("actual") and rejected = the response the
iteration-start policy generated ("generated"); the reference of iteration t is the policy at the end of
iteration t-1. The loss itself comes from the shared registry (``nemo_aligner/losses/preference.py``) through
the DPO model this class extends; this class adds what SPIN needs on top: the per-iteration KL penalty, reference
weights held in CPU memory that travel in trainer checkpoints (optional: by default the trainer precomputes
reference log-probs in the rollout phase; see ``reference.py``), Adam-state offload during generation, and the
plain SFT loss used for validation.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from nemo_aligner.models.nlp.gpt.gpt_sft_model import SFTLoss
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel, concat_pairs
from nemo_aligner.models.nlp.gpt.nemo_aligner_api import pairs_from_nemo_aligner_spin_batch
from nemo_aligner.models.nlp.gpt.reference import REFERENCE_PREFIX
from nemo_aligner.utils.optimizer_state import torch_optimizer_states
from nemo_aligner.utils.utils import cpu_weight_swap


class MegatronGPTSPINModel(SFTLoss, MegatronGPTDPOModel):
    """GPT trained by SPIN (keys under ``model.spin``); metrics name the pair sides ``actual`` and ``generated``
    (``pair_sides``); validation is the SFT loss (:class:`SFTLoss`)."""

    algorithm_key = "spin"
    reference_in_checkpoints = True  # the reference moves every iteration
    pair_sides = ("actual", "generated")

    def __init__(self, cfg: DictConfig, trainer=None, tokenizer=None):
        super().__init__(cfg, trainer, tokenizer=tokenizer)
        self.spin_config = self.cfg.spin
        self.offload_adam = bool(self.spin_config.get("offload_adam_states", True))
        self._offloaded_optimizer_state: list | None = None
        self.set_KL_penalty_by_iteration(0)

    # ------------------------------------------------------------------ KL schedule
    def set_KL_penalty_by_iteration(self, iteration: int) -> None:
        """beta for iteration ``iteration``: ``ref_policy_kl_penalty`` is a scalar or one value per iteration."""
        penalty = self.spin_config.ref_policy_kl_penalty
        if isinstance(penalty, (list, tuple, ListConfig)):
            if iteration >= len(penalty):
                raise ValueError(
                    f"model.spin.ref_policy_kl_penalty has {len(penalty)} values; iteration {iteration} needs one"
                )
            penalty = penalty[iteration]
        self.ref_policy_kl_penalty = float(penalty)

    # ------------------------------------------------------------------ losses
    def get_loss_and_metrics(self, batch: dict, forward_only: bool) -> tuple[float, dict[str, float]]:
        """The preference loss of a batch of pairs: ours, or NeMo-Aligner's SPIN batch (``actual``/``generated``,
        see :func:`pairs_from_nemo_aligner_spin_batch`)."""
        loss, metrics = super().get_loss_and_metrics(pairs_from_nemo_aligner_spin_batch(batch), forward_only)
        chosen, rejected = self.pair_sides
        names = {"rewards_chosen_mean": f"rewards_{chosen}_mean", "rewards_rejected_mean": f"rewards_{rejected}_mean"}
        return loss, {names.get(key, key): value for key, value in metrics.items()}

    def get_loss_and_metrics_vanilla_sft(self, batch: dict, forward_only: bool = True) -> tuple[float, dict]:
        """Plain SFT NLL of the ground truth (SPIN's validation: no generation needed)."""
        return self.sft_loss_and_metrics(batch, forward_only)

    @torch.no_grad()
    def get_ref_policy_logprobs(self, batch: dict) -> torch.Tensor:
        """Per-token reference log-probs ``[2B, S-1]`` of actual (first B rows) and generated responses.

        Computed inside the reference policy's scoring context (e.g. the CPU-held weights swapped in). The batch is
        ours or NeMo-Aligner's SPIN batch (:func:`pairs_from_nemo_aligner_spin_batch`).
        """
        tokens, _ = concat_pairs(self.to_model_device(pairs_from_nemo_aligner_spin_batch(batch)))
        with self.reference.scoring(self):
            was_training = self.training
            self.eval()
            logprobs = self.get_logprobs(tokens)
            self.train(was_training)
        return logprobs

    # ------------------------------------------------------------------ Adam offload
    def offload_adam_states(self) -> None:
        """Move the optimizer's moment tensors off the device (freeing their storage) for the rollout phase."""
        if not self.offload_adam or self._offloaded_optimizer_state is not None or not hasattr(self, "optimizer"):
            return
        saved = []
        for state in torch_optimizer_states(self.optimizer):
            for tensor in state.values():
                if isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
                    saved.append((tensor, tensor.device, tensor.to("cpu", copy=True)))
                    tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        self._offloaded_optimizer_state = saved

    def onload_adam_states(self) -> None:
        """Bring the offloaded moment tensors back, bit for bit."""
        if self._offloaded_optimizer_state is None:
            return
        for tensor, device, copy in self._offloaded_optimizer_state:
            tensor.data = copy.to(device)
        self._offloaded_optimizer_state = None

    def get_trainer_state(self) -> dict[str, Any]:
        return {"ref_policy_kl_penalty": self.ref_policy_kl_penalty}


class MegatronGPTSelfRewardingModel(MegatronGPTSPINModel):
    """The SPIN model as Self-Rewarding trains it: judged pairs, whose sides are ``chosen`` and ``rejected``."""

    pair_sides = ("chosen", "rejected")


__all__ = ["REFERENCE_PREFIX", "MegatronGPTSPINModel", "MegatronGPTSelfRewardingModel", "cpu_weight_swap"]
