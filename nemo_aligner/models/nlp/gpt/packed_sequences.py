"""Packed sequences (THD): a micro batch of pairs scored as one row with no padding computed.

The unpacked layout runs chosen and rejected as ``[2b, S]`` rows padded to the longest sequence, so every layer
computes the padding. Packed (``model.dpo.packed_sequences=true``), the 2b sequences (chosen rows, then rejected
rows), each cut to its real length (one past its last response token; a filler keeps one token), are
concatenated into one ``[1, T]`` row:

- position ids restart at 0 for each sequence;
- megatron-core's ``PackedSeqParams(qkv_format="thd")`` carries the cumulative lengths (``cu_seqlens``), so
  attention stays inside each sequence (causal), and RoPE is applied per sequence (megatron-core 0.16's unfused
  ``_apply_rotary_pos_emb_thd`` takes the angles of positions ``0..len-1`` for each ``cu_seqlens`` segment);
  learned absolute position embeddings read the position ids;
- a token is scored as predicted from the previous position of the same row; a sequence's first token is never
  scored, so no prediction crosses a boundary, and a segment sum gives each response's log-prob sum, in the
  unpacked order (chosen then rejected).

Every token therefore sees the same tokens at the same positions as in its unpacked row: log-probs, losses and
gradients equal the unpacked path's up to float rounding. Optionally ``T`` is rounded up to
``model.data.pad_length_to_multiple_of`` by one extra padding segment (its own sequence: nothing real sees it,
and it is not scored).

Attention: TransformerEngine's (GPU) takes THD natively. On the local layer spec, only the SDPA core attention
(``model.local_core_attention=sdpa``, ``attention.py``) handles it, with a block-diagonal causal mask: quadratic
in ``T``, a correctness path for CPU tests, not a speed path. Not supported (refused by
:func:`resolve_packed_sequences`): pipeline and context parallelism, megatron's local core attention, and
position embeddings other than rope / learned_absolute / none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from nemo_aligner.utils.batching import sequence_ends
from nemo_aligner.utils.logprobs import shifted_logprobs


@dataclass
class PackedSequences:
    """The sequences of a micro batch packed into one row (``[1, T]``), and how to read their scores back."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    params: PackedSeqParams
    segments: torch.Tensor  # [T] index of each token's sequence; the padding segment's is the sequence count
    scored: torch.Tensor  # [T] 1 at a response token (predicted from the position before it)
    count: int

    def response_logprob_sums(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob sums and token counts ``[count]`` of the sequences' responses (the unpacked order)."""
        logprobs = shifted_logprobs(logits, self.tokens)[0]  # [T-1]: token t+1 predicted from t
        scored, segments = self.scored[1:], self.segments[1:]
        zeros = logprobs.new_zeros(self.count + 1, dtype=torch.float32)
        sums = zeros.index_add(0, segments, logprobs.float() * scored)[: self.count]
        counts = zeros.index_add(0, segments, scored)[: self.count]
        return sums, counts


def pack_sequences(tokens: torch.Tensor, mask: torch.Tensor, multiple_of: int | None = None) -> PackedSequences:
    """Pack the rows of ``tokens`` / ``mask`` (``[N, S]``, mask in the collate's convention: 1 at a scored
    token) into one row; ``T`` rounded up to ``multiple_of`` with a padding segment."""
    device = tokens.device
    tokens, mask = tokens.cpu(), mask.cpu()
    lengths = sequence_ends(mask)
    pieces = [(tokens[i, :n], mask[i, :n].clone()) for i, n in enumerate(lengths.tolist())]
    for _, scored in pieces:
        scored[0] = 0  # a sequence's first token has no previous position of its own
    total = int(lengths.sum())
    padding = -total % multiple_of if multiple_of else 0
    if padding:
        lengths = torch.cat([lengths, torch.tensor([padding], device=lengths.device)])
        pieces.append((tokens.new_zeros(padding), mask.new_zeros(padding)))
    cu_seqlens = torch.cat(
        [torch.zeros(1, dtype=torch.int32, device=lengths.device), lengths.cumsum(0).to(torch.int32)]
    ).to(device)
    longest = int(lengths.max())
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
    return PackedSequences(
        tokens=torch.cat([piece for piece, _ in pieces])[None].to(device),
        position_ids=torch.cat([torch.arange(n, device=device) for n in lengths.tolist()])[None],
        params=params,
        segments=torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths).to(device),
        scored=torch.cat([scored for _, scored in pieces]).to(device=device, dtype=torch.float32),
        count=tokens.shape[0],
    )


def forward_packed_sequences(model_chunk: torch.nn.Module, packed: PackedSequences) -> torch.Tensor:
    """The chunk's output (logits ``[1, T, V]``) for packed sequences."""
    return model_chunk(
        input_ids=packed.tokens, position_ids=packed.position_ids, attention_mask=None, packed_seq_params=packed.params
    )


def packed_sequences_problems(cfg: Mapping[str, Any], transformer_engine: bool) -> list[str]:
    """Why this model cannot use packed sequences (module docstring); empty when it can."""
    problems = []
    if (cfg.get("pipeline_model_parallel_size") or 1) > 1:
        problems.append("model.pipeline_model_parallel_size > 1 (pipeline stages exchange fixed-shape activations)")
    if (cfg.get("context_parallel_size") or 1) > 1:
        problems.append("model.context_parallel_size > 1 (needs per-sequence padding to 2*CP, not built)")
    if not transformer_engine and (cfg.get("local_core_attention") or "megatron") != "sdpa":
        problems.append(
            "megatron's local core attention (takes no packed_seq_params): set model.local_core_attention=sdpa "
            "or use TransformerEngine layers (model.transformer_engine=true, GPU)"
        )
    embedding = cfg.get("position_embedding_type", "learned_absolute")
    if embedding not in ("rope", "learned_absolute", "none"):
        problems.append(f"model.position_embedding_type={embedding!r} (supported: rope, learned_absolute, none)")
    tp = cfg.get("tensor_model_parallel_size") or 1
    multiple_of = (cfg.get("data") or {}).get("pad_length_to_multiple_of") or 1
    if cfg.get("sequence_parallel", False) and tp > 1 and multiple_of % tp:
        problems.append(
            "model.sequence_parallel=true without model.data.pad_length_to_multiple_of a multiple of "
            f"model.tensor_model_parallel_size={tp} (the packed row is split across TP ranks)"
        )
    return problems


def resolve_packed_sequences(setting: Any, key: str, cfg: Mapping[str, Any], transformer_engine: bool) -> bool:
    """``true`` (a ``ValueError`` naming ``key`` when unsupported) or ``false``."""
    if not isinstance(setting, bool):
        raise ValueError(f"{key} must be true or false, got {setting!r}")
    problems = packed_sequences_problems(cfg, transformer_engine) if setting else []
    if problems:
        raise ValueError(f"{key}=true is not supported with " + "; ".join(problems) + f". Set {key}=false.")
    return setting
