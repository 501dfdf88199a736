"""Prefix sharing: a chosen/rejected pair scored in one row whose shared prompt is computed once.

The unshared layout runs chosen and rejected as two rows, so the prompt goes through every layer twice. Packed,
a pair is one row ``[shared prefix | chosen branch | rejected branch]``:

- the shared prefix is the tokens both sequences have in common before either response, except the last one;
- each branch starts with that last common token (a copy of it in the rejected branch) and runs to its sequence's
  last response token; its position ids continue the prefix's (both branches start at the same position);
- a branch token attends to the prefix and to the earlier tokens of its own branch, never to the other branch.

Every token therefore sees exactly the tokens and positions it sees in its unshared row, so its hidden states, and
the log-prob of each response token, are the same up to float rounding (the matrix shapes differ). Duplicating the
last common token keeps each branch a contiguous "predict the next token" run: a response's first token is
predicted from its own branch's first position, and the usual shifted log-probs with per-branch response masks
give each response's sum. The cost is one extra token per pair; the saving is the prompt's compute, once per pair.

Attention is an explicit ``[b, 1, L, L]`` mask (megatron's local ``DotProductAttention`` or the SDPA core
attention, ``nemo_aligner/models/nlp/gpt/attention.py``). RoPE needs per-token rotary angles: megatron-core 0.16's
``GPTModel`` computes them for positions ``0..L-1`` whatever the position ids, so :func:`rotary_at_positions`
replaces that table, for one forward, by the rows of the position ids (``[L, b, 1, d]``, which broadcasts in the
unfused ``apply_rotary_pos_emb``). Learned absolute position embeddings read the position ids directly.
Not supported (``auto`` turns it off, ``true`` is refused; :func:`resolve_prefix_sharing`): pipeline parallelism
(stages exchange activations of one fixed width), TransformerEngine layers and fused RoPE (GPU kernels that take
neither an arbitrary mask nor per-token angles here), and YaRN / multimodal RoPE.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.utils import unwrap_model

from nemo_aligner.data.nlp.collate import padded_length
from nemo_aligner.utils.batching import sequence_ends
from nemo_aligner.utils.logprobs import shifted_logprobs

logger = logging.getLogger(__name__)

SHARED, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3
"""Segment ids of the tokens of a packed row."""


@dataclass
class PackedPairs:
    """A micro batch of pairs packed one pair per row (``[b, L]`` each, right-padded)."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor  # [b, 1, L, L] bool, True = blocked (megatron's convention)
    chosen_mask: torch.Tensor  # 1 at a chosen-response token (scored as predicted from the position before it)
    rejected_mask: torch.Tensor

    def response_logprob_sums(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob sums and token counts ``[2b]`` of the responses, chosen then rejected (the unshared order)."""
        logprobs = shifted_logprobs(logits, self.tokens)
        masks = torch.cat([self.chosen_mask, self.rejected_mask])[:, 1:].to(torch.float32)
        return (logprobs.repeat(2, 1) * masks).sum(-1), masks.sum(-1)


def _spans(chosen: torch.Tensor, rejected: torch.Tensor, chosen_mask: torch.Tensor, rejected_mask: torch.Tensor):
    """Per pair: the branch start (= shared prefix length) and the end of each sequence (one past its last
    response token; 1 for a filler). ``[b]`` each."""
    width = chosen.shape[1]

    def end_and_first(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scored = mask > 0
        end = sequence_ends(mask)
        first = torch.where(scored.any(dim=1), scored.int().argmax(dim=1), end)
        return end, first

    chosen_end, chosen_first = end_and_first(chosen_mask)
    rejected_end, rejected_first = end_and_first(rejected_mask)
    differs = chosen != rejected
    common = torch.where(differs.any(dim=1), differs.int().argmax(dim=1), width)
    start = (torch.minimum(common, torch.minimum(chosen_first, rejected_first)) - 1).clamp(min=0)
    return start, chosen_end, rejected_end


def packed_lengths(micro_batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Length of each pair's packed row ``[b]`` (what length bucketing should sort by)."""
    start, chosen_end, rejected_end = _spans(*(micro_batch[k].cpu() for k in _KEYS))
    return chosen_end + rejected_end - start


def pack_pairs(micro_batch: Mapping[str, torch.Tensor], multiple_of: int | None = None) -> PackedPairs:
    """Pack the pairs of a micro batch (``chosen``, ``rejected``, ``chosen_mask``, ``rejected_mask``: ``[b, S]``,
    masks in the collate's convention) one pair per row; rows are padded to the longest, rounded up to
    ``multiple_of``. Padding tokens repeat the row's last token and attend causally to the whole row (no query
    row is empty), while no real token sees them."""
    device = micro_batch["chosen"].device
    chosen, rejected, chosen_mask, rejected_mask = (micro_batch[k].cpu() for k in _KEYS)
    start, chosen_end, rejected_end = _spans(chosen, rejected, chosen_mask, rejected_mask)
    rows = []
    for b in range(chosen.shape[0]):
        s, ce, re_ = int(start[b]), int(chosen_end[b]), int(rejected_end[b])
        rows.append(
            (
                torch.cat([chosen[b, :ce], rejected[b, s:re_]]),
                torch.cat([torch.arange(ce, device="cpu"), torch.arange(s, re_, device="cpu")]),
                torch.cat(
                    [
                        torch.full((n,), kind, device="cpu")
                        for n, kind in ((s, SHARED), (ce - s, CHOSEN), (re_ - s, REJECTED))
                    ]
                ),
                torch.cat([chosen_mask[b, :ce], torch.zeros(re_ - s, dtype=chosen_mask.dtype, device="cpu")]),
                torch.cat([torch.zeros(ce, dtype=rejected_mask.dtype, device="cpu"), rejected_mask[b, s:re_]]),
            )
        )
    width = padded_length(max(len(row[0]) for row in rows), multiple_of, None)
    tokens, positions, segments, chosen_packed, rejected_packed = (
        torch.stack([_right_pad(row[i], width, pad) for row in rows])
        for i, pad in ((0, None), (1, None), (2, PADDING), (3, 0), (4, 0))
    )
    causal = torch.ones(width, width, dtype=torch.bool, device="cpu").tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((key == SHARED) | (key == query) | (query == PADDING))
    return PackedPairs(
        *(t.to(device) for t in (tokens, positions, (~allowed)[:, None], chosen_packed, rejected_packed))
    )


def _right_pad(values: torch.Tensor, width: int, pad: int | None) -> torch.Tensor:
    """``values`` padded to ``width`` with ``pad`` (``None``: its last value repeated, so positions stay in range)."""
    fill = values[-1] if pad is None else pad
    return torch.cat([values, values.new_full((width - len(values),), fill)])


@contextlib.contextmanager
def rotary_at_positions(model_chunk: torch.nn.Module, position_ids: torch.Tensor) -> Iterator[None]:
    """Inside, the chunk's RoPE uses the angles of ``position_ids`` ``[b, L]`` instead of those of ``0..L-1``.

    The rows are taken from the model's own table (``rotary_pos_emb(max position + 1)``), so a token gets the
    same angles as at that position of an unpacked row. A forward hook replaces the table for the duration;
    without RoPE nothing changes.
    """
    gpt = unwrap_model(model_chunk)
    rotary = getattr(gpt, "rotary_pos_emb", None) if gpt.position_embedding_type == "rope" else None
    if rotary is None:
        yield
        return
    table = rotary(int(position_ids.max()) + 1)  # [positions, 1, 1, d]
    angles = table[:, 0][position_ids.t()]  # [L, b, 1, d]
    handle = rotary.register_forward_hook(lambda module, args, output: angles)
    try:
        yield
    finally:
        handle.remove()


def forward_packed(model_chunk: torch.nn.Module, packed: PackedPairs) -> torch.Tensor:
    """The chunk's output (logits on the last stage) for packed pairs."""
    with rotary_at_positions(model_chunk, packed.position_ids):
        return model_chunk(
            input_ids=packed.tokens, position_ids=packed.position_ids, attention_mask=packed.attention_mask
        )


def prefix_sharing_problems(cfg: Mapping[str, Any], transformer_engine: bool) -> list[str]:
    """Why this model cannot use prefix sharing (module docstring); empty when it can.

    ``transformer_engine``: whether the model was built with TransformerEngine layers (``model.transformer_engine``
    asks for them; without TE installed the local spec is used and prefix sharing works).
    """
    problems = []
    if (cfg.get("pipeline_model_parallel_size") or 1) > 1:
        problems.append("model.pipeline_model_parallel_size > 1 (pipeline stages exchange fixed-width activations)")
    if transformer_engine:
        problems.append("TransformerEngine layers (model.transformer_engine=true; use the local layer spec)")
    if cfg.get("apply_rope_fusion", False):
        problems.append("model.apply_rope_fusion=true (fused RoPE takes no per-token angles)")
    embedding = cfg.get("position_embedding_type", "learned_absolute")
    if embedding not in ("rope", "learned_absolute", "none"):
        problems.append(f"model.position_embedding_type={embedding!r} (supported: rope, learned_absolute, none)")
    return problems


def resolve_prefix_sharing(setting: Any, key: str, cfg: Mapping[str, Any], transformer_engine: bool) -> bool:
    """``true`` (required: a ``ValueError`` naming ``key`` when unsupported), ``false``, or ``auto`` (used exactly
    when supported, so NeMo-Aligner's TransformerEngine / pipeline-parallel commands run unchanged)."""
    if setting not in (True, False, "auto"):
        raise ValueError(f"{key} must be true, false or auto, got {setting!r}")
    if setting is False:
        return False
    problems = prefix_sharing_problems(cfg, transformer_engine)
    if problems and setting is True:
        raise ValueError(f"{key}=true is not supported with " + "; ".join(problems) + f". Set {key}=false or auto.")
    if problems:
        logger.info("%s=auto: off (%s)", key, "; ".join(problems))
    return not problems


_KEYS = ("chosen", "rejected", "chosen_mask", "rejected_mask")
