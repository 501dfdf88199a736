"""Packed sequences (``model.dpo.packed_sequences``): one THD row per micro batch gives the unpacked path's
per-response log-probs, losses and gradients (float rounding only), for RoPE and learned positions and GQA, through
the SDPA core attention's THD emulation on CPU; TransformerEngine's THD kernels on GPU."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_aligner.data.nlp.dpo_dataset import DPOCollate
from nemo_aligner.models.nlp.gpt.attention import thd_causal_mask
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.models.nlp.gpt.packed_sequences import pack_sequences, resolve_packed_sequences
from nemo_aligner.utils.distributed import initialize_distributed
from nemo_aligner.utils.utils import load_and_override_model_config
from tests.conftest import perturb_, tiny_model_cfg
from tests.distributed.multiprocess import restore_at_layout, run_distributed
from tests.models.test_dpo_prefix_sharing import (
    ARCHITECTURES,
    PAD,
    assert_training_step_equal,
    pair_items,
)
from tests.models.test_dpo_prefix_sharing import dpo_model as unpacked_dpo_model


def dpo_model(packed: bool, settings: dict | None = None, **overrides) -> MegatronGPTDPOModel:
    """The prefix-sharing tests' tiny DPO model (prefix sharing off), with the SDPA core attention by default."""
    overrides = {"local_core_attention": "sdpa", **overrides}
    return unpacked_dpo_model(False, {"packed_sequences": packed, **(settings or {})}, **overrides)


@pytest.fixture(scope="module")
def batch() -> dict:
    return DPOCollate(PAD, pad_length_to_multiple_of=4)(pair_items())  # 7 pairs of different lengths + a filler


