"""Core attention of the local (non-TransformerEngine) layer spec through PyTorch's fused attention.

megatron-core's local ``DotProductAttention`` materialises the ``[b, heads, s, s]`` scores, their float32 softmax
and keeps both for the backward pass. PyTorch's fused attention (``F.scaled_dot_product_attention``, a
flash-attention kernel on CPU) computes the same softmax(QK^T / sqrt(d) + mask) V in blocks and saves only a
log-sum-exp per row, so it is faster and its activation memory is linear in ``s``. The result equals the local
path's up to float rounding (masked scores are -10000 there and -inf here: both give probability exactly 0 in
float32).

Cases the fused call does not cover exactly fall back to megatron's implementation: attention dropout in
training (megatron draws it from its own RNG tracker), a learned softmax offset, attention bias, a sliding window,
and a query shorter than the keys without a mask other than the single-token decode step.

Packed sequences (THD, ``packed_seq_params``, see ``packed_sequences.py``), which megatron's local attention
refuses, are emulated: the ``[t, heads, d]`` tensors get a batch dimension of 1 and a block-diagonal causal mask
built from ``cu_seqlens`` (attention inside each sequence only), then take the path above. The mask is ``[t, t]``:
quadratic in the packed length, a correctness path for CPU, not a speed path (TransformerEngine's THD kernels are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
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
        if packed_seq_params is not None:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))  # [t, heads, d] -> [t, 1, heads, d]
            attention_mask, packed_seq_params = thd_causal_mask(packed_seq_params), None
        sq, sk = query.shape[0], key.shape[0]
        if attention_mask is None and sq > 1 and (sq != sk or self.attn_mask_type != AttnMaskType.causal):
            fused = False  # megatron would build no causal mask here; keep its behaviour
        else:
            fused = (
                attention_bias is None
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


def thd_causal_mask(params: PackedSeqParams) -> torch.Tensor:
    """``[1, 1, t, t]`` mask (True = blocked) of causal attention inside each ``cu_seqlens`` segment."""
    if params.qkv_format != "thd" or params.cu_seqlens_q_padded is not None or params.cu_seqlens_kv_padded is not None:
        raise NotImplementedError("SDPA core attention emulates unpadded THD packed sequences only")
    cu_seqlens = params.cu_seqlens_q
    if not torch.equal(cu_seqlens, params.cu_seqlens_kv):
        raise NotImplementedError("SDPA core attention emulates self-attention THD (cu_seqlens_q == cu_seqlens_kv)")
    lengths = cu_seqlens.diff().long()
    segments = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    causal = torch.ones(len(segments), len(segments), dtype=torch.bool, device=cu_seqlens.device).tril()
    return ~(causal & (segments[:, None] == segments[None, :]))[None, None]
