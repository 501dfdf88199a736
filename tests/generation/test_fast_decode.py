"""The fast decode step (``FastDecoder``) against megatron-core's modules (``generate(..., fast_decode=False)``)."""

from __future__ import annotations

import pytest
import torch

from nemo_aligner.generation import decoding
from nemo_aligner.generation.fast_decode import unsupported_reason
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.utils import cpu_support
from tests.conftest import perturb_, tiny_model_cfg
from tests.generation.test_generate import GREEDY, SAMPLING, random_prompts

ARCHITECTURES = {
    "llama_rope_gqa_swiglu_rmsnorm": {},
    "gpt2_learned_gelu_layernorm_bias_tied": {
        "position_embedding_type": "learned_absolute",
        "normalization": "layernorm",
        "activation": "gelu",
        "bias": True,
        "num_query_groups": None,
        "share_embeddings_and_output_weights": True,
    },
    # Partial RoPE (half of each head rotated), a query-key bias only, NeMo's layernorm1p, geglu, 4 heads per group.
    "rope50_qkv_bias_layernorm1p_geglu_mqa": {
        "rotary_percentage": 0.5,
        "qkv_bias": True,
        "normalization": "layernorm1p",
        "activation": "geglu",
        "num_query_groups": 1,
        "apply_query_key_layer_scaling": True,
    },
}
# Log-probs: the fast step runs megatron's operations in megatron's shapes, so they agree to float32 rounding of
# the RoPE table (computed once here, per step there); on this machine they are bit-identical.
LOGPROB_TOLERANCE = 1e-5


def build(**overrides) -> MegatronGPTModel:
    model = MegatronGPTModel(tiny_model_cfg(**overrides)).eval()
    perturb_(model)
    return model


def assert_same_generation(model, prompts, sampling, length, seeds=None):
    plain = decoding.generate(model, prompts, sampling, length, seeds, fast_decode=False)
    fast = decoding.generate(model, prompts, sampling, length, seeds)
    assert fast.token_ids == plain.token_ids
    assert fast.ended == plain.ended
    if sampling["compute_logprob"]:
        difference = max((f - p).abs().max().item() for f, p in zip(fast.logprobs, plain.logprobs))
        assert difference <= LOGPROB_TOLERANCE
    return fast


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_fast_decode_equals_megatron_modules(architecture):
    model = build(**ARCHITECTURES[architecture])
    assert unsupported_reason(model.model, model.autocast_dtype) is None
    # Prompts of different lengths: the shorter ones decode while the longer ones still read their prompt; the
    # budgets (context 64) end rows at different steps, so the cache shrinks mid-way.
    prompts = random_prompts([50, 3, 11, 56, 7], seed=6)
    length = {"max_length": 20, "min_length": 0}
    out = assert_same_generation(model, prompts, {**GREEDY, "compute_logprob": True}, length)
    assert len(set(out.response_lengths)) > 1
    sampled = {**SAMPLING, "compute_logprob": True}
    assert_same_generation(model, prompts, sampled, length, seeds=[11, 12, 13, 14, 15])


def test_unsupported_models_decode_through_megatron(monkeypatch):
    model = build()
    assert unsupported_reason(model.model, torch.bfloat16) == "not float32"
    with monkeypatch.context() as patch:  # another megatron-core release (e.g. a newer NVIDIA container)
        patch.setattr("megatron.core.__version__", "0.17.0")
        assert "megatron-core 0.17.0" in unsupported_reason(model.model, None)
    sdpa = build(local_core_attention="sdpa")
    assert "plain local-spec layer" in unsupported_reason(sdpa.model, None)
    model = build(peft={"peft_scheme": "lora", "lora_tuning": {"target_modules": ["attention_qkv"], "adapter_dim": 4}})
    assert "plain local-spec layer" in unsupported_reason(model.model, None)
    prompts = random_prompts([5, 9], seed=7)
    assert_same_generation(model, prompts, GREEDY, {"max_length": 8, "min_length": 0})


def test_device_rewrites_suspended_leaves_the_mode_in_place():
    def depth() -> int:
        return torch._C._len_torch_function_stack()

    before = depth()
    with cpu_support.device_rewrites_suspended():
        inside = depth()
    assert depth() == before
    assert inside == (before - 1 if cpu_support.apply_cpu_support() else before)
