"""The fused (SDPA) core attention gives megatron-core's local DotProductAttention results: logits, gradients,
custom masks and KV-cached greedy decoding."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

from nemo_aligner.models.nlp.gpt.attention import SDPADotProductAttention
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from tests.conftest import perturb_, tiny_model_cfg
from tests.generation.test_generate import GREEDY

# float32 with a different summation order (blocked softmax vs full), over 2 layers.
ATOL = 2e-5


def _core_attentions(model: MegatronGPTModel) -> list[torch.nn.Module]:
    return [layer.self_attention.core_attention for layer in model.model.decoder.layers]


@pytest.fixture(scope="module")
def models() -> tuple[MegatronGPTModel, MegatronGPTModel]:
    """(fused, megatron's local) models with the same perturbed weights."""
    fused = MegatronGPTModel(tiny_model_cfg(local_core_attention="sdpa"))
    local = MegatronGPTModel(tiny_model_cfg())
    perturb_(fused)
    local.load_state_dict(fused.state_dict())
    assert all(type(m) is SDPADotProductAttention for m in _core_attentions(fused))
    assert all(type(m) is DotProductAttention for m in _core_attentions(local))  # the default
    return fused, local


def _tokens(batch: int = 3, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 250, (batch, length), generator=torch.Generator().manual_seed(0))


def test_logits_and_gradients_match_local_attention(models):
    fused, local = models
    tokens = _tokens()
    out = {}
    for name, model in (("fused", fused), ("local", local)):
        model.zero_grad()
        logits = model(tokens)
        (logits.square().mean()).backward()
        out[name] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert (out["fused"][0] - out["local"][0]).abs().max() < ATOL
    for name, grad in out["local"][1].items():
        assert torch.allclose(out["fused"][1][name], grad, atol=ATOL, rtol=1e-4), name


def test_explicit_per_sample_mask_matches_local_attention(models):
    """A [B, 1, S, S] mask (here causal plus a blocked block per sample) goes through as given."""
    fused, local = models
    tokens = _tokens()
    mask = torch.triu(torch.ones(24, 24, dtype=torch.bool), diagonal=1).repeat(3, 1, 1, 1)
    mask[0, 0, 16:, 8:12] = True
    mask[2, 0, 20:, 0:4] = True
    with torch.no_grad():
        expected = local(tokens, attention_mask=mask)
        actual = fused(tokens, attention_mask=mask)
        causal_only = fused(tokens)
    assert (actual - expected).abs().max() < ATOL
    assert (actual[0, 16:] - causal_only[0, 16:]).abs().max() > 1e-3  # the extra block really changed attention


def test_kv_cached_greedy_decoding_matches_local_attention(models):
    fused, local = models
    prompts = [[5, 9, 33, 71], [8, 3], [100, 101, 102, 103, 104, 105]]
    sampling = {**GREEDY, "compute_logprob": True}
    length = {"max_length": 10, "min_length": 10}
    a = fused.eval().generate(prompts, sampling, length)
    b = local.eval().generate(prompts, sampling, length)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert (x - y).abs().max() < ATOL
