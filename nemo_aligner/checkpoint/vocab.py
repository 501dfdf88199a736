"""How NeMo sizes the vocabulary rows a checkpoint stores (models, converters and readers share it)."""

from __future__ import annotations


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Vocabulary rows of the embedding: rounded up to a multiple of ``divisible_by * TP``, as NeMo does."""
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple
