"""Generation RNG keys: the same for a sample whatever the batch, data-parallel size or resume point."""

from __future__ import annotations


def sample_seed(seed: int, iteration: int, sample_index: int) -> int:
    """The generation RNG key of one sample: the same whatever the batch, data-parallel size or resume point."""
    return (seed * 1_000_003 + iteration * 7_919 + sample_index * 104_729) % (2**63 - 1)
