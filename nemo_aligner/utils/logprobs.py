"""The one function that turns (vocab-parallel) logits into per-token log-probs.

Training, reference and validation passes of every algorithm call :func:`from_parallel_logits_to_logprobs`,
so policy and reference log-probs of the same tokens are computed identically.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel


def from_parallel_logits_to_logprobs(vocab_parallel_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``target`` under ``softmax(logits)``, without gathering the vocabulary.

    ``vocab_parallel_logits``: ``[..., V / TP]``, this rank's slice of the vocabulary (the whole vocabulary at
    TP=1). ``target``: ``[...]`` token ids in the full vocabulary. Returns float32 ``[...]``; differentiable.
    The log-sum-exp and the target logit are reduced across the tensor-parallel group by megatron-core's
    vocab-parallel cross entropy, whose negative is the log-prob. That function works in place, so it gets a
    float32 copy and the caller's logits stay intact.
    """
    logits = vocab_parallel_logits.to(torch.float32, copy=True)
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, target)


def shifted_logprobs(vocab_parallel_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token: position t scores ``input_ids[:, t+1]`` given the prefix. ``[B, S-1]``."""
    return from_parallel_logits_to_logprobs(vocab_parallel_logits[:, :-1], input_ids[:, 1:])