def test_packing_layout_by_hand():
    initialize_distributed(1, 1, seed=0)  # one process: the log-probs go through megatron's vocab-parallel helper
    # sequence 0: prompt [5, 6], response [7, 8]; sequence 1: prompt [5], response [9], then a padding column;
    # sequence 2: a filler (nothing scored: one token kept). Packed length 4 + 2 + 1 = 7, rounded up to 8.
    tokens = torch.tensor([[5, 6, 7, 8], [5, 9, 0, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[0.0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    packed = pack_sequences(tokens, mask, multiple_of=4)
    assert packed.tokens.tolist() == [[5, 6, 7, 8, 5, 9, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 0, 0]]
    assert packed.params.qkv_format == "thd"
    assert packed.params.cu_seqlens_q.tolist() == packed.params.cu_seqlens_kv.tolist() == [0, 4, 6, 7, 8]
    assert packed.params.cu_seqlens_q.dtype == torch.int32
    assert packed.params.max_seqlen_q == packed.params.max_seqlen_kv == 4
    assert packed.segments.tolist() == [0, 0, 0, 0, 1, 1, 2, 3]  # 3: the padding segment, not returned
    assert packed.scored.tolist() == [0, 0, 1, 1, 0, 1, 0, 0]
    visible = [set(torch.nonzero(~row).flatten().tolist()) for row in thd_causal_mask(packed.params)[0, 0]]
    assert visible[3] == {0, 1, 2, 3} and visible[4] == {4} and visible[5] == {4, 5} and visible[7] == {7}
    # log-probs by hand from logits whose log-softmax is known: uniform except the tokens of interest
    logits = torch.zeros(1, 8, 16)
    logits[0, 1, 7] = logits[0, 2, 8] = logits[0, 4, 9] = math.log(3.0)  # those tokens get 3/18
    logits[0, 3, 5] = 50.0  # the boundary prediction (8 -> next sequence's 5) must not count
    sums, counts = packed.response_logprob_sums(logits)
    expected = math.log(3 / 18)
    torch.testing.assert_close(sums, torch.tensor([2 * expected, expected, 0.0]))
    assert counts.tolist() == [2, 1, 0]


# RoPE + GQA, learned positions + MHA, RoPE on half the head dimension (all through the SDPA attention here)
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_logprob_sums_equal_unpacked(batch, architecture):
    overrides = ARCHITECTURES[architecture]
    unpacked = dpo_model(False, **overrides).get_logprob_sums(batch)
    packed = dpo_model(True, **overrides).get_logprob_sums(batch)
    for side in range(2):
        # float32 sums of up to 30 log-probs of size ~6: rounding (other matmul shapes, summation order) ~1e-7
        torch.testing.assert_close(packed[side], unpacked[side], rtol=1e-5, atol=1e-5)
    assert packed[0][-1] == packed[1][-1] == 0  # the filler scores nothing
    assert (packed[0][:-1] != 0).all() and (packed[1][:-1] != 0).all()


@pytest.mark.parametrize(
    "settings",
    [{}, {"sft_loss_weight": 0.3, "preference_average_log_probs": True}],
    ids=["dpo", "sft_term_and_averages"],
)
def test_training_step_loss_and_gradients_equal_unpacked(batch, settings):
    assert_training_step_equal(dpo_model, batch, settings)


def test_refused_configs_are_named_and_packed_wins_over_prefix_sharing():
    key = "model.dpo.packed_sequences"
    sdpa = {"local_core_attention": "sdpa", "position_embedding_type": "rope"}
    assert resolve_packed_sequences(True, key, sdpa, transformer_engine=False) is True
    assert resolve_packed_sequences(True, key, {"position_embedding_type": "rope"}, transformer_engine=True) is True
    assert resolve_packed_sequences(False, key, {}, transformer_engine=False) is False
    parallel = {**sdpa, "sequence_parallel": True, "tensor_model_parallel_size": 2}
    assert resolve_packed_sequences(True, key, {**parallel, "data": {"pad_length_to_multiple_of": 4}}, False)
    for bad, transformer_engine, named in (
        ({}, False, "model.local_core_attention=sdpa"),
        ({**sdpa, "pipeline_model_parallel_size": 2}, False, "pipeline_model_parallel_size"),
        ({**sdpa, "context_parallel_size": 2}, True, "context_parallel_size"),
        ({**sdpa, "position_embedding_type": "yarn"}, False, "position_embedding_type"),
        ({**sdpa, "sequence_parallel": True, "tensor_model_parallel_size": 2}, False, "pad_length_to_multiple_of"),
    ):
        with pytest.raises(ValueError, match=named) as error:
            resolve_packed_sequences(True, key, bad, transformer_engine)
        assert f"{key}=true is not supported" in str(error.value)
    for value in ("yes", "auto", 1, None):
        with pytest.raises(ValueError, match=f"{key} must be true or false"):
            resolve_packed_sequences(value, key, sdpa, transformer_engine=False)
    with pytest.raises(ValueError, match="model.local_core_attention=sdpa"):
        dpo_model(True, local_core_attention="megatron")
    model = dpo_model(True, {"prefix_sharing": True})
    assert model.packed_sequences and not model.prefix_sharing


@pytest.mark.gpu
def test_transformer_engine_thd_equals_unpacked(batch):
    """TransformerEngine's THD attention (megatron's TE spec) against the padded TE path, on CUDA."""
    sums = {}
    for packed in (False, True):
        model = dpo_model(packed, transformer_engine=True).cuda()
        assert model.packed_sequences is packed
        sums[packed] = model.get_logprob_sums({k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()})
    for side in range(2):
        torch.testing.assert_close(sums[True][side], sums[False][side], rtol=1e-4, atol=1e-4)  # TE kernels, TF32


def thd_scores_at_layout(model_path: str, tp: int) -> dict:
    """Per-response sums without and with packed sequences, and the packed loss, at tensor-parallel size ``tp``."""
    overrides = {"tensor_model_parallel_size": tp, "micro_batch_size": 2, "global_batch_size": 8}
    settings = {"ref_policy_kl_penalty": 0.5, "prefix_sharing": False, "packed_sequences": True}
    cfg = load_and_override_model_config(model_path, {**overrides, "local_core_attention": "sdpa", "dpo": settings})
    model = restore_at_layout(MegatronGPTDPOModel, cfg, model_path)
    batch = DPOCollate(PAD)(pair_items())
    out = {"packed": model.get_logprob_sums(batch)}
    ref = {"ref_chosen_logps": out["packed"][0] - 0.4, "ref_rejected_logps": out["packed"][1] + 0.3}
    out["loss"] = model.get_loss_and_metrics({**batch, **ref}, forward_only=True)[0]
    model.packed_sequences = False
    out["unpacked"] = model.get_logprob_sums(batch)
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_2_equals_one_process(tmp_path):
    """Split heads and vocab-parallel logits (TP=2, gloo) through the THD path, against one process."""
    start = MegatronGPTModel(tiny_model_cfg())
    perturb_(start)
    model_path = str(tmp_path / "start.nemo")
    start.save_to(model_path)
    single = thd_scores_at_layout(model_path, 1)
    ranks = run_distributed(
        "tests.models.test_dpo_packed_sequences:thd_scores_at_layout", 2, tmp_path / "out", model_path=model_path, tp=2
    )
    for result in ranks:
        for side in range(2):
            # TP=2 reduces in another order, and packing changes the matmul shapes: fp32 rounding only.
            torch.testing.assert_close(result["packed"][side], single["packed"][side], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(result["packed"][side], result["unpacked"][side], rtol=1e-5, atol=1e-5)
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-5)
