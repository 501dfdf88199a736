"""Prefix sharing (``model.dpo.prefix_sharing``): one packed row per pair gives the unshared path's per-response
log-probs, losses and gradients (float rounding only), for RoPE and learned positions, GQA, both core attentions."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from nemo_aligner.data.nlp.dpo_dataset import DPOCollate, filler_pair_item
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.models.nlp.gpt.prefix_sharing import pack_pairs, resolve_prefix_sharing
from nemo_aligner.utils.utils import load_and_override_model_config
from tests.conftest import perturb_, tiny_model_cfg
from tests.distributed.multiprocess import restore_at_layout, run_distributed

# (prompt length, chosen response length, rejected response length); the last pair's responses share 3 tokens.
SHAPES = [(20, 9, 3), (4, 2, 2), (11, 30, 6), (3, 1, 4), (8, 8, 8), (15, 2, 12), (6, 5, 7)]
PAD = 0
ARCHITECTURES = {
    "rope_gqa_swiglu": {},  # the tiny default: RoPE, 4 heads in 2 query groups, RMSNorm, SwiGLU
    "learned_abs_mha_gelu": {
        "position_embedding_type": "learned_absolute",
        "num_query_groups": None,
        "normalization": "layernorm",
        "activation": "gelu",
        "bias": True,
        "share_embeddings_and_output_weights": True,
    },
    "rope50_sdpa": {"rotary_percentage": 0.5, "local_core_attention": "sdpa"},
}


def pair_items() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    items = []
    for index, (prompt, chosen, rejected) in enumerate(SHAPES):
        ids = torch.randint(1, 250, (prompt + chosen + rejected,), generator=generator)
        rejected_ids = torch.cat([ids[:prompt], ids[prompt + chosen :]])
        if index == len(SHAPES) - 1:
            rejected_ids[prompt : prompt + 3] = ids[prompt : prompt + 3]  # a common start of the responses
        items.append(
            {
                "chosen_ids": ids[: prompt + chosen],
                "rejected_ids": rejected_ids,
                "prompt_length": prompt,
                "chosen_length": prompt + chosen,
                "rejected_length": prompt + rejected,
                "chosen_reward": 1.0,
                "rejected_reward": 0.0,
                "sample_index": index,
            }
        )
    return items + [filler_pair_item(PAD)]  # 8 pairs: the last a masked filler


def dpo_model(prefix_sharing: bool, settings: dict | None = None, **overrides) -> MegatronGPTDPOModel:
    dpo = {"ref_policy_kl_penalty": 0.5, "prefix_sharing": prefix_sharing, **(settings or {})}
    cfg = tiny_model_cfg(micro_batch_size=2, global_batch_size=8, dpo=dpo, **overrides)
    cfg["data"] = {"pad_length_to_multiple_of": 4}
    model = MegatronGPTDPOModel(cfg)
    perturb_(model)
    return model


@pytest.fixture(scope="module")
def batch() -> dict:
    return DPOCollate(PAD, pad_length_to_multiple_of=4)(pair_items())


def test_packing_layout_by_hand():
    # prompt [5, 6, 7], chosen response [8, 9], rejected response [4]; right-padded with 0.
    micro_batch = {
        "chosen": torch.tensor([[5, 6, 7, 8, 9]]),
        "rejected": torch.tensor([[5, 6, 7, 4, 0]]),
        "chosen_mask": torch.tensor([[0.0, 0, 0, 1, 1]]),
        "rejected_mask": torch.tensor([[0.0, 0, 0, 1, 0]]),
    }
    packed = pack_pairs(micro_batch, multiple_of=4)
    # [5, 6 | 7, 8, 9 | 7, 4] + one padding column (8 = 7 rounded up to a multiple of 4)
    assert packed.tokens.tolist() == [[5, 6, 7, 8, 9, 7, 4, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 3]]
    assert packed.chosen_mask.tolist() == [[0, 0, 0, 1, 1, 0, 0, 0]]
    assert packed.rejected_mask.tolist() == [[0, 0, 0, 0, 0, 0, 1, 0]]
    visible = [set(torch.nonzero(~row).flatten().tolist()) for row in packed.attention_mask[0, 0]]
    assert visible[4] == {0, 1, 2, 3, 4}  # chosen token: prefix and its own branch
    assert visible[5] == {0, 1, 5}  # the rejected branch's copy of the last prompt token: prefix and itself
    assert visible[6] == {0, 1, 5, 6}  # the rejected response token: never the chosen branch
    assert visible[7] == set(range(8))  # padding attends causally (no empty softmax row)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_logprob_sums_equal_unshared(batch, architecture):
    overrides = ARCHITECTURES[architecture]
    unshared = dpo_model(False, **overrides).get_logprob_sums(batch)
    shared = dpo_model(True, **overrides).get_logprob_sums(batch)
    for side in range(2):
        # float32 sums of up to 30 log-probs of size ~6: rounding (different matmul shapes) is ~1e-7 relative
        torch.testing.assert_close(shared[side], unshared[side], rtol=1e-6, atol=1e-6)
    assert shared[0][-1] == shared[1][-1] == 0  # the filler scores nothing


@pytest.mark.parametrize(
    "settings",
    [{}, {"sft_loss_weight": 0.3, "preference_average_log_probs": True}],
    ids=["dpo", "sft_term_and_averages"],
)
def test_training_step_loss_and_gradients_equal_unshared(batch, settings):
    assert_training_step_equal(dpo_model, batch, settings)


def assert_training_step_equal(make_model: Callable[[bool, dict], MegatronGPTDPOModel], batch: dict, settings: dict):
    """One training step of ``make_model(True, settings)`` (a packed layout) against ``make_model(False, ...)``:
    equal loss, metrics and gradients; and the packed reference pass gives a first loss of exactly log 2."""
    results = {}
    for packed in (False, True):
        model = make_model(packed, settings)
        ref_chosen, ref_rejected = model.get_logprob_sums(batch)
        if packed:
            # Policy == reference through the same packed path: rewards are exactly 0, the loss exactly log 2 in
            # float32.
            _, metrics = model.get_loss_and_metrics(
                {**batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}, forward_only=True
            )
            assert metrics["preference_loss"] == torch.tensor(math.log(2), dtype=torch.float32).item()
            assert metrics["rewards_all_std"] == 0
        model.setup_optimization({"name": "adamw", "lr": 1e-3}, max_steps=1)
        model.prepare_for_training_step()
        shifted = {**batch, "ref_chosen_logps": ref_chosen - 0.4, "ref_rejected_logps": ref_rejected + 0.3}
        _, metrics = model.get_loss_and_metrics(shifted, forward_only=False)
        grads = {name: p.main_grad.clone() for name, p in model.model.named_parameters()}
        results[packed] = metrics, grads
    (metrics, grads), (packed_metrics, packed_grads) = results[False], results[True]
    assert metrics["num_pairs"] == packed_metrics["num_pairs"] == 7
    for key, value in metrics.items():
        assert packed_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_true_refuses_unsupported_configs_auto_turns_off_and_bad_values_are_named():
    key = "model.dpo.prefix_sharing"
    supported = {"position_embedding_type": "rope", "transformer_engine": True}  # asked for TE, not installed
    assert resolve_prefix_sharing(True, key, supported, transformer_engine=False) is True
    assert resolve_prefix_sharing("auto", key, supported, transformer_engine=False) is True
    assert resolve_prefix_sharing(False, key, supported, transformer_engine=False) is False
    for bad, transformer_engine, named in (
        ({"pipeline_model_parallel_size": 2}, False, "pipeline_model_parallel_size"),
        ({}, True, "TransformerEngine"),
        ({"apply_rope_fusion": True}, False, "apply_rope_fusion"),
        ({"position_embedding_type": "yarn"}, False, "position_embedding_type"),
    ):
        with pytest.raises(ValueError, match=named) as error:
            resolve_prefix_sharing(True, key, bad, transformer_engine)
        assert key in str(error.value)
        assert resolve_prefix_sharing("auto", key, bad, transformer_engine) is False
    for value in ("yes", "true", 1.5, None):
        with pytest.raises(ValueError, match=f"{key} must be true, false or auto"):
            resolve_prefix_sharing(value, key, supported, transformer_engine=False)


def scores_at_layout(model_path: str, tp: int) -> dict:
    """Per-response sums without and with prefix sharing, and the packed loss, at tensor-parallel size ``tp``."""
    overrides = {"tensor_model_parallel_size": tp, "micro_batch_size": 2, "global_batch_size": 8}
    cfg = load_and_override_model_config(model_path, {**overrides, "dpo": {"ref_policy_kl_penalty": 0.5}})
    model = restore_at_layout(MegatronGPTDPOModel, cfg, model_path)
    batch = DPOCollate(PAD)(pair_items())
    out = {"unshared": model.get_logprob_sums(batch)}
    model.prefix_sharing = True
    out["shared"] = model.get_logprob_sums(batch)
    ref = {"ref_chosen_logps": out["shared"][0] - 0.4, "ref_rejected_logps": out["shared"][1] + 0.3}
    out["loss"] = model.get_loss_and_metrics({**batch, **ref}, forward_only=True)[0]
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_2_equals_one_process(tmp_path):
    """Vocab-parallel logits and split heads (TP=2, gloo) through the packed path, against one process."""
    start = MegatronGPTModel(tiny_model_cfg())
    perturb_(start)
    model_path = str(tmp_path / "start.nemo")
    start.save_to(model_path)
    single = scores_at_layout(model_path, 1)
    ranks = run_distributed(
        "tests.models.test_dpo_prefix_sharing:scores_at_layout", 2, tmp_path / "out", model_path=model_path, tp=2
    )
    for result in ranks:
        for side in range(2):
            # TP=2 reduces in another order, and packing changes the matmul shapes: fp32 rounding only.
            torch.testing.assert_close(result["shared"][side], single["shared"][side], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(result["shared"][side], result["unshared"][side], rtol=1e-6, atol=1e-6)
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-6)
