"""The run's seed (``model.seed``) and the generation RNG keys derived from it: the same for a sample whatever the
batch, data-parallel size or resume point."""

from __future__ import annotations

NEMO_DEFAULT_SEED = 1234
"""NeMo's ``model.seed``, for a model config without one (an HF-converted checkpoint's). The YAMLs set it."""


def model_seed(model_cfg) -> int:
    """The run's seed: ``model.seed`` of the config (the YAML's, or the checkpoint's), else NeMo's default."""
    return int(model_cfg.get("seed", NEMO_DEFAULT_SEED))


def sample_seed(seed: int, iteration: int, sample_index: int) -> int:
    """The generation RNG key of one sample: the same whatever the batch, data-parallel size or resume point."""
    return (seed * 1_000_003 + iteration * 7_919 + sample_index * 104_729) % (2**63 - 1)
