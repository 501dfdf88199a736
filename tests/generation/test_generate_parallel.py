"""Generation at tensor parallelism 2 (2 gloo processes) against one process."""

from __future__ import annotations

import pytest
import torch

from nemo_aligner.generation import GenerationOutput
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.utils.utils import load_and_override_model_config
from tests.conftest import perturb_, tiny_model_cfg
from tests.distributed.multiprocess import restore_at_layout, run_distributed
from tests.generation.test_generate import GREEDY, SAMPLING, random_prompts, reference_greedy

pytestmark = pytest.mark.distributed

LENGTH = {"max_length": 20, "min_length": 0}
GREEDY_WITH_LOGPROBS = {**GREEDY, "compute_logprob": True}


def tp2_generate(path: str, prompts: list[list[int]], seeds: list[int]) -> dict[str, GenerationOutput]:
    """Runs on each of 2 ranks: restore the TP=1 file at TP=2 and generate greedily and by sampling."""
    cfg = load_and_override_model_config(path, {"tensor_model_parallel_size": 2})
    model = restore_at_layout(MegatronGPTModel, cfg, path).eval()
    return {
        "greedy": model.generate(prompts, GREEDY_WITH_LOGPROBS, LENGTH),
        "sampled": model.generate(prompts, SAMPLING, LENGTH, seeds),
    }


def test_tp2_generation_equals_one_process(tmp_path):
    model = MegatronGPTModel(tiny_model_cfg()).eval()
    perturb_(model)
    model.save_to(tmp_path / "tp1.nemo")
    prompts = random_prompts([50, 56, 3, 10], seed=5)
    seeds = [31, 32, 33, 34]
    greedy = model.generate(prompts, GREEDY_WITH_LOGPROBS, LENGTH)
    sampled = model.generate(prompts, SAMPLING, LENGTH, seeds)

    ranks = run_distributed(
        "tests.generation.test_generate_parallel:tp2_generate",
        nprocs=2,
        out_dir=tmp_path / "out",
        path=str(tmp_path / "tp1.nemo"),
        prompts=prompts,
        seeds=seeds,
    )
    for rank in ranks:
        for i, prompt in enumerate(prompts):
            # Equal up to the first near-tie of the top-2 logits (TP reductions round differently, ~1e-6).
            _, trusted = reference_greedy(model, prompt, greedy.response_lengths[i])
            assert rank["greedy"].response_ids[i][:trusted] == greedy.response_ids[i][:trusted]
            if trusted == greedy.response_lengths[i]:
                assert (rank["greedy"].logprobs[i] - greedy.logprobs[i]).abs().max() < 1e-5
        # A draw changes only if its uniform falls within ~1e-6 of a CDF boundary; these keys do not.
        assert rank["sampled"].token_ids == sampled.token_ids
    assert ranks[0]["greedy"].token_ids == ranks[1]["greedy"].token_ids
    assert torch.equal(torch.cat(ranks[0]["greedy"].logprobs), torch.cat(ranks[1]["greedy"].logprobs))
