"""KV-cached generation against full forwards without a cache, on tiny perturbed random models."""

from __future__ import annotations

import pytest
import torch

from nemo_aligner.evaluation import greedy_sampling_params
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from tests.conftest import perturb_, tiny_model_cfg

GREEDY = greedy_sampling_params(end_strings=())
SAMPLING = {**GREEDY, "use_greedy": False, "top_p": 0.9, "repetition_penalty": 1.2}
# Byte-level vocabulary 512 plus one special token (id 512), padded to 640 for the embedding.
SPECIAL_TOKENS = ["<extra_id_1>"]
EXTRA_ID = 512
# Margin below which two logits count as tied: fp32 rounding of cached vs full forwards is ~1e-6.
TIE = 1e-5


def build(**overrides) -> MegatronGPTModel:
    cfg = tiny_model_cfg(tokenizer={"library": "byte-level", "special_tokens": SPECIAL_TOKENS}, **overrides)
    model = MegatronGPTModel(cfg).eval()
    perturb_(model)
    return model


@pytest.fixture(scope="module")
def model() -> MegatronGPTModel:
    return build()


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 256, (n,), generator=generator).tolist() for n in lengths]


def reference_greedy(model: MegatronGPTModel, prompt: list[int], max_new: int) -> tuple[list[int], int]:
    """Argmax of full forwards without a cache, one sample; returns (response, tokens trusted before a near-tie)."""
    ids, trusted = list(prompt), None
    for step in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1, : model.tokenizer.vocab_size]
        top2 = logits.topk(2).values
        if trusted is None and top2[0] - top2[1] < TIE:
            trusted = step
        ids.append(int(logits.argmax()))
        if ids[-1] == model.tokenizer.eos_id:
            break
    response = ids[len(prompt) :]
    return response, len(response) if trusted is None else trusted


@pytest.mark.parametrize("architecture", ["llama_rope", "gpt2_learned_positions"])
def test_greedy_equals_full_forward_argmax_and_logprobs_match(architecture, model):
    if architecture == "gpt2_learned_positions":
        model = build(
            position_embedding_type="learned_absolute",
            normalization="layernorm",
            activation="gelu",
            num_query_groups=None,
        )
    prompts = random_prompts([3, 11, 6, 1, 11])
    out = model.generate(
        prompts, {**GREEDY, "compute_logprob": True, "all_probs": True}, {"max_length": 10, "min_length": 0}
    )

    assert out.prompt_lengths == [len(p) for p in prompts]
    for i, prompt in enumerate(prompts):
        expected, trusted = reference_greedy(model, prompt, 10)
        assert trusted > 0
        assert out.response_ids[i][:trusted] == expected[:trusted]
        assert out.token_ids[i][: len(prompt)] == prompt
        assert out.response_lengths[i] == len(out.response_ids[i])
        assert out.ended[i] == (out.response_ids[i][-1] == model.tokenizer.eos_id)
        # Log-probs of the response under the model, from one full forward of the whole sequence.
        with torch.no_grad():
            full = model(torch.tensor([out.token_ids[i]]))[0, len(prompt) - 1 : -1].double().log_softmax(-1).cpu()
        response = torch.tensor(out.response_ids[i])
        assert out.logprobs[i].dtype == torch.float32
        assert (out.logprobs[i] - full.gather(1, response[:, None])[:, 0]).abs().max() < 1e-5
        assert (out.full_logprobs[i] - full).abs().max() < 1e-5


def test_sampling_is_reproducible_per_sample_across_batches(model):
    # Budgets 14, 8, 20, 20 (context 64): rows finish at different steps, so the cache shrinks mid-way.
    prompts = random_prompts([50, 56, 3, 10], seed=1)
    seeds = [101, 102, 103, 104]
    length = {"max_length": 20, "min_length": 0}
    batch = model.generate(prompts, SAMPLING, length, seeds)
    for i in range(4):
        alone = model.generate([prompts[i]], SAMPLING, length, [seeds[i]])
        assert alone.token_ids[0] == batch.token_ids[i]
    reordered = model.generate(prompts[::-1], SAMPLING, length, seeds[::-1])
    assert reordered.token_ids == batch.token_ids[::-1]
    # Another key gives another sample; the same key the same one.
    assert model.generate(prompts, SAMPLING, length, [7, 8, 9, 10]).token_ids != batch.token_ids
    assert model.generate(prompts, SAMPLING, length, seeds).token_ids == batch.token_ids
    for ids in batch.token_ids:
        assert len(ids) <= model.encoder_seq_length
        assert max(ids) < model.tokenizer.vocab_size  # never a padding id of the embedding


