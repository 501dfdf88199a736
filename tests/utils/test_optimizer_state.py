"""Self-Rewarding's per-iteration optimizer restart, checked against Adam's update written out by hand."""

from __future__ import annotations

import torch

from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.utils.optimizer_state import restart_adam
from tests.conftest import tiny_model_cfg

BETA1, BETA2, EPS, LR = 0.9, 0.999, 1e-8, 1e-3


def train_step(model, optimizer, tokens) -> dict[str, torch.Tensor]:
    """One step on a language-model loss; returns the gradients the optimizer saw, by parameter name."""
    model.prepare_for_training_step()
    for chunk in model.model_chunks():
        chunk.zero_grad_buffer()
    labels = tokens[:, 1:]
    logits = model(tokens[:, :-1], None, None)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    loss.backward()
    for chunk in model.model_chunks():
        chunk.finish_grad_sync()
    grads = {name: p.main_grad.detach().clone() for name, p in model.model.named_parameters()}
    optimizer.step()
    return grads


def test_the_first_update_after_a_restart_is_adams_second_step_on_zero_moments():
    model = MegatronGPTModel(tiny_model_cfg())
    optimizer, _ = model.setup_optimization(
        {
            "name": "adamw",
            "lr": LR,
            "weight_decay": 0.0,
            "betas": [BETA1, BETA2],
            "eps": EPS,
            "sched": {"name": "Constant"},
        },
        max_steps=10,
    )
    tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        train_step(model, optimizer, tokens)
    restart_adam(optimizer)
    before = {name: p.detach().clone() for name, p in model.model.named_parameters()}
    grads = train_step(model, optimizer, tokens)
    worst = 0.0
    for name, p in model.model.named_parameters():
        g = grads[name].double()
        m_hat = (1 - BETA1) * g / (1 - BETA1**2)
        v_hat = (1 - BETA2) * g * g / (1 - BETA2**2)
        expected = before[name].double() - LR * m_hat / (v_hat.sqrt() + EPS)
        worst = max(worst, (p.detach().double() - expected).abs().max().item())
    assert worst < 1e-6  # fp32 parameters of size ~0.02 moved by ~1e-3: float32 rounding is ~1e-9
