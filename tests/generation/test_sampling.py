"""Token choice and end detection, checked on crafted distributions and token sequences (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_aligner.generation import EndDetector, LengthParams, SamplingParams
from nemo_aligner.generation.sampling import (
    apply_repetition_penalty,
    choose_tokens,
    draw_uniforms,
    sample_from_logits,
    top_k_top_p_filter,
)
from nemo_aligner.tokenizers import ByteLevelTokenizer

SAMPLING = {
    "use_greedy": False,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "end_strings": ["<extra_id_1>"],
    "add_BOS": False,
    "all_probs": False,
    "compute_logprob": False,
}
# Probabilities 0.05, 0.5, 0.15, 0.3 at ids 0..3 (not sorted, so the filters must sort).
PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])
LOGITS = PROBS.log()


def params(**overrides) -> SamplingParams:
    return SamplingParams.from_config({**SAMPLING, **overrides})


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def empirical(probs_params: SamplingParams, draws: int = 20000) -> torch.Tensor:
    """Frequencies of each id over ``draws`` samples from LOGITS (one keyed uniform per draw)."""
    generator = torch.Generator().manual_seed(0)
    uniforms = draw_uniforms([generator] * draws)
    tokens = choose_tokens(LOGITS.expand(draws, -1), probs_params, uniforms=uniforms)
    return torch.bincount(tokens, minlength=4).double() / draws


def test_top_k_keeps_the_k_largest_logits_and_ties():
    assert kept(top_k_top_p_filter(LOGITS[None], top_k=2, top_p=1.0)[0]) == {1, 3}
    assert kept(top_k_top_p_filter(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), top_k=1, top_p=0.0)[0]) == {1, 2}
    assert kept(top_k_top_p_filter(LOGITS[None], top_k=0, top_p=1.0)[0]) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    "top_p, expected",
    [(0.3, {1}), (0.75, {1, 3}), (0.85, {1, 2, 3}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3}), (0.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_nucleus_reaching_the_mass(top_p, expected):
    # Sorted mass before each token: 0 (0.5), 0.5 (0.3), 0.8 (0.15), 0.95 (0.05); 0 and 1 disable the filter.
    assert kept(top_k_top_p_filter(LOGITS[None], top_k=0, top_p=top_p)[0]) == expected


def test_sampling_frequencies_follow_temperature_and_top_p():
    # 20000 draws: a frequency's standard deviation is at most 0.0036, so 0.015 is > 4 sigma.
    assert torch.allclose(empirical(params()), PROBS.double(), atol=0.015)
    tempered = PROBS.double().pow(1 / 2.0)
    assert torch.allclose(empirical(params(temperature=2.0)), tempered / tempered.sum(), atol=0.015)
    nucleus = torch.tensor([0.0, 0.5, 0.0, 0.3], dtype=torch.float64) / 0.8
    assert torch.allclose(empirical(params(top_p=0.75)), nucleus, atol=0.015)
    assert torch.equal(empirical(params(top_k=1), draws=100), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_inverse_cdf_never_picks_a_masked_token():
    logits = torch.tensor([[float("-inf"), 1.0, float("-inf"), 0.5, float("-inf")]]).expand(3, -1)
    uniforms = torch.tensor([0.0, 0.5, math.nextafter(1.0, 0.0)], dtype=torch.float64)
    assert sample_from_logits(logits, uniforms).tolist() == [1, 1, 3]


def test_repetition_penalty_divides_seen_logits_as_ctrl_and_nemo():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -1.0, 1.0]]
    # Greedy ignores the penalty (NeMo); sampling with it avoids a seen token that dominates the logits.
    strong = torch.tensor([[5.0, 0.0]])
    seen = torch.tensor([[True, False]])
    assert choose_tokens(strong, params(use_greedy=True, repetition_penalty=100.0), seen).item() == 0
    sampled = choose_tokens(strong, params(repetition_penalty=100.0), seen, torch.tensor([0.6], dtype=torch.float64))
    assert sampled.item() == 1


def test_draws_depend_only_on_the_key():
    first = draw_uniforms([torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    again = draw_uniforms([torch.Generator().manual_seed(s) for s in (3, 1)])
    assert again.tolist() == [first[2].item(), first[0].item()]


def test_params_errors_name_the_key():
    with pytest.raises(ValueError, match="missing keys \\['top_p'\\]"):
        SamplingParams.from_config({k: v for k, v in SAMPLING.items() if k != "top_p"})
    with pytest.raises(ValueError, match="unknown keys \\['topk'\\]"):
        SamplingParams.from_config({**SAMPLING, "topk": 3})
    with pytest.raises(ValueError, match="sampling_params.temperature"):
        params(temperature=0.0)
    with pytest.raises(ValueError, match="sampling_params.top_p"):
        params(top_p=1.5)
    with pytest.raises(ValueError, match="length_params.max_length"):
        LengthParams.from_config({"max_length": -1, "min_length": 0})
    assert params(use_greedy=True, temperature=0.0).use_greedy


def test_end_detector_ids_and_strings():
    tokenizer = ByteLevelTokenizer(["<extra_id_1>"])
    extra_id = tokenizer.token_to_id("<extra_id_1>")
    end = EndDetector(tokenizer, ["<extra_id_1>", "User:", "\n", "é!"])
    # EOS, the special token and the one-byte newline stop on their ids.
    assert end.end_ids == (0, ord("\n"), extra_id)

    def ids(text: str) -> list[int]:
        return tokenizer.text_to_ids(text)

    assert end.has_ended(ids("hi") + [extra_id])
    assert end.has_ended(ids("hi") + [0])
    assert end.has_ended(ids("hi\n"))
    assert end.has_ended(ids("hello User:"))
    assert not end.has_ended(ids("hello User"))
    assert not end.has_ended(ids("User: hello"))
    assert not end.has_ended([])
    # Multi-byte characters: the decoded tail must hold the whole end string.
    assert end.has_ended(ids("x" * 1000 + "é!"))
    assert not end.has_ended(ids("x" * 1000 + "e!"))
    # The special token's text spelled out byte by byte is not the special token.
    assert not EndDetector(tokenizer, ["<extra_id_1>"]).has_ended(ids("a") + list(b"<extra_id_1>"))
