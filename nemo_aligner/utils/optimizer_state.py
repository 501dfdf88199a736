"""The torch optimizers' per-parameter state inside megatron-core's optimizers, and restarting Adam."""

from __future__ import annotations

import torch


def torch_optimizer_states(optimizer) -> list[dict]:
    """Per-parameter state dicts of the torch optimizers inside a megatron (chained/distributed) optimizer."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    states = []
    for one in inner:
        torch_optimizer = getattr(one, "optimizer", one)
        states.extend(torch_optimizer.state.values())
    return states


def restart_adam(optimizer) -> None:
    """Zero Adam's moments and restart its bias correction, as if the optimizer were new.

    The step count goes back to 1, not 0: megatron-core's checkpoint drops a zero step and would not resume from it.
    The first update after a restart is then Adam's step 2 on zero moments, ``(1 - b1) / (1 - b1^2) /
    sqrt((1 - b2) / (1 - b2^2))`` = 0.74 times a new optimizer's first update (b1 = 0.9, b2 = 0.999). Keeping the old
    count instead would make it ``(1 - b1) / sqrt(1 - b2)`` = 3.2 times: bias correction would no longer undo the
    zeroed moments, and every iteration would start with a jump.
    """
    for state in torch_optimizer_states(optimizer):
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                value.fill_(1) if name == "step" else value.zero_()
