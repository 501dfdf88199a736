"""The LR schedule reproduces NeMo's CosineAnnealing (warmup, cosine decay, constant tail) step by step."""

from __future__ import annotations

import math

import pytest

from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.utils.optimization import build_lr_scheduler
from tests.conftest import tiny_model_cfg


def nemo_cosine_annealing(step: int, lr: float, min_lr: float, warmup: int, constant: int, max_steps: int) -> float:
    """NeMo's formula, written out: linear warmup (s+1)/(w+1), cosine to min_lr, then min_lr for `constant` steps."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    decay_steps = max_steps - warmup - constant
    if step >= warmup + decay_steps:
        return min_lr
    progress = (step - warmup) / decay_steps
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup, constant", [(0, 0), (3, 0), (2, 4)])
def test_cosine_annealing_matches_nemo(warmup, constant):
    model = MegatronGPTModel(tiny_model_cfg())
    optim = {
        "name": "adamw",
        "lr": 1e-3,
        "sched": {"name": "CosineAnnealing", "warmup_steps": warmup, "constant_steps": constant, "min_lr": 1e-4},
    }
    optimizer, _ = model.setup_optimization(optim, max_steps=20)
    scheduler = build_lr_scheduler(optimizer, optim, max_steps=20)
    for step in range(20):
        expected = nemo_cosine_annealing(step, 1e-3, 1e-4, warmup, constant, 20)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9), step
        scheduler.step(increment=1)