def test_top_k_one_equals_greedy(model):
    prompts = random_prompts([4, 9, 2], seed=2)
    length = {"max_length": 12, "min_length": 0}
    greedy = model.generate(prompts, GREEDY, length)
    top1 = model.generate(
        prompts, {**SAMPLING, "top_k": 1, "temperature": 0.7, "repetition_penalty": 1.0}, length, [1, 2, 3]
    )
    assert top1.token_ids == greedy.token_ids


def test_lengths_are_clipped_to_the_context(model):
    prompts = random_prompts([64, 60, 5], seed=3)
    # min_length above every budget blocks the end tokens: each sample uses its whole budget.
    out = model.generate(prompts, GREEDY, {"max_length": 30, "min_length": 100})
    assert out.response_lengths == [0, 4, 30]
    assert out.ended == [False, False, False]
    with pytest.raises(ValueError, match="prompt 0 has 65 tokens"):
        model.generate(random_prompts([65]), GREEDY, {"max_length": 1, "min_length": 0})


def test_end_token_and_end_strings_stop_generation(model):
    prompts = random_prompts([5, 8], seed=4)
    length = {"max_length": 12, "min_length": 0}
    free = model.generate(prompts, GREEDY, length).response_ids
    output_weight = model.model.output_layer.weight
    original = output_weight[EXTRA_ID].clone()
    try:
        # Make <extra_id_1> beat the third greedy token of sample 0: logit(extra) = 2 * logit(that token) > 0.
        with torch.no_grad():
            output_weight[EXTRA_ID] = 2 * output_weight[free[0][2]]
        stopped = model.generate(prompts, {**GREEDY, "end_strings": SPECIAL_TOKENS}, length)
        response = stopped.response_ids[0]
        assert stopped.ended[0] and response[-1] == EXTRA_ID and len(response) <= 3
        assert response[:-1] == free[0][: len(response) - 1]
        # min_length blocks it until 5 tokens are out; until then the greedy path is unchanged.
        late = model.generate(prompts, {**GREEDY, "end_strings": SPECIAL_TOKENS}, {**length, "min_length": 5})
        assert late.response_ids[0][:5] == free[0][:5]
        assert EXTRA_ID not in late.response_ids[0][:5]
    finally:
        with torch.no_grad():
            output_weight[EXTRA_ID] = original
    # A multi-token end string stops where the decoded response first ends with it. The random model also emits
    # ids 256-511, which the byte-level tokenizer decodes to nothing: take two tokens that decode to two characters.
    decode = model.tokenizer.ids_to_text
    sample, start = next((s, n) for s in (0, 1) for n in range(10) if len(decode(free[s][n : n + 2])) == 2)
    target = decode(free[sample][start : start + 2])
    stop_at = next(n for n in range(1, 13) if decode(free[sample][:n]).endswith(target))
    by_text = model.generate(prompts, {**GREEDY, "end_strings": [target]}, length)
    assert by_text.response_ids[sample] == free[sample][:stop_at] and by_text.ended[sample]


def test_generate_restores_training_mode_and_validates(model):
    model.train()
    model.generate([[5, 6]], GREEDY, {"max_length": 2, "min_length": 0})
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="one seed per prompt"):
        model.generate([[5, 6]], SAMPLING, {"max_length": 2, "min_length": 0})
    with pytest.raises(ValueError, match="sampling_params.add_BOS"):
        model.generate([[5, 6]], {**GREEDY, "add_BOS": True}, {"max_length": 2, "min_length": 0})
    with pytest.raises(ValueError, match="prompt 1 has 0 tokens"):
        model.generate([[5], []], GREEDY, {"max_length": 2, "min_length": 0})
    with pytest.raises(ValueError, match="length_params: missing keys \\['min_length'\\]"):
        model.generate([[5]], GREEDY, {"max_length": 2})
