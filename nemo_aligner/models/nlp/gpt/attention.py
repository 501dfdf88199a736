"""Core attention of the local (non-TransformerEngine) layer spec through PyTorch's fused attention.

megatron-core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` scores, their float32 softmax
and keeps both for the backward pass. PyTorch's fused attention (``F.scaled_dot_product_attention``, a
flash-attention kernel on CPU) computes the same softmax(QK^T / sqrt(d) + mask) V in blocks and saves only a
log-sum-exp per row, so it is faster and its activation memory is linear in ``s``. The result equals the local
path's up to float rounding (masked scores are -10000 there and -inf here: both give probability exactly 0 in
float32).

Cases the fused call does not cover exactly fall back to megatron's implementation: attention dropout in
training (megatron draws it from its own RNG tracker), a learned softmax offset, attention bias, a sliding window,
packed sequences, and a query shorter than the keys without a mask other than the single-token decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPADotProductAttention(DotProductAttention):
    """``DotProductAttention`` computed by PyTorch's fused scaled-dot-product attention where that is exact."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        sq, sk = query.shape[0], key.shape[0]
        if attention_mask is None and sq > 1 and (sq != sk or self.attn_mask_type != AttnMaskType.causal):
            fused = False  # megatron would build no causal mask here; keep its behaviour
        else:
            fused = (
                attention_bias is None
                and packed_seq_params is None
                and self.softmax_offset is None
                and self.config.window_size is None
                and not (self.training and self.attention_dropout.p > 0)
            )
        if not fused:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        causal = attention_mask is None and sq > 1
        allowed = None if attention_mask is None else ~attention_mask  # megatron: True = blocked
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal, scale=self.softmax_scale)
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(sq, context.shape[0], self.hidden_size_per_partition)
