"""Activation recompute, mixed-precision optimizer state and the DDP keys of ``model.optim``, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.utils.device import current_device
from nemo_aligner.utils.optimization import ddp_config_for
from tests.conftest import tiny_model_cfg

TOKENS = torch.randint(0, 250, (2, 24), generator=torch.Generator(device="cpu").manual_seed(0), device="cpu")


def _loss_and_grads(**overrides) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and how often the first layer's MLP ran (twice per step when it is recomputed)."""
    model = MegatronGPTModel(tiny_model_cfg(num_layers=3, **overrides)).train()
    mlp_calls = []
    model.model.decoder.layers[0].mlp.register_forward_hook(lambda *_: mlp_calls.append(1))
    logprobs = model.get_logprobs(TOKENS)
    loss = -logprobs.mean()
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()}, len(mlp_calls)


@pytest.mark.parametrize(
    "recompute",
    [
        {"activations_checkpoint_granularity": "selective"},
        {
            "activations_checkpoint_granularity": "full",
            "activations_checkpoint_method": "uniform",
            "activations_checkpoint_num_layers": 1,
        },  # fmt: skip
        {
            "activations_checkpoint_granularity": "full",
            "activations_checkpoint_method": "block",
            "activations_checkpoint_num_layers": 2,
        },  # fmt: skip
    ],
    ids=["selective", "full_uniform_1", "full_block_2"],
)
def test_activation_recompute_gives_the_loss_and_gradients_of_storing_everything(recompute):
    loss, grads, calls = _loss_and_grads()
    loss_r, grads_r, calls_r = _loss_and_grads(**recompute)
    assert (calls, calls_r) == (1, 2 if recompute["activations_checkpoint_granularity"] == "full" else 1)
    if recompute["activations_checkpoint_granularity"] == "selective":
        attention = MegatronGPTModel(tiny_model_cfg(**recompute)).model.decoder.layers[0].self_attention
        assert attention.checkpoint_core_attention
    torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
    assert grads_r.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"activations_checkpoint_granularity": "partial"}, "activations_checkpoint_granularity"),
        ({"activations_checkpoint_granularity": "full"}, "activations_checkpoint_method"),
        (
            {"activations_checkpoint_granularity": "full", "activations_checkpoint_method": "uniform"},
            "activations_checkpoint_num_layers",
        ),
        (
            {"activations_checkpoint_granularity": "selective", "activations_checkpoint_num_layers": 2},
            "activations_checkpoint_num_layers",
        ),
    ],
)
def test_unsupported_recompute_settings_are_refused_by_name(overrides, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        MegatronGPTModel(tiny_model_cfg(**overrides))


def test_bf16_o2_keeps_fp32_master_weights_and_steps_the_bf16_weights_from_them():
    model = MegatronGPTModel(tiny_model_cfg(precision="bf16", megatron_amp_O2=True))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device for p in model.parameters()} == {current_device()}
    optimizer, _ = model.setup_optimization({"name": "adam", "lr": 1e-2, "sched": {"name": "Constant"}}, max_steps=2)
    (inner,) = optimizer.chained_optimizers
    masters = [p for group in inner.fp32_from_float16_groups for p in group]
    assert masters and {p.dtype for p in masters} == {torch.float32}
    before = [p.detach().clone() for p in masters]
    model.prepare_for_training_step()

    def step(chunk, batch):
        logits = chunk(input_ids=batch, position_ids=None, attention_mask=None)
        return logits, lambda out: (
            -torch.log_softmax(out.float(), -1)[..., 0].sum(),
            torch.tensor(out.shape[0] * out.shape[1], device=out.device),
            {},
        )

    model.forward_backward([TOKENS.to(current_device())], 1, step, False, TOKENS.shape[1], TOKENS.shape[0])
    success, _ = model.optimizer_step()
    assert success
    moved = [not torch.equal(a, b) for a, b in zip(before, masters)]
    assert any(moved)
    # Each bf16 weight is its fp32 master rounded to bf16: the update accumulates in fp32.
    bf16_params = [p for group in inner.float16_groups for p in group]
    for weight, master in zip(bf16_params, masters):
        torch.testing.assert_close(weight.detach(), master.detach().to(torch.bfloat16), rtol=0, atol=0)


def test_ddp_keys_map_onto_megatron_and_unsupported_ones_are_refused_by_name():
    config = ddp_config_for(
        {"name": "adam", "overlap_grad_sync": True, "bucket_cap_mb": 2, "contiguous_grad_buffer": True}
    )
    assert config.overlap_grad_reduce and config.bucket_size == 2 * 2**20 // 4 and config.grad_reduce_in_fp32
    assert not config.overlap_param_gather and not config.use_distributed_optimizer
    with pytest.raises(ValueError, match="model.optim.contiguous_grad_buffer"):
        ddp_config_for({"name": "adam", "contiguous_grad_buffer": False})
    with pytest.raises(ValueError, match="model.optim.overlap_param_sync"):
        ddp_config_for({"name": "adam", "overlap_param_sync": True})
    with pytest.raises(ValueError, match="model.optim.bucket_cap_mb"):
        ddp_config_for({"name": "adam", "bucket_cap_mb": 0})


def test_overlapped_gradient_reduction_gives_the_same_step():
    def one_step(overlap: bool) -> list[torch.Tensor]:
        model = MegatronGPTModel(tiny_model_cfg())
        optim = {"name": "adam", "lr": 1e-2, "sched": {"name": "Constant"}, "overlap_grad_sync": overlap}
        model.setup_optimization(optim, max_steps=1)
        model.prepare_for_training_step()

        def step(chunk, batch):
            logits = chunk(input_ids=batch, position_ids=None, attention_mask=None)
            count = torch.tensor(batch.numel(), device=batch.device)
            return logits, lambda out: (-torch.log_softmax(out.float(), -1)[..., 1].sum(), count, {})

        model.forward_backward([TOKENS.to(current_device())], 1, step, False, TOKENS.shape[1], TOKENS.shape[0])
        model.optimizer_step()
        return [p.detach().cpu().clone() for p in model.parameters()]

    for plain, overlapped in zip(one_step(False), one_step(True)):
        torch.testing.assert_close(overlapped, plain, rtol=0, atol=0)


def test_fresh_models_draw_weights_on_the_cpu_and_restored_ones_are_built_on_the_device(tmp_path):
    fresh = MegatronGPTModel(tiny_model_cfg())
    assert fresh.transformer_config.use_cpu_initialization  # the same initial weights for every TP layout
    assert {p.device for p in fresh.parameters()} == {current_device()}
    fresh.save_to(tmp_path / "m.nemo")
    restored = MegatronGPTModel.restore_from(tmp_path / "m.nemo")
    assert not restored.transformer_config.use_cpu_initialization  # allocated on the device, then overwritten
    assert {p.device for p in restored.parameters()} == {current_device()}
    assert {b.device for b in restored.buffers()} <= {current_device()}
    for (name, a), (_, b) in zip(fresh.named_parameters(), restored.named_parameters()):
        assert torch.equal(a, b), name
    # Building another model afterwards draws fresh weights again (the restore setting does not leak).
    assert MegatronGPTModel(tiny_model_cfg()).transformer_config.use_cpu_initialization
