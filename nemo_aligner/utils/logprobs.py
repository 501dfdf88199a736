"""The one function that turns (vocab-parallel) logits into per-token log-probs.

Training, reference and validation passes of every algorithm call :func:`from_parallel_logits_to_logprobs`,
so policy and reference log-probs of the same tokens are computed identically.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from megatron.core import tensor_parallel

CHUNK_BYTES = 64 * 2**20
"""Size of the float32 working copy of one chunk of logits (rows x local vocabulary); bounds the extra memory."""


def from_parallel_logits_to_logprobs(vocab_parallel_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``target`` under ``softmax(logits)``, without gathering the vocabulary.

    ``vocab_parallel_logits``: ``[..., V / TP]``, this rank's slice of the vocabulary (the whole vocabulary at
    TP=1). ``target``: ``[...]`` token ids in the full vocabulary. Returns float32 ``[...]``; differentiable.
    The log-sum-exp and the target logit are reduced across the tensor-parallel group by megatron-core's
    vocab-parallel cross entropy, whose negative is the log-prob.

    Positions are processed in chunks of at most :data:`CHUNK_BYTES` of float32 logits, and the softmax is
    recomputed chunk by chunk in the backward pass, so the float32 copy of the logits (bf16 under mixed
    precision) and the softmax kept for the gradient exist for one chunk at a time instead of for the whole batch.
    Every tensor-parallel rank cuts the same chunks, so the collectives match.
    """
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * vocab_parallel_logits.shape[-1]))
    if target.numel() <= rows_per_chunk:
        return _chunk_logprobs(vocab_parallel_logits, target)  # one chunk: no recomputation needed
    return _ChunkedLogprobs.apply(vocab_parallel_logits, target, rows_per_chunk)


def _chunk_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # megatron's cross entropy works in place: it gets a float32 copy, so the caller's logits stay intact.
    return -tensor_parallel.vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), target)


def _chunks(logits: torch.Tensor, rows_per_chunk: int) -> Iterator[tuple]:
    """Indices of ``logits[..., :]`` pieces: every leading index, the last non-vocabulary dimension cut in chunks.

    Slicing (rather than flattening) keeps a strided view such as ``logits[:, :-1]`` from being copied whole.
    """
    *outer, inner = logits.shape[:-1]
    for index in itertools.product(*(range(n) for n in outer)):
        for start in range(0, inner, rows_per_chunk):
            yield (*index, slice(start, start + rows_per_chunk))


class _ChunkedLogprobs(torch.autograd.Function):
    """Chunked :func:`from_parallel_logits_to_logprobs`: saves the logits, recomputes each chunk's softmax."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, rows_per_chunk: int) -> torch.Tensor:
        out = torch.empty(target.shape, dtype=torch.float32, device=logits.device)
        for index in _chunks(logits, rows_per_chunk):
            out[index] = _chunk_logprobs(logits[index], target[index])
        ctx.save_for_backward(logits, target)
        ctx.rows_per_chunk = rows_per_chunk
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, target = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for index in _chunks(logits, ctx.rows_per_chunk):
            chunk = logits[index].detach().requires_grad_()
            with torch.enable_grad():
                logprobs = _chunk_logprobs(chunk, target[index])
            (grad_logits[index],) = torch.autograd.grad(logprobs, chunk, grad_output[index])
        return grad_logits, None, None


def shifted_logprobs(vocab_parallel_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token: position t scores ``input_ids[:, t+1]`` given the prefix. ``[B, S-1]``."""
    return from_parallel_logits_to_logprobs(vocab_parallel_logits[:, :-1], input_ids[:, 1:])
