"""The model's forward and loss run outside the CPU support's function mode (``cpu_support``,
``MegatronGPTModel.forward_backward``), with the same results as under it, megatron's own attention path
(attention dropout in training) included; and megatron's causal mask, which it builds itself when given none
(``device="cuda"`` in megatron-core), is built without the mode."""

from __future__ import annotations

import contextlib

import pytest
import torch
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from nemo_aligner.models.nlp.gpt import megatron_gpt_model
from nemo_aligner.models.nlp.gpt.gpt_sft_model import GPTSFTModel
from nemo_aligner.utils import cpu_support
from nemo_aligner.utils.distributed import initialize_distributed
from tests.conftest import tiny_model_cfg


def _loss_and_grads(model, batch) -> tuple[float, list[torch.Tensor]]:
    model_parallel_cuda_manual_seed(77)  # the same dropout masks for each call
    model.zero_grad(set_to_none=True)
    loss, _ = model.get_loss_and_metrics(batch, forward_only=False)
    return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _function_modes_seen(model, monkeypatch) -> dict[str, list[int]]:
    """How many torch function modes are entered when the model's forward and its loss function run."""
    seen = {"forward": [], "loss": []}
    model.model.register_forward_pre_hook(lambda *_: seen["forward"].append(torch._C._len_torch_function_stack()))
    suspend_loss = megatron_gpt_model.with_device_rewrites_suspended

    def probed(loss_func):
        def loss_with_probe(*args, **kwargs):
            seen["loss"].append(torch._C._len_torch_function_stack())
            return loss_func(*args, **kwargs)

        return suspend_loss(loss_with_probe)

    monkeypatch.setattr(megatron_gpt_model, "with_device_rewrites_suspended", probed)
    return seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="the function mode exists on CPU-only machines")
def test_training_step_with_attention_dropout_equals_the_one_under_the_function_mode(monkeypatch):
    initialize_distributed()
    torch.manual_seed(0)
    model = GPTSFTModel(tiny_model_cfg(attention_dropout=0.25, micro_batch_size=2, global_batch_size=2)).train()
    batch = {"input_ids": torch.randint(1, 250, (2, 24)), "loss_mask": torch.ones(2, 24)}
    with monkeypatch.context() as probing:
        seen = _function_modes_seen(model, probing)
        outside_loss, outside_grads = _loss_and_grads(model, batch)
    assert seen == {"forward": [0], "loss": [0]}  # no mode entered: every torch call goes straight to C++
    assert torch._C._len_torch_function_stack() == 1  # while the rest of the process keeps it

    monkeypatch.setattr(megatron_gpt_model, "device_rewrites_suspended", contextlib.nullcontext)
    monkeypatch.setattr(megatron_gpt_model, "with_device_rewrites_suspended", lambda function: function)
    under_loss, under_grads = _loss_and_grads(model, batch)

    assert outside_loss == under_loss
    assert len(outside_grads) == len(under_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(outside_grads, under_grads))
    model_parallel_cuda_manual_seed(78)  # another dropout draw changes the loss: the masks were in use
    assert model.get_loss_and_metrics(batch, forward_only=False)[0] != outside_loss


@pytest.mark.skipif(torch.cuda.is_available(), reason="the function mode exists on CPU-only machines")
def test_megatron_builds_its_own_causal_mask_outside_the_function_mode():
    # Without a mask megatron's unfused softmax builds the causal one itself (device="cuda" in megatron-core).
    initialize_distributed()
    torch.manual_seed(0)
    model = GPTSFTModel(tiny_model_cfg(attention_dropout=0.25)).train()
    input_ids = torch.randint(1, 250, (2, 24))
    positions = megatron_gpt_model.default_position_ids(input_ids)
    explicit = megatron_gpt_model.causal_attention_mask(24)
    outputs = []
    for mask in (None, explicit):
        model_parallel_cuda_manual_seed(77)
        with torch.no_grad(), cpu_support.device_rewrites_suspended():
            outputs.append(model.model(input_ids=input_ids, position_ids=positions, attention_mask=mask))
    assert torch.equal(outputs[0], outputs[1])
