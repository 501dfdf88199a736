"""Normalisation layer used by the local (non-TransformerEngine) layer spec.

megatron-core's torch fallback norm refuses zero-centred gamma (NeMo's ``layernorm1p``) and sequence
parallelism; this module supports LayerNorm, RMSNorm and both of those, with the same parameter names
(``weight``, ``bias``) so checkpoints map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from nemo_aligner.utils.device import current_device


class Norm(torch.nn.Module):
    """LayerNorm or RMSNorm as selected by ``config.normalization``.

    With ``config.layernorm_zero_centered_gamma`` the stored weight is ``gamma - 1`` (NeMo's ``layernorm1p``):
    ``y = norm(x) * (1 + weight) + bias``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"Unsupported normalization {config.normalization!r}; expected LayerNorm or RMSNorm")
        self.is_rmsnorm = config.normalization == "RMSNorm"
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        self.hidden_size = hidden_size
        self.eps = eps
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        # Where megatron allocates the layer's other weights (model_config.transformer_config_from_model_cfg).
        device = "cpu" if config.use_cpu_initialization else current_device()
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype, device=device))
        self.bias = (
            None
            if self.is_rmsnorm
            else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype, device=device))
        )
        # Under sequence parallelism each rank sees a slice of the sequence, so the norm's gradients
        # are partial sums that megatron's DDP all-reduces across the tensor-parallel group.
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        if self.is_rmsnorm:
            return F.rms_norm(x, (self.hidden_size,), weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), weight, self.bias, self.eps)
